"""The small tokenizer protocol the pipelines use: ``encode(text) -> list[int]`` (no special tokens),
``start_ids`` (what the tokenizer puts at a sequence's start), ``pad_id``, ``eos_id``, and
``chat_turns(prompt, answer)`` for instruct models.

``ByteTokenizer`` lets tests and the tiny demo run random-weight models on real text with no
tokenizer files: UTF-8 bytes shifted past three special ids, folded into the model's vocabulary.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from layercard.errors import LayercardError

# Encoded with and without special tokens to see what the tokenizer adds around a sequence: the
# post-processor of a saved tokenizer.json adds the BOS even where ``add_bos_token`` reads False.
PROBE_TEXT = "layercard probe 7"


class ByteTokenizer:
    name = "bytes"
    pad_id, bos_id, eos_id = 0, 1, 2
    start_ids: list[int] = []
    """No BOS: the random models it serves were never trained on one, and cards profiled with it stay valid."""
    chat_template: str | None = None

    def __init__(self, vocab_size: int):
        if vocab_size < 4:
            raise LayercardError(f"ByteTokenizer needs vocab_size >= 4, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        span = self.vocab_size - 3
        return [3 + (b % span) for b in text.encode("utf-8")]

    def token_name(self, token_id: int) -> str:
        """The byte a token stands for (the fold past 255 makes some ids stand for several)."""
        return bytes([(token_id - 3) % 256]).decode("latin-1") if token_id >= 3 else f"<special {token_id}>"

    def chat_turns(self, prompt: str, answer: str) -> tuple[str, str]:
        raise LayercardError("data.chat_template: the byte tokenizer of a model.config model has no chat template")


def special_affixes(tok, probe: str = PROBE_TEXT) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens ``tok`` adds before and after a sequence by default."""
    plain = tok.encode(probe, add_special_tokens=False)
    full = tok.encode(probe, add_special_tokens=True)
    n = len(plain)
    for i in range(len(full) - n + 1) if n else ():
        if full[i:i + n] == plain:
            return list(full[:i]), list(full[i + n:])
    # The probe's tokens changed with special tokens on (a normaliser that depends on them): trust the flag.
    bos = tok.bos_token_id
    return ([bos] if getattr(tok, "add_bos_token", False) and bos is not None else []), []


def template_hash(template: str | None) -> str | None:
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else None


class HFTokenizer:
    def __init__(self, tok, name: str):
        self.tok = tok
        self.name = name
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise LayercardError(f"tokenizer '{name}' has neither a pad nor an eos token")
        # Only the prefix is used: a causal LM's default suffix is its EOS, which data.answer_eos controls.
        self.start_ids, _ = special_affixes(tok)
        template = getattr(tok, "chat_template", None)
        self.chat_template = template if isinstance(template, str) else None

    @classmethod
    def from_dir(cls, path: Path) -> "HFTokenizer":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise LayercardError(f"no tokenizer in '{path}': {str(err).splitlines()[0]}") from None
        return cls(tok, tok.name_or_path or str(path))

    def encode(self, text: str) -> list[int]:
        """The text's own tokens: no BOS/EOS (sequence starts come from ``start_ids``)."""
        return self.tok.encode(text, add_special_tokens=False)

    def token_name(self, token_id: int) -> str:
        return str(self.tok.convert_ids_to_tokens(int(token_id)))

    def chat_turns(self, prompt: str, answer: str) -> tuple[str, str]:
        """(prompt text, answer text): the template rendering a user turn ``prompt`` up to the
        assistant's header, and the rest of the conversation with assistant turn ``answer``."""
        if not self.chat_template:
            raise LayercardError(f"data.chat_template: tokenizer '{self.name}' has no chat template")
        user = [{"role": "user", "content": prompt}]
        head = self.tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = self.tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(head):
            raise LayercardError(f"data.chat_template: the chat template of tokenizer '{self.name}' does not render "
                                 "a conversation as its generation prompt followed by the assistant turn")
        return head, full[len(head):]
