"""Sizing a distributed profile: memory per actor, memory of the driver, and the driver's solve time.

Pure arithmetic on a :class:`ModelLayout` (works on a ``meta`` model). Per actor (pass 1, on its
device): weights (the whole frozen model) + statistics of its slice (float64 A per input group and
C per module) + the float32 partial sums the hooks accumulate between flushes (the same entries,
half the bytes) + one float64 copy of the largest partial while it is flushed + the inputs X its
hooks keep until the backward (float32, tokens × d_in per group) + an activation allowance for one
forward/backward of a micro-batch. Pass 2's actor memory (float32 weights, the slice's Δ*, forward-
mode activations) is not sized here.

The driver (``pipelines/ray_profile.py``) holds every layer's float64 statistics as running sums,
solves every input group's eigendecomposition and every module's Δ* on its CPU, and puts the Δ* in
the object store of its node: :func:`driver_memory` follows it phase by phase.
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


def _groups(layout: ModelLayout, layers) -> dict:
    """(layer, input group) → d_in."""
    groups = {}
    for layer in layers:
        for m in layout.modules_of(layer):
            groups.setdefault((layer, _group_key(m.name)), m.d_in)
    return groups


def partial_sum_bytes(layout: ModelLayout, layers: list[int]) -> int:
    """float32 partial sums on the device (hooks.StatsCollector: same entries as the statistics)."""
    return slice_stat_bytes(layout, layers) * X_BYTES // STAT_BYTES


def flush_bytes(layout: ModelLayout, layers: list[int]) -> int:
    """The float64 copy of the largest partial sum made while it is added into the totals."""
    mods = [m for l in layers for m in layout.modules_of(l)]
    return max([m.d_in * m.d_out for m in mods] + [d * d for d in _groups(layout, layers).values()]) * STAT_BYTES


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
        return [weights_bytes + act + slice_stat_bytes(layout, s) + partial_sum_bytes(layout, s) + flush_bytes(layout, s)
                + slice_x_bytes(layout, s, tokens) for s in slices]

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


# ----------------------------------------------------------------------------- the driver
EIG_CACHE_BYTES = 2 * 2 ** 30
"""pipelines/ray_profile.py keeps the eigendecompositions for pass 2 when they fit in this (the same value)."""
DELTA_BYTES = 4   # the driver's Δ* are float32 CPU tangents (float64 for a float64 model)
EIGH_FLOPS = 9    # symmetric QR with eigenvectors: ~9·d³ (Golub & Van Loan, Matrix Computations, §8.3)
SVD_FLOPS = (14, 8)   # thin SVD of m × n (m ≥ n), U and V: ~14·m·n² + 8·n³ (Golub–Reinsch, ibid. §5.4)


@dataclass
class DriverPlan:
    """The driver's memory under the current design, phase by phase (bytes), and its solve time."""
    stats_bytes: int            # every layer's float64 running sums, held from pass 1 to the end
    slice_result_bytes: int     # one slice's result while it is added: serialised bytes + its tensors
    eig_cache_bytes: int        # eigendecompositions kept for pass 2 (0 above EIG_CACHE_BYTES)
    solve_transient_bytes: int  # one input group's eigh (symmetrised copy, LAPACK's copy, eigenvectors)
    delta_bytes: int            # every layer's Δ* (and, with coupling.adam, the sign steps) on the CPU
    object_store_bytes: int     # the Δ* put in the object store of the driver's node for pass 2
    phases: dict[str, int]      # peak per phase
    solve_flops: float
    eigh_solves: int            # each input group's eigh is solved this many times (2: cache too big)

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def driver_memory(layout: ModelLayout, slices: list[list[int]], *, coupling: bool, adam: bool,
                  delta_bytes: int = DELTA_BYTES) -> DriverPlan:
    """What ``profile_on_ray`` holds on the driver's node, phase by phase:

    - pass 1: the running sums + one slice's result (``stats += _stats_from_bytes(row["stats"])``:
      the row's bytes and the tensors read back from them);
    - card: the sums + the cached eigendecompositions + one group's eigh at work;
    - Δ* (coupling): the sums + the cache + every Δ* built so far + one eigh at work;
    - pass 2 (coupling): the sums + the Δ* + their copy in the object store (``ray.put`` per slice).

    The process's own footprint (interpreter, torch, Ray, the token ids) comes on top: SmolLM2's
    demo driver plans 4.6 GiB and was seen at ~6.5 GB RSS.
    """
    layers = [l for s in slices for l in s]
    stats = slice_stat_bytes(layout, layers)
    result = 2 * max(slice_stat_bytes(layout, s) for s in slices)
    d_groups = list(_groups(layout, layers).values())
    eig_all = sum(STAT_BYTES * (d * d + d) for d in d_groups)
    cached = coupling and eig_all <= EIG_CACHE_BYTES
    cache = eig_all if cached else 0
    transient = 3 * STAT_BYTES * max(d * d for d in d_groups)
    newton = sum(m.d_in * m.d_out for m in layout.modules if m.layer in set(layers)) * delta_bytes
    deltas = newton * (2 if adam else 1)
    phases = {"pass 1": stats + result, "card": stats + cache + transient}
    if coupling:
        phases["Δ*"] = stats + cache + deltas + transient
        phases["pass 2"] = stats + 2 * deltas
    solves = 2 if coupling and not cached else 1
    flops = solves * sum(EIGH_FLOPS * float(d) ** 3 for d in d_groups)
    for m in layout.modules:
        if m.layer not in set(layers):
            continue
        big, small = max(m.d_in, m.d_out), min(m.d_in, m.d_out)
        svd = SVD_FLOPS[0] * big * small ** 2 + SVD_FLOPS[1] * float(small) ** 3
        whiten = 4.0 * m.d_in ** 2 * m.d_out                 # V (w ⊙ Vᵀ C): two d_in × d_in by d_in × d_out GEMMs
        flops += svd + whiten + ((svd + 2 * whiten) if coupling else 0)   # card row; Δ*: SVD, whiten, un-whiten
    return DriverPlan(stats, result, cache, transient, deltas, deltas if coupling else 0, phases, flops, solves)
