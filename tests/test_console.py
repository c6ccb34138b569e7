"""What reaches the terminal: without --verbose, warnings and library INFO lines go to the log file."""
from __future__ import annotations

import io
import logging
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
    for name in ("py.warnings", "lc-test"):
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
