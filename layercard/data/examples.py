"""Calibration / training text → token batches.

Records are dicts with either a ``text`` column (every token supervised) or a ``prompt`` and an
``answer`` column (only answer tokens supervised, e.g. "Review: …\\nSentiment:" → " positive").
The same :func:`tokenize_record` serves the single-process path and the Ray Data pipelines.

A sequence starts the way the model's tokenizer starts one (its BOS, where it adds one), holds no
other special token (texts are encoded without them), and with ``answer_eos`` ends its answer with
the EOS. :func:`sequence_format` says which of these a card or a run was built with.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from layercard.errors import LayercardError
from layercard.paths import resolve_path

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "text"}


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token batches."""

    path: str | None = None
    """A .parquet, .jsonl, .csv or .txt file (one document per line), or a `datasets` directory saved to disk."""
    format: Literal["auto", "parquet", "jsonl", "csv", "text", "hf"] = "auto"
    text_column: str = "text"
    prompt_column: str | None = None
    """With ``answer_column``: the loss is on answer tokens only."""
    answer_column: str | None = None
    max_seq_len: int = 128
    num_samples: int | None = None
    """Use the first N records (after a seeded shuffle when ``shuffle``)."""
    shuffle: bool = False
    batch_size: int = 8
    seed: int = 0
    answer_eos: bool | None = None
    """End every answer with the tokenizer's EOS, so a trained adapter learns to stop. None: decided by
    the loss (on for the LM loss, off for the label loss, whose answers are class words)."""
    chat_template: bool = False
    """Render prompt/answer records with the tokenizer's chat template (user turn = prompt, assistant
    turn = answer), for instruct models. Only the assistant turn as the template renders it is
    supervised (the answer and the template's end of turn); the template writes its own BOS, if any."""

    def __post_init__(self):
        self.path = resolve_path(self.path)
        if (self.prompt_column is None) != (self.answer_column is None):
            raise LayercardError("data: give both prompt_column and answer_column, or neither")
        if self.max_seq_len < 2:
            raise LayercardError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.batch_size < 1:
            raise LayercardError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.chat_template and not self.prompt_column:
            raise LayercardError("data.chat_template needs prompt/answer data (data.prompt_column, data.answer_column)")

    @property
    def columns(self) -> list[str]:
        return [self.prompt_column, self.answer_column] if self.prompt_column else [self.text_column]


def resolve_format(cfg: DataConfig) -> tuple[Path, str]:
    if not cfg.path:
        raise LayercardError("data.path is not set")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise LayercardError(f"data path '{path}' does not exist")
    if cfg.format != "auto":
        return path, cfg.format
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return path, "hf"
        raise LayercardError(f"data path '{path}' is a directory but not a saved `datasets` dataset")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LayercardError(f"data path '{path}': unknown extension '{path.suffix}' (set data.format)")
    return path, fmt


def read_records(cfg: DataConfig) -> list[dict]:
    """Read the whole file locally (the Ray pipeline uses Ray Data readers instead)."""
    path, fmt = resolve_format(cfg)
    try:
        if fmt == "text":
            records = [{cfg.text_column: line.rstrip("\n")} for line in path.read_text().splitlines() if line.strip()]
        elif fmt == "jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif fmt == "csv":
            import pyarrow.csv as pacsv

            records = pacsv.read_csv(path).to_pylist()
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(path).to_pylist()
        else:
            from datasets import load_from_disk

            records = list(load_from_disk(str(path)))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise LayercardError(f"cannot read data '{path}' as {fmt}: {str(err).splitlines()[0]}") from None
    return select_records(records, cfg, path)


def select_records(records: list[dict], cfg: DataConfig, path) -> list[dict]:
    """The records a profile uses, from the whole file's: a seeded shuffle when ``shuffle``, then
    the first ``num_samples``. Shared by the local and the Ray reader, so both pick the same ones."""
    check_columns(records[0].keys() if records else [], cfg, path)
    check_every_record(records, cfg, path)
    if cfg.shuffle:
        g = torch.Generator().manual_seed(cfg.seed)
        records = [records[i] for i in torch.randperm(len(records), generator=g).tolist()]
    if cfg.num_samples is not None:
        records = records[: cfg.num_samples]
    if not records:
        raise LayercardError(f"data '{path}' is empty")
    return records


def check_columns(available, cfg: DataConfig, where) -> None:
    available = list(available)
    missing = [c for c in cfg.columns if c not in available]
    if missing and available:
        raise LayercardError(f"data '{where}' has no column {missing[0]!r} (columns: {', '.join(map(str, available))})")


def check_every_record(records: list, cfg: DataConfig, where) -> None:
    """Each record an object with every configured column (the first one's keys are not the file's:
    a later record without a column would fail deep in tokenisation)."""
    for i, r in enumerate(records, start=1):
        missing = [c for c in cfg.columns if not isinstance(r, dict) or c not in r]
        if missing:
            raise LayercardError(f"data '{where}': record {i} has no column {missing[0]!r}")


def with_answer_eos(cfg: DataConfig, loss: str) -> DataConfig:
    """``cfg`` with ``answer_eos`` decided: as given, else on for the LM loss and off for the label loss
    (whose answers are class words: an EOS after them is nothing the label loss looks at)."""
    if cfg.answer_eos is not None:
        return cfg
    return dataclasses.replace(cfg, answer_eos=loss != "label")


def sequence_format(tokenizer, cfg: DataConfig) -> dict:
    """How :func:`tokenize_record` builds sequences: the BOS it starts them with (None: none), whether
    answers end with the EOS, the chat template's hash (None: no template). Recorded in cards."""
    from layercard.data.tokenizer import template_hash

    start = list(tokenizer.start_ids)
    chat = bool(cfg.chat_template and cfg.prompt_column)
    return {"bos_id": int(start[0]) if start else None,
            "answer_eos": bool(cfg.answer_eos and cfg.prompt_column),
            "chat_template": template_hash(tokenizer.chat_template) if chat else None}


# What cards made before sequence formats were recorded were built with.
LEGACY_SEQUENCE_FORMAT = {"bos_id": None, "answer_eos": False, "chat_template": None}

# How to build sequences the recorded way, for each field of a format.
_FIX = {"bos_id": "the tokenizer decides the BOS: profile again with this model's tokenizer",
        "answer_eos": "set data.answer_eos={want} (or profile again)",
        "chat_template": "set data.chat_template={want} (or profile again with this tokenizer)"}


def check_sequence_format(recorded: dict | None, have: dict, what: str) -> None:
    """Refuse data built another way than ``what`` (a card, a selection) was: the statistics it holds
    are of other sequences. ``recorded`` None: made before formats were recorded (the legacy one)."""
    recorded = {**LEGACY_SEQUENCE_FORMAT, **(recorded or {})}
    for key, fix in _FIX.items():
        if recorded[key] != have[key]:
            want = str(recorded[key] is not None).lower() if key == "chat_template" else str(recorded[key]).lower()
            raise LayercardError(f"{what} was built from sequences with {key}={recorded[key]}, this data gives "
                                 f"{key}={have[key]}: " + fix.format(want=want))


def _prompt_answer_ids(record: dict, tokenizer, cfg: DataConfig) -> tuple[list[int], list[int], list[int]]:
    """(start tokens, prompt tokens, answer tokens) of a prompt/answer record, before truncation."""
    prompt, answer = str(record[cfg.prompt_column]), str(record[cfg.answer_column])
    start = list(tokenizer.start_ids)
    if not cfg.chat_template:
        answer_ids = tokenizer.encode(answer)
        if cfg.answer_eos and tokenizer.eos_id is not None:
            answer_ids.append(int(tokenizer.eos_id))
        return start, tokenizer.encode(prompt), answer_ids
    head, tail = tokenizer.chat_turns(prompt, answer)
    # The template writes its own BOS (if any): take it as the start only when it is the tokenizer's.
    prompt_ids, answer_ids = tokenizer.encode(head), tokenizer.encode(tail)
    start = start if start and prompt_ids[:len(start)] == start else []
    if cfg.answer_eos and tokenizer.eos_id is not None and tokenizer.eos_id not in answer_ids:
        answer_ids.append(int(tokenizer.eos_id))   # templates whose turn end is not the EOS
    return start, prompt_ids[len(start):], answer_ids


def tokenize_record(record: dict, tokenizer, cfg: DataConfig) -> dict:
    """→ {"input_ids": list[int], "labels": list[int]} (labels -100 where not supervised).

    Truncation to ``max_seq_len`` keeps the start tokens and the answer and cuts the prompt's start
    (text records: the text's end)."""
    if not cfg.prompt_column:
        start = list(tokenizer.start_ids)
        ids = tokenizer.encode(str(record[cfg.text_column]))[: max(cfg.max_seq_len - len(start), 1)]
        return {"input_ids": start + ids, "labels": [-100] * len(start) + ids}
    start, prompt, answer = _prompt_answer_ids(record, tokenizer, cfg)
    room = max(cfg.max_seq_len - len(start), 2)
    answer = answer[: room - 1]
    prompt = prompt[len(prompt) - min(len(prompt), room - len(answer)):]
    return {"input_ids": start + prompt + answer, "labels": [-100] * (len(start) + len(prompt)) + answer}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has attention_mask 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches_of(examples: list[dict], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(examples[i: i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def examples_hash(examples) -> str:
    """Order-independent digest of tokenised records (so sharded and single-process runs agree)."""
    digests = sorted(hashlib.sha256(json.dumps([list(map(int, e["input_ids"])), list(map(int, e["labels"]))]).encode()).hexdigest()
                     for e in examples)
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def load_examples(cfg: DataConfig, tokenizer) -> list[dict]:
    examples = [tokenize_record(r, tokenizer, cfg) for r in read_records(cfg)]
    examples = [e for e in examples if len(e["input_ids"]) >= 2]
    if not examples:
        raise LayercardError(f"data '{cfg.path}' has no record with at least 2 tokens")
    return examples
