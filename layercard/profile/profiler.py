"""Profile a frozen model into a Layer Card: hooks → sufficient statistics → per-module and
per-layer metrics. ``profile_model`` is the single-process path; the Ray pipeline computes the
same :class:`SufficientStats` on shards and calls :func:`card_from_stats` on their sum.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from layercard.profile.adam_step import lora_b_grad, lora_init_a
from layercard.card.layer_card import LAYER_COLUMNS, MODULE_COLUMNS, LayerCard, library_versions
from layercard.discovery import ModelLayout, discover
from layercard.errors import LayercardError
from layercard.profile.hooks import StatsCollector
from layercard.train.losses import supervised_count, supervised_loss_sum
from layercard.profile.metrics import eig_psd, module_metrics
from layercard.profile.stats import SufficientStats


def _progress(iterable, desc: str, enabled: bool, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch")


def collect_stats(model: nn.Module, layout: ModelLayout, batches: Iterable[dict], *,
                  progress: bool = False, stats: SufficientStats | None = None,
                  half_gemm: bool = True, flush_every: int = 16, label_ids=None) -> SufficientStats:
    """One forward+backward per batch; the loss is Σ of next-token CE over supervised tokens, or with
    ``label_ids`` Σ over examples of the label loss (:func:`layercard.train.losses.supervised_loss_sum`).

    ``half_gemm``: on CUDA, bf16/fp16 activations and gradients enter the statistics GEMMs as they
    are (tensor cores, float32 accumulation); False upcasts them to float32 first (slower, the same
    values up to summation order). ``flush_every``: batches summed on the device (float32 for
    float32/half models) between additions into the float64 totals. A batch with a NaN/Inf anywhere is run once more with every
    module checked (:func:`diagnose_non_finite`), and the error names where it first appears."""
    device = next(model.parameters()).device
    stats = stats if stats is not None else SufficientStats()
    seen, failed = 0, None
    total = len(batches) if hasattr(batches, "__len__") else None
    with StatsCollector(model, layout, stats, half_gemm=half_gemm, flush_every=flush_every) as collector:
        for batch in _progress(batches, "profile: pass 1", progress, total):
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            if supervised_count(labels) == 0:
                continue
            collector.mask = mask.bool()
            loss = supervised_loss_sum(model, ids, mask, labels, label_ids, use_cache=False)
            if bool(torch.isfinite(loss)):
                loss.backward()
                if collector.end_batch():
                    seen += 1
                    continue
            failed = (ids, mask, labels)
            break
    if failed is not None:
        raise diagnose_non_finite(model, layout, *failed, half_gemm=half_gemm, label_ids=label_ids)
    if seen == 0:
        raise LayercardError("calibration data is empty: no batch had a supervised token")
    return stats


def diagnose_non_finite(model: nn.Module, layout: ModelLayout, ids, mask, labels, *,
                        half_gemm: bool = True, label_ids=None) -> LayercardError:
    """Re-run one batch with every module's input, output and gradient checked; the error names
    the first module where a NaN/Inf appears (or says the loss itself is non-finite)."""
    try:
        with StatsCollector(model, layout, SufficientStats(), block_influence=False, half_gemm=half_gemm,
                            strict=True) as collector:
            collector.mask = mask.bool()
            loss = supervised_loss_sum(model, ids, mask, labels, label_ids, use_cache=False)
            if bool(torch.isfinite(loss)):
                loss.backward()
            collector.end_batch()
    except LayercardError as e:
        return e
    return LayercardError("non-finite loss or statistics on a calibration batch (check the model dtype and data)")


def _module_rows(layout: ModelLayout, stats: SufficientStats, rank: int, ridge: float,
                 eigs: dict | None = None) -> pd.DataFrame:
    rows, eigs = [], ({} if eigs is None else eigs)
    for m in layout.modules:
        if m.key not in stats.C:
            raise LayercardError(f"no statistics for module '{m.full_name}' (was it reached by the backward pass?)")
        group = stats.group_of[m.key]
        A = stats.A[group]
        if group not in eigs:  # one eigh per shared input (q/k/v, gate/up)
            eigs[group] = eig_psd(A)
        vals = module_metrics(A, stats.C[m.key], stats.gg[m.key], stats.n[group], ridge, rank, m.d_out,
                              eig=eigs[group])
        vals.update(lora_init_gradient(stats.C[m.key], m.d_in, rank, m.key))
        rows.append({"layer": m.layer, "module": m.name, "target": m.target, "d_in": m.d_in, "d_out": m.d_out,
                     "n_tokens": stats.n[group], "group": group, "gg": stats.gg[m.key], **vals})
    return pd.DataFrame(rows)


ADAM_COLUMNS = ["lora_grad_l1", "lora_grad_l2"]


def lora_init_gradient(C, d_in: int, rank: int, key: str) -> dict:
    """ℓ1 and ℓ2 norms of ∇_B L at PEFT's LoRA init (B = 0, A₀ as :func:`layercard.profile.adam_step.lora_init_a`
    draws it, lora_alpha = 2r): the loss decrease per unit of Adam's first step, and its gradient size."""
    g = lora_b_grad(C, lora_init_a(d_in, rank, key), 2.0)
    return {"lora_grad_l1": float(g.abs().sum()), "lora_grad_l2": float(torch.linalg.vector_norm(g))}


def aggregate_layers(modules: pd.DataFrame) -> pd.DataFrame:
    """Per-layer view. Additive quantities (res2, res2_rank_r, gain_adj, gain_adj_rank_r, energy, gg) are summed over the
    layer's modules / input groups; grad_norm = sqrt(Σ‖C‖²); res_frac = Σres2 / Σgg; kappa is the worst
    (largest) of the layer's input groups; erank and d_eff are averaged over its input groups."""
    out = []
    for layer, g in modules.groupby("layer", sort=True):
        groups = g.drop_duplicates("group")
        gg = g["gg"].sum()
        res2 = g["res2"].sum()
        out.append({
            "layer": int(layer), "n_tokens": int(g["n_tokens"].max()),
            "res2": res2, "res2_rank_r": g["res2_rank_r"].sum(),
            "res_frac": res2 / gg if gg > 0 else 0.0,
            "grad_norm": float(np.sqrt((g["grad_norm"] ** 2).sum())),
            "energy": groups["energy"].sum(), "kappa": groups["kappa"].max(),
            "erank": groups["erank"].mean(), "d_eff": groups["d_eff"].mean(),
            "gain_adj": g["gain_adj"].sum(), "gain_adj_rank_r": g["gain_adj_rank_r"].sum(),
            **({"lora_grad_l1": g["lora_grad_l1"].sum(), "lora_grad_l2": float(np.sqrt((g["lora_grad_l2"] ** 2).sum()))}
               if "lora_grad_l1" in g.columns else {}),
        })
    df = pd.DataFrame(out)
    return df[LAYER_COLUMNS + [c for c in ADAM_COLUMNS if c in df.columns]]


def card_from_stats(layout: ModelLayout, stats: SufficientStats, *, rank: int, ridge: float,
                    meta: dict | None = None, eigs: dict | None = None) -> LayerCard:
    """Solve every card quantity from summed statistics (float64).

    ``eigs``: a dict that receives each input group's eigendecomposition (one eigh per shared A),
    for :func:`layercard.profile.coupling_pass.layer_deltas` to reuse instead of solving them again."""
    layers, modules = card_rows(layout, stats, rank=rank, ridge=ridge, eigs=eigs)
    card = card_from_rows(layout, layers, modules, stats.n_tokens, rank=rank, ridge=ridge, meta=meta)
    card.stats = stats
    return card


def card_rows(layout: ModelLayout, stats: SufficientStats, *, rank: int, ridge: float,
              eigs: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-layer and per-module rows of ``layout``'s layers. Each layer's rows need only its own
    statistics, so a Ray slice owner solves its slice and the driver concatenates the rows."""
    if rank < 1:
        raise LayercardError(f"rank must be >= 1, got {rank}")
    if not ridge > 0:
        raise LayercardError(f"ridge must be > 0 (relative ridge λ = ridge·tr(A)/d_in), got {ridge}")
    if stats.n_tokens == 0:
        raise LayercardError("statistics are empty: no calibration token was seen")
    modules = _module_rows(layout, stats, rank, ridge, eigs)
    layers = aggregate_layers(modules)
    layers["block_influence"] = [stats.bi_sum.get(l, np.nan) / stats.bi_n[l] if stats.bi_n.get(l) else np.nan
                                 for l in layers["layer"]]
    return layers, modules[MODULE_COLUMNS + ["group", "gg", *ADAM_COLUMNS]]


def card_from_rows(layout: ModelLayout, layers: pd.DataFrame, modules: pd.DataFrame, n_tokens: int, *,
                   rank: int, ridge: float, meta: dict | None = None) -> LayerCard:
    """A card (no coupling yet, no statistics) from rows :func:`card_rows` solved."""
    card_meta = {
        "block_path": layout.block_path, "layers_pattern": layout.layers_pattern, "num_layers": layout.num_layers,
        "layers": list(layout.layers), "target_modules": layout.targets, "modules": sorted({m.name for m in layout.modules}),
        "block_modules": list(layout.block_modules),
        "rank": rank, "ridge": ridge, "n_tokens": n_tokens, "library_versions": library_versions(),
    }
    card_meta.update(meta or {})
    L = len(layers)
    return LayerCard(layers.reset_index(drop=True), modules.reset_index(drop=True), np.eye(L) * 0.0, None,
                     card_meta, None)


def profile_model(model: nn.Module, batches: Iterable[dict], *, target_modules=None, layers=None,
                  rank: int = 8, ridge: float = 1e-3, block_path: str | None = None,
                  progress: bool = False, meta: dict | None = None, label_ids=None) -> LayerCard:
    """Profile ``model`` (frozen) on ``batches`` of input_ids / attention_mask / labels into a card;
    ``label_ids``: profile the label loss over these answer tokens instead of the LM loss."""
    if not ridge > 0:
        raise LayercardError(f"ridge must be > 0 (relative ridge λ = ridge·tr(A)/d_in), got {ridge}")
    layout = discover(model, target_modules, layers, block_path)
    stats = collect_stats(model, layout, batches, progress=progress, label_ids=label_ids)
    return card_from_stats(layout, stats, rank=rank, ridge=ridge, meta=meta)
