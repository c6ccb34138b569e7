"""layercard.card.report and ``layercard report``: files, embedded images, and a real headless browser."""
import base64
import copy
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layercard.profile import cost
from layercard.discovery import discover
from layercard.errors import LayercardError
from layercard.models import ModelConfig, load_model
from layercard.profile.profiler import profile_model
from layercard.card.report import default_top_k, recommended_layers, write_report
from layercard.train.step_timing import StepMeasurement, add_step_columns

TINY = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=256)
RANK, T = 4, 16
CHROMIUM = Path("/usr/bin/chromium")
IMG_RE = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def random_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, TINY["vocab_size"], (4, T), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.fixture(scope="module")
def full_card():
    """A profiled card with cost columns, (synthetic) step measurements and a coupling matrix."""
    model = load_model(ModelConfig(config=TINY)).model
    card = profile_model(model, random_batches(2), rank=RANK)
    cost.add_cost_columns(card, discover(model, card.meta["target_modules"]), cost.dims_from_model(model), seq_len=T)
    secs = {3: 0.010, 2: 0.013, 0: 0.018}
    points = [StepMeasurement([l], s, 1e6 * (5 - l)) for l, s in secs.items()]
    points += [StepMeasurement([2, 3], 0.015, 3e6), StepMeasurement([0, 1, 2, 3], 0.024, 6e6)]
    add_step_columns(card, points)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 12))
    card.coupling_k = x @ x.T / 12                     # a (synthetic) coupling pass: K, ρ, b
    d = np.sqrt(np.diag(card.coupling_k))
    card.coupling = card.coupling_k / np.outer(d, d)
    card.layers["b"], card.layers["k_diag"] = x @ rng.standard_normal(12), np.diag(card.coupling_k)
    card.meta["model_id"] = "tiny <qwen3> & co"  # must come out escaped
    return card


@pytest.fixture
def card(full_card):
    return copy.deepcopy(full_card)


def decoded_images(html: str) -> list[Image.Image]:
    images = []
    for b64 in IMG_RE.findall(html):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()  # full decode, not just the header
        images.append(img)
    return images


def test_report_files_and_images(card, tmp_path):
    paths = write_report(card, tmp_path / "rep")
    assert paths["html"].is_file() and paths["markdown"].is_file()
    html = paths["html"].read_text()
    images = decoded_images(html)
    assert len(images) == 5 == html.count("<img ")  # res, energy/kappa, coupling, cost, top gain
    assert all(img.format == "PNG" and img.width > 200 and img.height > 100 for img in images)
    assert "coupling not computed" not in html and "cost not computed" not in html
    assert "tiny &lt;qwen3&gt; &amp; co" in html and "<qwen3>" not in html
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    assert "R²" in html
    # the Markdown section: a row per layer and the card-guided max-quality set (coupling + cost present)
    from layercard.select.selection import arrays_from_card, select_max_quality

    md = paths["markdown"].read_text()
    k = default_top_k(len(card.layers))
    top = sorted(select_max_quality(arrays_from_card(card), k=k).layers)
    assert f"**Recommended `layers_to_transform`**: `{top}` (card-guided max-quality set of {k} layers" in md
    assert f"layers_to_transform={top}" in md and "layers_pattern='layers'" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(card.layers)
    assert not list((tmp_path / "rep").glob(".*tmp"))  # no temporary files left behind


def test_report_without_coupling_or_cost(full_card, tmp_path):
    bare = copy.deepcopy(full_card)
    bare.coupling = np.zeros_like(bare.coupling)
    cols = [c for c in bare.layers.columns if c in cost.COST_LAYER_COLUMNS or c.startswith("step_") or c == "peak_bytes"]
    bare.layers = bare.layers.drop(columns=cols)
    html = write_report(bare, tmp_path)["html"].read_text()
    assert "coupling not computed" in html and "cost not computed" in html
    assert len(decoded_images(html)) == 3
    k = default_top_k(len(bare.layers))
    top = sorted(bare.layers.sort_values("gain_adj", ascending=False)["layer"].head(k).tolist())
    assert f"layers_to_transform = {top}</code>" in html and "lacks the coupling or cost" in html


def test_selection_and_top_k(card, tmp_path):
    md = write_report(card, tmp_path, selection=[3, 1])["markdown"].read_text()
    assert "`[1, 3]` (the given selection)" in md
    assert recommended_layers(card, top_k=4) == [0, 1, 2, 3]
    with pytest.raises(LayercardError, match=r"\[9\]"):
        write_report(card, tmp_path, selection=[1, 9])
    with pytest.raises(LayercardError, match="top_k"):
        recommended_layers(card, top_k=0)


def test_report_overwrites_atomically(card, tmp_path):
    write_report(card, tmp_path)
    first = (tmp_path / "report.html").read_text()
    write_report(card, tmp_path, top_k=2)
    assert (tmp_path / "report.html").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.md", "report.html"]


def test_cli_report(card, tmp_path):
    from pipelines.report import main

    card.save(tmp_path / "card")
    assert main([str(tmp_path / "card")]) == 0
    assert (tmp_path / "card" / "report.html").is_file() and (tmp_path / "card" / "card.md").is_file()
    assert main([str(tmp_path / "card"), "--out", str(tmp_path / "site"), "--layers", "0,2"]) == 0
    assert "`[0, 2]`" in (tmp_path / "site" / "card.md").read_text()
    with pytest.raises(LayercardError, match="card.json is missing"):
        main([str(tmp_path / "nope")])
    with pytest.raises(LayercardError, match="--layers"):
        main([str(tmp_path / "card"), "--layers", "a,b"])
    with pytest.raises(LayercardError, match="not both"):
        main([str(tmp_path / "card"), "--layers", "1", "--top-k", "2"])


# ------------------------------------------------------------------------------------ browser
CHECK_SCRIPT = """<script>
var __errors = 0;
window.addEventListener('error', function () { __errors++; }, true);
window.addEventListener('load', function () {
  var im = document.images, ok = 0;
  for (var i = 0; i < im.length; i++) { if (im[i].complete && im[i].naturalWidth > 0) ok++; }
  document.title = 'LAYERCARD-CHECK images=' + ok + '/' + im.length + ' errors=' + __errors;
});
</script>"""


def browser_check(html_path: Path, workdir: Path) -> tuple[int, int, int, list[str]]:
    """Load a copy of the page (with a checking script injected first) in headless Chromium.
    Returns (images decoded, images, page errors, console lines)."""
    page = workdir / "checked.html"
    page.write_text(html_path.read_text().replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={workdir / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"LAYERCARD-CHECK images=(\d+)/(\d+) errors=(\d+)", proc.stdout)
    assert m, f"check script did not run; DOM starts {proc.stdout[:300]!r}"
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return int(m[1]), int(m[2]), int(m[3]), console


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no headless browser: /usr/bin/chromium is absent "
                    "(apt-get install chromium; .ci/apt-packages.txt lists it for CI)")
def test_report_in_headless_chromium(card, tmp_path):
    html = write_report(card, tmp_path / "rep")["html"]
    ok, total, errors, console = browser_check(html, tmp_path)
    assert (ok, total) == (5, 5)
    assert errors == 0 and console == []
    # the checker itself catches a broken image, a script error and console output
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>x</title></head><body>'
                   '<img src="data:image/png;base64,AAAA"><script>console.error("boom"); nope();</script>'
                   '</body></html>')
    (tmp_path / "bad").mkdir()
    ok, total, errors, console = browser_check(bad, tmp_path / "bad")
    assert (ok, total) == (0, 1) and errors >= 1 and any("boom" in line for line in console)
