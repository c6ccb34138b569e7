"""Losses on causal-LM logits. Sums, not means, so statistics add exactly across batches.

:func:`supervised_lm_loss_sum` runs the LM head only where a logit predicts a supervised token
(``logits_to_keep`` with a boolean mask, transformers ≥ 5): for prompt/answer data (a sentiment
answer is one token of ~40) that skips most of the head's forward and backward — about a fifth of
a SmolLM2 training step — and gives the same loss (rows without a label have zero gradient anyway).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn


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


def keep_logits_kwargs(model: nn.Module, labels: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """(forward kwargs, keep): ``keep`` (B, T) bool marks the positions whose logits predict a
    supervised token; the kwargs ask the model for those rows only, when it can."""
    keep = next_token_labels(labels) != -100
    return ({"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}), keep


def kept_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the kept positions, row-major, whether the model sliced them or not."""
    return logits if logits.dim() == 2 else logits[keep]


def supervised_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """:func:`lm_loss_sum` of ``model``'s logits, with the LM head run only on supervised rows."""
    extra, keep = keep_logits_kwargs(model, labels)
    out = model(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)
    z = kept_logits(out.logits, keep)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return F.cross_entropy(z, next_token_labels(labels)[keep], reduction="sum")
