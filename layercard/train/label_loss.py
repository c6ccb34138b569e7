"""The label loss: how well a model tells the classes apart, not how well it has learnt the format.

The full-vocabulary answer loss on "Review: …\\nSentiment:" → " positive" is ~5.5 for the base
SmolLM2 and falls to ~0.3 after a few hundred LoRA steps for *any* set of adapted layers: most of
the fall is learning to put its mass on the two answer words at all, which every layer set does.
That makes it useless for comparing layer sets. The label loss restricts the log-softmax to the
answer tokens (the first token of each answer string), so it measures only the choice between
them: log 2 ≈ 0.693 for a coin flip, 0 for confident and right, whatever mass the rest of the
vocabulary gets.

Shapes: ``logits`` [N, V] at the position that predicts the first answer token; ``label_token_ids``
[C] (C ≥ 2 answer tokens); ``target_index`` [N] in 0..C-1 indexes ``label_token_ids``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from layercard.errors import LayercardError


def label_logits(logits: torch.Tensor, label_token_ids) -> torch.Tensor:
    """[N, V] → [N, C]: the logits of the answer tokens, in float32 at least."""
    ids = torch.as_tensor(label_token_ids, dtype=torch.long, device=logits.device)
    z = logits.index_select(-1, ids)
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def label_loss(logits: torch.Tensor, label_token_ids, target_index: torch.Tensor) -> torch.Tensor:
    """Mean over examples of −log softmax(logits[:, label_token_ids])[target] (nats)."""
    return F.cross_entropy(label_logits(logits, label_token_ids), torch.as_tensor(target_index, device=logits.device))


def label_accuracy(logits: torch.Tensor, label_token_ids, target_index: torch.Tensor) -> float:
    """Fraction of examples whose highest-scoring answer token is the target (ties: the lower index)."""
    pred = label_logits(logits, label_token_ids).argmax(dim=-1)
    return float((pred == torch.as_tensor(target_index, device=logits.device)).float().mean())


def first_answer_position(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels (-100 off the answer) → [B] index t ≥ 1 of each row's first supervised token."""
    supervised = labels != -100
    if not bool(supervised[:, 1:].any(dim=1).all()):
        raise LayercardError("answer_position_logits: a row has no supervised answer token after position 0")
    return supervised[:, 1:].int().argmax(dim=1) + 1


def answer_position_logits(logits: torch.Tensor, labels: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, V] causal-LM logits and [B, T] labels (-100 off the answer) → [B, V] at the position
    that predicts each row's first answer token (the last prompt token). ``first``: the
    :func:`first_answer_position` of ``labels``, when the caller has it already."""
    first = first_answer_position(labels) if first is None else first
    return logits[torch.arange(logits.shape[0], device=logits.device), first - 1]


def label_targets(labels: torch.Tensor, label_token_ids, first: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] labels → [B] index into ``label_token_ids`` of each row's first answer token."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    first_tokens = labels[rows, first_answer_position(labels) if first is None else first]
    ids = torch.as_tensor(label_token_ids, dtype=torch.long, device=labels.device)
    match = first_tokens[:, None] == ids[None, :]
    missing = ~match.any(dim=1)
    if bool(missing.any()):
        row = int(missing.nonzero()[0, 0])
        raise LayercardError(f"label loss: row {row} starts its answer with token {int(first_tokens[row])}, "
                             f"which is none of the label answer tokens {ids.tolist()}")
    return match.int().argmax(dim=1)


def _token_label(tokenizer, token_id: int) -> str:
    """``'▁neg' (412)``: the token's text where the tokenizer can name it, and its id."""
    name = getattr(tokenizer, "token_name", None)
    return f"{name(token_id)!r} ({token_id})" if name else f"token {token_id}"


def answer_token_ids(tokenizer, answers) -> list[int]:
    """First token of each answer string, encoded without special tokens (``tokenizer.encode``: the
    answer follows the prompt inside the sequence); they must differ, or the loss is blind."""
    ids = []
    for answer in answers:
        tokens = tokenizer.encode(answer)
        if not tokens:
            raise LayercardError(f"answer {answer!r} encodes to no token")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        named = ", ".join(f"{a!r} → {_token_label(tokenizer, i)}" for a, i in zip(answers, ids))
        raise LayercardError(f"answers share a first token ({named}): no label loss can separate them")
    return ids


def check_answer_tokens(answers, tokenizer, examples: list[dict], what: str) -> list[int]:
    """The answers' first tokens (:func:`answer_token_ids`); every example must start its answer
    with one of them, or the label loss is undefined for it. ``what`` names the data in the error."""
    ids = answer_token_ids(tokenizer, answers)
    for i, e in enumerate(examples):
        first = next((t for t in e["labels"] if t != -100), None)
        if first not in ids:
            raise LayercardError(f"{what} example {i} answers with token {first}, none of label_answers "
                                 f"{list(answers)} (tokens {ids})")
    return ids
