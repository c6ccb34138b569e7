"""``layercard profile`` / ``layercard show`` end to end, and the one-line errors (exit 2) of bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layercard.card.layer_card import LayerCard
from pipelines import cli

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny.yaml"



@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs/tiny.yaml names its data relative to the repository root


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "card"
    cwd = os.getcwd()
    os.chdir(REPO)  # module-scoped: set up before the autouse chdir above
    try:
        assert cli.main(["profile", "--config", TINY, "--out", str(out), "cost.measure=false"]) == 0
    finally:
        os.chdir(cwd)
    return out


def test_profile_writes_a_valid_card(card_dir):
    card = LayerCard.load(card_dir)
    assert list(card.layers["layer"]) == [0, 1, 2, 3]
    assert card.meta["rank"] == 4 and card.meta["n_records"] == 128
    assert card.coupling_k is not None  # the coupling pass ran (coupling.enabled defaults to true)
    assert card.meta["config"]["cost"]["measure"] is False


def test_show_prints_the_layer_table(card_dir, capsys):
    assert cli.main(["show", str(card_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "n_tokens"])
    assert "res_frac" in lines[header] and "gain_adj" in lines[header]
    rows = lines[header + 1: header + 5]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2, 3]
    assert LayerCard.load(card_dir).card_id in out


def test_show_missing_card(tmp_path, capsys):
    assert cli.main(["show", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "card.json" in err and err.count("\n") == 1


def _empty_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return str(path)


BAD = {
    "missing model path": (lambda tmp: ["model.config=null", "model.path=/nonexistent/model"], "/nonexistent/model"),
    "target modules match nothing": (lambda tmp: ["profile.target_modules=[q_proj,qq_proj]"], "qq_proj"),
    "layer out of range": (lambda tmp: ["profile.layers=[0,9]"], "[9]"),
    "empty dataset": (lambda tmp: [f"data.path={_empty_jsonl(tmp)}"], "empty.jsonl"),
    "missing data column": (lambda tmp: ["data.prompt_column=question"], "question"),
    "ridge zero": (lambda tmp: ["profile.ridge=0"], "profile.ridge"),
    "ridge negative": (lambda tmp: ["profile.ridge=-1e-3"], "profile.ridge"),
    "unknown config key": (lambda tmp: ["profile.rnk=4"], "profile.rnk"),
    "ill-typed value": (lambda tmp: ["profile.rank=x"], "profile.rank"),
    "missing data file": (lambda tmp: ["data.path=/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    "unknown loss": (lambda tmp: ["profile.loss=mse"], "profile.loss"),
    "label loss without answers": (lambda tmp: ["profile.loss=label"], "profile.label_answers"),
    "label answers sharing a first token": (lambda tmp: ["profile.loss=label", "profile.label_answers=[' no', ' yes']"],
                                            "share a first token"),
    "calibration answer outside the labels": (lambda tmp: ["profile.loss=label", "profile.label_answers=[a, b]"],
                                              "calibration example 0 answers with token"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_error(case, tmp_path, capsys):
    overrides, culprit = BAD[case]
    out = tmp_path / "card"
    code = cli.main(["profile", "--config", TINY, "--out", str(out), "cost.measure=false", *overrides(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error:"), err
    assert err.count("\n") == 1, err
    assert culprit in err
    assert not out.exists()


def test_existing_output_is_refused(tmp_path, capsys):
    out = tmp_path / "card"
    out.mkdir()
    code = cli.main(["profile", "--config", TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert str(out) in err and "already exists" in err


def test_missing_config_file(tmp_path, capsys):
    code = cli.main(["profile", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "card")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "nope.yaml" in err and err.count("\n") == 1


def test_unknown_command(capsys):
    assert cli.main(["profil"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown command 'profil'")


def test_console_script(tmp_path):
    """The installed ``layercard`` entry point runs the profile pipeline in a fresh process."""
    exe = Path(sys.executable).parent / "layercard"
    assert exe.is_file(), f"console script missing at {exe} (pip install -e .)"
    out = tmp_path / "card"
    proc = subprocess.run(
        [str(exe), "profile", "--config", TINY, "--out", str(out), "cost.measure=false", "data.num_samples=16",
         "coupling.enabled=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"written to {out}" in proc.stdout
    assert LayerCard.load(out).meta["n_records"] == 16


def test_profile_saves_small_statistics_by_default(card_dir):
    assert (card_dir / "stats.safetensors").is_file()   # save_stats: null, statistics under 2 GiB
    assert LayerCard.load(card_dir, with_stats=True).stats is not None


def test_profile_without_statistics_still_selects(tmp_path, capsys):
    out = tmp_path / "card"
    assert cli.main(["profile", "--config", TINY, "--out", str(out), "cost.measure=false",
                     "profile.save_stats=false"]) == 0
    assert "not saved: profile.save_stats=false" in capsys.readouterr().out
    assert not (out / "stats.safetensors").exists()
    assert LayerCard.load(out).stats is None
    assert cli.main(["select", str(out), "--out", str(tmp_path / "sel"), "--k", "2"]) == 0


def test_save_stats_threshold():
    from layercard.profile.config import SAVE_STATS_AUTO_BYTES, should_save_stats

    assert should_save_stats(None, SAVE_STATS_AUTO_BYTES - 1) and not should_save_stats(None, SAVE_STATS_AUTO_BYTES)
    assert should_save_stats(True, 10 * SAVE_STATS_AUTO_BYTES) and not should_save_stats(False, 1)
