"""Trials in one process without Ray (layercard.train.local) against the same trial on Ray Train: the loop
both run is one function, so one seed must give the same losses, bit for bit. The local trials run in a
subprocess: they start a one-process torch.distributed group, which must not leak into other tests."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import numpy as np
import pytest

from layercard.train.local import LocalHost, RowShard
from tests.train.test_train import train_cfg

# the local side: two trials (another layer set, another seed) with the base eval measured once
LOCAL = """
import json, sys
from pathlib import Path
from layercard.config import load_config
from layercard.train.config import TrainConfig
from layercard.train.local import run_trials
from layercard.train.worker import prepare, worker_config
args = json.loads(sys.argv[1])
cfg = load_config(TrainConfig, args["yaml"], args["overrides"])
plan = prepare(cfg)
base = worker_config(cfg, plan, Path(args["tmp"]))
rows = run_trials(base, args["trials"], plan)
print(json.dumps(rows, default=str))
"""

OVERRIDES = ["num_workers=1", "cpus_per_worker=0.49", "lora_dropout=0.1", "strategy=all", "steps=6",
             "report_every=2", "checkpoint_every=100"]


def test_row_shard_reads_as_ray_data_does():
    rows = [{"input_ids": [i, i + 1], "labels": [-100, i + 1]} for i in range(5)]
    batches = list(RowShard(rows).iter_batches(batch_size=2, batch_format="numpy"))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    assert [list(x) for b in batches for x in b["input_ids"]] == [r["input_ids"] for r in rows]
    host = LocalHost(None, {"train": rows})
    with host.resume_dir() as d:
        assert d is None
    host.report({"step": 1})
    assert host.reports == [{"step": 1}] and (host.rank, host.world) == (0, 1)


@pytest.mark.slow
def test_local_trials_match_ray_train(ray_local, tmp_path):
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from layercard.train.worker import prepare, train_func, worker_config
    from tests.train.test_train import FAST, TINY_YAML

    cfg = train_cfg(*OVERRIDES)
    plan = prepare(cfg)
    base = worker_config(cfg, plan, tmp_path)
    trials = [{"key": "all-s0", "seed": 0}, {"key": "all-s1", "seed": 1}]

    def on_ray(seed: int) -> dict:
        def ds(rows):        # as a search trial builds its datasets (layercard.search.trials.trial_function)
            return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4)))

        loop = {**base.to_dict(), "seed": seed}
        result = TorchTrainer(train_func, train_loop_config=loop, torch_config=TorchConfig(backend="gloo"),
                              scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.49}),
                              run_config=RunConfig(storage_path=str(tmp_path / "ray"), name=f"run-{uuid.uuid4().hex[:6]}"),
                              datasets={"train": ds(plan.train), "eval": ds(plan.eval)}).fit()
        assert result.error is None
        return result.metrics

    args = {"yaml": str(TINY_YAML), "overrides": [*FAST, *OVERRIDES], "tmp": str(tmp_path), "trials": trials}
    proc = subprocess.run([sys.executable, "-c", LOCAL, json.dumps(args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    local = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["key"] for r in local] == ["all-s0", "all-s1"]
    # the second local trial reused the first one's base-model eval; Ray measures its own
    row, ray_metrics = local[1], on_ray(trials[1]["seed"])
    assert row["step"] == ray_metrics["step"] == 6
    assert row["train_loss_history"] == ray_metrics["train_loss_history"]
    assert row["eval_loss"] == ray_metrics["eval_loss"] and row["quality"] == ray_metrics["quality"]
    assert row["initial_eval_loss"] == ray_metrics["initial_eval_loss"] == local[0]["initial_eval_loss"]
    # another seed, another run (dropout and LoRA init draw from it)
    assert local[0]["train_loss_history"] != local[1]["train_loss_history"]
    assert np.isfinite(local[1]["eval_loss"])
