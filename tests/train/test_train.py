"""LoRA training: the backprop-depth guard in-process, then real 2-worker Ray Train + DeepSpeed runs
on a tiny random Qwen3 (4 layers, hidden 64) with the ``ray_local`` fixture (2 CPUs)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layercard.train import training
from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.train.losses import lm_loss_sum
from layercard.models import ModelConfig, load_model
from layercard.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs" / "train-tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny.jsonl"
TINY = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256)
TARGETS = ["q_proj", "v_proj", "down_proj"]
# Small and quick on 2 cores: 8 steps of 4 examples of <= 32 tokens per worker.
FAST = ["steps=8", "batch_size=4", "data.max_seq_len=32", "warmup_steps=1", "lr=0.01",
        "report_every=4", "checkpoint_every=4"]


def tiny_model():
    return load_model(ModelConfig(config=dict(TINY)))


def write_selection(path: Path, layers: list[int], weights_hash: str) -> Path:
    from peft import LoraConfig

    LoraConfig(target_modules=TARGETS, layers_to_transform=layers, layers_pattern="layers", r=4,
               lora_alpha=8).save_pretrained(str(path))
    (path / "selection.json").write_text(json.dumps({"layers": layers, "weights_hash": weights_hash,
                                                     "card_id": "test-card"}))
    return path


@pytest.fixture(scope="module")
def weights_hash():
    return tiny_model().weights_hash


@pytest.fixture(scope="module")
def selection(tmp_path_factory, weights_hash):
    return write_selection(tmp_path_factory.mktemp("sel"), [2, 3], weights_hash)


def train_cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, TINY_YAML, [*FAST, *overrides])


# --------------------------------------------------------------------------- no Ray
def test_tiny_yaml_loads_and_validates():
    cfg = load_config(TrainConfig, TINY_YAML, ["strategy=all"])
    assert cfg.zero_stage in (2, 3) and cfg.num_workers == 2 and cfg.model.config["num_hidden_layers"] == 4
    with pytest.raises(LayercardError, match="zero_stage"):
        load_config(TrainConfig, TINY_YAML, ["strategy=all", "zero_stage=1"])
    with pytest.raises(LayercardError, match="exactly one of selection"):
        load_config(TrainConfig, TINY_YAML, [])
    with pytest.raises(LayercardError, match="fail_at_step"):
        load_config(TrainConfig, TINY_YAML, ["strategy=all", "steps=4", "fail_at_step=9"])


def test_no_activation_gradient_below_the_lowest_adapted_layer(tmp_path, weights_hash):
    sel = training.read_selection(write_selection(tmp_path, [3], weights_hash))
    model = training.build_lora_model(tiny_model().model, sel.lora)
    assert training.adapted_layers(model) == [3]
    blocks = training.find_blocks_of(model)
    fired = []
    blocks[0].register_full_backward_hook(lambda *a: fired.append(0))
    blocks[2].register_full_backward_hook(lambda *a: fired.append(2))
    blocks[3].register_full_backward_hook(lambda *a: fired.append(3))
    ids = torch.randint(3, 256, (2, 16))
    with pytest.warns(UserWarning, match="no inputs require gradients"):  # block 3: outputs only
        lm_loss_sum(model(input_ids=ids).logits, ids).backward()
    assert fired == [3]
    assert all(p.grad is None for p in blocks[0].parameters())


def test_backprop_depth_guard_names_the_culprit(tmp_path, weights_hash):
    sel = training.read_selection(write_selection(tmp_path, [2, 3], weights_hash))
    model = training.build_lora_model(tiny_model().model, sel.lora)
    base = model.get_base_model()
    base.enable_input_require_grads()
    with pytest.raises(LayercardError, match="enable_input_require_grads"):
        training.check_backprop_depth(model)
    base.disable_input_require_grads()
    training.find_blocks_of(model)[0].gradient_checkpointing = True
    with pytest.raises(LayercardError, match="gradient checkpointing is on for frozen layer 0"):
        training.check_backprop_depth(model)
    training.find_blocks_of(model)[0].gradient_checkpointing = False
    base.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(LayercardError, match="embeddings require grad"):
        training.check_backprop_depth(model)


def test_deepspeed_config():
    ds = training.deepspeed_config(zero_stage=3, lr=1e-3, warmup_steps=2, steps=10, batch_size=4, world_size=2,
                                   bf16=False, overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["train_batch_size"] == 8
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
    with pytest.raises(LayercardError, match="zero_stage"):
        training.deepspeed_config(zero_stage=1, lr=1e-3, warmup_steps=0, steps=1, batch_size=1, world_size=1, bf16=False)


def test_eval_sums_scores_answers_exactly():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, 7, 8]])
    logits = torch.full((2, 4, 10), -10.0)
    logits[0, 1, 5] = logits[0, 2, 6] = 10.0          # example 0: both answer tokens right
    logits[1, 1, 7] = logits[1, 2, 1] = 10.0          # example 1: second answer token wrong
    sums = training.eval_sums(logits, labels)
    assert sums["tokens"] == 4 and sums["examples"] == 2 and sums["correct"] == 1
    assert training.eval_metrics(sums, True)["metric"] == 0.5
    assert training.eval_metrics(sums, False)["metric"] is None


def test_selection_for_another_model_is_refused(tmp_path, weights_hash):
    from layercard.train.run import run_training

    sel = write_selection(tmp_path / "sel", [2, 3], "0123456789abcdef")
    with pytest.raises(LayercardError, match=f"0123456789abcdef.*{weights_hash}"):
        run_training(train_cfg(f"selection={sel}"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_selection_without_a_hash_is_checked_against_its_card(tmp_path, weights_hash):
    sel = write_selection(tmp_path / "sel", [2, 3], weights_hash)
    (sel / "selection.json").write_text(json.dumps({"layers": [2, 3], "card_dir": "../card"}))
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "card.json").write_text(json.dumps({"model": {"weights_hash": "feedfacefeedface"}}))
    with pytest.raises(LayercardError, match=f"feedfacefeedface, the configured model's is {weights_hash}"):
        training.check_selection_for_model(training.read_selection(sel), weights_hash)


def test_a_selection_without_a_sequence_format_takes_its_cards(tmp_path, weights_hash):
    """selection.json records how its card built sequences; an older one points at its card, or at
    nothing (then it was built the legacy way: no BOS, no answer EOS, no chat template)."""
    from layercard.data.examples import check_sequence_format

    sel = write_selection(tmp_path / "sel", [2, 3], weights_hash)
    assert training.read_selection(sel).sequences is None
    (sel / "selection.json").write_text(json.dumps({"layers": [2, 3], "card_dir": "../card"}))
    (tmp_path / "card").mkdir()
    fmt = {"bos_id": 1, "answer_eos": False, "chat_template": None}
    (tmp_path / "card" / "card.json").write_text(json.dumps({"weights_hash": weights_hash, "sequences": fmt}))
    assert training.read_selection(sel).sequences == fmt
    with pytest.raises(LayercardError, match=r"selection 's' was built from sequences with bos_id=1, "
                                              r"this data gives bos_id=None"):
        check_sequence_format(training.read_selection(sel).sequences, {**fmt, "bos_id": None}, "selection 's'")


@pytest.mark.parametrize("answers, message", [
    ("[' negative', ' positive']", "share a first token"),               # the byte tokenizer: both start with ' '
    ("[a, b]", r"eval example \d+ answers with token \d+, none of label_answers"),
    ("[a]", "'label_answers' needs at least 2 answers"),
])
def test_bad_label_answers_are_refused(answers, message):
    from layercard.train.worker import prepare

    with pytest.raises(LayercardError, match=message) as exc:
        prepare(train_cfg("strategy=all", f"label_answers={answers}"))
    assert "\n" not in str(exc.value)


def test_bad_loss_settings_are_refused(tmp_path):
    from layercard.train.worker import prepare

    with pytest.raises(LayercardError, match="config key 'loss' must be 'lm' or 'label', got 'mse'"):
        train_cfg("strategy=all", "loss=mse")
    with pytest.raises(LayercardError, match="'loss: label' needs 'label_answers'"):
        train_cfg("strategy=all", "loss=label")
    # eval answers are labels, training answers (with their leading space) are not: named, one line
    evals = tmp_path / "eval.jsonl"
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    evals.write_text("".join(json.dumps({**r, "answer": r["answer"].strip()}) + "\n" for r in rows))
    with pytest.raises(LayercardError, match=r"^training example 0 answers with token \d+, none of label_answers"):
        prepare(train_cfg("strategy=all", "loss=label", "label_answers=[negative, positive]",
                                f"eval_data={{path: {evals}, prompt_column: prompt, answer_column: answer}}"))


def test_worker_config_round_trips_through_its_dict_form(tmp_path):
    from layercard.train.worker import WORKER_SCHEMA_VERSION, WorkerConfig, prepare, worker_config

    cfg = train_cfg("strategy=all")
    typed = worker_config(cfg, prepare(cfg), tmp_path)
    data = typed.to_dict()
    assert data["schema_version"] == WORKER_SCHEMA_VERSION
    assert json.loads(json.dumps(data)) == data                  # what Ray Train / Tune pass on
    assert WorkerConfig.from_dict(data) == typed


@pytest.mark.parametrize("change, key", [
    ({"schema_version": 0}, "schema_version"),
    ({"schema_version": None}, "schema_version"),
    ({"learning_rate": 1e-3}, "learning_rate"),                 # a key this version does not know
    ({"steps": "many"}, "steps"),
    ({"model": {"nam": "x"}}, "model.nam"),
])
def test_worker_refuses_an_untyped_or_foreign_config(tmp_path, change, key):
    """A worker given a dict of another schema version, or with an unknown or ill-typed key, fails at
    once with one line naming the key (before Ray or the model is touched)."""
    from layercard.train.worker import prepare, train_func, worker_config

    cfg = train_cfg("strategy=all")
    data = {**worker_config(cfg, prepare(cfg), tmp_path).to_dict(), **change}
    with pytest.raises(LayercardError) as exc:
        train_func(data)
    assert f"{key}'" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("missing", ["schema_version", "lr"])
def test_worker_refuses_a_config_missing_a_key(tmp_path, missing):
    from layercard.train.worker import prepare, train_func, worker_config

    cfg = train_cfg("strategy=all")
    data = worker_config(cfg, prepare(cfg), tmp_path).to_dict()
    del data[missing]
    with pytest.raises(LayercardError) as exc:
        train_func(data)
    assert f"'{missing}'" in str(exc.value) and "\n" not in str(exc.value)


def test_existing_out_is_refused_before_training(tmp_path, capsys):
    from pipelines import train

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text("{}")
    rc = train.main(["--config", str(TINY_YAML), "--out", str(tmp_path / "out"), "strategy=all"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "metrics.json").read_text() == "{}"        # the earlier result is untouched


def test_resume_from_a_run_directory_others_can_write_is_refused(tmp_path, capsys):
    """Resuming unpickles the run's DeepSpeed checkpoint: a storage path writable by group/others is refused."""
    import os

    from pipelines import train

    run = tmp_path / "ray" / "train"
    run.mkdir(parents=True)
    os.chmod(run, 0o777)
    rc = train.main(["--config", str(TINY_YAML), "--out", str(tmp_path / "out"), "strategy=all",
                     f"storage_path={tmp_path / 'ray'}", "name=train"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to resume" in err and str(run) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_rejects_zero_stage_1(tmp_path, capsys):
    from pipelines import train

    rc = train.main(["--config", str(TINY_YAML), "--out", str(tmp_path), "strategy=all", "zero_stage=1"])
    assert rc == 2 and "zero_stage" in capsys.readouterr().err


# --------------------------------------------------------------------------- real Ray Train + DeepSpeed
def test_more_workers_than_cpus_is_an_error(ray_local, tmp_path):
    from layercard.train.run import run_training

    with pytest.raises(LayercardError, match="num_workers=3 .* needs 3 CPUs but the Ray cluster has 2"):
        run_training(train_cfg("strategy=all", "num_workers=3"), tmp_path / "out")


def check_adapter(out: Path, layers: list[int]):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(tiny_model().model, str(out / "adapter"))
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    want = {f"base_model.model.model.layers.{i}.{p}" for i in layers
            for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert set(lora) == want
    trained = [m.lora_B["default"].weight.abs().max().item() for m in lora.values()]
    assert min(trained) > 0  # lora_B starts at zero: the saved weights are the trained ones


def check_metrics(m: dict, zero_stage: int, metric_name: str = "accuracy", helped: bool = True):
    assert m["steps"] == 8 and m["zero_stage"] == zero_stage and m["num_workers"] == 2
    if helped:   # training helped
        assert m["eval_loss"] < m["initial_eval_loss"] - 0.05, (m["eval_loss"], m["initial_eval_loss"])
    assert 0.0 <= m["metric"] <= 1.0 and m["metric_name"] == metric_name
    assert m["adapter_layers"] == [2, 3] and m["selection_layers"] == [2, 3] and m["lowest_adapted_layer"] == 2
    assert m["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64))   # r=4: q, v, down on 2 layers
    assert m["card_id"] == "test-card"
    assert len(m["peak_memory_bytes"]) == 2 and min(m["peak_memory_bytes"]) > 50e6
    assert m["median_step_s"] > 0 and m["train_tokens_per_s"] > 0 and m["wall_time_s"] > 0


def test_zero2_run_trains_the_selected_layers(ray_local, tmp_path, selection):
    from layercard.train.worker import prepare
    from pipelines import train

    # Answers without the leading space, so the byte tokenizer's first answer tokens differ ('n', 'p').
    data = tmp_path / "labelled.jsonl"
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "answer": r["answer"].strip()}) + "\n" for r in rows))
    labelled = [f"data.path={data}", "label_answers=[negative, positive]", "loss=label"]   # trained on the label loss
    args = ["--config", str(TINY_YAML), *FAST, f"selection={selection}", "zero_stage=2", *labelled,
            f"storage_path={tmp_path / 'ray'}"]
    assert train.main(["--out", str(tmp_path / "out"), *args]) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # 8 steps on the label loss do not teach a random tiny model the labels (0.694 → 0.699 measured);
    # what this run checks is that it trained on the label loss (below) and reports it exactly.
    check_metrics(m, 2, metric_name="label_accuracy", helped=False)
    assert m["label_loss"] == m["quality"] and m["quality_name"] == "label_loss"
    assert m["initial_quality"] == m["initial_label_loss"]
    # The reported label loss and accuracy equal an independent evaluation of the saved adapter on
    # the same held-out examples (summed over the two workers' shards in the run).
    from peft import PeftModel

    from layercard.train import training
    from layercard.data.examples import batches_of

    plan = prepare(train_cfg(f"selection={selection}", *labelled))
    model = PeftModel.from_pretrained(tiny_model().model, str(tmp_path / "out" / "adapter")).eval()
    fwd = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    ref = training.eval_metrics(training.evaluate(fwd, batches_of(plan.eval, 3, plan.pad_id), "cpu",
                                                  plan.label_token_ids), with_accuracy=True)
    assert m["label_loss"] == pytest.approx(ref["label_loss"], rel=1e-5)
    assert m["metric"] == pytest.approx(ref["metric"]) and m["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    hist = m["train_loss_history"]
    assert m["resumed_from_step"] == 0 and len(hist) == 8
    # the trained objective was the label loss (two answers: ≈ ln 2 for this model), not the answer
    # tokens' full-vocabulary loss (≈ ln 256 ≈ 5.5 for it: the initial eval loss)
    assert all(0.4 < h < 1.0 for h in hist), hist
    assert m["initial_eval_loss"] > 4.0
    check_adapter(tmp_path / "out", [2, 3])

    # The same run again (same storage and name): Ray Train hands it the final checkpoint, which keeps
    # the final metrics, so nothing trains and it reports what the finished run measured — as a Tune
    # trial does when a search was interrupted after the trial's last checkpoint but before Tune saw it end.
    assert train.main(["--out", str(tmp_path / "again"), *args]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    for key in ("label_loss", "metric", "median_step_s", "train_loss_history", "peak_memory_bytes", "resumed_from_step"):
        assert again[key] == m[key], key
    check_adapter(tmp_path / "again", [2, 3])


def test_zero3_run_resumes_after_a_worker_is_killed(ray_local, tmp_path, selection):
    """ZeRO-3 (every tensor partitioned, so gathers really happen) and a hard kill of rank 0 at step 6:
    the run restarts from its step-4 checkpoint and finishes all 8 steps."""
    from layercard.train.run import run_training
    from layercard.train.worker import FAULT_MARKER

    # data.answer_eos=false: the sequences the selection's (unrecorded, so legacy) card was built from
    cfg = train_cfg(f"selection={selection}", "zero_stage=3", "fail_at_step=6", "max_failures=1", "data.answer_eos=false",
                    "ds_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
    m = run_training(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "ray" / "train" / FAULT_MARKER).exists()   # the kill did happen
    assert m["resumed_from_step"] == 4 and len(m["train_loss_history"]) == 4  # steps 5..8 on the 2nd attempt
    check_metrics(m, 3)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 8
    check_adapter(tmp_path / "out", [2, 3])


BUILD_SHM_OP = """
import importlib, os
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from layercard.train import training
assert training.skip_shm_op_build() is False        # a compiler is there: DeepSpeed may build its op
op = importlib.import_module("deepspeed.comm.torch").build_shm_op()
assert op is not None and hasattr(op, "initialize")
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (the other runs cover the no-compiler path)")
def test_with_a_compiler_deepspeed_ops_build_once_and_load_from_the_cache(tmp_path):
    """The compiler path: DeepSpeed JIT-builds its shm comm op into TORCH_EXTENSIONS_DIR, and a
    second process loads the cached build instead of compiling again."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    run = lambda: subprocess.run([sys.executable, "-c", BUILD_SHM_OP], env=env, capture_output=True,  # noqa: E731
                                 text=True, timeout=600)
    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    built = {p: p.stat().st_mtime_ns for p in (tmp_path / "ext").rglob("*.so")}
    assert built, "no compiled op in TORCH_EXTENSIONS_DIR"
    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ext").rglob("*.so")} == built   # not rebuilt


def test_result_table_shows_what_the_run_measured():
    from pipelines.train import result_table

    m = {"adapter_layers": [2, 3], "steps": 8, "final_train_loss": 2.5, "eval_loss": 2.25, "label_loss": None,
         "metric": None, "median_step_s": 0.1234, "train_tokens_per_s": 812.4}
    assert result_table(m).splitlines() == ["| layers | steps | train loss | eval loss | s/step | tokens/s |",
                                            "|---|---|---|---|---|---|",
                                            "| [2, 3] | 8 | 2.5000 | 2.2500 | 0.123 | 812 |"]
