"""The small tokenizer protocol the pipelines use: ``encode(text) -> list[int]``, ``pad_id``, ``eos_id``.

``ByteTokenizer`` lets tests and the tiny demo run random-weight models on real text with no
tokenizer files: UTF-8 bytes shifted past three special ids, folded into the model's vocabulary.
"""
from __future__ import annotations

from pathlib import Path

from layercard.errors import LayercardError


class ByteTokenizer:
    name = "bytes"
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int):
        if vocab_size < 4:
            raise LayercardError(f"ByteTokenizer needs vocab_size >= 4, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        span = self.vocab_size - 3
        return [3 + (b % span) for b in text.encode("utf-8")]


class HFTokenizer:
    def __init__(self, tok, name: str):
        self.tok = tok
        self.name = name
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise LayercardError(f"tokenizer '{name}' has neither a pad nor an eos token")

    @classmethod
    def from_dir(cls, path: Path) -> "HFTokenizer":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise LayercardError(f"no tokenizer in '{path}': {str(err).splitlines()[0]}") from None
        return cls(tok, tok.name_or_path or str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)
