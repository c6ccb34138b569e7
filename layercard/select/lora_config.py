"""A layer selection as a plain Hugging Face PEFT ``LoraConfig`` (no monkey-patching, STYLE §4).

**Target form.** Normally ``target_modules`` is the list of the card's short targets (``q_proj``,
``attn.c_proj``) plus ``layers_to_transform`` and ``layers_pattern`` (the blocks' ModuleList name).
PEFT matches a list entry t to every module whose name ends in ``.t``, so a target is *ambiguous*
when it is also a suffix of another module the card knows: BERT's MLP ``output.dense`` also
matches ``attention.output.dense``. Then (and when the chosen layers do not all hold the same
modules) ``target_modules`` is one regex, fully matched by PEFT against each module name, that
names the exact layers and block-relative paths — PEFT forbids ``layers_to_transform`` and
``layers_pattern`` beside a regex, so the layers live in the regex. The card knows the modules it
profiled (and ``meta["block_modules"]`` when the profiler records every linear module of a block);
pass ``target_form="regex"`` when a card profiled only some modules of a block whose unprofiled
modules could share a suffix.

**Ranks under a parameter budget.** A rank-r adapter on a module costs r·(d_in + d_out)
parameters (A: r×d_in, B: d_out×r), so rank r on layer ℓ costs r·P_ℓ, P_ℓ = Σ_modules (d_in + d_out).
The card stores the captured resnorm at its own rank R (``res2_rank_r``) and at full rank
(``res2``). The rank curve assumes geometrically decaying squared singular values σ_i² ∝ q^(i−1)
(i ≤ D = the layer's largest min(d_in, d_out)) — the one-parameter spectrum that reproduces both
stored numbers: (1 − q^R)/(1 − q^D) = res2_rank_r/res2, solved for q by bisection (q = 1, a flat
spectrum, when the ratio is ≤ R/D; q = 0 when rank 1 already captures everything). A layer's value
at rank r is then v_ℓ · (1 − q^r)/(1 − q^R): its predicted gain at the card's rank, v_ℓ (the
scale-free singleton quality Q({ℓ}) of :mod:`layercard.select.selection`, never raw res2), rescaled by
the curve. Every chosen layer starts at rank 1; then one rank at a time goes to the layer with the
largest marginal value per parameter, v_ℓ q^r (1 − q)/(1 − q^R) / P_ℓ, while it fits the budget
(the marginal values fall with r, so this greedy is the classic optimum for concave separable
allocation up to the last, integer, step). ``alpha_pattern`` keeps every layer's LoRA scaling
alpha/r equal to the base one, so a layer's update scale does not depend on the rank it got.
"""
from __future__ import annotations

import heapq
import re
from collections import Counter
from pathlib import Path


from layercard.errors import LayercardError

__all__ = [
    "chosen_modules",
    "ambiguous_targets",
    "params_per_rank",
    "rank_decay",
    "allocate_ranks",
    "card_rank_allocation",
    "build_lora_config",
    "write_lora_config",
]

TASK_TYPE = "CAUSAL_LM"
GENERIC_LAYERS_PATTERN = r"[^.]+"


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
def chosen_modules(card, layers) -> dict[int, list[dict]]:
    """layer → [{module, target, d_in, d_out}] from the card's module table, in table order."""
    table = card.modules
    out = {}
    for layer in layers:
        rows = table[table["layer"] == layer]
        if rows.empty:
            raise LayercardError(f"layer {layer} has no modules in the card (its module table covers layers "
                                 f"{sorted(set(int(x) for x in table['layer']))})")
        out[int(layer)] = [{"module": str(r.module), "target": str(r.target), "d_in": int(r.d_in), "d_out": int(r.d_out)}
                           for r in rows.itertuples()]
    return out


def _known_modules(card) -> set[str]:
    names = set(str(m) for m in card.modules["module"])
    names.update(card.meta.get("modules", []) or [])
    names.update(card.meta.get("block_modules", []) or [])
    return names


def ambiguous_targets(card, modules: dict[int, list[dict]]) -> list[str]:
    """Targets that PEFT's suffix matching would also apply to another module the card knows."""
    known = _known_modules(card)
    bad = set()
    for rows in modules.values():
        for m in rows:
            t = m["target"]
            if any(n != m["module"] and (n == t or n.endswith("." + t)) for n in known):
                bad.add(t)
    return sorted(bad)


def params_per_rank(modules: dict[int, list[dict]]) -> dict[int, int]:
    """layer → P_ℓ = Σ_modules (d_in + d_out): adapter parameters per unit of rank."""
    return {l: sum(m["d_in"] + m["d_out"] for m in rows) for l, rows in modules.items()}


# ---------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------
def rank_decay(res2_rank_r: float, res2: float, R: int, D: int) -> float:
    """q of the geometric spectrum with (1 − q^R)/(1 − q^D) = res2_rank_r / res2 (see module docstring)."""
    if D <= R or not res2 > 0:
        return 1.0
    ratio = float(res2_rank_r) / float(res2)
    if ratio <= R / D:
        return 1.0
    if ratio >= 1.0:
        return 0.0
    lo, hi = 0.0, 1.0                       # g(q) = (1−q^R)/(1−q^D) falls from 1 to R/D on (0, 1)
    for _ in range(200):
        q = 0.5 * (lo + hi)
        if (1 - q**R) / (1 - q**D) > ratio:
            lo = q
        else:
            hi = q
    return 0.5 * (lo + hi)


def _marginal(value: float, q: float, r: int, R: int) -> float:
    """Value of raising a layer's rank from r to r + 1."""
    if q >= 1.0:
        return value / R
    return value * q**r * (1 - q) / (1 - q**R)


def allocate_ranks(values, per_rank, decay, max_rank, R: int, budget: int) -> list[int]:
    """Integer ranks ≥ 1 per layer, Σ rank·per_rank ≤ budget, greedy on marginal value per parameter.

    values (n,) gain at rank R; per_rank (n,) params per unit rank; decay (n,) q; max_rank (n,) D.
    """
    per_rank = [int(p) for p in per_rank]
    floor = sum(per_rank)
    if budget < floor:
        raise LayercardError(f"--rank-budget {budget} is below one rank-1 adapter on the {len(per_rank)} chosen "
                             f"layers ({floor} parameters)")
    ranks = [1] * len(per_rank)
    left = budget - floor
    heap = [(-_marginal(v, q, 1, R) / p, i) for i, (v, q, p) in enumerate(zip(values, decay, per_rank))]
    heapq.heapify(heap)
    while heap:
        neg, i = heapq.heappop(heap)
        if -neg <= 0:
            break
        if per_rank[i] > left or ranks[i] >= max_rank[i]:
            continue                        # this layer is done; cheaper ones may still fit
        ranks[i] += 1
        left -= per_rank[i]
        heapq.heappush(heap, (-_marginal(values[i], decay[i], ranks[i], R) / per_rank[i], i))
    return ranks


def card_rank_allocation(card, layers, budget: int, values: dict[int, float]) -> dict[int, int]:
    """layer → rank for ``layers`` under ``budget`` total adapter parameters.

    ``values``: layer → predicted gain at the card's rank (scale-free, from the selection).
    """
    R = int(card.meta.get("rank", 8))
    modules = chosen_modules(card, layers)
    P = params_per_rank(modules)
    t = card.layers.set_index("layer")
    D = [max(min(m["d_in"], m["d_out"]) for m in modules[l]) for l in layers]
    decay = [rank_decay(t.at[l, "res2_rank_r"], t.at[l, "res2"], R, d) for l, d in zip(layers, D)]
    ranks = allocate_ranks([float(values[l]) for l in layers], [P[l] for l in layers], decay, D, R, int(budget))
    return dict(zip([int(l) for l in layers], ranks))


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------
def _alt(items) -> str:
    return "|".join(re.escape(str(x)) for x in items)


def _layer_key(pattern: str, layer: int, names) -> str:
    """rank_pattern / alpha_pattern key of one layer's modules (PEFT matches ``(.*\\.)?(key)$``)."""
    return rf"{pattern}\.{layer}\.(?:{_alt(names)})"


def _regex_targets(pattern: str, modules: dict[int, list[dict]]) -> str:
    groups: dict[tuple[str, ...], list[int]] = {}
    for l, rows in modules.items():
        groups.setdefault(tuple(sorted(m["module"] for m in rows)), []).append(l)
    parts = [rf"(?:{'|'.join(str(l) for l in ls)})\.(?:{_alt(names)})" for names, ls in groups.items()]
    body = parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"
    return rf"(?:.*\.)?{pattern}\.{body}"


def build_lora_config(card, layers, *, r: int | None = None, alpha: float | None = None,
                      ranks: dict[int, int] | None = None, target_form: str = "auto"):
    """(peft.LoraConfig, info) adapting the card's modules on ``layers``.

    ``r`` defaults to the card's rank, ``alpha`` to 2·r. With ``ranks`` (layer → rank) the base r is
    the most common rank and the others go to ``rank_pattern`` (with ``alpha_pattern`` keeping
    alpha/r). ``target_form``: "auto" (list unless a target is ambiguous), "list" or "regex".
    ``info``: target_form, ambiguous targets, modules per layer, ranks, adapter_params.
    """
    from peft import LoraConfig

    layers = sorted(int(l) for l in layers)
    if not layers:
        raise LayercardError("no layers selected: a LoRA config needs at least one layer")
    if target_form not in ("auto", "list", "regex"):
        raise LayercardError(f"target form '{target_form}' is not one of auto, list, regex")
    modules = chosen_modules(card, layers)
    if ranks is None:
        base_r = int(r if r is not None else card.meta.get("rank", 8))
        ranks = {l: base_r for l in layers}
    else:
        ranks = {l: int(ranks[l]) for l in layers}
        counts = Counter(ranks.values())
        base_r = max(counts, key=lambda x: (counts[x], x))      # the most common rank (ties: larger)
    if min(ranks.values()) < 1:
        raise LayercardError(f"LoRA ranks must be >= 1, got {sorted(set(ranks.values()))}")
    lora_alpha = float(alpha) if alpha is not None else 2.0 * base_r
    if not lora_alpha > 0:
        raise LayercardError(f"--alpha must be > 0, got {alpha}")
    lora_alpha = int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha

    pattern_name = card.meta.get("layers_pattern")
    pattern = re.escape(pattern_name) if pattern_name else GENERIC_LAYERS_PATTERN
    ambiguous = ambiguous_targets(card, modules)
    uneven = len({tuple(sorted(m["module"] for m in rows)) for rows in modules.values()}) > 1
    form = target_form if target_form != "auto" else ("regex" if ambiguous or uneven else "list")
    if form == "list" and uneven:
        raise LayercardError(f"the chosen layers {layers} hold different modules; a list target_modules "
                             "cannot say so (use target_form='regex')")
    rank_pattern = {_layer_key(pattern, l, [m["module"] for m in modules[l]]): ranks[l]
                    for l in layers if ranks[l] != base_r}
    alpha_pattern = {k: _scaled_alpha(lora_alpha, v, base_r) for k, v in rank_pattern.items()}
    kwargs = dict(r=base_r, lora_alpha=lora_alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                  lora_dropout=0.0, bias="none", task_type=TASK_TYPE)
    if form == "regex":
        kwargs["target_modules"] = _regex_targets(pattern, modules)
    else:
        kwargs["target_modules"] = sorted({m["target"] for rows in modules.values() for m in rows})
        kwargs["layers_to_transform"] = layers
        if pattern_name:
            kwargs["layers_pattern"] = pattern_name
    config = LoraConfig(**kwargs)
    P = params_per_rank(modules)
    info = {
        "target_form": form,
        "ambiguous_targets": ambiguous,
        "modules": {l: [m["module"] for m in modules[l]] for l in layers},
        "ranks": ranks,
        "adapter_params": int(sum(ranks[l] * P[l] for l in layers)),
    }
    return config, info


def _scaled_alpha(alpha: float, rank: int, base_r: int) -> float | int:
    a = alpha * rank / base_r
    return int(a) if float(a).is_integer() else a


def write_lora_config(config, directory: str | Path) -> Path:
    """``config.save_pretrained(directory)`` → ``adapter_config.json`` that ``LoraConfig.from_pretrained`` loads."""
    directory = Path(directory)
    config.save_pretrained(str(directory))
    return directory / "adapter_config.json"
