"""Distributed profiling on Ray: data shards × layer slices.

Layout. ``ray.num_actors`` = ``layer_slices`` × R. Layers are cut into ``layer_slices`` contiguous
slices; each slice gets its own pool of R actors (``ActorPoolStrategy(size=R)``), and every actor
holds the frozen model but statistics for its slice only. Records are hashed into ``num_shards``
data shards (content hash, so the assignment does not depend on read order); each (slice, shard)
pair is one ``map_groups`` call that returns the shard's summed statistics. The driver keeps the
first result per (slice, shard) — a retried shard counts once — and sums them in float64.

Pass 2 ships each slice's Δ* to a fresh pool over the probe shards; actors return the metric-
embedded (JL-sketched above ``coupling.sketch_above_vocab``) directions and b per shard; the driver
forms K shard by shard and sums. Nothing per-token but probe sketches ever reaches the driver.
"""
from __future__ import annotations

import io
import os
import time
import zlib
from pathlib import Path

import numpy as np

from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig


# ----------------------------------------------------------------------------- serialisation
def _stats_to_bytes(stats) -> bytes:
    from safetensors.torch import save

    tensors, header = stats.to_tensors()
    return save(tensors, metadata=header)


def _stats_from_bytes(data: bytes):
    from safetensors import safe_open
    import tempfile

    from layercard.profile.stats import SufficientStats

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        with safe_open(f.name, framework="pt") as st:
            return SufficientStats.from_tensors({k: st.get_tensor(k) for k in st.keys()}, st.metadata())


def _array_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _array_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ----------------------------------------------------------------------------- data
def read_dataset(cfg: ProfileConfig):
    """Ray Data dataset of raw records (Parquet, JSONL, CSV, text, or a saved `datasets` dir): the
    same records, in the same order, as the local reader picks (:func:`layercard.data.select_records`).

    The read is materialized before anything looks at it. A streaming ``limit`` or a schema probe
    on a running read ends its execution with read tasks still in flight, which Ray Data then
    force-cancels; on Ray 2.60 that cancel can race the task's reply and abort the driver's core
    worker (``task_manager.cc: Tried to complete task that was not pending``). The local reader
    reads the whole file too, so this costs no more memory than ``layercard profile``.
    """
    import ray.data

    from layercard.data.examples import check_columns, resolve_format, select_records

    path, fmt = resolve_format(cfg.data)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    try:
        if fmt == "parquet":
            ds = ray.data.read_parquet(str(path))
        elif fmt == "jsonl":
            ds = ray.data.read_json(str(path), lines=True) if path.suffix == ".jsonl" else ray.data.read_json(str(path))
        elif fmt == "csv":
            ds = ray.data.read_csv(str(path))
        elif fmt == "text":
            ds = ray.data.read_text(str(path)).filter(lambda r: bool(r["text"].strip()))
            if cfg.data.text_column != "text":
                ds = ds.rename_columns({"text": cfg.data.text_column})
        else:
            from datasets import load_from_disk

            ds = ray.data.from_huggingface(load_from_disk(str(path)))
        ds = ds.materialize()
        columns = ds.columns()
    except Exception as err:  # Ray wraps reader errors in many types
        raise LayercardError(f"cannot read data '{path}' as {fmt}: {str(err).splitlines()[0]}") from None
    check_columns(columns or [], cfg.data, path)
    if cfg.data.shuffle:   # the local reader's permutation: the same records whichever path profiles
        return ray.data.from_items(select_records(ds.take_all(), cfg.data, path))
    if cfg.data.num_samples is not None:
        ds = ds.limit(cfg.data.num_samples)   # on materialized blocks: no task left running to cancel
    return ds


_TOKENIZERS: dict = {}


def tokenize_batch(batch, model_cfg, data_cfg, num_shards: int):
    """Ray Data task: raw records → input_ids / labels (+ content-hash shard id)."""
    from layercard.data.examples import tokenize_record
    from layercard.models import load_tokenizer

    key = repr(model_cfg)
    if key not in _TOKENIZERS:   # one tokenizer per worker process, not per batch
        _TOKENIZERS[key] = load_tokenizer(model_cfg)
    tok = _TOKENIZERS[key]
    keys = list(batch)
    n = len(batch[keys[0]])
    ids, labels, shards = [], [], []
    for i in range(n):
        ex = tokenize_record({k: batch[k][i] for k in keys}, tok, data_cfg)
        if len(ex["input_ids"]) < 2:
            continue
        ids.append(np.asarray(ex["input_ids"], dtype=np.int64))
        labels.append(np.asarray(ex["labels"], dtype=np.int64))
        shards.append(zlib.crc32(ids[-1].tobytes()) % num_shards)
    out = np.empty(len(ids), dtype=object)
    lab = np.empty(len(ids), dtype=object)
    out[:], lab[:] = ids, labels
    return {"input_ids": out, "labels": lab, "shard": np.asarray(shards, dtype=np.int64)}


def _examples(batch) -> list[dict]:
    order = np.argsort([zlib.crc32(np.asarray(x).tobytes()) for x in batch["input_ids"]], kind="stable")
    return [{"input_ids": list(map(int, batch["input_ids"][i])), "labels": list(map(int, batch["labels"][i]))}
            for i in order]


# ----------------------------------------------------------------------------- actors
def check_weights_hash(loaded: str, expected: str | None, model: str) -> None:
    """An actor's model must be the driver's: a node holding other files at the same path (an older
    download, a partial copy) would otherwise add another model's statistics to the card."""
    if expected is not None and loaded != expected:
        raise LayercardError(f"an actor loaded model '{model}' with weights hash {loaded}, the driver's has {expected}: "
                             f"every node must hold the same model files at that path")


def _model_name(model_cfg) -> str:
    return str(model_cfg.path or model_cfg.gguf_file or "model.config (random weights)")


class _SliceActor:
    def __init__(self, model_cfg, profile_cfg, batch_size: int, layers: list[int], slice_id: int,
                 weights_hash: str | None = None):
        import torch

        from layercard.discovery import discover
        from layercard.models import load_model

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.lm = load_model(model_cfg)
        check_weights_hash(self.lm.weights_hash, weights_hash, _model_name(model_cfg))
        self.layout = discover(self.lm.model, profile_cfg.target_modules, layers, model_cfg.block_path)
        self.batch_size, self.slice_id = batch_size, slice_id
        self.label_ids = None   # the LM loss; profile.loss: label → the answer tokens (checked by the driver)
        if profile_cfg.loss == "label":
            from layercard.train.label_loss import answer_token_ids

            self.label_ids = answer_token_ids(self.lm.tokenizer, profile_cfg.label_answers)

    def _batches(self, batch):
        from layercard.data.examples import batches_of

        return batches_of(_examples(batch), self.batch_size, self.lm.tokenizer.pad_id)


def _shard_rows(batch) -> dict:
    """A probe-shard row (``shard_input_ids``/``shard_labels`` hold the shard's records) → the
    per-record columns the actors read; per-record batches pass through."""
    if "shard_input_ids" not in batch:
        return batch
    if len(batch["shard"]) != 1:
        raise LayercardError(f"a probe call got {len(batch['shard'])} shards at once (expected 1)")
    ids, labels = list(batch["shard_input_ids"][0]), list(batch["shard_labels"][0])
    return {"input_ids": ids, "labels": labels, "shard": np.full(len(ids), int(batch["shard"][0]))}


def probe_shards(records: list[dict], n: int) -> list[dict]:
    """The probe records dealt round-robin into ``n`` shards of (nearly) equal size, one row each."""
    n = max(1, min(n, len(records)))
    return [{"shard": s, "shard_input_ids": [np.asarray(r["input_ids"], dtype=np.int64) for r in records[s::n]],
             "shard_labels": [np.asarray(r["labels"], dtype=np.int64) for r in records[s::n]]} for s in range(n)]


class StatsActor(_SliceActor):
    """Pass 1: one call per (slice, shard) → the shard's summed statistics for the slice."""

    def __init__(self, *args, fail_once_at_shard=None, marker_dir=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_once_at_shard, self.marker_dir = fail_once_at_shard, marker_dir

    def _maybe_fail(self, shard: int) -> None:
        # Test-only fault injection: die once (per slice) on this shard; Ray restarts and retries.
        if self.fail_once_at_shard is None or shard != self.fail_once_at_shard:
            return
        marker = Path(self.marker_dir) / f"failed-{self.slice_id}-{shard}"
        if not marker.exists():
            marker.touch()
            os._exit(1)

    def __call__(self, batch):
        from layercard.profile.profiler import collect_stats

        shard = int(batch["shard"][0])
        self._maybe_fail(shard)
        stats = collect_stats(self.lm.model, self.layout, self._batches(batch), label_ids=self.label_ids)
        return {"slice": np.asarray([self.slice_id]), "shard": np.asarray([shard]), "actor": np.asarray([os.getpid()]),
                "stats": np.asarray([_stats_to_bytes(stats)], dtype=object)}


class DirectionsActor(_SliceActor):
    """Pass 2: one call per (slice, probe shard) → embedded directions and b for the slice's layers."""

    def __init__(self, *args, deltas=None, sketch_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        import ray

        from layercard.profile.coupling import Sketch

        if isinstance(deltas, ray.ObjectRef):   # fetched from the object store, not pickled into the UDF
            deltas = ray.get(deltas)
        params = dict(self.lm.model.named_parameters())
        self.deltas = {l: {n: t.to(device=params[n].device, dtype=params[n].dtype) for n, t in d.items()}
                       for l, d in deltas.items()}
        self.sketch = Sketch(*sketch_args) if sketch_args else None

    def __call__(self, batch):
        from layercard.profile.coupling_pass import full_precision, probe_terms

        batch = _shard_rows(batch)
        shard = int(batch["shard"][0])
        layers = sorted(self.deltas)
        W_all = {l: [] for l in layers}
        b = np.zeros(len(layers))
        with full_precision(self.lm.model, self.deltas) as deltas:
            for mb in self._batches(batch):
                if not bool((mb["labels"][:, 1:] != -100).any()):
                    continue
                W, bb = probe_terms(self.lm.model, deltas, mb, self.sketch, self.label_ids)
                for l in layers:
                    W_all[l].append(W[l].numpy())
                b += np.array([bb[l] for l in layers])
        W_cat = np.stack([np.concatenate(W_all[l]) if W_all[l] else np.zeros((0, 0)) for l in layers])
        return {"slice": np.asarray([self.slice_id]), "shard": np.asarray([shard]), "actor": np.asarray([os.getpid()]),
                "layers": np.asarray([_array_bytes(np.asarray(layers))], dtype=object),
                "W": np.asarray([_array_bytes(W_cat)], dtype=object), "b": np.asarray([_array_bytes(b)], dtype=object)}


# ----------------------------------------------------------------------------- driver
SHUFFLE_CPUS = 1.0
EIG_CACHE_BYTES = 2 * 2**30


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
    # Every slice's pool runs at once, and Ray Data's hash shuffle (groupby shard) needs a CPU of
    # its own beside them: with the actors holding every CPU the shuffle never starts and the run
    # hangs. So the actors may take at most all CPUs but one.
    need_cpu = r.num_cpus_per_actor * r.num_actors + SHUFFLE_CPUS
    if need_cpu > total.get("CPU", 0):
        raise LayercardError(f"ray.num_cpus_per_actor={r.num_cpus_per_actor:g} × ray.num_actors={r.num_actors} plus "
                             f"{SHUFFLE_CPUS:g} CPU for Ray Data's shuffle needs {need_cpu:g} CPUs; the cluster has "
                             f"{total.get('CPU', 0):g} (lower ray.num_cpus_per_actor, e.g. "
                             f"{max(total.get('CPU', 0) - SHUFFLE_CPUS, 0) / r.num_actors:g}, or ray.num_actors)")


def slice_layers(layers: list[int], slices: int) -> list[list[int]]:
    if slices > len(layers):
        raise LayercardError(f"ray.layer_slices={slices} is more than the {len(layers)} profiled layers")
    return [list(map(int, s)) for s in np.array_split(np.asarray(layers), slices)]


def _run_pool(ds, actor_cls, cfg: ProfileConfig, slices, per_slice_kwargs, num_shards: int, consume,
              presharded: bool = False) -> int:
    """One map_groups stage per slice (its own actor pool), unioned so slices run concurrently.
    ``presharded``: ``ds`` has one row per shard in its own block (the small probe set, see
    :func:`probe_shards`), mapped one row per call — no hash shuffle, so no two shards share a
    partition and every actor gets one (a groupby on 2 shard keys put both in one partition).

    Each (slice, shard) result is handed to ``consume(key, row)`` as it arrives, once (a retried
    shard counts once), and then dropped: the driver holds running sums, never every shard's
    statistics at once (a Qwen3-8B layer's are ~3 GiB). Returns how many actor processes did work.
    """
    import ray.data

    r = cfg.ray
    size = r.num_actors // r.layer_slices
    stages = []
    for s, layers in enumerate(slices):
        # One call in flight per actor: with Ray Data's default (several), every shard was queued on
        # the first actor to come up while the others sat idle — 2 actors ran as 1 (seen on SmolLM2).
        pool = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)
        args = dict(compute=pool, batch_format="numpy",
                    fn_constructor_args=(cfg.model, cfg.profile, cfg.data.batch_size, layers, s),
                    fn_constructor_kwargs=per_slice_kwargs(s, layers), num_cpus=r.num_cpus_per_actor,
                    num_gpus=r.num_gpus_per_actor or None)   # Ray Data's actor pools restart and retry (-1) by default
        if presharded:
            stages.append(ds.map_batches(actor_cls, batch_size=1, **args))
        else:
            stages.append(ds.groupby("shard", num_partitions=max(1, min(num_shards, 64))).map_groups(actor_cls, **args))
    out = stages[0].union(*stages[1:]) if len(stages) > 1 else stages[0]
    seen, workers = set(), set()
    for row in out.iter_rows():
        key = (int(row["slice"]), int(row["shard"]))
        if key not in seen:                      # a retried shard counts once
            seen.add(key)
            workers.add(int(row["actor"]))
            consume(key, row)
    return len(workers)


def profile_on_ray(cfg: ProfileConfig, progress: bool = True):
    """Pass 1 (+ pass 2 when coupling is enabled) on Ray; returns (card, loaded model, probe examples)."""
    import tempfile

    from layercard.profile.coupling_pass import adam_deltas, adam_meta, attach_coupling, direction_keys, layer_deltas
    from layercard.data.examples import batches_of
    from layercard.train.losses import loss_count
    from layercard.profile.coupling import coupling_from_embeddings
    from layercard.discovery import discover
    from layercard.models import describe_model
    from layercard.profile.profiler import card_from_stats
    from layercard.profile.stats import SufficientStats
    from layercard.runtime import init_ray

    ray = init_ray(cfg.ray.address)
    lm = describe_model(cfg.model)   # driver: layout, identity, Δ* shapes — no weights on an accelerator
    layout = discover(lm.model, cfg.profile.target_modules, cfg.profile.layers, cfg.model.block_path)
    slices = slice_layers(list(layout.layers), cfg.ray.layer_slices)
    _check_resources(cfg, ray)
    replicas = cfg.ray.num_actors // cfg.ray.layer_slices
    num_shards = cfg.ray.num_shards or 2 * replicas

    raw = read_dataset(cfg)
    tokenized = raw.map_batches(tokenize_batch, fn_args=(cfg.model, cfg.data, num_shards), batch_format="numpy",
                                num_cpus=0.25)
    tokenized = tokenized.materialize()
    n_records = tokenized.count()
    if n_records == 0:
        raise LayercardError(f"data '{cfg.data.path}' is empty")
    from layercard.data.examples import examples_hash
    from layercard.profile.run import card_meta, profile_label_ids, sketch_for

    records = list(_records(tokenized))   # token ids only: small next to the statistics
    label_ids = profile_label_ids(cfg, lm.tokenizer, records)   # fails here, before any actor starts
    data_hash = examples_hash(records)
    # the probe set and the cost batch are the first records (no `limit` on a dataset, see read_dataset)
    head = records[:max(cfg.coupling.probe_samples, cfg.data.batch_size)]
    del records

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        marker_dir = cfg.ray.fault_marker_dir or tmp
        stats = SufficientStats()

        def add(key, row):
            nonlocal stats
            stats += _stats_from_bytes(row["stats"])

        used1 = _run_pool(tokenized, StatsActor, cfg, slices, lambda s, layers: {
            "fail_once_at_shard": cfg.ray.fail_once_at_shard, "marker_dir": marker_dir,
            "weights_hash": lm.weights_hash}, num_shards, add)
    dt = time.perf_counter() - t0
    if progress:
        print(f"pass 1: {stats.n_tokens} tokens on {used1} of {cfg.ray.num_actors} actors × {len(slices)} slices, "
              f"{num_shards} shards in {dt:.1f}s ({stats.n_tokens / dt:.0f} tokens/s)")

    meta = card_meta(cfg, lm, [], label_ids)
    meta.update({"n_records": n_records, "data_hash": data_hash,
                 "ray_layout": {"num_actors": cfg.ray.num_actors, "layer_slices": len(slices), "num_shards": num_shards,
                                "pass1_actors_used": used1}})
    # Keep the eigendecompositions for pass 2's Δ* when they are small (SmolLM2: 0.65 GB; a Qwen3-8B
    # would need ~50 GB, so there each is solved again, one group at a time).
    eigs = {} if cfg.coupling.enabled and _eig_bytes(stats) <= EIG_CACHE_BYTES else None
    card = card_from_stats(layout, stats, rank=cfg.profile.rank, ridge=cfg.profile.ridge, meta=meta, eigs=eigs)

    if cfg.coupling.enabled:
        t0 = time.perf_counter()
        import ray.data

        probe_records = head[:cfg.coupling.probe_samples]
        shards = probe_shards(probe_records, replicas)
        probe = ray.data.from_items(shards, override_num_blocks=len(shards))
        deltas = layer_deltas(lm.model, layout, stats, rank=cfg.profile.rank, ridge=cfg.profile.ridge, device="cpu",
                              eigs=eigs)
        adam = cfg.coupling.adam
        if adam:
            deltas.update(adam_deltas(lm.model, layout, stats, rank=cfg.profile.rank, device="cpu"))
        eigs = None
        sketch = sketch_for(cfg, lm.model.config.vocab_size)
        sketch_args = (sketch.vocab, sketch.dim, sketch.seed) if sketch else None
        refs = {s: ray.put({k: deltas[k] for k in direction_keys(layers, adam)}) for s, layers in enumerate(slices)}
        agg = DirectionsSum(direction_keys(layout.layers, adam), len(slices), coupling_from_embeddings)
        used2 = _run_pool(probe, DirectionsActor, cfg, slices,
                          lambda s, layers: {"deltas": refs[s], "sketch_args": sketch_args,
                                             "weights_hash": lm.weights_hash}, len(shards), agg.add,
                          presharded=True)
        card.meta["ray_layout"]["pass2_actors_used"] = used2
        K, b = agg.result()
        label_ids = card.meta.get("label_token_ids")
        probe_count = sum(loss_count(x["labels"], label_ids)
                          for x in batches_of(probe_records, cfg.data.batch_size, lm.tokenizer.pad_id))
        attach_coupling(card, K, b, {"coupling_sketch_dim": sketch.dim if sketch else None,
                                     "coupling_tokens": probe_count, **adam_meta(cfg.profile.rank, adam)})
        if progress:
            dt = time.perf_counter() - t0
            print(f"pass 2: {len(layout.layers)} layers × {len(probe_records)} probe records in {len(shards)} shards "
                  f"on {used2} actors "
                  f"in {dt:.1f}s ({len(layout.layers) * len(probe_records) / dt:.1f} layer-records/s)")
    _cost_on_actor(card, cfg, head[:cfg.data.batch_size], ray, lm)
    return card, lm, None


def _measure_cost_task(card, cfg: ProfileConfig, records: list[dict]):
    """Runs where a probe actor would (same GPU/CPU request): load the model, time PEFT steps."""
    from layercard.data.examples import batches_of
    from layercard.models import load_model
    from layercard.profile.run import add_cost

    lm = load_model(cfg.model)
    check_weights_hash(lm.weights_hash, card.meta.get("weights_hash"), _model_name(cfg.model))
    add_cost(card, cfg, lm.model, batches_of(records, cfg.data.batch_size, lm.tokenizer.pad_id)[0], progress=False)
    return card


def _cost_on_actor(card, cfg: ProfileConfig, records: list[dict], ray, lm) -> None:
    from layercard.data.examples import batches_of
    from layercard.profile.run import add_cost

    if not cfg.cost.measure:   # analytic columns only: the driver's copy of the model has the shapes
        add_cost(card, cfg, lm.model, batches_of(records, cfg.data.batch_size, lm.tokenizer.pad_id)[0])
        return
    stats, card.stats = card.stats, None   # the task needs the tables, not the statistics
    task = ray.remote(num_cpus=cfg.ray.num_cpus_per_actor, num_gpus=cfg.ray.num_gpus_per_actor or 0)(_measure_cost_task)
    t0 = time.perf_counter()
    measured = ray.get(task.remote(card, cfg, records))
    card.layers, card.meta, card.stats = measured.layers, measured.meta, stats
    r2 = card.meta.get("cost_r2")
    print(f"cost: measured on a Ray worker in {time.perf_counter() - t0:.1f}s"
          + (f", R² of predicted step time {r2:.3f}" if r2 is not None else ""))


class DirectionsSum:
    """K = Σ_shards K_shard and b = Σ, one probe shard at a time: a shard's rows wait only until every
    slice has sent its directions (K needs all layers' directions of the same tokens side by side)."""

    def __init__(self, layers: list[int], n_slices: int, coupling_fn):
        self.where = {l: i for i, l in enumerate(layers)}
        self.n_slices, self.coupling_fn = n_slices, coupling_fn
        self.K = np.zeros((len(layers), len(layers)))
        self.b = np.zeros(len(layers))
        self.pending: dict[int, dict[int, dict]] = {}

    def add(self, key: tuple[int, int], row: dict) -> None:
        s, shard = key
        self.pending.setdefault(shard, {})[s] = row
        if len(self.pending[shard]) == self.n_slices:
            self._fold(shard, self.pending.pop(shard))

    def _fold(self, shard: int, rows: dict[int, dict]) -> None:
        import torch

        W = [None] * len(self.where)
        for row in rows.values():
            ls, Ws, bs = (_array_from_bytes(row[k]) for k in ("layers", "W", "b"))
            for j, l in enumerate(ls):
                W[self.where[int(l)]] = torch.from_numpy(Ws[j])
                self.b[self.where[int(l)]] += bs[j]
        if any(w is None for w in W):
            raise LayercardError(f"probe shard {shard} is missing directions for some layers")
        if W[0].numel():
            self.K += self.coupling_fn(W).numpy()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pending:
            raise LayercardError(f"probe shards {sorted(self.pending)} are missing directions from some slices")
        return self.K, self.b


def _records(ds):
    for r in ds.select_columns(["input_ids", "labels"]).iter_rows():
        yield {"input_ids": np.asarray(r["input_ids"]).tolist(), "labels": np.asarray(r["labels"]).tolist()}
