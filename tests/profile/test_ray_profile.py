"""Distributed profiling on a real local Ray: every layout reproduces the single-process card."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from layercard.card.layer_card import LayerCard
from layercard.config import load_config
from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig
from layercard.profile.run import add_coupling_local, profile_local
from layercard.profile.distributed import profile_on_ray

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
# float64 so the comparison tests the aggregation, not float32 rounding of differently shaped batches.
BASE = ["model.dtype=float64", "ray.num_cpus_per_actor=0.5", "cost.measure=false", "data.num_samples=48", "coupling.probe_samples=8",
        f"data.path={ROOT / 'configs' / 'data' / 'tiny.jsonl'}"]
COLUMNS = ["n_tokens", "res2", "res2_rank_r", "res_frac", "grad_norm", "energy", "kappa", "erank", "d_eff",
           "gain_adj", "block_influence", "b", "k_diag"]


def cfg_with(*overrides) -> ProfileConfig:
    return load_config(ProfileConfig, TINY, [*BASE, *overrides])


def _reference(*overrides) -> LayerCard:
    cfg = cfg_with(*overrides)
    card, lm, examples = profile_local(cfg, progress=False)
    add_coupling_local(card, cfg, lm, examples, progress=False)
    return card


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def label_overrides(tmp_path_factory) -> list[str]:
    """The label loss on the tiny data, answers without their leading space (the byte tokenizer's
    first answer tokens are then 'n' and 'p')."""
    path = tmp_path_factory.mktemp("label") / "tiny-label.jsonl"
    rows = [json.loads(line) for line in (ROOT / "configs" / "data" / "tiny.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "answer": r["answer"].strip()}) + "\n" for r in rows))
    return [f"data.path={path}", "profile.loss=label", "profile.label_answers=[negative, positive]"]


def assert_same_card(card: LayerCard, ref: LayerCard, rtol=1e-6):
    for col in COLUMNS:
        np.testing.assert_allclose(card.layers[col].to_numpy(float), ref.layers[col].to_numpy(float), rtol=rtol,
                                   err_msg=col)
    for col in ["res2", "res2_rank_r", "kappa", "d_eff", "gain_adj"]:
        np.testing.assert_allclose(card.modules[col].to_numpy(float), ref.modules[col].to_numpy(float), rtol=rtol,
                                   err_msg=f"modules.{col}")
    scale = np.abs(ref.coupling_k).max()
    np.testing.assert_allclose(card.coupling_k / scale, ref.coupling_k / scale, atol=rtol)
    np.testing.assert_allclose(card.coupling, ref.coupling, atol=rtol)
    scale = np.abs(ref.coupling_adam).max()          # Adam's sign-step directions, probed beside Δ*
    np.testing.assert_allclose(card.coupling_adam / scale, ref.coupling_adam / scale, atol=rtol)
    for col in ["adam_b", "adam_h", "lora_grad_l1", "lora_grad_l2"]:
        np.testing.assert_allclose(card.layers[col].to_numpy(float), ref.layers[col].to_numpy(float), rtol=rtol,
                                   err_msg=col)
    assert card.meta["coupling_tokens"] == ref.meta["coupling_tokens"]
    assert card.meta["data_hash"] == ref.meta["data_hash"]
    assert card.meta["weights_hash"] == ref.meta["weights_hash"]


@pytest.mark.parametrize("actors,slices,loss", [(1, 1, "lm"), (2, 1, "lm"), (2, 2, "label")])
def test_layouts_equal_single_process(ray_local, reference, label_overrides, actors, slices, loss):
    extra = label_overrides if loss == "label" else []
    card, _, _ = profile_on_ray(cfg_with(f"ray.num_actors={actors}", f"ray.layer_slices={slices}", *extra),
                                progress=False)
    layout = card.meta["ray_layout"]
    assert layout["layer_slices"] == slices
    # how many actor processes did work (a tiny shard may finish before the second actor is up)
    assert 1 <= layout["pass1_actors_used"] <= actors and 1 <= layout["pass2_actors_used"] <= actors
    assert card.meta["loss"] == loss
    if loss == "label":   # the label loss: a card of its own, not the LM-loss one
        ref = _reference(*extra)
        assert ref.meta["label_token_ids"] == card.meta["label_token_ids"] == [3 + ord("n"), 3 + ord("p")]   # ByteTokenizer: 3 + byte
        assert ref.meta["coupling_tokens"] == 8   # one row per probe example
        assert not np.allclose(ref.layers["res2"], reference.layers["res2"])
        assert_same_card(card, ref)
    else:
        assert_same_card(card, reference)


@pytest.mark.parametrize("phase,shard", [("pass1", 1), ("pass1", 0), ("reduce", 1), ("pass2", 1), ("pass2", 0)])
def test_killed_actor_gives_identical_card(ray_local, reference, tmp_path, phase, shard):
    """Shard 1 is replica 1's, shard 0 the owner's: a replica killed while summing, an owner killed while
    summing, receiving a replica's part (its sums are gone: the slice is summed again) or probing."""
    cfg = cfg_with("ray.num_actors=2", "ray.num_shards=4", f"ray.fail_once_at_shard={shard}",
                   f"ray.fail_once_in={phase}", f"ray.fault_marker_dir={tmp_path}")
    card, _, _ = profile_on_ray(cfg, progress=False)
    assert (tmp_path / f"failed-{phase}-0-{shard}").exists(), "the fault was not injected"
    assert_same_card(card, reference)


@pytest.mark.parametrize("override,message", [
    ("data.path=/nonexistent/calib.jsonl", "does not exist"),
    ("data.answer_column=label", "no column 'label'"),
    ("ray.layer_slices=8", "more than the 4 profiled layers"),
])
def test_bad_input(ray_local, override, message):
    overrides = ["ray.num_actors=8", override] if "layer_slices" in override else ["ray.num_actors=1", override]
    with pytest.raises(LayercardError, match=message):
        profile_on_ray(cfg_with(*overrides), progress=False)


def test_actors_asking_for_more_cpus_than_the_cluster_fail_fast(ray_local):
    # The whole pool runs at once: 2 actors × 1.5 CPUs do not fit on 2 CPUs (a hang, not a run).
    with pytest.raises(LayercardError, match=r"ray.num_cpus_per_actor=1.5 × ray.num_actors=2 needs 3 CPUs; "
                                             r"the cluster has 2 \(lower ray.num_cpus_per_actor, e.g. 1"):
        profile_on_ray(cfg_with("ray.num_actors=2", "ray.num_cpus_per_actor=1.5"), progress=False)


def test_actors_holding_every_cpu_run(ray_local, reference):
    """No shuffle stage competes with the pool: actors may hold every CPU."""
    card, _, _ = profile_on_ray(cfg_with("ray.num_actors=2", "ray.num_cpus_per_actor=1"), progress=False)
    assert_same_card(card, reference)


def test_gpus_requested_on_cpu_cluster_fails_fast(ray_local):
    with pytest.raises(LayercardError, match="needs 1 GPUs; the cluster has 0"):
        profile_on_ray(cfg_with("ray.num_actors=1", "ray.num_gpus_per_actor=1"), progress=False)


def test_actor_refuses_a_model_other_than_the_drivers():
    from layercard.models import describe_model
    from layercard.profile.distributed import SliceActor

    cfg = cfg_with()
    driver_hash = describe_model(cfg.model).weights_hash
    actor = SliceActor(cfg.model, cfg.profile, 2, [0, 1], 0, weights_hash=driver_hash)   # the driver's model: fine
    assert actor.lm.weights_hash == driver_hash
    with pytest.raises(LayercardError) as exc:
        SliceActor(cfg.model, cfg.profile, 2, [0, 1], 0, weights_hash="0123456789abcdef")
    msg = str(exc.value)
    assert driver_hash in msg and "0123456789abcdef" in msg and "model.config" in msg and "\n" not in msg


def test_statistics_stay_with_the_slice_owners(ray_local, reference, tmp_path):
    """The driver receives rows, the probe tokens' directions and counts, never the statistics:
    16× the statistics (4× the width) leave what reaches it nearly unchanged. Saved, each owner
    writes its slice's file, and the card loads their sum."""
    card, _, _ = profile_on_ray(cfg_with("ray.num_actors=2", "ray.layer_slices=2"), progress=False)
    assert card.stats.nbytes == reference.stats.nbytes
    layout = card.meta["ray_layout"]
    assert layout["driver_peak_rss_bytes"] > 0
    assert layout["driver_bytes_received"] > 0
    wide, _, _ = profile_on_ray(cfg_with("ray.num_actors=2", "ray.layer_slices=2", "model.config.hidden_size=256",
                                         "model.config.intermediate_size=512"), progress=False)
    assert wide.stats.nbytes > 12 * card.stats.nbytes
    assert wide.meta["ray_layout"]["driver_bytes_received"] < 1.5 * layout["driver_bytes_received"]

    card.save(tmp_path / "card")
    names = json.loads((tmp_path / "card" / "card.json").read_text())["files"]
    assert {"stats-slice-000.safetensors", "stats-slice-001.safetensors"} <= set(names)
    loaded = LayerCard.load(tmp_path / "card")
    for key, a in reference.stats.A.items():
        np.testing.assert_allclose(loaded.stats.A[key].numpy(), a.numpy(), rtol=1e-9, atol=1e-12, err_msg=key)
    for key, c in reference.stats.C.items():
        np.testing.assert_allclose(loaded.stats.C[key].numpy(), c.numpy(), rtol=1e-9, atol=1e-12, err_msg=key)
    assert loaded.stats.n == reference.stats.n
    assert LayerCard.load(tmp_path / "card", with_stats=False).stats is None


def test_shards_are_put_once_and_reused(ray_local):
    """Every slice's call and every retry reuses one object-store copy of a shard."""
    from types import SimpleNamespace

    from layercard.profile.distributed import SlicePool

    pool = SimpleNamespace(ray=ray_local, _puts={})
    shards = {3: [{"input_ids": [1, 2, 3]}], 7: [{"input_ids": [4, 5]}]}
    refs = SlicePool.shared(pool, "pass1", shards)
    assert sorted(refs) == [3, 7] and ray_local.get(refs[7]) == shards[7]
    assert SlicePool.shared(pool, "pass1", shards) == refs                  # the same copies, not new puts
    probe = [[{"input_ids": [9]}], [{"input_ids": [8]}]]
    prefs = SlicePool.shared(pool, "pass2", probe)
    assert [ray_local.get(prefs[r]) for r in range(2)] == probe and SlicePool.shared(pool, "pass1", shards) == refs
    other = dict(shards)                                                    # another profile's shards: new copies
    assert SlicePool.shared(pool, "pass1", other)[3] != refs[3]
