"""Adam's first LoRA step: the LoRA-init gradient of B against autograd through a real PEFT model,
the sign-step terms of pass 2 against finite differences of the real loss, the step budget against
DeepSpeed's own scheduler, the trust-region gain against a grid, and the set models' greedy search
against exhaustive enumeration."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from layercard.profile.adam_step import (expected_l1_rate, lora_b_grad, lora_init_a, sign_step_tangent, step_budget,
                                 trust_region_gain)
from layercard.errors import LayercardError
from layercard.select.gain_models import AdamGain, CoverageGain, _similarity
from layercard.select.selection import CardArrays, select_max_quality, select_min_cost, set_quality, singleton_quality

from test_coupling import _lm_batch, _tiny_lm  # the shared tiny float64 LM and batch


def _stats_and_layout(model, batches):
    from layercard.discovery import discover
    from layercard.profile.profiler import collect_stats

    layout = discover(model)
    return layout, collect_stats(model, layout, batches)


# ---------------------------------------------------------------------------------------------
# The LoRA-init gradient of B
# ---------------------------------------------------------------------------------------------
def test_lora_b_grad_matches_autograd_through_a_real_peft_model():
    """∇_B L = s · Cᵀ A₀ᵀ with C = XᵀG from pass 1, A₀ PEFT's own init, s = alpha/r — against
    autograd of the summed loss through a PEFT LoRA model (float64), for every target module."""
    from peft import LoraConfig, get_peft_model

    from layercard.train.losses import supervised_loss_sum

    model = _tiny_lm("qwen3")
    batches = [_lm_batch(13), _lm_batch(14)]
    layout, stats = _stats_and_layout(model, batches)
    r, alpha = 4, 12.0
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=layout.targets, lora_dropout=0.0))
    peft.double()
    loss = sum(supervised_loss_sum(peft, b["input_ids"], b["attention_mask"], b["labels"]) for b in batches)
    loss.backward()
    lora = {n: m for n, m in peft.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    checked = 0
    for m in layout.modules:
        mod = next(v for k, v in lora.items() if k.endswith(m.full_name))
        A0 = mod.lora_A["default"].weight.detach()
        want = mod.lora_B["default"].weight.grad
        got = lora_b_grad(stats.C[m.key], A0, alpha / r)
        torch.testing.assert_close(got, want.to(torch.float64), rtol=1e-6, atol=1e-9)
        checked += 1
    assert checked == len(layout.modules) and checked > 0


def test_lora_init_a_is_peft_s_distribution_and_seeded_per_module():
    """Same bound as PEFT's kaiming_uniform_(a=√5) init (1/√d_in), uniform (mean 0, var 1/(3 d_in)),
    reproducible per (seed, key) and different across keys."""
    from peft import LoraConfig, get_peft_model

    model = _tiny_lm("llama")
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj"]))
    a_peft = next(m.lora_A["default"].weight for n, m in peft.named_modules() if n.endswith("q_proj"))
    d_in = a_peft.shape[1]
    a = lora_init_a(d_in, 8, "0.self_attn.q_proj")
    assert a.shape == a_peft.shape
    bound = 1 / np.sqrt(d_in)
    assert float(a_peft.detach().abs().max()) <= bound and float(a.abs().max()) <= bound
    big = lora_init_a(4096, 64, "x")
    assert abs(float(big.mean())) < 2e-3 and float(big.var()) == pytest.approx(1 / (3 * 4096), rel=0.02)
    assert torch.equal(lora_init_a(64, 4, "k"), lora_init_a(64, 4, "k"))
    assert not torch.equal(lora_init_a(64, 4, "k"), lora_init_a(64, 4, "j"))
    assert not torch.equal(lora_init_a(64, 4, "k", seed=1), lora_init_a(64, 4, "k"))


def test_sign_step_descends_at_the_l1_rate_and_expected_rate_matches_monte_carlo():
    g = torch.Generator().manual_seed(3)
    C = torch.randn(48, 20, generator=g, dtype=torch.float64)
    A0 = lora_init_a(48, 4, "m")
    grad_w = C.T                                               # ∇_W L (d_out × d_in)
    delta = sign_step_tangent(C, A0, 2.0)
    assert float((grad_w * delta).sum()) == pytest.approx(-float(lora_b_grad(C, A0, 2.0).abs().sum()), rel=1e-12)
    draws = [float(lora_b_grad(C, lora_init_a(48, 4, f"m{i}"), 2.0).abs().sum()) for i in range(400)]
    assert np.mean(draws) == pytest.approx(expected_l1_rate(C, 48, 4, 2.0), rel=0.03)


def test_adam_b_and_h_are_the_first_and_second_derivative_along_the_sign_step():
    """Pass 2's sign-step terms on a tiny float64 LM: b = −dL/dt equals the ℓ1 rate of ∇_B L on the
    probe set to 1e-6 (and a central difference of the real loss to 1 %: the sign step is a long
    tangent, so the O(h²) error of a step the RMSNorm's float32 rounding allows is ~0.3 %), and
    K_adam's diagonal the p-metric of u from a central difference of the logits; the Gram is PSD."""
    from layercard.profile.coupling_pass import ADAM_KEY, adam_deltas, coupling_terms, direction_keys
    from layercard.profile.directions import _perturbed, finite_difference_directions
    from layercard.profile.coupling import centered_softmax_weights
    from layercard.train.losses import supervised_loss_sum

    model = _tiny_lm("qwen3")
    batch = _lm_batch(13)
    layout, stats = _stats_and_layout(model, [batch])
    deltas = adam_deltas(model, layout, stats, rank=4)
    assert sorted(deltas) == [ADAM_KEY + l for l in layout.layers]
    K, b = coupling_terms(model, deltas, [batch], direction_keys(layout.layers, True)[len(layout.layers):], None)
    assert np.allclose(K, K.T) and np.linalg.eigvalsh(K).min() > -1e-9 * K.max()
    for i, layer in enumerate(layout.layers):
        l1 = sum(float(lora_b_grad(stats.C[m.key], lora_init_a(m.d_in, 4, m.key), 2.0).abs().sum())
                 for m in layout.modules_of(layer))
        assert b[i] == pytest.approx(l1, rel=1e-6)
        h = 1e-3

        def loss():
            with torch.no_grad():
                return float(supervised_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"]))
        with _perturbed(model, deltas[ADAM_KEY + layer], +h):
            plus = loss()
        with _perturbed(model, deltas[ADAM_KEY + layer], -h):
            minus = loss()
        assert b[i] == pytest.approx(-(plus - minus) / (2 * h), rel=1e-2)   # the sign step is long: O(h²) ≈ 0.3 %
        u = finite_difference_directions(model, deltas[ADAM_KEY + layer], batch, 1e-3)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["labels"][:, 1:] != -100
        z = logits[:, :-1][keep]
        p, _ = centered_softmax_weights(z)
        ubar = (p * u).sum(-1, keepdim=True)
        assert K[i, i] == pytest.approx(float((p * (u - ubar) ** 2).sum()), rel=1e-2)


def test_profiled_card_carries_the_adam_columns_and_round_trips(tmp_path):
    from layercard.card.layer_card import LayerCard
    from layercard.profile.coupling_pass import coupling_pass
    from layercard.discovery import discover
    from layercard.profile.profiler import profile_model

    model = _tiny_lm("llama")
    batches = [_lm_batch(13), _lm_batch(14)]
    card = profile_model(model, batches, rank=2)
    coupling_pass(model, discover(model), card, batches, sketch=None)
    for col in ("lora_grad_l1", "lora_grad_l2", "adam_b", "adam_h"):
        assert col in card.layers and np.isfinite(card.layers[col]).all() and (card.layers[col] > 0).all(), col
    assert card.modules["lora_grad_l1"].groupby(card.modules["layer"]).sum().to_numpy() == pytest.approx(
        card.layers["lora_grad_l1"].to_numpy())
    np.testing.assert_allclose(np.diag(card.coupling_adam), card.layers["adam_h"])
    card.save(tmp_path / "c")
    back = LayerCard.load(tmp_path / "c")
    np.testing.assert_array_equal(back.coupling_adam, card.coupling_adam)
    np.testing.assert_array_equal(back.coupling_k, card.coupling_k)
    off = profile_model(model, batches, rank=2)
    coupling_pass(model, discover(model), off, batches, sketch=None, adam=False)
    np.testing.assert_allclose(off.coupling_k, card.coupling_k, rtol=1e-10, atol=1e-12)
    assert off.coupling_adam is None and "adam_b" not in off.layers


# ---------------------------------------------------------------------------------------------
# Step budget and trust-region gain
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr,steps,warmup", [(1e-3, 60, 6), (2e-4, 100, 10), (5e-4, 30, 0), (1e-3, 5, 10)])
def test_step_budget_is_the_sum_of_deepspeeds_warmup_decay_schedule(lr, steps, warmup):
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = WarmupDecayLR(opt, total_num_steps=max(steps, warmup + 1), warmup_min_lr=0.0, warmup_max_lr=lr,
                          warmup_num_steps=max(warmup, 1), warmup_type="linear")
    total = 0.0
    for _ in range(steps):
        total += opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert step_budget(lr, steps, warmup) == pytest.approx(total, rel=1e-9, abs=1e-15)


def test_trust_region_gain_against_a_fine_grid():
    rng = np.random.default_rng(0)
    s = np.abs(rng.normal(size=200)) * rng.choice([1, 0, -1], 200, p=[0.8, 0.1, 0.1])
    h = rng.normal(size=200) * 3
    rho = 0.7
    t = np.linspace(0, rho, 200001)
    brute = np.maximum((t[None] * s[:, None] - 0.5 * t[None] ** 2 * h[:, None]).max(axis=1), 0.0)
    np.testing.assert_allclose(trust_region_gain(s, h, rho), brute, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Set models in selection
# ---------------------------------------------------------------------------------------------
def _arrays(model, L, seed):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(L, 6)) + 0.8 * rng.normal(size=(1, 6))    # shared direction: coupled layers
    H = U @ U.T * rng.uniform(0.5, 2.0)
    s = rng.uniform(0.2, 3.0, size=L)
    lowest = np.sort(rng.uniform(1, 10, size=L))[::-1].copy()
    added = rng.uniform(0.05, 0.5, size=L)
    gm = AdamGain(s, H, rho=float(rng.uniform(0.05, 2.0))) if model == "adam" else \
        CoverageGain(trust_region_gain(s, np.diag(H), 1.0), _similarity(H))
    K = np.eye(L)
    return CardArrays(np.arange(L) * 2, K, np.ones(L), np.ones(L), lowest, added, "flops", gm), s, H, gm


def test_adam_and_coverage_set_gains_match_brute_force():
    for model in ("adam", "coverage"):
        A, s, H, gm = _arrays(model, 7, 1)
        for S in [(0,), (1, 3), (0, 2, 4, 6), tuple(range(7))]:
            layers = [2 * i for i in S]
            if model == "adam":
                t = np.linspace(0, gm.rho, 400001)
                ss, hh = s[list(S)].sum(), H[np.ix_(S, S)].sum()
                want = max(float((t * ss - 0.5 * t * t * hh).max()), 0.0)
                assert set_quality(A, layers) == pytest.approx(want, rel=1e-7)
            else:
                want = sum(gm.G[j] * max(gm.sim[j, l] for l in S) for j in range(7))
                assert set_quality(A, layers) == pytest.approx(want, rel=1e-12)
        assert singleton_quality(A) == pytest.approx([set_quality(A, [2 * i]) for i in range(7)])


@pytest.mark.parametrize("model", ["adam", "coverage"])
def test_greedy_against_exhaustive_enumeration(model):
    """≤ 16 layers: the greedy (forced with exact_max_layers=0) against every set; coverage keeps
    submodular greedy's (1 − 1/e) bound on every card, both are within a few % on average."""
    ratios, cost_ratios = [], []
    for seed in range(12):
        A, *_ = _arrays(model, 10, seed)
        for k in (2, 3, 5):
            exact = select_max_quality(A, k=k)
            greedy = select_max_quality(A, k=k, exact_max_layers=0)
            assert exact.method == "exact" and greedy.method == "greedy"
            assert greedy.gain <= exact.gain * (1 + 1e-9)
            ratios.append(greedy.gain / exact.gain)
            if model == "coverage":
                assert greedy.gain >= (1 - 1 / np.e) * exact.gain
        exact = select_min_cost(A, 0.9)
        greedy = select_min_cost(A, 0.9, exact_max_layers=0)
        assert greedy.gain >= 0.9 * set_quality(A, A.layers) * (1 - 1e-9)
        cost_ratios.append(greedy.cost / exact.cost)
    assert np.mean(ratios) >= 0.97 and min(ratios) >= 0.8
    assert np.mean(cost_ratios) <= 1.05


def test_card_without_sign_step_columns_falls_back_or_names_the_missing_columns():
    from types import SimpleNamespace

    import pandas as pd

    from layercard.select.gain_models import gain_model_from_card
    from layercard.select.selection import resolve_model

    card = SimpleNamespace(layers=pd.DataFrame({"layer": [0, 1]}), coupling_adam=None, meta={})
    assert resolve_model(card, None) in ("newton",) or resolve_model(card, None) == "newton"
    with pytest.raises(LayercardError, match="sign-step"):
        gain_model_from_card(card, "adam", 0.1)
    with pytest.raises(LayercardError, match="--model 'nope'"):
        gain_model_from_card(card, "nope", 0.1)
    with pytest.raises(LayercardError, match="step budget"):
        gain_model_from_card(card, "adam", 0.0)


def test_measured_model_is_coverage_of_the_single_layer_gains_against_brute_force():
    """``--model measured``: Σ_j max(m_j, 0)·max_{ℓ∈S} |ρ_jℓ| with m the card's measured_gain (a per-layer
    search's), ρ from the sign-step Gram; every set of a 6-layer card against the sum written out."""
    from types import SimpleNamespace

    import pandas as pd

    from layercard.select.gain_models import gain_model_from_card

    rng = np.random.default_rng(4)
    L = 6
    U = rng.normal(size=(L, 4)) + 0.6 * rng.normal(size=(1, 4))
    H = U @ U.T
    m = rng.normal(0.1, 0.1, size=L)
    m[2] = -0.05                                    # a layer that lost alone counts 0
    layers = pd.DataFrame({"layer": np.arange(L), "adam_b": rng.uniform(1, 2, L), "measured_gain": m})
    card = SimpleNamespace(layers=layers, coupling_adam=H * 7.0, meta={"coupling_tokens": 7})
    gm = gain_model_from_card(card, "measured", 0.1)
    assert gm.name == "measured"
    sim = np.abs(H) / np.sqrt(np.outer(np.diag(H), np.diag(H)))
    for size in range(1, L + 1):
        for S in itertools.combinations(range(L), size):
            want = sum(max(m[j], 0.0) * max(sim[j, l] for l in S) for j in range(L))
            assert gm(np.array([S]))[0] == pytest.approx(want, rel=1e-12, abs=1e-15)
    with pytest.raises(LayercardError, match=r"lacks a measured gain for layer\(s\) \[1, 4\]"):
        layers.loc[[1, 4], "measured_gain"] = np.nan
        gain_model_from_card(card, "measured", 0.1)
    with pytest.raises(LayercardError, match="no measured single-layer gains .*mode=per-layer"):
        gain_model_from_card(SimpleNamespace(layers=layers.drop(columns="measured_gain"), coupling_adam=H,
                                             meta={"coupling_tokens": 7}), "measured", 0.1)
