"""Analytic LoRA training cost (docs/design.md §1 "Cost"): pure arithmetic on module shapes, no hooks, no I/O.

Cost is not additive over layers. A training step with adapters on a layer set S pays

* the forward of the whole frozen model (the same for every S),
* the activation-gradient backward of blocks min(S)..L−1 and of the LM head — frozen weights need
  no weight gradients, and nothing below the lowest adapter needs a gradient at all,
* forward + backward of every adapter: ≈ 6·r·(d_in + d_out) FLOPs per token and module
  (2 forward, 2 for the adapter's weight gradients, 2 for the gradient through it).

All FLOP counts are per token and count a multiply-add as 2 FLOPs. Attention-score FLOPs are the
full T×T matrices that eager / math attention computes (QKᵀ and PV: 4·heads·head_dim·T forward,
twice that backward); causal flash kernels skip about half of them.

Per-layer columns added to ``card.layers`` (for layer ℓ):

``forward_flops_per_token``   forward of block ℓ
``adapter_params``            Σ over ℓ's target modules of r·(d_in + d_out)
``adapter_flops_per_token``   Σ over ℓ's target modules of 6·r·(d_in + d_out)
``backprop_flops_per_token``  activation backward of blocks ℓ..L−1 + LM head (ℓ = lowest adapted layer)
``act_bytes_per_token``       activations kept for that backward (an estimate, see :func:`block_act_elems`)

``card.modules`` gets ``adapter_params`` and ``adapter_flops_per_token`` per module. Measured step
time (:mod:`layercard.train.step_timing`) calibrates :func:`predicted_cost`'s seconds per step.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from layercard.discovery import ModelLayout
from layercard.errors import LayercardError

COST_LAYER_COLUMNS = ["forward_flops_per_token", "adapter_params", "adapter_flops_per_token",
                      "backprop_flops_per_token", "act_bytes_per_token"]
COST_MODULE_COLUMNS = ["adapter_params", "adapter_flops_per_token"]
FIT_FEATURES = ["intercept", "backprop_flops_per_token", "adapter_flops_per_token"]
PREDICTED_COST_KEYS = ("flops_per_token", "step_seconds", "adapted_layers", "adapter_params")


@dataclass(frozen=True)
class ModelDims:
    """Shapes the cost model needs; JSON-serialisable so a saved card can predict without the model."""

    hidden: int
    vocab: int
    num_layers: int
    num_heads: int                                    # query heads (GQA repeats K/V up to these)
    head_dim: int
    block_linears: tuple[tuple[tuple[int, int], ...], ...]  # per block: (d_in, d_out) of every linear
    dtype_bytes: int = 4

    def __post_init__(self):
        if len(self.block_linears) != self.num_layers:
            raise LayercardError(f"model dims: {len(self.block_linears)} blocks of linear shapes for "
                                 f"num_layers={self.num_layers}")
        bad = [k for k in ("hidden", "vocab", "num_layers", "num_heads", "head_dim", "dtype_bytes")
               if not getattr(self, k) > 0]
        if bad:
            raise LayercardError(f"model dims: {bad} must be positive")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_linears"] = [[list(s) for s in blk] for blk in self.block_linears]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelDims":
        known = {"hidden", "vocab", "num_layers", "num_heads", "head_dim", "block_linears", "dtype_bytes"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LayercardError(f"model dims: unknown keys {unknown}")
        blocks = tuple(tuple((int(a), int(b)) for a, b in blk) for blk in d["block_linears"])
        return cls(**{**d, "block_linears": blocks})


def dims_from_model(model, block_path: str | None = None) -> ModelDims:
    """Read :class:`ModelDims` off a transformers causal LM (works on the ``meta`` device)."""
    from layercard.discovery import find_blocks, is_linear, linear_dims

    _, blocks = find_blocks(model, block_path)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not hidden or not heads:
        raise LayercardError(f"model config {type(cfg).__name__} has no hidden_size/num_attention_heads")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(cfg.vocab_size)
    shapes = tuple(tuple(linear_dims(m)[:2] for m in blk.modules() if is_linear(m)) for blk in blocks)
    dtype_bytes = next(model.parameters()).element_size()
    return ModelDims(int(hidden), vocab, len(blocks), int(heads), int(head_dim), shapes, int(dtype_bytes))


# ---------------------------------------------------------------------------------------------
# Per-token FLOPs and bytes of one block / the head
# ---------------------------------------------------------------------------------------------
def block_forward_flops(dims: ModelDims, layer: int, seq_len: int) -> int:
    """2·Σ d_in·d_out over the block's linears + 4·heads·head_dim·T (QKᵀ and PV)."""
    linear = 2 * sum(a * b for a, b in dims.block_linears[layer])
    return linear + 4 * dims.num_heads * dims.head_dim * seq_len


def block_backprop_flops(dims: ModelDims, layer: int, seq_len: int) -> int:
    """Activation gradient only: dX = dY·W per linear (same as forward); both operands of QKᵀ and PV."""
    linear = 2 * sum(a * b for a, b in dims.block_linears[layer])
    return linear + 8 * dims.num_heads * dims.head_dim * seq_len


def head_flops(dims: ModelDims) -> int:
    """LM head forward (= its activation backward): 2·hidden·vocab."""
    return 2 * dims.hidden * dims.vocab


def block_act_elems(dims: ModelDims, layer: int, seq_len: int) -> int:
    """Elements per token a block keeps for the activation backward (an estimate): its two norm
    inputs (2·hidden), every linear's output (q/k/v feed attention, gate/up the activation and the
    product), the MLP activation's output (≈ the widest linear output) and the attention
    probabilities (heads·T, which flash kernels recompute instead). Measured peak memory per layer
    of depth (benchmarks/cost_vs_depth.py) was 1.00× this on an H200 (bf16, sdpa) and 1.25× on CPU
    (fp32, eager)."""
    outs = [b for _, b in dims.block_linears[layer]]
    return 2 * dims.hidden + sum(outs) + max(outs, default=0) + dims.num_heads * seq_len


def head_act_bytes(dims: ModelDims) -> int:
    """The head's input and logits in the model dtype, plus the float32 log-softmax of the loss."""
    return (dims.hidden + dims.vocab) * dims.dtype_bytes + 4 * dims.vocab


def forward_flops_per_token(dims: ModelDims, seq_len: int) -> int:
    return sum(block_forward_flops(dims, l, seq_len) for l in range(dims.num_layers)) + head_flops(dims)


def backprop_flops_from(dims: ModelDims, layer: int, seq_len: int) -> int:
    """What the backward costs per token when ``layer`` is the lowest adapted layer."""
    return sum(block_backprop_flops(dims, l, seq_len) for l in range(layer, dims.num_layers)) + head_flops(dims)


def act_bytes_from(dims: ModelDims, layer: int, seq_len: int) -> int:
    elems = sum(block_act_elems(dims, l, seq_len) for l in range(layer, dims.num_layers))
    return elems * dims.dtype_bytes + head_act_bytes(dims)


def adapter_params(rank: int, d_in: int, d_out: int) -> int:
    return rank * (d_in + d_out)


def adapter_flops(rank: int, d_in: int, d_out: int) -> int:
    """Forward (2) + weight gradients (2) + gradient through the adapter (2), per token."""
    return 6 * rank * (d_in + d_out)


# ---------------------------------------------------------------------------------------------
# Card columns
# ---------------------------------------------------------------------------------------------
def add_cost_columns(card, layout: ModelLayout, dims: ModelDims | dict, *, rank: int | None = None,
                     seq_len: int):
    """Add the analytic cost columns to ``card.layers`` / ``card.modules`` (in place; returns card).

    ``rank`` defaults to the card's profiling rank; ``seq_len`` is the training sequence length
    (attention-score FLOPs grow with it). The dims, rank and seq_len go to ``card.meta["cost_model"]``
    so a loaded card can still answer :func:`predicted_cost`.
    """
    dims = dims if isinstance(dims, ModelDims) else ModelDims.from_dict(dims)
    rank = int(card.meta.get("rank", 0) if rank is None else rank)
    if rank < 1:
        raise LayercardError(f"cost model: rank must be >= 1, got {rank}")
    if seq_len < 1:
        raise LayercardError(f"cost model: seq_len must be >= 1, got {seq_len}")
    if layout.num_layers != dims.num_layers:
        raise LayercardError(f"cost model: layout has {layout.num_layers} blocks but the model dims {dims.num_layers}")
    ids = card.layer_ids
    outside = [l for l in ids if l >= dims.num_layers]
    if outside:
        raise LayercardError(f"cost model: card layers {outside} exceed the model's {dims.num_layers} blocks")
    by_layer = {l: layout.modules_of(l) for l in ids}
    empty = [l for l, mods in by_layer.items() if not mods]
    if empty:
        raise LayercardError(f"cost model: layout has no target modules in card layers {empty}")

    layers = card.layers
    layers["forward_flops_per_token"] = [float(block_forward_flops(dims, l, seq_len)) for l in ids]
    layers["adapter_params"] = [sum(adapter_params(rank, m.d_in, m.d_out) for m in by_layer[l]) for l in ids]
    layers["adapter_flops_per_token"] = [float(sum(adapter_flops(rank, m.d_in, m.d_out) for m in by_layer[l]))
                                         for l in ids]
    layers["backprop_flops_per_token"] = [float(backprop_flops_from(dims, l, seq_len)) for l in ids]
    layers["act_bytes_per_token"] = [float(act_bytes_from(dims, l, seq_len)) for l in ids]

    mods = card.modules
    if len(mods):
        mods["adapter_params"] = [adapter_params(rank, int(a), int(b)) for a, b in zip(mods["d_in"], mods["d_out"])]
        mods["adapter_flops_per_token"] = [float(adapter_flops(rank, int(a), int(b)))
                                           for a, b in zip(mods["d_in"], mods["d_out"])]
    card.meta["cost_model"] = {
        "dims": dims.to_dict(), "rank": rank, "seq_len": int(seq_len),
        "forward_flops_per_token": float(forward_flops_per_token(dims, seq_len)),
    }
    if card.meta.get("step_timing", {}).get("points"):
        calibrate_step_time(card)
    return card


# ---------------------------------------------------------------------------------------------
# Calibration on measured step times
# ---------------------------------------------------------------------------------------------
def _check_layers(card, layers) -> list[int]:
    try:
        layers = sorted({int(l) for l in layers})
    except (TypeError, ValueError):
        raise LayercardError(f"layers must be layer indices, got {layers!r}") from None
    if not layers:
        raise LayercardError("layer set is empty: give at least one layer to adapt")
    card.positions(layers)  # raises naming any layer the card lacks
    return layers


def cost_features(card, layers) -> np.ndarray:
    """[1, backprop FLOPs/token from min(S), Σ adapter FLOPs/token over S] — the calibration regressors."""
    layers = _check_layers(card, layers)
    card.require_columns(["backprop_flops_per_token", "adapter_flops_per_token"],
                         "layercard.profile.cost.add_cost_columns")
    rows = card.layers.iloc[card.positions(layers)]
    lowest = card.layers.iloc[card.positions([layers[0]])[0]]
    return np.array([1.0, float(lowest["backprop_flops_per_token"]), float(rows["adapter_flops_per_token"].sum())])


def _nnls_small(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares by trying every feature subset (exact for a handful of features):
    seconds per FLOP and the fixed overhead cannot be negative, and negative fits extrapolate badly."""
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    Xs = X / scale
    best, best_err = np.zeros(X.shape[1]), float(np.sum(y ** 2))
    for k in range(1, X.shape[1] + 1):
        for subset in itertools.combinations(range(X.shape[1]), k):
            coef_s, *_ = np.linalg.lstsq(Xs[:, subset], y, rcond=None)
            if np.any(coef_s < 0):
                continue
            coef = np.zeros(X.shape[1])
            coef[list(subset)] = coef_s
            err = float(np.sum((Xs @ coef - y) ** 2))
            if err < best_err - 1e-15 * max(best_err, 1.0):
                best, best_err = coef, err
    return best / scale


def r_squared(measured, predicted) -> float | None:
    """1 − SS_res/SS_tot; None when the measurements have no spread (or fewer than two)."""
    y, p = np.asarray(measured, float), np.asarray(predicted, float)
    if len(y) < 2:
        return None
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot <= 0:
        return None
    return 1.0 - float(np.sum((y - p) ** 2)) / ss_tot


def calibrate_step_time(card) -> dict:
    """Fit step_seconds ≈ c·[1, backprop(min S), Σ adapter(S)] (c ≥ 0) on the measured points in
    ``card.meta["step_timing"]["points"]``; stores the fit in ``meta["cost_fit"]`` and its R² in
    ``meta["cost_r2"]`` (None when the measured times have no spread)."""
    points = card.meta.get("step_timing", {}).get("points") or []
    if not points:
        raise LayercardError("no measured step times to calibrate on (run layercard.train.step_timing first)")
    X = np.stack([cost_features(card, p["layers"]) for p in points])
    y = np.array([float(p["step_seconds"]) for p in points])
    coef = _nnls_small(X, y)
    r2 = r_squared(y, X @ coef)
    fit = {"features": FIT_FEATURES, "coef": [float(c) for c in coef], "r2": r2, "n_points": len(points)}
    card.meta["cost_fit"] = fit
    card.meta["cost_r2"] = r2
    return fit


def predicted_step_seconds(card, layers) -> float | None:
    fit = card.meta.get("cost_fit")
    if not fit:
        return None
    return float(np.dot(fit["coef"], cost_features(card, layers)))


def predicted_cost(card, layers) -> dict:
    """Training cost of adapting exactly ``layers`` (a non-empty set of card layer indices).

    Returns ``flops_per_token`` (forward of the whole model + backprop from min(S) + Σ adapter
    FLOPs), ``step_seconds`` (calibrated on measured steps; None if nothing was measured),
    ``adapted_layers`` (|S|, what unmerged multi-adapter inference pays per layer) and
    ``adapter_params``.
    """
    layers = _check_layers(card, layers)
    card.require_columns(["backprop_flops_per_token", "adapter_flops_per_token", "adapter_params"],
                         "layercard.profile.cost.add_cost_columns")
    model = card.meta.get("cost_model")
    if not model:
        raise LayercardError("card has no cost model metadata; layercard.profile.cost.add_cost_columns adds it")
    feats = cost_features(card, layers)
    rows = card.layers.iloc[card.positions(layers)]
    return {
        "flops_per_token": float(model["forward_flops_per_token"] + feats[1] + feats[2]),
        "step_seconds": predicted_step_seconds(card, layers),
        "adapted_layers": len(layers),
        "adapter_params": int(rows["adapter_params"].sum()),
    }
