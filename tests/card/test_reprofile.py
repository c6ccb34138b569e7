"""Scheduled re-profiling end to end: a local head (127.0.0.1, token auth, started and stopped by
the test), a baseline version, then `ray job submit` of `pipelines.reprofile` twice — same data on
Ray actors (exit 0) and a perturbed checkpoint (exit 3, changed layers named) — and the store
listing all versions; a `pipelines.profile` job on a Ray actor runs on the same head meanwhile."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from layercard.card.layer_card import LayerCard
from layercard.card.store import CardStore
from pipelines import cards as cards_cli
from pipelines import reprofile
from layercard.runtime import run_main
from ray_head import ray_bin, start_head, stop_head, wait_started

ROOT = Path(__file__).resolve().parents[2]
# float64: the Ray layout must reproduce the single-process card closely enough to rank identically.
FAST = ["data.num_samples=16", "coupling.probe_samples=8", "cost.measure=false", "model.dtype=float64"]


def submit(head, log: Path, *args: str, module: str = "pipelines.reprofile") -> subprocess.Popen:
    """`ray job submit` of ``module`` (waits for the job and streams its logs to ``log``), started in
    the background."""
    cmd = [ray_bin(), "job", "submit", "--address", head.dashboard, "--submission-id", f"job-{uuid.uuid4().hex[:8]}",
           "--working-dir", str(ROOT), "--", sys.executable, "-m", module, "--config", "configs/tiny.yaml", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=head.env, stdout=f, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    proc.wait(timeout=600)
    return proc.returncode, proc.log.read_text()


@pytest.mark.slow
def test_reprofile_job_submit(tmp_path, capsys):
    head, booting = start_head(tmp_path / "head", wait=False)
    store = tmp_path / "store"
    jobs = []
    try:
        # The baseline, in this process while the head boots: the first version of a model is exit 0.
        rc = run_main(reprofile.main, ["--config", str(ROOT / "configs" / "tiny.yaml"), "--store", str(store),
                                       "--out", str(tmp_path / "r0"), *FAST])
        assert rc == 0
        (base,) = CardStore(store).list_versions()
        assert json.loads((tmp_path / "r0" / "drift.json").read_text())["against"] is None
        wait_started(booting)

        # Token auth is on: the wrong token is refused.
        denied = subprocess.run([ray_bin(), "job", "list", "--address", head.dashboard],
                                env={**head.env, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True,
                                timeout=120)
        assert denied.returncode != 0

        # Two jobs at once, publishing to the same store. Same model and data, profiled on a Ray actor
        # inside the job: a new version, no drift. A perturbed checkpoint (another initialisation),
        # compared with the baseline: a new version, exit 3.
        same = submit(head, tmp_path / "same.log", "--store", f"file://{store}", "--out", str(tmp_path / "r1"),
                      *FAST, "ray.num_actors=1", "ray.num_cpus_per_actor=0.5")
        drift = submit(head, tmp_path / "drift.log", "--store", str(store), "--out", str(tmp_path / "r2"),
                       "--against", base.version, *FAST, "model.seed=1")
        # And a plain `layercard profile` job on a Ray actor, on the same head at the same time.
        profile = submit(head, tmp_path / "profile.log", "--out", str(tmp_path / "card"), *FAST, "ray.num_actors=1",
                         "ray.num_cpus_per_actor=0.5", module="pipelines.profile")
        jobs = [same, drift, profile]
        rc, out = finish(same)
        assert rc == 0 and f"no drift against {base.version}" in out, out[-4000:]
        r1 = json.loads((tmp_path / "r1" / "drift.json").read_text())
        assert not r1["drift"] and r1["rankings"]["gain_adj"]["kendall_tau"] == 1.0
        assert not r1["changes"]["weights"] and not r1["changes"]["data"] and not r1["changes"]["config"]

        rc, out = finish(drift)
        assert rc == 1 and "exit code 3" in out, out[-4000:]   # `ray job submit` reports a failed job as 1,
        r2 = json.loads((tmp_path / "r2" / "drift.json").read_text())   # the entrypoint's status in the message
        assert r2["drift"] and r2["exit_code"] == 3 and r2["changes"]["weights"] and r2["changed_layers"]
        assert f"changed layers: {', '.join(map(str, r2['changed_layers']))}" in out
        assert "# Drift report" in (tmp_path / "r2" / "drift.md").read_text()

        rc, out = finish(profile)
        assert rc == 0 and "succeeded" in out.lower(), out[-4000:]
        card = LayerCard.load(tmp_path / "card")
        assert card.meta["ray_layout"]["num_actors"] == 1
        assert len(card.layers) == 4 and np.isfinite(card.coupling_k).all()
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
        stop_head(head.temp_dir)

    versions = {v.version: v for v in CardStore(store).list_versions()}
    assert set(versions) == {base.version, r1["new"]["version"], r2["new"]["version"]}
    assert versions[r2["new"]["version"]].summary == {"against": base.version, "drift": True,
                                                       "changed_layers": r2["changed_layers"]}
    capsys.readouterr()
    assert cards_cli.main(["list", "--store", str(store), "--model", base.model_id]) == 0
    listing = capsys.readouterr().out
    assert base.version in listing and r1["new"]["version"] in listing and r2["new"]["version"] not in listing
    assert cards_cli.main(["list", "--store", str(store)]) == 0
    assert r2["new"]["version"] in capsys.readouterr().out
    assert cards_cli.main(["show", r2["new"]["version"], "--store", str(store)]) == 0
    assert "DRIFT" in capsys.readouterr().out


def test_bad_input_exits_2_before_profiling(tmp_path, capsys):
    from fake_cards import make_card

    CardStore(tmp_path / "store").publish(make_card())
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "o")]
    assert run_main(reprofile.main, [*args, "--against", "20990101T000000Z-000000000000"]) == 2
    assert "version '20990101T000000Z-000000000000' is not in store" in capsys.readouterr().err
    assert run_main(reprofile.main, [*args, "drift.min_kendall_tau=5"]) == 2
    assert "drift.min_kendall_tau" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    assert run_main(reprofile.main, args) == 2
    assert "already exists" in capsys.readouterr().err
    assert len(CardStore(tmp_path / "store").list_versions()) == 1


def test_killed_while_publishing_leaves_the_report_and_no_version(tmp_path, capsys):
    """The drift report is written before the version is published: a run SIGKILLed just before the
    version's rename leaves drift.json and no new version, and its rerun finds the same drift (exit 3)
    against the same predecessor (publishing first made the rerun compare the card with itself)."""
    import os
    import signal

    from layercard.atomic import KILL_ENV

    store = tmp_path / "store"
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--store", str(store)]
    assert run_main(reprofile.main, [*args, "--out", str(tmp_path / "r0"), *FAST]) == 0
    (base,) = CardStore(store).list_versions()
    drift = [*args, "--out", str(tmp_path / "r1"), "--against", base.version, *FAST, "model.seed=1"]
    killed = subprocess.run([sys.executable, "-m", "pipelines.reprofile", *drift], cwd=ROOT, timeout=600,
                            env={**os.environ, KILL_ENV: "store-staged"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    report = json.loads((tmp_path / "r1" / "drift.json").read_text())
    assert report["drift"] and report["exit_code"] == 3 and report["against"]["version"] == base.version
    assert [v.version for v in CardStore(store).list_versions()] == [base.version]
    assert run_main(reprofile.main, ["--overwrite", *drift, "profile.save_stats=true"]) == 3
    again = json.loads((tmp_path / "r1" / "drift.json").read_text())
    assert again["against"]["version"] == base.version and again["changed_layers"] == report["changed_layers"]
    versions = {v.version: v for v in CardStore(store).list_versions()}
    assert len(versions) == 2
    # the store keeps statistics only when asked: the baseline has none, the run with save_stats=true has them
    has_stats = {v: (Path(versions[v].path) / "stats.safetensors").is_file() for v in versions}
    assert has_stats == {base.version: False, again["new"]["version"]: True}
    assert CardStore(store).load(again["new"]["version"]).stats is not None
