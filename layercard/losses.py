"""Losses on causal-LM logits. Sums, not means, so statistics add exactly across batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
