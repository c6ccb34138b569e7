"""Small synthetic Layer Cards for store and drift tests (no model, no profiling), and the
publisher the concurrent-store tests run in child processes (imports only the store)."""
from __future__ import annotations

import numpy as np


def make_card(n_layers: int = 4, *, seed: int = 0, model_id: str = "config:test-model", weights_hash: str = "w0",
              data_hash: str = "d0", created_at: str = "2026-11-01T10:00:00+00:00", gain=None, kappa=None,
              b=None, coupling: bool = True):
    """A complete card: layer and module tables, ρ and K (PSD), meta with the store's key fields."""
    import pandas as pd

    from layercard.card.layer_card import LAYER_COLUMNS, MODULE_COLUMNS

    rng = np.random.default_rng(seed)
    L = n_layers
    gain = np.asarray(gain if gain is not None else np.linspace(4.0, 1.0, L), dtype=np.float64)
    kappa = np.asarray(kappa if kappa is not None else np.full(L, 100.0), dtype=np.float64)
    layers = pd.DataFrame({c: rng.uniform(1, 2, L) for c in LAYER_COLUMNS})
    layers["layer"] = np.arange(L)
    layers["n_tokens"] = 1000
    layers["gain_adj"] = gain
    layers["res2"] = 2.5 * gain
    layers["gain_adj_rank_r"], layers["res2_rank_r"] = 0.8 * gain, 2.0 * gain
    layers["kappa"] = kappa
    modules = pd.DataFrame({c: rng.uniform(1, 2, L) for c in MODULE_COLUMNS})
    modules["layer"] = np.arange(L)
    modules["module"] = [f"model.layers.{i}.mlp.down_proj" for i in range(L)]
    modules["target"] = "down_proj"
    modules[["d_in", "d_out", "n_tokens"]] = [16, 8, 1000]
    K = None
    rho = np.eye(L)
    if coupling:
        U = rng.normal(size=(L, 3 * L)) * 0.1 + np.eye(L, 3 * L)
        K = U @ U.T
        d = np.sqrt(np.diag(K))
        rho = K / np.outer(d, d)
        layers["k_diag"] = np.diag(K)
        # b such that the singleton gain b²/2K follows the gain_adj order unless b is given
        layers["b"] = np.asarray(b, dtype=np.float64) if b is not None else np.sqrt(2 * np.diag(K) * gain)
    meta = {"model_id": model_id, "weights_hash": weights_hash, "data_hash": data_hash,
            "config": {"model": {"seed": 0}, "data": {"path": "x.jsonl"}, "ray": {"num_actors": 0}},
            "created_at": created_at, "rank": 4}
    from layercard.card.layer_card import LayerCard

    return LayerCard(layers, modules, rho, K, meta)


def publish_in_child(store_uri: str, card_dir: str, barrier, atomic_rename, results) -> None:
    """Child-process publisher: wait for the others, publish, report the version or the error."""
    from layercard.errors import LayercardError
    from layercard.card.store import CardStore

    store = CardStore(store_uri, atomic_rename=atomic_rename)
    barrier.wait(timeout=120)
    try:
        results.put(("ok", store.publish(card_dir).version))
    except LayercardError as err:
        results.put(("error", str(err)))
