"""Cost model (layercard.profile.cost) and measured step time (layercard.train.step_timing).

The analytic FLOPs are checked against torch's own FLOP counter on real forward/backward passes,
and against a count from the nn.Linear weight shapes; the measured step time against a real PEFT
LoRA training step. The check that step time falls as the lowest adapted layer rises needs a
model big enough to rise above timer noise: see benchmarks/cost_vs_depth.py.
"""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from layercard.profile import cost
from layercard.card.layer_card import LayerCard
from layercard.discovery import discover
from layercard.errors import LayercardError
from layercard.models import ModelConfig, load_model, state_dict_hash
from layercard.profile.profiler import profile_model
from layercard.train.step_timing import (StepMeasurement, StepTimingConfig, add_step_columns, measure_card_cost,
                                   measured_layers)

TINY = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=256)
B, T, RANK = 4, 16, 4


def random_batches(n, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (B, T), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig(config=TINY)).model


@pytest.fixture(scope="module")
def batches():
    return random_batches(3)


@pytest.fixture(scope="module")
def profiled(model, batches):
    return profile_model(model, batches, rank=RANK)


@pytest.fixture
def card(model, profiled):
    card = copy.deepcopy(profiled)
    layout = discover(model, card.meta["target_modules"])
    return cost.add_cost_columns(card, layout, cost.dims_from_model(model), seq_len=T)


@pytest.fixture
def one_thread():
    """Timing on a shared 2-core machine: one intra-op thread avoids OpenMP barrier stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ analytic
def test_forward_flops_match_torch_flop_counter(model, batches):
    dims = cost.dims_from_model(model)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=batches[0]["input_ids"], use_cache=False)
    # some transformers versions build the rotary table with a tiny matmul (2·head_dim/2·T FLOPs)
    assert fc.get_total_flops() == pytest.approx(cost.forward_flops_per_token(dims, T) * B * T, rel=1e-4)


@pytest.mark.parametrize("lowest", [0, 1, 2, 3])
def test_backprop_flops_match_torch_flop_counter(model, batches, lowest):
    """Make block ℓ's input require grad (as the lowest adapter does) and count the backward's FLOPs."""
    dims = cost.dims_from_model(model)

    def needs_grad(module, args, kwargs):
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    hook = model.model.layers[lowest].register_forward_pre_hook(needs_grad, with_kwargs=True)
    try:
        out = model(**batches[0], use_cache=False)
        with FlopCounterMode(display=False) as fc:
            out.loss.backward()
    finally:
        hook.remove()
    assert fc.get_total_flops() == cost.backprop_flops_from(dims, lowest, T) * B * T


def test_cost_columns_match_count_from_linear_shapes(model, card):
    """An independent count: walk the nn.Linear weights of each block."""
    blocks = model.model.layers
    for row in card.layers.itertuples():
        linears = [m for m in blocks[row.layer].modules() if isinstance(m, nn.Linear)]
        d_sum = sum(m.weight.shape[0] + m.weight.shape[1] for m in linears)
        macs = sum(m.weight.numel() for m in linears)
        assert row.adapter_params == RANK * d_sum
        assert row.adapter_flops_per_token == 6 * RANK * d_sum
        assert row.forward_flops_per_token == 2 * macs + 4 * TINY["num_attention_heads"] * TINY["head_dim"] * T
        above = [m for l in range(row.layer, 4) for m in blocks[l].modules() if isinstance(m, nn.Linear)]
        expected = (sum(2 * m.weight.numel() for m in above) + (4 - row.layer) * 8 * 4 * 16 * T
                    + 2 * 64 * 256)  # + activation backward of the LM head
        assert row.backprop_flops_per_token == expected
    mods = card.modules
    assert (mods["adapter_params"] == RANK * (mods["d_in"] + mods["d_out"])).all()
    assert (mods["adapter_flops_per_token"] == 6 * mods["adapter_params"]).all()
    assert card.modules.groupby("layer")["adapter_params"].sum().tolist() == card.layers["adapter_params"].tolist()


def test_backprop_and_activation_cost_strictly_decrease_with_depth(card):
    for col in ("backprop_flops_per_token", "act_bytes_per_token"):
        v = card.layers[col].to_numpy()
        assert (np.diff(v) < 0).all(), col
        assert (v > 0).all()


def test_predicted_flops_match_a_real_peft_step(model, card, batches):
    """A PEFT step's counted FLOPs = the analytic prediction minus what the lowest block really skips:
    q/k/v read the block's first norm, whose input needs no gradient, so neither their base weights
    nor their adapters propagate a gradient to it (2·d_in·d_out + 2·r·d_in per module)."""
    from peft import LoraConfig, get_peft_model

    layout = discover(model, card.meta["target_modules"])
    for S in ([1, 3], [0, 1, 2, 3]):
        peft_model = get_peft_model(model, LoraConfig(r=RANK, target_modules=layout.targets, layers_to_transform=S,
                                                      layers_pattern="layers", lora_dropout=0.0))
        try:
            with FlopCounterMode(display=False) as fc:
                peft_model(**batches[0], use_cache=False).loss.backward()
        finally:
            peft_model.unload()
        counted = fc.get_total_flops() / (B * T)
        predicted = cost.predicted_cost(card, S)["flops_per_token"]
        skipped = sum(2 * m.d_in * m.d_out + 2 * RANK * m.d_in for m in layout.modules_of(min(S))
                      if m.target in ("q_proj", "k_proj", "v_proj"))
        assert counted == pytest.approx(predicted - skipped, rel=1e-4)  # rel: the rotary table, see above
        assert abs(counted - predicted) / counted < 0.05
    assert not any(p.requires_grad for p in model.parameters())


def test_predicted_cost_keys_values_and_errors(card):
    out = cost.predicted_cost(card, [3, 1])
    assert tuple(out) == cost.PREDICTED_COST_KEYS
    rows = card.layers.set_index("layer")
    fwd = card.meta["cost_model"]["forward_flops_per_token"]
    assert out["flops_per_token"] == pytest.approx(
        fwd + rows.loc[1, "backprop_flops_per_token"] + rows.loc[[1, 3], "adapter_flops_per_token"].sum())
    assert out["adapted_layers"] == 2
    assert out["adapter_params"] == rows.loc[[1, 3], "adapter_params"].sum()
    assert out["step_seconds"] is None  # nothing measured yet
    # deeper lowest layer → cheaper; more layers above the same lowest → dearer
    assert cost.predicted_cost(card, [2])["flops_per_token"] < cost.predicted_cost(card, [1])["flops_per_token"]
    assert cost.predicted_cost(card, [1, 2])["flops_per_token"] > cost.predicted_cost(card, [1])["flops_per_token"]
    with pytest.raises(LayercardError, match="empty"):
        cost.predicted_cost(card, [])
    with pytest.raises(LayercardError, match=r"\[7\]"):
        cost.predicted_cost(card, [1, 7])


def test_predicted_cost_needs_cost_columns(profiled):
    bare = copy.deepcopy(profiled)
    with pytest.raises(LayercardError, match="add_cost_columns"):
        cost.predicted_cost(bare, [0])


def test_cost_survives_save_and_load(card, tmp_path):
    card.save(tmp_path / "card")
    loaded = LayerCard.load(tmp_path / "card")
    assert cost.predicted_cost(loaded, [0, 2]) == cost.predicted_cost(card, [0, 2])
    assert cost.ModelDims.from_dict(loaded.meta["cost_model"]["dims"]) == cost.ModelDims.from_dict(
        card.meta["cost_model"]["dims"])


def test_calibration_recovers_known_coefficients(card):
    """Synthetic step times from known non-negative coefficients: recovered exactly, R² = 1."""
    coef = np.array([0.01, 2e-8, 5e-7])
    sets = [[3], [2], [2, 3], [0], [0, 1, 2, 3]]
    points = [StepMeasurement(s, float(coef @ cost.cost_features(card, s)), 1e6) for s in sets]
    add_step_columns(card, points)
    assert card.meta["cost_r2"] == pytest.approx(1.0)
    np.testing.assert_allclose(card.meta["cost_fit"]["coef"], coef, rtol=1e-6)
    assert cost.predicted_cost(card, [1, 2])["step_seconds"] == pytest.approx(coef @ cost.cost_features(card, [1, 2]))
    assert card.layers["step_measured"].tolist() == [True, False, True, True]
    assert card.layers["step_seconds"][1] == pytest.approx((points[3].step_seconds + points[1].step_seconds) / 2)


def test_dims_of_qwen3_8b_on_meta_device():
    """The real 8B architecture (no memory): forward FLOPs/token ≈ 2 × non-embedding parameters."""
    from layercard.discovery import count_parameters

    cfg = dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
               tie_word_embeddings=False)
    big = load_model(ModelConfig(config=cfg, device="meta")).model
    dims = cost.dims_from_model(big)
    assert dims.num_layers == 36 and dims.vocab == 151936
    params = count_parameters(big) - big.get_input_embeddings().weight.numel()
    linear_only = cost.forward_flops_per_token(dims, seq_len=1) - 36 * 4 * 32 * 128
    norms = sum(p.numel() for n, p in big.named_parameters() if "norm" in n)
    assert linear_only == 2 * (params - norms)
    assert 8.1e9 < count_parameters(big) < 8.3e9  # "8B"


# ------------------------------------------------------------------------------------ measured
def test_measured_layers_first_middle_last():
    assert measured_layers([0, 1, 2, 3], 3) == [0, 2, 3]
    assert measured_layers(list(range(30)), 4) == [0, 10, 19, 29]
    assert measured_layers([5], 3) == [5]
    with pytest.raises(LayercardError, match="points"):
        StepTimingConfig(points=1)


def test_step_timing_on_real_peft_steps(model, batches, card, one_thread):
    h0, training0 = state_dict_hash(model), model.training
    cfg = StepTimingConfig(points=3, steps=3, warmup=1)
    measure_card_cost(card, model, batches[0], config=cfg)
    layers = card.layers
    for col in ("step_seconds", "peak_bytes"):
        v = layers[col].to_numpy(np.float64)
        assert np.isfinite(v).all() and (v > 0).all(), col
    assert layers["step_measured"].tolist() == [True, False, True, True]
    points = card.meta["step_timing"]["points"]
    assert [p["layers"] for p in points] == [[3], [2], [2, 3], [0], [0, 1, 2, 3]]
    assert all(len(p["times"]) == 3 and p["step_seconds"] > 0 for p in points)
    r2 = card.meta["cost_r2"]
    assert r2 is None or (math.isfinite(r2) and r2 <= 1.0)
    assert card.meta["cost_fit"]["n_points"] == 5
    pred = cost.predicted_cost(card, [0, 3])
    assert pred["step_seconds"] is not None and pred["step_seconds"] >= 0
    # the base model is left as it was
    assert state_dict_hash(model) == h0 and model.training == training0
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_modules())


def test_step_timing_rejects_a_batch_without_targets(model, card):
    from layercard.train.step_timing import measure_step

    layout = discover(model, card.meta["target_modules"])
    batch = random_batches(1)[0]
    batch["labels"][:] = -100
    with pytest.raises(LayercardError, match="supervised"):
        measure_step(model, layout, batch, [0], rank=RANK)
    with pytest.raises(LayercardError, match=r"\[9\]"):
        measure_step(model, layout, random_batches(1)[0], [9], rank=RANK)
