"""Sizing a distributed profile: statistics memory per layer slice and the actor layout.

Pure arithmetic on a :class:`ModelLayout` (works on a ``meta`` model). Per actor:
weights (the whole frozen model) + statistics of its slice (float64 A per input group and C per
module) + the inputs X its hooks keep until the backward (float32, tokens × d_in per group) +
an activation allowance for one forward/backward of a micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layercard.discovery import ModelLayout

GIB = 1024 ** 3
STAT_BYTES = 8   # statistics are summed in float64
X_BYTES = 4      # per-batch products in float32


def slice_stat_bytes(layout: ModelLayout, layers: list[int]) -> int:
    """float64 bytes of A (one per input group: q/k/v share, gate/up share) and C for ``layers``."""
    total = 0
    for layer in layers:
        mods = layout.modules_of(layer)
        groups = {}
        for m in mods:
            total += m.d_in * m.d_out * STAT_BYTES
            groups.setdefault(_group_key(m.name), m.d_in)
        total += sum(d * d for d in groups.values()) * STAT_BYTES
    return total


def _group_key(name: str) -> str:
    """Modules that read the same tensor: q/k/v, gate/up (by architecture naming)."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    if leaf in ("q_proj", "k_proj", "v_proj", "query", "key", "value"):
        return parent + ".qkv"
    if leaf in ("gate_proj", "up_proj", "w1", "w3"):
        return parent + ".gate_up"
    return name


def slice_x_bytes(layout: ModelLayout, layers: list[int], tokens: int) -> int:
    groups = {}
    for layer in layers:
        for m in layout.modules_of(layer):
            groups.setdefault((layer, _group_key(m.name)), m.d_in)
    return sum(groups.values()) * tokens * X_BYTES


def activation_bytes(hidden: int, num_layers: int, vocab: int, tokens: int, elt: int,
                     heads: int = 0, seq_len: int = 0) -> int:
    """Allowance for one micro-batch forward+backward kept for the backward: per token and layer
    (34 + 5·heads·seq/hidden)·hidden 16-bit values (Korthikanti et al.; the second term is eager
    attention's score matrices, 0 with fused SDPA) scaled to ``elt`` bytes, plus float32 logits
    and their gradient."""
    per_layer = (34 + 5 * heads * seq_len / hidden) * hidden * elt / 2
    return int(tokens * (per_layer * num_layers + 2 * vocab * 4))


@dataclass
class Plan:
    gpus: int
    gpu_mem_bytes: int
    layer_slices: int
    replicas: int
    slices: list[list[int]]
    per_actor_bytes: list[int]
    stat_bytes: list[int]
    weights_bytes: int
    fits: bool
    gpus_needed: int

    def table(self) -> str:
        rows = [f"{'slice':>5} {'layers':>9} {'stats GiB':>10} {'actor GiB':>10} {'actors':>6}"]
        for i, (layers, b, st) in enumerate(zip(self.slices, self.per_actor_bytes, self.stat_bytes)):
            rows.append(f"{i:>5} {f'{layers[0]}-{layers[-1]}':>9} {st / GIB:>10.2f} "
                        f"{b / GIB:>10.1f} {self.replicas:>6}")
        return "\n".join(rows)


def plan_layout(layout: ModelLayout, *, weights_bytes: int, hidden: int, vocab: int, tokens: int, elt: int,
                gpus: int, gpu_mem_gb: float, headroom: float = 0.9, heads: int = 0, seq_len: int = 0) -> Plan:
    """The fewest layer slices whose biggest actor fits ``headroom`` of one GPU, with actors = gpus.

    ``layer_slices`` must divide ``gpus`` (each slice gets gpus/slices data replicas). If no divisor
    fits, ``gpus_needed`` is the number of GPUs the smallest fitting slicing needs.
    """
    layers = list(layout.layers)
    budget = int(gpu_mem_gb * GIB * headroom)
    act = activation_bytes(hidden, layout.num_layers, vocab, tokens, elt, heads, seq_len)

    def per_actor(slices):
        return [weights_bytes + act + slice_stat_bytes(layout, s) + slice_x_bytes(layout, s, tokens) for s in slices]

    def stats(slices):
        return [slice_stat_bytes(layout, s) for s in slices]

    def split(n):
        return [list(map(int, s)) for s in np.array_split(np.asarray(layers), n)]

    for n in range(1, len(layers) + 1):
        if gpus % n:
            continue
        sizes = per_actor(split(n))
        if max(sizes) <= budget:
            return Plan(gpus, int(gpu_mem_gb * GIB), n, gpus // n, split(n), sizes, stats(split(n)), weights_bytes,
                        True, n)
    needed = next((n for n in range(1, len(layers) + 1) if max(per_actor(split(n))) <= budget), None)
    n = len(layers) if needed is None else needed
    return Plan(gpus, int(gpu_mem_gb * GIB), n, 0, split(n), per_actor(split(n)), stats(split(n)), weights_bytes,
                False, needed or 0)
