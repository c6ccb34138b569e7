"""What reaches the terminal: without --verbose, warnings and library INFO lines go to the log file."""
from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import pytest

from layercard import runtime


@pytest.fixture
def quiet(tmp_path, monkeypatch):
    """The quiet default (conftest runs the suite verbose), with a fresh log file under tmp_path."""
    monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    monkeypatch.setenv(runtime.LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.setattr(runtime, "_LOG", {})
    yield tmp_path / "logs"
    handler = runtime._LOG.get("handler")
    logging.captureWarnings(False)
    for name in ("py.warnings", "lc-test", "layercard.raylet"):
        if handler is not None and handler in logging.getLogger(name).handlers:
            logging.getLogger(name).removeHandler(handler)
    logging.getLogger("py.warnings").propagate = True


def _warn_and_info(argv):
    warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
    print("the pipeline's own line")
    return 0 if argv == ["x=1"] else 1


def test_warnings_go_to_the_log_file(quiet, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert runtime.run_main(_warn_and_info, ["x=1"]) == 0
    out, err = capfd.readouterr()
    assert "the pipeline's own line" in out
    assert "is_gradient_checkpointing" not in out + err
    (log,) = quiet.iterdir()
    assert "FutureWarning" in log.read_text()


def test_verbose_keeps_warnings_on_the_terminal(quiet, monkeypatch):
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
        assert runtime.run_main(_warn_and_info, ["--verbose", "x=1"]) == 0   # --verbose is taken out of argv
    assert runtime.verbose()
    assert not quiet.exists()


def test_library_info_lines_go_to_the_log_file(quiet):
    stream = io.StringIO()
    logger = logging.getLogger("lc-test")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers = [logging.StreamHandler(stream)]
    runtime.reroute_logger("lc-test")
    runtime.reroute_logger("lc-test")                      # idempotent
    logger.info("Started a local Ray instance.")
    logger.warning("a real problem")
    assert stream.getvalue() == "a real problem\n"
    (log,) = quiet.iterdir()
    text = log.read_text()
    assert "Started a local Ray instance." in text and text.count("a real problem") == 1


def test_quiet_tune_prints_no_experiment_table(quiet, ray_local, tmp_path, monkeypatch, capfd):
    """Unless verbose, a Tune run (what ``layercard search`` drives) adds nothing to the terminal: the
    newer console engine's experiment table and TensorBoard hint are off."""
    from ray import tune

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "")            # recorded, so teardown restores the suite's value
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT")
    assert runtime.ray_init_kwargs() == {"log_to_driver": False}
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"

    def trainable(config):
        tune.report({"score": config["x"]})

    capfd.readouterr()
    grid = tune.Tuner(trainable, param_space={"x": tune.grid_search([1, 2])},
                      run_config=tune.RunConfig(name="quiet", storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    assert sorted(r.metrics["score"] for r in grid) == [1, 2]
    out, err = capfd.readouterr()
    assert "Configuration for experiment" not in out + err and "tensorboard" not in (out + err).lower()


def test_select_step_budget_from_a_train_config():
    """``layercard select --train-config`` reads ρ = Σ lr_t from a train YAML that names no selection."""
    from argparse import Namespace

    from layercard.profile.adam_step import step_budget
    from layercard.config import load_config
    from layercard.train.config import TrainConfig
    from layercard.select.run import step_budget_of

    path = str(Path(__file__).resolve().parents[1] / "configs" / "train-smollm2.yaml")
    t = load_config(TrainConfig, path, ["strategy=all"])
    rho = step_budget_of(Namespace(step_budget=None, train_config=path))
    assert rho == pytest.approx(step_budget(t.lr, t.steps, t.warmup_steps)) and rho > 0


def test_quiet_routes_raylet_worker_count_notice_to_log(quiet, capfd):
    """The raylet's "N PYTHON worker processes have been started" (every search on a small node trips it)
    goes to the log file; anything else the raylet pushes still reaches the terminal."""
    import ray._private.worker as ray_worker

    runtime.ray_init_kwargs()
    runtime.route_raylet_notices()                         # idempotent: wrapped once
    assert getattr(ray_worker.print_to_stdstream, "layercard_routed", False)
    notice = ("WARNING: 8 PYTHON worker processes have been started on node: 7b5a with address: 192.0.2.2, "
              "which is 4x the maximum expected startup concurrency (2).")
    capfd.readouterr()
    ray_worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": [notice, "a worker died unexpectedly"], "pid": "raylet",
                                   "is_err": False}, ignore_prefix=False)
    out, err = capfd.readouterr()
    assert "PYTHON worker processes" not in out + err
    assert "a worker died unexpectedly" in out
    (log,) = quiet.iterdir()
    assert log.read_text().count("PYTHON worker processes have been started") == 2
