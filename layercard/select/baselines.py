"""Baseline layer choices that card-guided selection must beat (docs/design.md §3).

Each strategy returns k distinct card layer indices, ascending. Positions are by depth among the
card's layers (a card may hold a subset of the model's layers): "top" is the k deepest layers,
"bottom" the k shallowest, "mid" the k centred ones, "uniform" k evenly spaced ones including both
ends where k ≥ 2, "random" a seeded draw, "grad-norm" the k largest card column ``grad_norm``,
"block-influence" the k largest ``block_influence`` (1 − cos(block input, output), ShortGPT).
"all" is every layer (k is ignored).
"""
from __future__ import annotations

import numpy as np

from layercard.errors import LayercardError

__all__ = ["STRATEGIES", "SCORE_COLUMNS", "baseline_positions", "baseline_layers"]

STRATEGIES = ("all", "top", "bottom", "mid", "uniform", "random", "grad-norm", "block-influence")
SCORE_COLUMNS = {"grad-norm": "grad_norm", "block-influence": "block_influence"}


def _top_k(scores: np.ndarray, k: int) -> list[int]:
    # stable: among equal scores the shallower layer wins
    return sorted(np.argsort(-scores, kind="stable")[:k].tolist())


def baseline_positions(strategy: str, L: int, k: int | None, *, seed: int | None = None,
                       scores: np.ndarray | None = None) -> list[int]:
    """Positions 0..L−1 (ascending) chosen by ``strategy``; ``scores`` (L,) for the score strategies."""
    if strategy not in STRATEGIES:
        raise LayercardError(f"strategy '{strategy}' is not one of {', '.join(STRATEGIES)}")
    if strategy == "all":
        return list(range(L))
    if k is None:
        raise LayercardError(f"strategy '{strategy}' needs --k (how many layers)")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= L:
        raise LayercardError(f"k={k!r} is out of range: the card has {L} layers, so k must be in 1..{L}")
    if strategy == "top":
        return list(range(L - k, L))
    if strategy == "bottom":
        return list(range(k))
    if strategy == "mid":
        start = (L - k) // 2
        return list(range(start, start + k))
    if strategy == "uniform":
        if k == 1:
            return [(L - 1) // 2]
        # spacing (L−1)/(k−1) ≥ 1, so floor(x + ½) keeps the k points distinct
        return [int(np.floor(i * (L - 1) / (k - 1) + 0.5)) for i in range(k)]
    if strategy == "random":
        if seed is None:
            raise LayercardError("strategy 'random' needs --seed")
        return sorted(np.random.default_rng(seed).choice(L, size=k, replace=False).tolist())
    column = SCORE_COLUMNS[strategy]
    if scores is None:
        raise LayercardError(f"strategy '{strategy}' needs the card column '{column}'")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (L,) or not np.all(np.isfinite(scores)):
        raise LayercardError(f"strategy '{strategy}': card column '{column}' is missing or not finite for every layer; "
                             "`layercard profile` fills it")
    return _top_k(scores, k)


def baseline_layers(card, strategy: str, k: int | None, *, seed: int | None = None) -> list[int]:
    """Card layer indices chosen by ``strategy`` on ``card`` (a :class:`layercard.card.layer_card.LayerCard`)."""
    scores = None
    column = SCORE_COLUMNS.get(strategy)
    if column is not None:
        if column not in card.layers.columns:
            raise LayercardError(f"strategy '{strategy}' needs card column '{column}', which this card lacks; "
                                 "`layercard profile` fills it")
        scores = card.layers[column].to_numpy(np.float64)
    ids = card.layer_ids
    return [ids[i] for i in baseline_positions(strategy, len(ids), k, seed=seed, scores=scores)]
