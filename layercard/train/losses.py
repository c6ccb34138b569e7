"""Losses on causal-LM logits. Sums, not means, so statistics add exactly across batches.

Two losses, one code path (:func:`supervised_loss_sum`; profiling, pass 2 and training all use it):

* the **LM loss** — next-token cross-entropy over the supervised (answer) tokens;
* the **label loss** (``label_ids``, :mod:`layercard.train.label_loss`) — cross-entropy of the log-softmax
  restricted to the answer tokens, at the one position per example that predicts the first answer
  token: how well the model tells the classes apart, not how well it emits the answer format.

Either way the LM head runs only on the rows the loss reads (``logits_to_keep`` with a boolean
mask, transformers ≥ 5): for prompt/answer data (a sentiment answer is one token of ~40) that skips
most of the head's forward and backward — about a fifth of a SmolLM2 training step — and gives the
same loss (rows the loss does not read have zero gradient anyway).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from layercard.errors import LayercardError
from layercard.train.label_loss import first_answer_position, label_logits, label_targets


def shift_for_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits[:, t] predicts labels[:, t+1] (the Hugging Face causal-LM convention)."""
    return logits[:, :-1, :], labels[:, 1:]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over supervised tokens (labels != -100) of the next-token cross-entropy, in float32+.

    Equals the model's own mean LM loss × the number of supervised tokens.
    """
    z, y = shift_for_lm(logits, labels)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")


def supervised_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels → (B, T) the label each position's logits predict (-100 where none)."""
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    return nxt


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under DeepSpeed (``.module``) and PEFT (``get_base_model()``) wrappers."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            break
    return model


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes ``logits_to_keep``."""
    return _forward_takes_logits_to_keep(type(_hf_model(model)))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:   # once per class, not per batch
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def loss_positions(labels: torch.Tensor, label_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): ``keep`` (B, T) bool marks the positions whose logits the loss reads;
    ``targets`` (N,) their targets in row-major (batch, position) order.

    * ``label_ids`` None — the LM loss: every position that predicts a supervised token; the
      target is that token id.
    * ``label_ids`` given — the label loss (:mod:`layercard.train.label_loss`): one position per row, the
      one that predicts its first answer token; the target is the index of that token in
      ``label_ids`` (the logits are then restricted to those columns, :func:`loss_logits`).
    """
    if labels.dim() != 2:
        raise LayercardError(f"labels must be (batch, seq), got shape {tuple(labels.shape)}")
    if label_ids is None:
        nxt = next_token_labels(labels)
        keep = nxt != -100
        return keep, nxt[keep]
    first = first_answer_position(labels)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[torch.arange(labels.shape[0], device=labels.device), first - 1] = True
    return keep, label_targets(labels, label_ids, first)


def loss_logits(z: torch.Tensor, label_ids=None) -> torch.Tensor:
    """The kept logits (N, V) as the loss sees them: all columns (LM loss) or the answer tokens'
    (label loss); half precision upcast to float32."""
    if label_ids is not None:
        return label_logits(z, label_ids)
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def loss_count(labels: torch.Tensor, label_ids=None) -> int:
    """Terms in the summed loss: supervised tokens (LM loss) or examples (label loss)."""
    if label_ids is None:
        return supervised_count(labels)
    return int((labels[:, 1:] != -100).any(dim=1).sum())


def label_sums(logits: torch.Tensor, labels: torch.Tensor, label_ids) -> dict[str, float]:
    """Summed label loss, correct choices and examples of one batch of full ([B, T, V]) logits, read
    at the rows and columns :func:`loss_positions` / :func:`loss_logits` give training and profiling."""
    keep, target = loss_positions(labels, label_ids)
    z = loss_logits(logits[keep], label_ids)
    return {"label_loss_sum": float(F.cross_entropy(z, target, reduction="sum")),
            "label_correct": float((z.argmax(dim=-1) == target).sum()),
            "label_examples": float(target.numel())}


def keep_logits_kwargs(model: nn.Module, labels: torch.Tensor, label_ids=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(forward kwargs, keep, targets) with ``keep``/``targets`` from :func:`loss_positions`; the
    kwargs ask the model for the kept rows only, when it can."""
    keep, targets = loss_positions(labels, label_ids)
    return ({"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}), keep, targets


def kept_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the kept positions, row-major, whether the model sliced them or not."""
    return logits if logits.dim() == 2 else logits[keep]


def supervised_loss_sum(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor, label_ids=None, **kwargs) -> torch.Tensor:
    """Σ of the LM loss over supervised tokens (:func:`lm_loss_sum`), or with ``label_ids`` Σ of the
    label loss over examples, from ``model``'s logits with the LM head run only on the rows the
    loss reads."""
    extra, keep, targets = keep_logits_kwargs(model, labels, label_ids)
    out = model(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)
    z = loss_logits(kept_logits(out.logits, keep), label_ids)
    return F.cross_entropy(z, targets, reduction="sum")
