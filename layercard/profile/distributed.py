"""Distributed profiling on Ray: one pool of slice actors, reduced and solved where the statistics live.

Layout. ``ray.num_actors`` = ``layer_slices`` × R. Layers are cut into ``layer_slices`` contiguous
slices; slice s has R replicas, replica 0 is its *owner*. Every actor loads the frozen model once
and serves the whole profile: pass 1, the reduce, the solve, pass 2 and the cost measurement.

Pass 1. The driver reads and tokenizes the records as the single-process profile does (the same
records, the same tokens) and deals them into ``num_shards`` shards by a content hash (independent of
read order);
shard i goes to replica ``i mod R`` of every slice, so no shuffle is needed. Each actor sums its
shards' float64 statistics for its slice in place and keeps the set of shards it holds; a shard it
already holds is refused, so a retried call adds nothing twice.

Reduce. Each replica hands its sums (and their shard set) to its owner through the object store —
never through the driver — and starts empty; the owner adds a part only when its shards are new to
it. The driver asks each owner which shards it holds and deals the missing ones again, so a killed
replica's or owner's shards are redone and nothing is counted twice.

Solve. The owner computes its layers' card rows, the Δ* (and Adam's sign-step directions) from its
own sums, and shares the directions with its replicas through the object store.

Pass 2. Probe shard r goes to replica r of every slice; each puts its layers' metric-embedded
(sketched) directions in the object store, one micro-batch per object, and returns b; the driver
folds K one micro-batch at a time. The driver holds the token ids, the card rows, O(L²) numbers and
one micro-batch of directions (tokens × sketch × layers): nothing that grows with a layer's width.
"""
from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import numpy as np

from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig
from layercard.profile.plan import EIG_CACHE_BYTES


# ----------------------------------------------------------------------------- data
def shard_of(input_ids, num_shards: int) -> int:
    """A record's shard: a content hash of its token ids (independent of read order)."""
    return zlib.crc32(np.asarray(input_ids, dtype=np.int64).tobytes()) % num_shards


# ----------------------------------------------------------------------------- actors
def check_weights_hash(loaded: str, expected: str | None, model: str) -> None:
    """An actor's model must be the driver's: a node holding other files at the same path (an older
    download, a partial copy) would otherwise add another model's statistics to the card."""
    if expected is not None and loaded != expected:
        raise LayercardError(f"an actor loaded model '{model}' with weights hash {loaded}, the driver's has {expected}: "
                             f"every node must hold the same model files at that path")


def _model_name(model_cfg) -> str:
    return str(model_cfg.path or model_cfg.gguf_file or "model.config (random weights)")


def probe_shards(records: list[dict], n: int) -> list[list[dict]]:
    """The probe records dealt round-robin into ``n`` shards of (nearly) equal size."""
    n = max(1, min(n, len(records)))
    return [records[s::n] for s in range(n)]


class SliceActor:
    """One actor of the pool: the frozen model, and the statistics of one layer slice for the
    shards it was dealt (see the module docstring). ``fault``: test-only fault injection,
    ``(phase, shard, marker_dir)`` — the actor dies once (per slice) when it reaches that shard in
    that phase (``pass1``, ``reduce`` or ``pass2``)."""

    def __init__(self, model_cfg, profile_cfg, batch_size: int, layers: list[int], slice_id: int,
                 replica: int = 0, weights_hash: str | None = None, fault: tuple | None = None):
        import torch

        from layercard.discovery import discover
        from layercard.models import load_model
        from layercard.profile.stats import SufficientStats

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.lm = load_model(model_cfg)
        check_weights_hash(self.lm.weights_hash, weights_hash, _model_name(model_cfg))
        self.layout = discover(self.lm.model, profile_cfg.target_modules, layers, model_cfg.block_path)
        self.profile_cfg, self.batch_size, self.slice_id, self.replica = profile_cfg, batch_size, slice_id, replica
        self.fault = fault
        self.label_ids = None   # the LM loss; profile.loss: label → the answer tokens (checked by the driver)
        if profile_cfg.loss == "label":
            from layercard.train.label_loss import answer_token_ids

            self.label_ids = answer_token_ids(self.lm.tokenizer, profile_cfg.label_answers)
        self.stats, self.shards = SufficientStats(), set()
        self.deltas, self.deltas_ref = None, None

    # -------------------------------------------------------------- helpers
    def _maybe_fail(self, phase: str, shards) -> None:
        if self.fault is None:
            return
        at_phase, at_shard, marker_dir = self.fault
        if phase != at_phase or at_shard not in shards:
            return
        marker = Path(marker_dir) / f"failed-{phase}-{self.slice_id}-{at_shard}"
        if not marker.exists():
            marker.touch()
            os._exit(1)

    def _batches(self, records: list[dict]):
        from layercard.data.examples import batches_of

        order = np.argsort([zlib.crc32(np.asarray(r["input_ids"], dtype=np.int64).tobytes()) for r in records],
                           kind="stable")
        return batches_of([records[i] for i in order], self.batch_size, self.lm.tokenizer.pad_id)

    def ready(self) -> int:
        return os.getpid()

    # -------------------------------------------------------------- pass 1 and the reduce
    def pass1(self, shard: int, records: list[dict]) -> dict:
        """Add one shard's statistics to this actor's sums (once: a shard it holds is refused)."""
        from layercard.profile.profiler import collect_stats

        if shard in self.shards:
            return {"shard": shard, "added": False, "actor": os.getpid()}
        self._maybe_fail("pass1", {shard})
        collect_stats(self.lm.model, self.layout, self._batches(records), stats=self.stats, label_ids=self.label_ids)
        self.shards.add(shard)
        return {"shard": shard, "added": True, "actor": os.getpid()}

    def handover(self):
        """A replica's sums and their shards, for its owner; the replica starts empty again."""
        from layercard.profile.stats import SufficientStats

        part = (set(self.shards), _on_cpu(self.stats))   # through the object store: host memory
        self.stats, self.shards = SufficientStats(), set()
        return part

    def absorb(self, part) -> list[int]:
        """The owner adds a replica's part (float64) once: a part whose shards the owner already
        holds is skipped. Returns the shards the owner now holds."""
        for shards, stats in [part]:
            if not shards:
                continue
            self._maybe_fail("reduce", shards)
            if shards & self.shards:
                if shards <= self.shards:
                    continue
                raise LayercardError(f"slice {self.slice_id}: shards {sorted(shards & self.shards)} arrived twice "
                                     f"with others that are new; the reduce cannot split a part")
            self.stats += stats
            self.shards |= shards
        return sorted(self.shards)

    def held(self) -> list[int]:
        return sorted(self.shards)

    # -------------------------------------------------------------- solve
    def solve(self, rank: int, ridge: float, adam: bool, coupling: bool, eig_cache_bytes: int) -> dict:
        """The owner's card rows for its layers, and (``coupling``) the directions pass 2 probes:
        kept here and put in the object store for the replicas. Returns rows and a box holding the
        directions' reference (a list, so Ray passes the reference on instead of resolving it)."""
        import ray

        from layercard.profile.coupling_pass import adam_deltas, layer_deltas
        from layercard.profile.profiler import card_rows

        eigs = {} if coupling and _eig_bytes(self.stats) <= eig_cache_bytes else None
        layers, modules = card_rows(self.layout, self.stats, rank=rank, ridge=ridge, eigs=eigs)
        out = {"layers": layers, "modules": modules, "n_tokens": self.stats.n_tokens, "shards": sorted(self.shards),
               "deltas": None}
        if coupling:
            deltas = layer_deltas(self.lm.model, self.layout, self.stats, rank=rank, ridge=ridge, eigs=eigs)
            if adam:
                deltas.update(adam_deltas(self.lm.model, self.layout, self.stats, rank=rank))
            self.deltas = deltas
            self.deltas_ref = ray.put({l: {n: t.cpu() for n, t in d.items()} for l, d in deltas.items()})
            out["deltas"] = [self.deltas_ref]
        return out

    # -------------------------------------------------------------- pass 2
    def pass2(self, shard: int, records: list[dict], deltas_box: list, sketch_args) -> dict:
        """Metric-embedded directions and b of this slice's layers on one probe shard."""
        import ray

        from layercard.profile.coupling import Sketch
        from layercard.profile.coupling_pass import full_precision, probe_terms

        self._maybe_fail("pass2", {shard})
        if self.deltas is None or self.deltas_ref != deltas_box[0]:
            params = dict(self.lm.model.named_parameters())
            self.deltas = {l: {n: t.to(device=params[n].device, dtype=params[n].dtype) for n, t in d.items()}
                           for l, d in ray.get(deltas_box[0]).items()}
            self.deltas_ref = deltas_box[0]
        sketch = Sketch(*sketch_args) if sketch_args else None
        keys = sorted(self.deltas)
        chunks, b = [], np.zeros(len(keys))
        with full_precision(self.lm.model, self.deltas) as deltas:
            for mb in self._batches(records):
                if not bool((mb["labels"][:, 1:] != -100).any()):
                    continue
                W, bb = probe_terms(self.lm.model, deltas, mb, sketch, self.label_ids)
                # one object per micro-batch: the driver folds them one at a time, so it never holds
                # more than a micro-batch's directions (tokens × sketch × layers), whatever the probe size
                chunks.append(ray.put([W[k].numpy() for k in keys]))
                b += np.array([bb[k] for k in keys])
        return {"shard": shard, "keys": keys, "chunks": chunks, "b": b, "actor": os.getpid()}

    # -------------------------------------------------------------- cost and statistics
    def measure_cost(self, card, cfg: ProfileConfig, records: list[dict]):
        """Timed PEFT steps on this actor's device (the last use of its model)."""
        from layercard.data.examples import batches_of
        from layercard.profile.run import add_cost

        add_cost(card, cfg, self.lm.model, batches_of(records, cfg.data.batch_size, self.lm.tokenizer.pad_id)[0],
                 progress=False)
        return card.layers, card.meta

    def stats_bytes(self) -> int:
        return self.stats.nbytes

    def write_stats(self, path: str) -> str:
        """The owner writes its slice's statistics straight to ``path`` (a location the driver reads)."""
        from safetensors.torch import save_file

        tensors, header = _on_cpu(self.stats).to_tensors()   # safetensors writes host tensors
        save_file(tensors, path, metadata=header)
        return path


def _on_cpu(stats):
    from layercard.profile.stats import SufficientStats

    return SufficientStats({k: v.cpu() for k, v in stats.A.items()}, dict(stats.n),
                           {k: v.cpu() for k, v in stats.C.items()}, dict(stats.gg), dict(stats.group_of),
                           dict(stats.bi_sum), dict(stats.bi_n))


# ----------------------------------------------------------------------------- driver
MAX_ROUNDS = 4          # rounds with a lost actor before the profile gives up
RESTART_TIMEOUT_S = 600.0


def _eig_bytes(stats) -> int:
    """Bytes of every input group's float64 eigenvectors + eigenvalues."""
    return sum(8 * (a.shape[0] ** 2 + a.shape[0]) for a in stats.A.values())


def _check_resources(cfg: ProfileConfig, ray) -> None:
    r = cfg.ray
    total = ray.cluster_resources()
    need_gpu = r.num_gpus_per_actor * r.num_actors
    if need_gpu > total.get("GPU", 0):
        raise LayercardError(f"ray.num_gpus_per_actor={r.num_gpus_per_actor} × {r.num_actors} actors needs {need_gpu:g} GPUs; "
                             f"the cluster has {total.get('GPU', 0):g}")
    need_cpu = r.num_cpus_per_actor * r.num_actors   # the whole pool runs at once
    if need_cpu > total.get("CPU", 0):
        raise LayercardError(f"ray.num_cpus_per_actor={r.num_cpus_per_actor:g} × ray.num_actors={r.num_actors} needs "
                             f"{need_cpu:g} CPUs; the cluster has {total.get('CPU', 0):g} (lower "
                             f"ray.num_cpus_per_actor, e.g. {total.get('CPU', 0) / r.num_actors:g}, or ray.num_actors)")


def slice_layers(layers: list[int], slices: int) -> list[list[int]]:
    if slices > len(layers):
        raise LayercardError(f"ray.layer_slices={slices} is more than the {len(layers)} profiled layers")
    return [list(map(int, s)) for s in np.array_split(np.asarray(layers), slices)]


class _Received:
    """What reaches the driver from the actors, in bytes (pickled size)."""

    def __init__(self):
        self.bytes = 0

    def get(self, ray, refs):
        import pickle

        out = ray.get(refs)
        self.bytes += len(pickle.dumps(out, protocol=5))
        return out


class SlicePool:
    """The actors of a profile, ``pool[s][r]`` = slice s, replica r (r = 0: the owner)."""

    def __init__(self, ray, cfg: ProfileConfig, slices: list[list[int]], weights_hash: str, fault):
        self.ray, self.cfg, self.slices = ray, cfg, slices
        self.replicas = cfg.ray.num_actors // cfg.ray.layer_slices
        remote = ray.remote(SliceActor).options(
            num_cpus=cfg.ray.num_cpus_per_actor, num_gpus=cfg.ray.num_gpus_per_actor or 0,
            max_restarts=MAX_ROUNDS, max_task_retries=0)
        self.pool = [[remote.remote(cfg.model, cfg.profile, cfg.data.batch_size, layers, s, r, weights_hash, fault)
                      for r in range(self.replicas)] for s, layers in enumerate(slices)]
        self.received = _Received()
        self.workers: dict[str, set] = {"pass1": set(), "pass2": set()}
        self._puts: dict[str, tuple] = {}

    def shared(self, name: str, items) -> dict:
        """index → object-store ref of each of ``items`` (a dict or list of shards), put once and reused by
        every slice's call and every retry: one copy per shard, not one per call (a call's large arguments
        are copied into the object store call by call)."""
        cached = self._puts.get(name)
        if cached is None or cached[0] is not items:
            keys = items.keys() if isinstance(items, dict) else range(len(items))
            cached = (items, {i: self.ray.put(items[i]) for i in keys})
            self._puts[name] = cached
        return cached[1]

    @property
    def owners(self):
        return [actors[0] for actors in self.pool]

    def _gather(self, refs: dict) -> tuple[dict, list]:
        """Results of ``refs`` (key → ref); actors that died give a failure, not an exception."""
        from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError

        lost = (RayActorError, ActorUnavailableError, ObjectLostError)
        done, failed = {}, []
        for key, ref in refs.items():
            try:
                done[key] = self.received.get(self.ray, ref)
            except RayTaskError as err:   # raised in the call, or an argument (a replica's part) was lost
                cause = getattr(err, "cause", None)
                if isinstance(cause, LayercardError):
                    raise LayercardError(str(cause).splitlines()[0]) from None
                if not isinstance(cause, lost):
                    raise
                failed.append((key, type(cause).__name__))
            except lost as err:
                failed.append((key, type(err).__name__))
        return done, failed

    def wait_ready(self, timeout_s: float = RESTART_TIMEOUT_S) -> None:
        """Until every actor answers (a restarted one has loaded its model again)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        deadline = time.monotonic() + timeout_s
        for actors in self.pool:
            for a in actors:
                while True:
                    try:
                        self.ray.get(a.ready.remote())
                        break
                    except (RayActorError, ActorUnavailableError):
                        if time.monotonic() > deadline:
                            raise LayercardError(f"a profile actor did not come back within {timeout_s:.0f} s "
                                                 f"after it died (see the Ray logs)") from None
                        time.sleep(0.5)

    def pass1(self, shards: dict[int, list[dict]]) -> None:
        """Every slice's owner ends up holding every shard, each counted once (see module docstring)."""
        want = set(shards)
        for attempt in range(MAX_ROUNDS + 1):
            if attempt:
                self.wait_ready()
            held, failed = self._gather({s: owner.held.remote() for s, owner in enumerate(self.owners)})
            missing = {s: want - set(held[s]) for s in held}
            missing.update({s: set(want) for s, _ in failed})
            if not any(missing.values()):
                return
            refs = self.shared("pass1", shards)
            calls = {(s, r, i): self.pool[s][r].pass1.remote(i, refs[i])
                     for s, todo in missing.items() for i in sorted(todo) for r in [i % self.replicas]}
            done, failed = self._gather(calls)
            self.workers["pass1"] |= {v["actor"] for v in done.values()}
            # one replica's part at a time per owner (an owner holds its sums plus one part, never R
            # parts), all slices at once; a lost actor shows as shards the owner lacks next round
            for r in range(1, self.replicas):
                self._gather({s: self.owners[s].absorb.remote(self.pool[s][r].handover.remote())
                              for s in missing if missing[s]})
        raise LayercardError(f"pass 1 did not complete after {MAX_ROUNDS + 1} rounds: actors kept failing "
                             f"(see the Ray logs)")

    def solve(self, rank: int, ridge: float, adam: bool, coupling: bool, shards: dict[int, list[dict]]) -> list[dict]:
        """Each owner's rows and directions; an owner lost on the way is profiled again."""
        for attempt in range(MAX_ROUNDS + 1):
            if attempt:
                self.wait_ready()
            self.pass1(shards)
            out, failed = self._gather({s: o.solve.remote(rank, ridge, adam, coupling, EIG_CACHE_BYTES)
                                        for s, o in enumerate(self.owners)})
            if not failed and all(set(out[s]["shards"]) == set(shards) for s in out):
                return [out[s] for s in range(len(self.slices))]
        raise LayercardError(f"the solve did not complete after {MAX_ROUNDS + 1} rounds: slice owners kept failing")

    def pass2(self, probe: list[list[dict]], solved: list[dict], sketch_args, agg, rank, ridge, adam,
              shards) -> None:
        """Probe shard r on replica r of every slice; a lost owner is re-profiled and re-solved."""
        todo = {(s, r) for s in range(len(self.slices)) for r in range(len(probe))}
        refs = self.shared("pass2", probe)
        for attempt in range(MAX_ROUNDS + 1):
            calls = {(s, r): self.pool[s][r % self.replicas].pass2.remote(r, refs[r], solved[s]["deltas"], sketch_args)
                     for s, r in sorted(todo)}
            done, failed = self._gather(calls)
            for (s, r), row in sorted(done.items()):
                self.workers["pass2"].add(row["actor"])
                if not agg.add((s, r), row):   # lost directions: every slice probes the shard again
                    failed += [((t, r), "ObjectLostError") for t in range(len(self.slices))]
            todo = {key for key, _ in failed}
            if not todo:
                return
            self.wait_ready()
            held, lost = self._gather({s: self.owners[s].held.remote() for s in {s for s, _ in todo}})
            if lost or any(set(h) != set(shards) for h in held.values()):
                solved[:] = self.solve(rank, ridge, adam, True, shards)   # an owner lost its sums
        raise LayercardError(f"pass 2 did not complete after {MAX_ROUNDS + 1} rounds: actors kept failing")

    def close(self) -> None:
        self._puts.clear()
        for actors in self.pool:
            for a in actors:
                self.ray.kill(a)


class RemoteStats:
    """A Ray profile's statistics, left with the slice owners until the card is saved."""

    def __init__(self, pool: SlicePool):
        self.pool = pool
        self._nbytes = None

    @property
    def nbytes(self) -> int:
        if self._nbytes is None:
            self._nbytes = sum(self.pool.received.get(self.pool.ray, [o.stats_bytes.remote() for o in self.pool.owners]))
        return self._nbytes

    def write(self, directory: Path) -> list[str]:
        """Each owner writes ``stats-slice-<s>.safetensors`` into ``directory``; returns the names."""
        from layercard.card.layer_card import stats_slice_file

        names = [stats_slice_file(s) for s in range(len(self.pool.owners))]
        self.pool.received.get(self.pool.ray, [o.write_stats.remote(str(Path(directory) / n))
                                               for o, n in zip(self.pool.owners, names)])
        missing = [n for n in names if not (Path(directory) / n).is_file()]
        if missing:
            raise LayercardError(f"slice owners wrote {missing} where this process cannot see them: with statistics "
                                 f"saved, the card's output directory must be on storage every node reaches")
        return names


def profile_on_ray(cfg: ProfileConfig, progress: bool = True):
    """Pass 1, pass 2 (when coupling is enabled) and the cost measurement on one pool of Ray actors;
    returns (card, driver's description of the model, None). The card's ``stats`` stay on the slice
    owners (:class:`RemoteStats`) until the card is saved."""
    import resource

    from layercard.profile.coupling import coupling_from_embeddings
    from layercard.profile.coupling_pass import adam_meta, attach_coupling, direction_keys
    from layercard.data.examples import batches_of, examples_hash, load_examples
    from layercard.discovery import discover
    from layercard.train.losses import loss_count
    from layercard.models import describe_model
    from layercard.profile.profiler import card_from_rows
    from layercard.runtime import init_ray
    from layercard.profile.run import card_meta, profile_label_ids, sketch_for

    t_start = time.perf_counter()
    ray = init_ray(cfg.ray.address)
    lm = describe_model(cfg.model)   # driver: layout, identity, Δ* shapes — no weights on an accelerator
    layout = discover(lm.model, cfg.profile.target_modules, cfg.profile.layers, cfg.model.block_path)
    slices = slice_layers(list(layout.layers), cfg.ray.layer_slices)
    _check_resources(cfg, ray)
    replicas = cfg.ray.num_actors // cfg.ray.layer_slices
    num_shards = cfg.ray.num_shards or 2 * replicas

    # The records and tokens of the single-process profile (the same reader and tokenizer), dealt by
    # content hash: shard i goes to replica i mod R of every slice, whatever order they were read in.
    examples = load_examples(cfg.data, lm.tokenizer)
    label_ids = profile_label_ids(cfg, lm.tokenizer, examples)   # fails here, before any actor starts
    data_hash, n_records = examples_hash(examples), len(examples)
    records = [{"input_ids": np.asarray(e["input_ids"], dtype=np.int32),   # compact: 4 bytes a token
                "labels": np.asarray(e["labels"], dtype=np.int32)} for e in examples]
    del examples
    shards: dict[int, list[dict]] = {}
    for rec in records:
        shards.setdefault(shard_of(rec["input_ids"], num_shards), []).append(rec)
    head = records[:max(cfg.coupling.probe_samples, cfg.data.batch_size)]
    del records

    fault = None
    if cfg.ray.fail_once_at_shard is not None:
        import tempfile

        marker_dir = cfg.ray.fault_marker_dir or tempfile.mkdtemp(prefix="layercard-fault-")
        fault = (cfg.ray.fail_once_in, cfg.ray.fail_once_at_shard, marker_dir)
    pool = SlicePool(ray, cfg, slices, lm.weights_hash, fault)
    try:
        t0 = time.perf_counter()
        coupling, adam = cfg.coupling.enabled, cfg.coupling.enabled and cfg.coupling.adam
        solved = pool.solve(cfg.profile.rank, cfg.profile.ridge, adam, coupling, shards)
        n_tokens = solved[0]["n_tokens"]
        if progress:
            dt = time.perf_counter() - t0
            print(f"pass 1: {n_tokens} tokens on {len(pool.workers['pass1'])} of {cfg.ray.num_actors} actors × "
                  f"{len(slices)} slices, {len(shards)} shards in {dt:.1f}s ({n_tokens / dt:.0f} tokens/s)")

        meta = card_meta(cfg, lm, [], label_ids)
        meta.update({"n_records": n_records, "data_hash": data_hash})
        import pandas as pd

        card = card_from_rows(layout, pd.concat([x["layers"] for x in solved], ignore_index=True),
                              pd.concat([x["modules"] for x in solved], ignore_index=True), n_tokens,
                              rank=cfg.profile.rank, ridge=cfg.profile.ridge, meta=meta)

        if coupling:
            t0 = time.perf_counter()
            probe_records = head[:cfg.coupling.probe_samples]
            probe = probe_shards(probe_records, replicas)
            sketch = sketch_for(cfg, lm.model.config.vocab_size)
            sketch_args = (sketch.vocab, sketch.dim, sketch.seed) if sketch else None
            agg = DirectionsSum(direction_keys(layout.layers, adam), len(slices), coupling_from_embeddings,
                                lambda refs: pool.received.get(ray, refs))
            pool.pass2(probe, solved, sketch_args, agg, cfg.profile.rank, cfg.profile.ridge, adam, shards)
            K, b = agg.result()
            probe_count = sum(loss_count(x["labels"], label_ids)
                              for x in batches_of(probe_records, cfg.data.batch_size, lm.tokenizer.pad_id))
            attach_coupling(card, K, b, {"coupling_sketch_dim": sketch.dim if sketch else None,
                                         "coupling_tokens": probe_count, **adam_meta(cfg.profile.rank, adam)})
            if progress:
                dt = time.perf_counter() - t0
                print(f"pass 2: {len(layout.layers)} layers × {len(probe_records)} probe records in {len(probe)} shards "
                      f"on {len(pool.workers['pass2'])} actors in {dt:.1f}s "
                      f"({len(layout.layers) * len(probe_records) / dt:.1f} layer-records/s)")
        _add_cost(card, cfg, head[:cfg.data.batch_size], pool, lm, progress)
    except BaseException:
        pool.close()   # the actors hold the statistics: nothing else will release them
        raise
    card.stats = RemoteStats(pool)
    card.meta["ray_layout"] = {
        "num_actors": cfg.ray.num_actors, "layer_slices": len(slices), "num_shards": num_shards,
        "pass1_actors_used": len(pool.workers["pass1"]), "pass2_actors_used": len(pool.workers["pass2"]) or None,
        "driver_bytes_received": pool.received.bytes,
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_s": round(time.perf_counter() - t_start, 3)}
    return card, lm, None


def _add_cost(card, cfg: ProfileConfig, records: list[dict], pool: SlicePool, lm, progress: bool) -> None:
    from layercard.data.examples import batches_of
    from layercard.profile.run import add_cost

    if not cfg.cost.measure:   # analytic columns only: the driver's copy of the model has the shapes
        add_cost(card, cfg, lm.model, batches_of(records, cfg.data.batch_size, lm.tokenizer.pad_id)[0])
        return
    t0 = time.perf_counter()
    for attempt in range(MAX_ROUNDS + 1):
        if attempt:
            pool.wait_ready()
        done, failed = pool._gather({0: pool.owners[0].measure_cost.remote(card, cfg, records)})
        if done:
            card.layers, card.meta = done[0]
            break
    else:
        raise LayercardError("the cost measurement did not complete: its actor kept failing")
    r2 = card.meta.get("cost_r2")
    if progress:
        print(f"cost: measured on a slice actor in {time.perf_counter() - t0:.1f}s"
              + (f", R² of predicted step time {r2:.3f}" if r2 is not None else ""))


class DirectionsSum:
    """K = Σ_shards Σ_micro-batches K and b = Σ: a probe shard is folded once every slice has sent it,
    one micro-batch at a time (K needs all layers' directions of the same tokens side by side). A
    shard whose directions were lost (an actor died) is dropped whole and reported for a redo."""

    def __init__(self, keys: list[int], n_slices: int, coupling_fn, get):
        self.where = {k: i for i, k in enumerate(keys)}
        self.n_slices, self.coupling_fn, self.get = n_slices, coupling_fn, get
        self.K = np.zeros((len(keys), len(keys)))
        self.b = np.zeros(len(keys))
        self.pending: dict[int, dict[int, dict]] = {}
        self.folded: set[int] = set()

    def add(self, key: tuple[int, int], row: dict) -> bool:
        """False when the shard's directions were lost and it must be probed again (every slice)."""
        s, shard = key
        if shard in self.folded:   # a retried shard counts once
            return True
        self.pending.setdefault(shard, {})[s] = row
        if len(self.pending[shard]) < self.n_slices:
            return True
        rows = self.pending.pop(shard)
        if not self._fold(shard, rows):
            return False
        self.folded.add(shard)
        return True

    def _fold(self, shard: int, rows: dict[int, dict]) -> bool:
        import torch
        from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError

        n_chunks = {len(r["chunks"]) for r in rows.values()}
        if len(n_chunks) != 1:
            raise LayercardError(f"probe shard {shard}: slices sent {sorted(n_chunks)} micro-batches")
        K, b = np.zeros_like(self.K), np.zeros_like(self.b)
        for row in rows.values():
            for j, k in enumerate(row["keys"]):
                b[self.where[int(k)]] += row["b"][j]
        for m in range(n_chunks.pop()):
            try:
                parts = self.get([r["chunks"][m] for r in rows.values()])
            except (ObjectLostError, OwnerDiedError, RayActorError):
                return False
            W = [None] * len(self.where)
            for row, Ws in zip(rows.values(), parts):
                for j, k in enumerate(row["keys"]):
                    W[self.where[int(k)]] = torch.from_numpy(np.array(Ws[j]))
            if any(w is None for w in W):
                raise LayercardError(f"probe shard {shard} is missing directions for some layers")
            if W[0].numel():
                K += self.coupling_fn(W).numpy()
        self.K += K
        self.b += b
        return True

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pending:
            raise LayercardError(f"probe shards {sorted(self.pending)} are missing directions from some slices")
        return self.K, self.b
