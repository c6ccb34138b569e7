"""Sizing a distributed profile: memory per actor, memory of the driver, and the driver's solve time.

Pure arithmetic on a :class:`ModelLayout` (works on a ``meta`` model). Per actor (pass 1, on its
device): weights (the whole frozen model) + statistics of its slice (float64 A per input group and
C per module) + the float32 partial sums the hooks accumulate between flushes (the same entries,
half the bytes) + one float64 copy of the largest partial while it is flushed + the inputs X its
hooks keep until the backward (float32, tokens × d_in per group) + an activation allowance for one
forward/backward of a micro-batch. A slice owner also solves on its device: the eigendecompositions
it keeps for pass 2, one eigh at work and its layers' Δ* (and sign steps) beside the statistics
(:func:`owner_solve_bytes`); an actor must fit the larger of the two. Pass 2's forward-mode
activations are not sized here.

The driver (:mod:`layercard.profile.distributed`) holds the calibration token ids, the card rows,
K and one micro-batch of pass-2 directions at a time — nothing that grows with a layer's width:
:func:`driver_memory` follows it phase by phase.
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


def owner_solve_bytes(layout: ModelLayout, layers: list[int], *, coupling: bool, adam: bool, elt: int) -> int:
    """A slice owner's solve beyond its statistics, on its device: the eigendecompositions kept for
    pass 2 (when they fit in :data:`EIG_CACHE_BYTES`), one input group's eigh at work (symmetrised
    copy, LAPACK's copy, eigenvectors) and, with coupling, its layers' Δ* (and sign steps) in the
    weights' dtype."""
    d_groups = list(_groups(layout, layers).values())
    eig_all = sum(STAT_BYTES * (d * d + d) for d in d_groups)
    cache = eig_all if coupling and eig_all <= EIG_CACHE_BYTES else 0
    transient = 3 * STAT_BYTES * max(d * d for d in d_groups)
    deltas = sum(m.d_in * m.d_out for l in layers for m in layout.modules_of(l)) * elt * (2 if adam else 1)
    return cache + transient + (deltas if coupling else 0)


def plan_layout(layout: ModelLayout, *, weights_bytes: int, hidden: int, vocab: int, tokens: int, elt: int,
                gpus: int, gpu_mem_gb: float, headroom: float = 0.9, heads: int = 0, seq_len: int = 0,
                coupling: bool = True, adam: bool = True) -> Plan:
    """The fewest layer slices whose biggest actor fits ``headroom`` of one GPU, with actors = gpus.

    An actor's bytes are the larger of pass 1 (weights, activations, statistics, partial sums, one
    flush, the hooks' inputs) and its owner's solve (weights, statistics, :func:`owner_solve_bytes`).
    ``layer_slices`` must divide ``gpus`` (each slice gets gpus/slices data replicas). If no divisor
    fits, ``gpus_needed`` is the number of GPUs the smallest fitting slicing needs.
    """
    layers = list(layout.layers)
    budget = int(gpu_mem_gb * GIB * headroom)
    act = activation_bytes(hidden, layout.num_layers, vocab, tokens, elt, heads, seq_len)

    def per_actor(slices):
        return [weights_bytes + slice_stat_bytes(layout, s)
                + max(act + partial_sum_bytes(layout, s) + flush_bytes(layout, s) + slice_x_bytes(layout, s, tokens),
                      owner_solve_bytes(layout, s, coupling=coupling, adam=adam, elt=elt)) for s in slices]

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
"""A slice owner keeps its eigendecompositions for pass 2 when they fit in this
(:data:`layercard.profile.distributed.EIG_CACHE_BYTES`, the same value)."""
EIGH_FLOPS = 9    # symmetric QR with eigenvectors: ~9·d³ (Golub & Van Loan, Matrix Computations, §8.3)
SVD_FLOPS = (14, 8)   # thin SVD of m × n (m ≥ n), U and V: ~14·m·n² + 8·n³ (Golub–Reinsch, ibid. §5.4)
RECORD_OVERHEAD = 400   # a token record on the driver: a dict and two int32 arrays, less their data
ROW_COLUMNS = (64, 32)  # float columns of a layer row / a module row, with room to grow


@dataclass
class DriverPlan:
    """The driver's memory under :mod:`layercard.profile.distributed`, phase by phase (bytes), and the
    slowest slice owner's solve."""
    token_bytes: int            # every calibration record's token ids and labels (int32)
    rows_bytes: int             # the card's layer and module rows
    k_bytes: int                # K over the direction keys, and one probe shard's K while it is folded
    chunk_bytes: int            # one micro-batch of pass-2 directions from every slice, as received and copied
    phases: dict[str, int]      # peak per phase
    solve_flops: float          # the largest slice's solve (its owner's eigh, card-row SVDs and Δ*)
    eigh_solves: int            # each input group's eigh is solved this many times (2: cache too big)

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def probe_rows_per_batch(*, loss: str, batch_size: int, seq_len: int) -> int:
    """Rows of one micro-batch's directions: one per example (label loss) or per supervised token."""
    return batch_size if loss == "label" else batch_size * seq_len


def probe_width(*, loss: str, answers: int, vocab: int, sketch_dim: int, sketch_above_vocab: int) -> int:
    """Columns of a direction row: the answers (label loss), the sketch, or the vocabulary."""
    if loss == "label":
        return answers
    return sketch_dim if vocab > sketch_above_vocab else vocab


def driver_memory(layout: ModelLayout, slices: list[list[int]], *, coupling: bool, adam: bool,
                  records: int, seq_len: int, rows_per_batch: int, width: int) -> DriverPlan:
    """What ``profile_on_ray`` holds on the driver, phase by phase:

    - data: every record's token ids and labels (int32) and their records;
    - rows: + the card's layer and module rows (the owners' solves);
    - pass 2 (coupling): + K and a probe shard's K + one micro-batch of directions from every slice
      (float64, ``rows_per_batch`` × ``width`` per direction key), received and copied once.

    The process's own footprint (interpreter, torch, Ray, the model on ``meta``) comes on top.
    """
    layers = [l for s in slices for l in s]
    n_modules = sum(len(layout.modules_of(l)) for l in layers)
    tokens = records * (2 * 4 * seq_len + RECORD_OVERHEAD)
    rows = STAT_BYTES * (len(layers) * ROW_COLUMNS[0] + n_modules * ROW_COLUMNS[1])
    keys = len(layers) * (2 if coupling and adam else 1)
    k = 2 * STAT_BYTES * keys * keys if coupling else 0
    chunk = 2 * STAT_BYTES * rows_per_batch * width * keys if coupling else 0
    phases = {"data": tokens, "rows": tokens + rows}
    if coupling:
        phases["pass 2"] = tokens + rows + k + chunk
    flops, solves = 0.0, 1
    for s in slices:
        d_groups = list(_groups(layout, s).values())
        cached = coupling and sum(STAT_BYTES * (d * d + d) for d in d_groups) <= EIG_CACHE_BYTES
        n_solves = 2 if coupling and not cached else 1
        f = n_solves * sum(EIGH_FLOPS * float(d) ** 3 for d in d_groups)
        for m in (m for l in s for m in layout.modules_of(l)):
            big, small = max(m.d_in, m.d_out), min(m.d_in, m.d_out)
            svd = SVD_FLOPS[0] * big * small ** 2 + SVD_FLOPS[1] * float(small) ** 3
            whiten = 4.0 * m.d_in ** 2 * m.d_out                 # V (w ⊙ Vᵀ C): two d_in × d_in by d_in × d_out GEMMs
            f += svd + whiten + ((svd + 2 * whiten) if coupling else 0)   # card row; Δ*: SVD, whiten, un-whiten
        if f > flops:
            flops, solves = f, n_solves
    return DriverPlan(tokens, rows, k, chunk, phases, flops, solves)
