"""Drift between two Layer Cards of one model lineage: what re-profiling a new checkpoint or new
data changed, and whether it is enough to act on.

Three families of change are measured over the layers both cards hold:

* **per-layer metrics** — relative change ``(new − old) / |old|`` of ``res2``, ``kappa``,
  ``gain_adj``, the predicted singleton gain ``b² / 2K_ℓℓ`` and, when both cards carry them, the
  cost columns ``step_seconds`` and ``backprop_flops_per_token``;
* **rankings** — Kendall τ-b between the old and new layer scores, by ``gain_adj`` and (with the
  coupling pass) by the singleton gain, and each layer's move in rank;
* **selections** — for every objective both cards can answer, the chosen layer set: the top
  ⌈L/4⌉ by ``gain_adj``, :func:`layercard.select.selection.select_max_quality` at k = ⌈L/4⌉ (coupling
  needed) and :func:`layercard.select.selection.select_min_cost` at ``min_cost_target`` (cost columns
  needed); with the coupling pass, how much of the new set's value the old set keeps when both
  are scored on the new card (:func:`retained_value`), so near-ties do not count as drift.

:func:`diff_cards` returns the whole comparison as a plain dict (``drift.json``);
:func:`verdict` turns it into drift yes/no, the reasons and the layers to name, using the
thresholds of :class:`DriftSettings`. Everything here is pure: no I/O, no Ray, no torch maths.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig

METRIC_COLUMNS = ["res2", "kappa", "gain_adj", "singleton_gain", "step_seconds", "backprop_flops_per_token"]
RANKINGS = {"gain_adj": "gain_adj", "singleton_gain": "singleton_gain (b²/2K_ℓℓ)"}


def _default_rel_limits() -> dict:
    # Cost columns are reported but not limited by default: analytic FLOPs move with the padded
    # length of the timing batch and measured seconds with the node; a cost change that matters
    # shows up as a changed min-cost selection.
    return {"res2": 0.5, "kappa": 1.0}


@dataclass
class DriftSettings:
    """When a re-profile counts as drift (exit code 3). Every limit applies per layer or per ranking."""

    min_kendall_tau: float = 0.8
    """Drift when Kendall τ-b of a layer ranking (by gain_adj; by b²/2K_ℓℓ) falls below this."""
    max_rank_change: int = 2
    """Drift when a layer moves more than this many places in either ranking."""
    max_rel_change: dict = field(default_factory=_default_rel_limits)
    """Column → limit on |new − old| / |old| per layer (columns: METRIC_COLUMNS). Given columns
    override the defaults; a column set to null, or without a default, is reported but never
    drift. κ is a condition number: it moves a lot between checkpoints, hence the loose default."""
    fail_on_selection_change: bool = True
    """Drift when the selected layer set of an objective changes and the old set is now clearly
    worse (see ``min_retained_value``)."""
    min_retained_value: float = 0.95
    """A changed selection is drift when the old set, scored on the new card, keeps less than this
    share of the new set's value for the objective (:func:`retained_value`); 1.0 = any change.
    Near-ties flip on calibration noise alone and are not worth a re-train. Without the coupling
    pass (nothing to score with) any change counts."""
    selection_k: int | None = None
    """Set size for the top-k and max-quality objectives; null = ⌈L/4⌉."""
    min_cost_target: float = 0.9
    """The min-cost objective: the cheapest set reaching this fraction of the all-layer gain."""

    def __post_init__(self):
        self.max_rel_change = {**_default_rel_limits(), **(self.max_rel_change or {})}
        if not -1.0 <= self.min_kendall_tau <= 1.0:
            raise LayercardError(f"config key 'drift.min_kendall_tau' must be in [-1, 1], got {self.min_kendall_tau}")
        if self.max_rank_change < 0:
            raise LayercardError(f"config key 'drift.max_rank_change' must be >= 0, got {self.max_rank_change}")
        for name, limit in self.max_rel_change.items():
            if name not in METRIC_COLUMNS:
                raise LayercardError(f"config key 'drift.max_rel_change.{name}' is unknown "
                                     f"(known: {', '.join(METRIC_COLUMNS)})")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0):
                raise LayercardError(f"config key 'drift.max_rel_change.{name}' must be a number >= 0 or null, got {limit!r}")
        if self.selection_k is not None and self.selection_k < 1:
            raise LayercardError(f"config key 'drift.selection_k' must be >= 1, got {self.selection_k}")
        if not 0.0 <= self.min_retained_value <= 1.0:
            raise LayercardError(f"config key 'drift.min_retained_value' must be in [0, 1], "
                                 f"got {self.min_retained_value}")
        if not 0.0 < self.min_cost_target <= 1.0:
            raise LayercardError(f"config key 'drift.min_cost_target' must be in (0, 1], got {self.min_cost_target}")


@dataclass
class ReprofileConfig(ProfileConfig):
    """``layercard reprofile``: a profile config (configs/*.yaml) plus the ``drift`` thresholds."""

    drift: DriftSettings = field(default_factory=DriftSettings)

    def profile_config(self) -> ProfileConfig:
        """The profile part alone: what the card records and the store hashes (not the thresholds)."""
        return ProfileConfig(**{f.name: getattr(self, f.name) for f in fields(ProfileConfig)})


# ---------------------------------------------------------------------------------------------
# Rank statistics
# ---------------------------------------------------------------------------------------------
def _finite_or_inf(v, name: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1:
        raise LayercardError(f"{name} must be a 1-D array, got shape {v.shape}")
    if np.isnan(v).any():
        raise LayercardError(f"{name} has NaN at positions {np.flatnonzero(np.isnan(v)).tolist()}")
    return v


def kendall_tau(x, y) -> float:
    """Kendall τ-b of paired scores: (concordant − discordant) / √((n₀ − tiesₓ)(n₀ − ties_y)) over the
    n₀ = n(n−1)/2 pairs. ±inf is allowed (κ of a singular layer); NaN is an error. NaN is returned
    when fewer than two pairs are untied in x or in y (τ is undefined)."""
    x, y = _finite_or_inf(x, "x"), _finite_or_inf(y, "y")
    if x.shape != y.shape:
        raise LayercardError(f"kendall_tau: x has {len(x)} values, y has {len(y)}")
    # Dense ranks first, so inf − inf never occurs in the pair differences.
    rx, ry = np.unique(x, return_inverse=True)[1], np.unique(y, return_inverse=True)[1]
    iu = np.triu_indices(len(x), k=1)
    sx = np.sign(rx[:, None] - rx[None, :])[iu]
    sy = np.sign(ry[:, None] - ry[None, :])[iu]
    untied_x, untied_y = int(np.count_nonzero(sx)), int(np.count_nonzero(sy))
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return float(np.sum(sx * sy) / math.sqrt(untied_x * untied_y))


def rank_positions(scores) -> np.ndarray:
    """Rank of each entry, 1 = highest score; ties keep their order (the shallower layer first)."""
    s = _finite_or_inf(scores, "scores")
    order = np.argsort(-s, kind="stable")
    ranks = np.empty(len(s), dtype=np.int64)
    ranks[order] = np.arange(1, len(s) + 1)
    return ranks


def relative_change(old, new) -> np.ndarray:
    """(new − old) / |old| elementwise; 0 where equal (inf = inf too), ±inf where old = 0 ≠ new."""
    old, new = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (new - old) / np.abs(old)
    out[old == new] = 0.0
    zero = (old == 0) & (new != 0)
    out[zero] = np.copysign(np.inf, new[zero])
    return out


def singleton_gain(b, k_diag) -> np.ndarray:
    """Predicted gain of adapting one layer alone, b² / (2 K_ℓℓ) (0 where K_ℓℓ ≤ 0)."""
    b, k = np.asarray(b, dtype=np.float64), np.asarray(k_diag, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k > 0, b * b / (2.0 * k), 0.0)


def default_k(n_layers: int) -> int:
    return max(1, math.ceil(n_layers / 4))


# ---------------------------------------------------------------------------------------------
# Cards → comparable tables and selections
# ---------------------------------------------------------------------------------------------
def _layer_frame(card):
    t = card.layers.copy()
    if {"b", "k_diag"} <= set(t.columns) and not t["b"].isna().all():
        t["singleton_gain"] = singleton_gain(t["b"], t["k_diag"])
    return t.set_index("layer")


def _has_coupling(card) -> bool:
    return card.coupling_k is not None and "b" in card.layers.columns and not card.layers["b"].isna().all()


def card_selections(card, settings: DriftSettings) -> tuple[dict[str, list[int]], list[str], object]:
    """Objective name → selected layers, for every objective this card can answer; notes; and the
    card's :class:`layercard.select.selection.CardArrays` (None without the coupling pass)."""
    notes = []
    t = card.layers
    k = settings.selection_k or default_k(len(t))
    k = min(k, len(t))
    top = t.sort_values("gain_adj", ascending=False, kind="stable")["layer"].head(k)
    out = {f"top{k}_gain_adj": sorted(int(l) for l in top)}
    if not _has_coupling(card):
        notes.append("no coupling pass: max-quality and min-cost selections not compared")
        return out, notes, None
    try:
        from layercard.select import selection as sel
    except ImportError:
        notes.append("layercard.select.selection is not available: only the top-k by gain_adj is compared")
        return out, notes, None
    try:
        arrays = sel.arrays_from_card(card)
        has_cost = True
    except LayercardError:
        has_cost = False
        notes.append("no cost columns: max-quality uses uniform cost (ties only), min-cost not compared")
        weight = sel.card_reliability(card)
        ones = np.ones(len(t))
        arrays = sel.CardArrays(np.asarray(card.layer_ids), card.coupling_k, t["b"].to_numpy(np.float64), weight,
                                ones, ones)
    out[f"max_quality@k={k}"] = sorted(int(l) for l in sel.select_max_quality(arrays, k=k).layers)
    if has_cost:
        target = settings.min_cost_target
        out[f"min_cost@{target:g}"] = sorted(int(l) for l in sel.select_min_cost(arrays, target).layers)
    return out, notes, arrays


def retained_value(arrays, objective: str, old_set: list[int], new_set: list[int]) -> float | None:
    """How good the old selection still is for ``objective``, relative to the new one, both scored
    on the new card's arrays (1 = as good, < 1 = worse; None when it cannot be scored).

    max-quality / top-k: Q(old) / Q(new). min-cost@t: cost(new) / cost(old) when the old set still
    reaches t · Q(all layers), else Q(old) / (t · Q(all)) — its shortfall from the target.
    """
    if arrays is None:
        return None
    from layercard.select import selection as sel

    try:
        q_old, q_new = sel.set_quality(arrays, old_set), sel.set_quality(arrays, new_set)
        if objective.startswith("min_cost@"):
            need = float(objective.split("@", 1)[1]) * sel.set_quality(arrays, list(arrays.layers))
            if q_old >= need * (1 - 1e-9):
                return sel.set_cost(arrays, new_set) / sel.set_cost(arrays, old_set)
            return q_old / need if need > 0 else None
        return q_old / q_new if q_new > 0 else None
    except LayercardError:      # the old set names layers the new card lacks
        return None


def card_identity(card, version: str | None = None) -> dict:
    from layercard.card.store import config_hash

    m = card.meta
    return {"version": version, "card_id": card.card_id, "model_id": m.get("model_id"),
            "weights_hash": m.get("weights_hash"), "data_hash": m.get("data_hash"),
            "config_hash": config_hash(m.get("config") or {}), "created_at": m.get("created_at"),
            "n_layers": len(card.layers)}


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------
def _num(v):
    v = float(v)
    return None if math.isnan(v) else (v if math.isfinite(v) else ("inf" if v > 0 else "-inf"))


def diff_cards(old, new, settings: DriftSettings, *, old_version: str | None = None,
               new_version: str | None = None) -> dict:
    """Everything that changed from card ``old`` to card ``new``, verdict included (JSON-ready)."""
    a, b = _layer_frame(old), _layer_frame(new)
    common = sorted(set(a.index) & set(b.index))
    only_old, only_new = sorted(set(a.index) - set(b.index)), sorted(set(b.index) - set(a.index))
    rows = {l: {"layer": int(l)} for l in common}
    metrics = {}
    for col in METRIC_COLUMNS:
        if col not in a.columns or col not in b.columns or a[col].isna().all() or b[col].isna().all():
            continue
        va, vb = a.loc[common, col].to_numpy(np.float64), b.loc[common, col].to_numpy(np.float64)
        rel = relative_change(va, vb)
        limit = settings.max_rel_change.get(col)
        over = [int(l) for l, r in zip(common, rel) if limit is not None and abs(r) > limit]
        metrics[col] = {"limit": limit, "max_abs_rel": _num(np.nanmax(np.abs(rel))) if len(rel) else None,
                        "over_limit": over}
        for l, x, y, r in zip(common, va, vb, rel):
            rows[l].update({f"{col}_old": _num(x), f"{col}_new": _num(y), f"{col}_rel": _num(r)})

    rankings = {}
    for col in RANKINGS:
        if col not in metrics or len(common) < 2:
            continue
        va, vb = a.loc[common, col].to_numpy(np.float64), b.loc[common, col].to_numpy(np.float64)
        ra, rb = rank_positions(va), rank_positions(vb)
        moves = rb - ra
        for l, x, y in zip(common, ra, rb):
            rows[l].update({f"rank_{col}_old": int(x), f"rank_{col}_new": int(y), f"rank_{col}_change": int(y - x)})
        tau = kendall_tau(va, vb)
        rankings[col] = {
            "kendall_tau": None if math.isnan(tau) else tau,
            "max_rank_change": int(np.abs(moves).max()),
            "moved_over_limit": [int(l) for l, m in zip(common, moves) if abs(m) > settings.max_rank_change],
            "moved": [int(l) for l, m in zip(common, moves) if m != 0],
            "order_old": [int(common[i]) for i in np.argsort(ra)],
            "order_new": [int(common[i]) for i in np.argsort(rb)],
        }

    sel_old, notes_old, _ = card_selections(old, settings)
    sel_new, notes_new, arrays_new = card_selections(new, settings)
    selections = {}
    for name in sorted(sel_old.keys() & sel_new.keys()):
        so, sn = set(sel_old[name]), set(sel_new[name])
        selections[name] = {"old": sel_old[name], "new": sel_new[name], "changed": so != sn,
                            "entered": sorted(sn - so), "left": sorted(so - sn),
                            "retained_value": retained_value(arrays_new, name, sel_old[name], sel_new[name])}
    notes = sorted(set(notes_old) | set(notes_new))
    for name in sorted(sel_old.keys() ^ sel_new.keys()):
        notes.append(f"objective {name} is answered by only one of the cards: not compared")

    mo, mn = old.meta, new.meta
    report = {
        "against": card_identity(old, old_version), "new": card_identity(new, new_version),
        "changes": {"weights": mo.get("weights_hash") != mn.get("weights_hash"),
                    "data": mo.get("data_hash") != mn.get("data_hash"),
                    "config": card_identity(old)["config_hash"] != card_identity(new)["config_hash"],
                    "model_id": mo.get("model_id") != mn.get("model_id")},
        "thresholds": asdict(settings),
        "layers_only_in_old": [int(l) for l in only_old], "layers_only_in_new": [int(l) for l in only_new],
        "metrics": metrics, "rankings": rankings, "selections": selections,
        "layers": [rows[l] for l in common], "notes": notes,
    }
    report.update(verdict(report, settings))
    return report


def verdict(report: dict, settings: DriftSettings) -> dict:
    """``{"drift": bool, "reasons": [...], "changed_layers": [...]}`` from a :func:`diff_cards` report."""
    reasons, changed = [], set()
    if report["layers_only_in_old"] or report["layers_only_in_new"]:
        reasons.append(f"layer sets differ: only in old {report['layers_only_in_old']}, "
                       f"only in new {report['layers_only_in_new']}")
        changed |= set(report["layers_only_in_old"]) | set(report["layers_only_in_new"])
    for col, m in report["metrics"].items():
        if m["over_limit"]:
            reasons.append(f"{col} changed by more than {m['limit']:.0%} in layers {m['over_limit']}")
            changed |= set(m["over_limit"])
    for col, r in report["rankings"].items():
        tau = r["kendall_tau"]
        if tau is not None and tau < settings.min_kendall_tau:
            reasons.append(f"Kendall τ of the {RANKINGS[col]} ranking is {tau:.3f} < {settings.min_kendall_tau}")
            changed |= set(r["moved_over_limit"] or r["moved"])
        if r["moved_over_limit"]:
            reasons.append(f"layers {r['moved_over_limit']} moved more than {settings.max_rank_change} places "
                           f"in the {RANKINGS[col]} ranking")
            changed |= set(r["moved_over_limit"])
    if settings.fail_on_selection_change:
        for name, s in report["selections"].items():
            kept = s.get("retained_value")
            if s["changed"] and (kept is None or kept < settings.min_retained_value):
                how = "" if kept is None else f" (the old set keeps {kept:.1%} of the new set's value)"
                reasons.append(f"selection {name} changed: {s['old']} → {s['new']}{how}")
                changed |= set(s["entered"]) | set(s["left"])
    return {"drift": bool(reasons), "reasons": reasons, "changed_layers": sorted(int(l) for l in changed)}


# ---------------------------------------------------------------------------------------------
# drift.md
# ---------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:+.1%}" if abs(v) < 100 else f"{v:+.3g}"


def drift_markdown(report: dict) -> str:
    """A short human summary of a report (the ``drift.md`` beside ``drift.json``)."""
    new, old = report["new"], report.get("against")
    lines = [f"# Drift report: {new.get('model_id')}", ""]
    if old is None:
        lines += [f"Version {new.get('version')} is the first of this model in the store: nothing to compare.", ""]
        return "\n".join(lines)
    status = "**DRIFT**" if report["drift"] else "no drift"
    lines += [f"- new: `{new.get('version')}` (weights `{new.get('weights_hash')}`, data `{new.get('data_hash')}`)",
              f"- against: `{old.get('version')}` (weights `{old.get('weights_hash')}`, data `{old.get('data_hash')}`)",
              f"- what changed: {', '.join(k for k, v in report['changes'].items() if v) or 'nothing in the key'}",
              f"- verdict: {status} (exit code {3 if report['drift'] else 0})", ""]
    if report["reasons"]:
        lines += ["## Reasons", ""] + [f"- {r}" for r in report["reasons"]] + [""]
        lines += [f"Changed layers: {', '.join(map(str, report['changed_layers'])) or '–'}", ""]
    if report["rankings"]:
        lines += ["## Rankings", "", "| ranking | Kendall τ | max move | old order | new order |", "|---|---|---|---|---|"]
        for col, r in report["rankings"].items():
            tau = "–" if r["kendall_tau"] is None else f"{r['kendall_tau']:.3f}"
            lines.append(f"| {RANKINGS[col]} | {tau} | {r['max_rank_change']} | {r['order_old']} | {r['order_new']} |")
        lines.append("")
    if report["selections"]:
        lines += ["## Selections", "", "| objective | old | new | changed | old set keeps |", "|---|---|---|---|---|"]
        for name, s in sorted(report["selections"].items()):
            kept = s.get("retained_value")
            lines.append(f"| {name} | {s['old']} | {s['new']} | {'yes' if s['changed'] else 'no'} | "
                         f"{'–' if kept is None else f'{kept:.1%}'} |")
        lines.append("")
    cols = [c for c in METRIC_COLUMNS if c in report["metrics"]]
    if cols:
        lines += ["## Per-layer relative change", "", "| layer | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for row in report["layers"]:
            lines.append(f"| {row['layer']} | " + " | ".join(_fmt(row.get(f"{c}_rel")) for c in cols) + " |")
        lines.append("")
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)
