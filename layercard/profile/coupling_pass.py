"""Pass 2: from the card's statistics to the coupling matrix.

For each layer ℓ the best rank-r update Δ*_ℓ of every target module (ridge solution truncated to
rank r in the whitened space, :func:`layercard.profile.metrics.best_rank_r_update`), its output direction
u_ℓ = J_ℓ Δ*_ℓ by forward-mode AD on probe batches, then K, b (additive over batches) and ρ.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from layercard.profile.adam_step import DEFAULT_INIT_SEED, lora_init_a, sign_step_tangent
from layercard.profile.coupling import (Sketch, ce_logit_grad, centered_softmax_weights, correlation,
                                coupling_from_embeddings, linear_term, metric_embed)
from layercard.profile.directions import layer_directions, supervised_targets
from layercard.discovery import ModelLayout
from layercard.errors import LayercardError
from layercard.train.losses import loss_count
from layercard.profile.metrics import best_rank_r_update, eig_psd
from layercard.profile.stats import SufficientStats


def layer_deltas(model: nn.Module, layout: ModelLayout, stats: SufficientStats, *, rank: int, ridge: float,
                 layers: Iterable[int] | None = None, device: str | None = None,
                 eigs: dict | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Δ*_ℓ per layer as tangents in each weight's own shape/dtype/device (Conv1D: transposed).

    ``device`` overrides the weights' device (a driver holding a ``meta`` model ships float32 CPU
    tangents; each actor casts them to its own weights). ``eigs``: eigendecompositions per input
    group already solved (:func:`layercard.profile.profiler.card_from_stats` fills such a dict)."""
    params = dict(model.named_parameters())
    wanted = set(layout.layers if layers is None else layers)
    out: dict[int, dict[str, torch.Tensor]] = {}
    eigs = {} if eigs is None else eigs
    for m in layout.modules:
        if m.layer not in wanted:
            continue
        group = stats.group_of[m.key]
        if group not in eigs:
            eigs[group] = eig_psd(stats.A[group])
        delta = best_rank_r_update(stats.A[group], stats.C[m.key], ridge, rank, eig=eigs[group])  # (d_out, d_in)
        out.setdefault(m.layer, {})[m.weight_name] = _tangent(delta, m, params[m.weight_name], device)
    return out


def _tangent(delta: torch.Tensor, m, w: torch.Tensor, device: str | None) -> torch.Tensor:
    """A (d_out, d_in) update as a tangent of weight ``w``: its shape (Conv1D: transposed), and its
    dtype/device, or float32/float64 on ``device`` (a driver holding a ``meta`` model)."""
    tangent = delta.T if m.transposed else delta
    if device is None:
        return tangent.to(device=w.device, dtype=w.dtype)
    return tangent.to(device=device, dtype=torch.float64 if w.dtype == torch.float64 else torch.float32)


ADAM_KEY = 1 << 20
"""Pass-2 key of layer ℓ's sign-step direction: ``ADAM_KEY + ℓ`` (its Newton direction's key is ℓ)."""


def adam_deltas(model: nn.Module, layout: ModelLayout, stats: SufficientStats, *, rank: int,
                alpha: float | None = None, seed: int = DEFAULT_INIT_SEED, layers: Iterable[int] | None = None,
                device: str | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Adam's first LoRA step per layer (:func:`layercard.profile.adam_step.sign_step_tangent` of every target
    module, A₀ seeded per module), keyed ``ADAM_KEY + ℓ``; dtypes/devices as :func:`layer_deltas`."""
    params = dict(model.named_parameters())
    wanted = set(layout.layers if layers is None else layers)
    scaling = (alpha if alpha else 2.0 * rank) / rank
    out: dict[int, dict[str, torch.Tensor]] = {}
    for m in layout.modules:
        if m.layer not in wanted:
            continue
        delta = sign_step_tangent(stats.C[m.key], lora_init_a(m.d_in, rank, m.key, seed), scaling)  # (d_out, d_in)
        out.setdefault(ADAM_KEY + m.layer, {})[m.weight_name] = _tangent(delta, m, params[m.weight_name], device)
    return out


def direction_keys(layers: Iterable[int], adam: bool) -> list[int]:
    """Pass 2's direction keys in matrix order: the Newton directions, then (``adam``) the sign steps."""
    layers = list(layers)
    return layers + ([ADAM_KEY + l for l in layers] if adam else [])


def make_sketch(vocab: int, dim: int, above_vocab: int, seed: int) -> Sketch | None:
    """A JL sketch when the vocabulary is larger than ``above_vocab`` (None: exact embeddings)."""
    return Sketch(vocab, dim, seed) if vocab > above_vocab else None


def probe_terms(model: nn.Module, deltas_by_layer: dict[int, dict[str, torch.Tensor]], batch: dict,
                sketch: Sketch | None, label_ids=None) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Per layer: the metric-embedded (and sketched) directions W_ℓ (T × D) and b_ℓ on one batch.

    With ``label_ids`` the loss is the label loss: T = one row per example and the softmax, its
    metric and ∇_z L are over the answer tokens only (D = C, so no sketch)."""
    logits, us = layer_directions(model, deltas_by_layer, batch, label_ids)
    p, _ = centered_softmax_weights(logits)
    grad = ce_logit_grad(p, supervised_targets(batch, label_ids).to(p.device))
    W, b = {}, {}
    for layer, u in us.items():
        w = metric_embed(u, p)
        W[layer] = (sketch(w) if sketch is not None else w).to(torch.float64).cpu()
        b[layer] = linear_term(grad, u)
    return W, b


@contextmanager
def full_precision(model: nn.Module, deltas_by_layer: dict):
    """Run pass 2 in float32 when the model is bf16/fp16, then cast back (bf16→fp32→bf16 is exact).

    Measured on an H200 (benchmarks/results/gpu_check_h200.json): the ranking by res_frac from a
    bf16 pass 1 matches fp32 (Spearman 1.0), but bf16 JVP directions are noise (Spearman of b²/2K
    vs fp32: −0.09), so the directions are always computed in float32.
    """
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16):
        yield deltas_by_layer
        return
    model.float()
    try:
        yield {l: {n: t.float() for n, t in d.items()} for l, d in deltas_by_layer.items()}
    finally:
        model.to(dtype)


def coupling_terms(model: nn.Module, deltas_by_layer: dict, batches: Iterable[dict], layers: list[int],
                   sketch: Sketch | None, label_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """K (L × L) and b (L,) summed over probe batches, layers in the given order (float32 or wider)."""
    with full_precision(model, deltas_by_layer) as deltas:
        return _coupling_terms(model, deltas, batches, layers, sketch, label_ids)


def _coupling_terms(model, deltas_by_layer, batches, layers, sketch, label_ids=None):
    K = np.zeros((len(layers), len(layers)))
    b = np.zeros(len(layers))
    seen = 0
    for batch in batches:
        if not bool((batch["labels"][:, 1:] != -100).any()):
            continue
        W, bb = probe_terms(model, deltas_by_layer, batch, sketch, label_ids)
        K += coupling_from_embeddings([W[l] for l in layers]).numpy()
        b += np.array([bb[l] for l in layers])
        seen += 1
    if seen == 0:
        raise LayercardError("coupling probe set is empty: no batch had a supervised token")
    return K, b


def attach_coupling(card, K: np.ndarray, b: np.ndarray, meta: dict | None = None) -> None:
    """Store K, ρ and the layer columns ``b``, ``k_diag`` on the card. A K of 2L × 2L holds the
    sign-step directions too (:func:`direction_keys`): their block becomes ``coupling_adam`` and the
    columns ``adam_b`` (the ℓ1 rate on the probe set) and ``adam_h`` (the curvature uᵀHu)."""
    L = len(card.layers)
    K, b = np.asarray(K, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if K.shape == (2 * L, 2 * L):
        card.coupling_adam = K[L:, L:].copy()
        card.layers["adam_b"] = b[L:].copy()
        card.layers["adam_h"] = np.diag(K[L:, L:]).copy()
        K, b = K[:L, :L], b[:L]
    card.coupling_k = np.asarray(K, dtype=np.float64)
    card.coupling = correlation(card.coupling_k)
    card.layers["b"] = np.asarray(b, dtype=np.float64)
    card.layers["k_diag"] = np.diag(card.coupling_k).copy()
    card.meta.update(meta or {})


def coupling_pass(model: nn.Module, layout: ModelLayout, card, batches: list[dict], *, sketch: Sketch | None,
                  eigs: dict | None = None, label_ids=None, adam: bool = True) -> None:
    """Single-process pass 2 on ``card`` (which must carry its statistics); ``eigs`` as in
    :func:`layer_deltas`; ``label_ids``: the label loss (as pass 1 used); ``adam``: also the
    sign-step directions of Adam's first LoRA step (:func:`adam_deltas`)."""
    if card.stats is None:
        raise LayercardError("the card carries no statistics (stats.safetensors); re-profile to compute coupling")
    rank, ridge = card.meta["rank"], card.meta["ridge"]
    deltas = layer_deltas(model, layout, card.stats, rank=rank, ridge=ridge, eigs=eigs)
    if adam:
        deltas.update(adam_deltas(model, layout, card.stats, rank=rank))
    K, b = coupling_terms(model, deltas, batches, direction_keys(layout.layers, adam), sketch, label_ids)
    attach_coupling(card, K, b, {"coupling_sketch_dim": sketch.dim if sketch else None,
                                 "coupling_tokens": sum(loss_count(x["labels"], label_ids) for x in batches),
                                 **adam_meta(rank, adam)})


def adam_meta(rank: int, adam: bool) -> dict:
    """What the sign-step directions were drawn with (LoRA scaling, A₀ seed rule)."""
    return {"adam_directions": {"lora_alpha": 2.0 * rank, "init_seed": DEFAULT_INIT_SEED,
                                "init": "uniform(±1/sqrt(d_in)) per module, seeded by (seed, module key)"}} if adam else {}
