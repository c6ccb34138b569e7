"""The step LoRA-with-Adam really takes, from the card's statistics (docs/design.md §3).

PEFT starts LoRA at B = 0 with a random A₀ (``kaiming_uniform_(a=√5)``: entries uniform in
±1/√d_in), so the first step moves B only. With C = XᵀG (d_in × d_out) the summed-loss gradient of
the weight transposed, the gradient of B is::

    ∇_B L = s · Cᵀ A₀ᵀ                    (d_out × r),   s = lora_alpha / r

and Adam's first update is −η · sign(∇_B L) (bias-corrected moments). Along that step the weight
moves by t · Δ with the *sign-step tangent*::

    Δ = −s · sign(∇_B L) · A₀             (d_out × d_in),   ⟨∇_W L, Δ⟩ = −‖∇_B L‖₁

so the loss falls at the rate ‖∇_B L‖₁ per unit of t, and Adam moves every adapted coordinate by
about the same t = Σ_t lr_t over a run whose gradient signs hold (the *step budget* ρ). Pass 2 gives
the output direction u = J·Δ of each layer's tangent, hence the curvature h = uᵀHu and the linear
term b = −⟨∇_z L, u⟩ (= the ℓ1 rate on the probe set). The gain of a run of budget ρ along that
path is the trust-region gain::

    G(s, h, ρ) = max_{0 ≤ t ≤ ρ} t·s − ½·t²·h

Everything here is pure torch/numpy on tensors; hooks and passes live elsewhere.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["lora_init_a", "lora_b_grad", "sign_step_tangent", "step_budget", "trust_region_gain",
           "expected_l1_rate", "DEFAULT_INIT_SEED"]

DEFAULT_INIT_SEED = 0


def lora_init_a(d_in: int, rank: int, key: str, seed: int = DEFAULT_INIT_SEED) -> torch.Tensor:
    """A₀ (rank × d_in, float64) drawn from PEFT's default LoRA init, U(−1/√d_in, 1/√d_in)
    (``kaiming_uniform_`` with a = √5), seeded by (``seed``, ``key``) so every process draws the same
    matrix for a module whatever else it adapts. PEFT's own draw for a run depends on which modules
    that run adapts (one global RNG stream); this is a draw from the same distribution."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    bound = 1.0 / np.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=g, dtype=torch.float64) * 2.0 - 1.0) * bound


def lora_b_grad(C: torch.Tensor, A0: torch.Tensor, scaling: float) -> torch.Tensor:
    """∇_B L at B = 0 (d_out × r) from C = XᵀG (d_in × d_out) and A₀ (r × d_in), float64."""
    return scaling * (C.to(torch.float64).T @ A0.to(torch.float64).T)


def sign_step_tangent(C: torch.Tensor, A0: torch.Tensor, scaling: float) -> torch.Tensor:
    """Δ = −s·sign(∇_B L)·A₀ (d_out × d_in): the weight change per unit of Adam's first step."""
    return -scaling * torch.sign(lora_b_grad(C, A0, scaling)) @ A0.to(torch.float64)


def expected_l1_rate(C: torch.Tensor, d_in: int, rank: int, scaling: float) -> float:
    """E over A₀ of ‖∇_B L‖₁ for large d_in: each entry of Cᵀ A₀ᵀ is ≈ normal with variance
    ‖C_{:,j}‖²/(3·d_in), so E = s · r · √(2/π) · Σ_j ‖C_{:,j}‖₂ / √(3·d_in)."""
    col = torch.linalg.vector_norm(C.to(torch.float64), dim=0).sum().item()
    return scaling * rank * np.sqrt(2.0 / np.pi) * col / np.sqrt(3.0 * d_in)


def step_budget(lr: float, steps: int, warmup_steps: int = 0) -> float:
    """ρ = Σ_t lr_t of DeepSpeed's ``WarmupDecayLR`` (linear warmup from 0, then linear decay to 0 at
    ``steps``), the schedule :func:`layercard.train.training.deepspeed_config` sets up, stepped after each
    optimizer step: step t runs at γ(max(t − 1, 0))·lr (the first two steps both at γ(0) = 0)."""
    if steps < 1 or lr <= 0:
        return 0.0
    w = max(int(warmup_steps), 2)                  # WarmupLR raises warmup_num_steps to at least 2
    total = max(int(steps), int(warmup_steps) + 1)
    t = np.maximum(np.arange(int(steps), dtype=np.float64) - 1.0, 0.0)
    gamma = np.where(t < w, t / w, np.maximum(0.0, (total - t) / max(1.0, total - w)))
    return float(lr * gamma.sum())


def trust_region_gain(s, h, rho: float) -> np.ndarray:
    """G = max_{0≤t≤ρ} t·s − ½t²·h, elementwise (h > 0: t = clip(s/h, 0, ρ); h ≤ 0: an end point)."""
    s = np.asarray(s, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(h > 0, np.clip(s / np.where(h > 0, h, 1.0), 0.0, rho), rho)
    return np.maximum(t * s - 0.5 * t * t * h, 0.0)
