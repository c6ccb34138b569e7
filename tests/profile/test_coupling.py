"""Layer coupling: the output metric, K/b/ρ/gains, the JL sketch, and JVP directions vs finite differences."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from layercard.profile.coupling import (
    Sketch,
    additivity_error,
    additivity_gap,
    ce_logit_grad,
    centered_softmax_weights,
    correlation,
    coupling_from_embeddings,
    linear_term,
    metric_embed,
    predicted_gain,
    set_gain,
    singleton_gains,
)
from layercard.profile.directions import (
    finite_difference_directions,
    layer_directions,
    module_finite_difference,
    module_jvp,
    output_directions,
    supervised_targets,
)
from layercard.errors import LayercardError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _K_b(us: list[torch.Tensor], logits: torch.Tensor, targets: torch.Tensor):
    """K (numpy) and b (numpy) of layer directions ``us`` on one token batch."""
    p, _ = centered_softmax_weights(logits)
    K = coupling_from_embeddings([metric_embed(u, p) for u in us]).numpy()
    g = ce_logit_grad(p, targets)
    b = np.array([linear_term(g, u) for u in us])
    return K, b


def _random_problem(L=5, T=40, V=30, seed=0):
    g = _gen(seed)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (T,), generator=g)
    us = [torch.randn(T, V, generator=g, dtype=torch.float64) for _ in range(L)]
    return us, logits, targets


# ---------------------------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------------------------
def test_metric_embed_inner_product_is_softmax_hessian():
    g = _gen(1)
    T, V = 9, 17
    logits = 3.0 * torch.randn(T, V, generator=g, dtype=torch.float64)
    u = torch.randn(T, V, generator=g, dtype=torch.float64)
    v = torch.randn(T, V, generator=g, dtype=torch.float64)
    p, sqrt_p = centered_softmax_weights(logits)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p.sum(-1), torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(sqrt_p**2, p, rtol=1e-14, atol=0)
    wu, wv = metric_embed(u, p), metric_embed(v, p)
    for t in range(T):
        H = torch.diag(p[t]) - torch.outer(p[t], p[t])
        exact = (u[t] @ H @ v[t]).item()
        got = (wu[t] @ wv[t]).item()
        assert got == pytest.approx(exact, rel=1e-12, abs=1e-14)
    total = sum((u[t] @ (torch.diag(p[t]) - torch.outer(p[t], p[t])) @ v[t]).item() for t in range(T))
    K = coupling_from_embeddings([wu, wv])
    assert K.dtype == torch.float64
    assert K[0, 1].item() == pytest.approx(total, rel=1e-12)


def test_b_and_K_are_first_and_second_derivative_of_summed_cross_entropy():
    """b = −dL/dα and K_ℓℓ = d²L/dα² of L(z + α u) = Σ_t CE; the gain b²/2K is the quadratic model's optimum."""
    us, logits, targets = _random_problem(L=1, T=12, V=10, seed=2)
    u = us[0]
    K, b = _K_b([u], logits, targets)

    def loss(alpha):
        return torch.nn.functional.cross_entropy(logits + alpha * u, targets, reduction="sum")

    alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(loss(alpha), alpha, create_graph=True)
    (d2,) = torch.autograd.grad(d1, alpha)
    assert b[0] == pytest.approx(-d1.item(), rel=1e-12)
    assert K[0, 0] == pytest.approx(d2.item(), rel=1e-12)
    assert singleton_gains(K, b)[0] == pytest.approx(b[0] ** 2 / (2 * d2.item()), rel=1e-12)


def test_K_symmetric_psd_and_additive_over_batches():
    us, logits, targets = _random_problem(L=6, T=50, V=25, seed=3)
    K, b = _K_b(us, logits, targets)
    assert np.array_equal(K, K.T)
    ev = np.linalg.eigvalsh(K)
    assert ev.min() >= -1e-10 * ev.max()
    # additive across token batches
    K1, b1 = _K_b([u[:20] for u in us], logits[:20], targets[:20])
    K2, b2 = _K_b([u[20:] for u in us], logits[20:], targets[20:])
    np.testing.assert_allclose(K1 + K2, K, rtol=1e-12)
    np.testing.assert_allclose(b1 + b2, b, rtol=1e-12)
    rho = correlation(K)
    np.testing.assert_allclose(np.diag(rho), 1.0)
    assert np.all(np.abs(rho) <= 1.0)
    np.testing.assert_allclose(rho, rho.T)


# ---------------------------------------------------------------------------------------------
# Coupling toys
# ---------------------------------------------------------------------------------------------
def test_disjoint_layers_give_identity_coupling_and_additive_gains():
    """Layer ℓ only moves its own vocabulary block, with a p-centred direction (ū = 0): H-orthogonal."""
    g = _gen(4)
    T, V, L = 16, 24, 3
    logits = torch.randn(T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (T,), generator=g)
    p, _ = centered_softmax_weights(logits)
    us = []
    for layer in range(L):
        block = slice(8 * layer, 8 * (layer + 1))
        u = torch.zeros(T, V, dtype=torch.float64)
        raw = torch.randn(T, 8, generator=g, dtype=torch.float64)
        pb = p[:, block]
        u[:, block] = raw - (pb * raw).sum(-1, keepdim=True) / pb.sum(-1, keepdim=True)  # Σ_i p_i u_i = 0
        us.append(u)
    K, b = _K_b(us, logits, targets)
    rho = correlation(K)
    np.testing.assert_allclose(rho, np.eye(L), atol=1e-12)
    all_layers = list(range(L))
    assert additivity_gap(K, b, all_layers) == pytest.approx(0.0, abs=1e-12 * singleton_gains(K, b).sum())
    assert set_gain(K, b, all_layers) == pytest.approx(singleton_gains(K, b).sum(), rel=1e-12)
    # disjoint tokens are orthogonal too
    K2, _ = _K_b(
        [torch.cat([us[0][:8], torch.zeros(8, V, dtype=torch.float64)]), torch.cat([torch.zeros(8, V, dtype=torch.float64), us[1][8:]])],
        logits,
        targets,
    )
    assert K2[0, 1] == 0.0


def test_two_layers_with_the_same_correction_are_fully_coupled():
    """Linear toy z = B A x: updating A by N·A or B by B·N moves the output identically (B N A x)."""
    g = _gen(5)
    d_in, d_h, V, T = 6, 8, 10, 32
    net = torch.nn.Sequential(
        torch.nn.Linear(d_in, d_h, bias=False), torch.nn.Linear(d_h, V, bias=False)
    ).double()
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (T,), generator=g)
    N = torch.randn(d_h, d_h, generator=g, dtype=torch.float64)
    A, B = net[0].weight.detach(), net[1].weight.detach()
    logits, u0 = module_jvp(net, {"0.weight": N @ A}, (x,))
    _, u1 = module_jvp(net, {"1.weight": 2.5 * B @ N}, (x,))
    other = torch.randn(d_h, d_in, generator=g, dtype=torch.float64)
    _, u2 = module_jvp(net, {"0.weight": other}, (x,))
    K, b = _K_b([u0, u1, u2], logits, targets)
    rho = correlation(K)
    assert abs(rho[0, 1]) == pytest.approx(1.0, abs=1e-10)
    s = singleton_gains(K, b)
    assert s[0] == pytest.approx(s[1], rel=1e-9)
    joint = set_gain(K, b, [0, 1])
    assert np.isfinite(joint)
    assert joint == pytest.approx(s[0], rel=1e-6)  # not s[0] + s[1]
    assert additivity_gap(K, b, [0, 1]) == pytest.approx(s[1], rel=1e-6)
    # a genuinely different layer still adds information
    assert set_gain(K, b, [0, 1, 2]) >= set_gain(K, b, [0, 2]) - 1e-9 * abs(set_gain(K, b, [0, 2]))
    assert set_gain(K, b, [0, 1, 2]) == pytest.approx(set_gain(K, b, [0, 2]), rel=1e-6)


def test_set_gain_singular_K_uses_pinv_and_is_monotone():
    us, logits, targets = _random_problem(L=5, T=30, V=20, seed=6)
    us.append(us[1].clone())  # duplicate direction → duplicate row/column in K
    us.append(-3.0 * us[3])  # scaled duplicate
    K, b = _K_b(us, logits, targets)
    n = len(us)
    assert np.linalg.matrix_rank(K) == 5
    full = set_gain(K, b, range(n))
    assert np.isfinite(full)
    assert full == pytest.approx(set_gain(K, b, range(5)), rel=1e-8)
    assert set_gain(K, b, []) == 0.0
    tol = 1e-9 * full
    gains = {}
    for r in range(n + 1):
        for S in itertools.combinations(range(n), r):
            gains[S] = set_gain(K, b, S)
            assert np.isfinite(gains[S]) and gains[S] >= -tol
            assert gains[S] <= full + tol
    for S, gS in gains.items():  # adding a layer never lowers the gain
        for j in set(range(n)) - set(S):
            assert gains[tuple(sorted(S + (j,)))] >= gS - tol


def test_correlation_and_singletons_with_dead_layer():
    K = np.array([[4.0, 2.0, 0.0], [2.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    b = np.array([2.0, 3.0, 0.0])
    rho = correlation(K)
    np.testing.assert_allclose(rho, [[1.0, 2.0 / 6.0, 0.0], [2.0 / 6.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(singleton_gains(K, b), [0.5, 0.5, 0.0])
    assert set_gain(K, b, [0, 1, 2]) == pytest.approx(set_gain(K, b, [0, 1]))
    assert additivity_gap(K, b, [0, 1]) == pytest.approx(1.0 - set_gain(K, b, [0, 1]))
    with pytest.raises(LayercardError, match="out of range"):
        set_gain(K, b, [3])


# ---------------------------------------------------------------------------------------------
# JL sketch
# ---------------------------------------------------------------------------------------------
def test_sketch_is_seeded_and_preserves_K():
    s1, s2, s3 = Sketch(1000, 512, seed=7), Sketch(1000, 512, seed=7), Sketch(1000, 512, seed=8)
    assert s1.matrix.dtype == torch.float32 and s1.matrix.shape == (1000, 512)
    assert torch.equal(s1.matrix, s2.matrix)
    assert not torch.equal(s1.matrix, s3.matrix)
    assert s1.matrix.var().item() == pytest.approx(1.0 / 512, rel=0.02)

    us, logits, targets = _random_problem(L=4, T=64, V=1000, seed=9)
    us[3] = 0.7 * us[0] + 0.3 * us[3]  # include a correlated pair
    p, _ = centered_softmax_weights(logits)
    W = [metric_embed(u, p) for u in us]
    K = coupling_from_embeddings(W).numpy()
    Ks = coupling_from_embeddings([s1(w) for w in W]).numpy()
    scale = np.sqrt(np.outer(np.diag(K), np.diag(K)))
    assert np.max(np.abs(Ks - K) / scale) <= 0.15
    assert np.max(np.abs(correlation(Ks) - correlation(K))) <= 0.15
    with pytest.raises(LayercardError, match="vocab"):
        s1(torch.zeros(2, 999))


# ---------------------------------------------------------------------------------------------
# On a card
# ---------------------------------------------------------------------------------------------
def test_predicted_gain_on_card_maps_layer_indices():
    K = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
    b = np.array([1.0, -2.0, 0.5])
    table = pd.DataFrame({"layer": [3, 5, 7], "b": b, "k_diag": np.diag(K)})
    card = SimpleNamespace(layers=table, coupling=correlation(K), coupling_k=K)
    assert predicted_gain(card, [5, 7]) == pytest.approx(set_gain(K, b, [1, 2]))
    assert predicted_gain(card, []) == 0.0
    assert additivity_error(card, [3, 5, 7]) == pytest.approx(additivity_gap(K, b, [0, 1, 2]))
    with pytest.raises(LayercardError, match="layer 4 "):
        predicted_gain(card, [3, 4])
    with pytest.raises(LayercardError, match="card has no coupling; run `layercard profile` with coupling enabled"):
        predicted_gain(SimpleNamespace(layers=table, coupling=None, coupling_k=None), [3])


# ---------------------------------------------------------------------------------------------
# JVP directions
# ---------------------------------------------------------------------------------------------
def test_module_jvp_matches_central_difference_on_float64_toy():
    torch.manual_seed(10)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 11)
    ).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    g = _gen(11)
    for names in (["0.weight"], ["2.weight", "2.bias"], ["0.weight", "2.weight", "4.weight", "4.bias"]):
        deltas = {n: torch.randn(before[n].shape, generator=g, dtype=torch.float64) for n in names}
        out, u = module_jvp(net, deltas, (x,))
        with torch.no_grad():
            torch.testing.assert_close(out, net(x), rtol=0, atol=0)
        fd = module_finite_difference(net, deltas, 1e-4, (x,))
        assert _rel(fd, u) <= 1e-6
    for n, p in net.named_parameters():  # restored bit for bit
        assert torch.equal(p, before[n])
    with pytest.raises(LayercardError, match="'nope.weight'"):
        module_jvp(net, {"nope.weight": torch.zeros(1)}, (x,))
    with pytest.raises(LayercardError, match="shape"):
        module_jvp(net, {"0.weight": torch.zeros(5, 16, dtype=torch.float64)}, (x,))


def _tiny_lm(kind: str, attn: str = "eager"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, intermediate_size=128, attn_implementation=attn,
    )
    torch.manual_seed(12)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    return model.double().eval()


def _lm_batch(seed: int = 13):
    g = _gen(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding (float64 eager turns fully masked left-pad rows into NaN)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _layer_deltas(model, layer: int, seed: int):
    g = _gen(seed)
    prefix = f"model.layers.{layer}."
    return {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype) * p.detach().std()
        for n, p in model.named_parameters()
        if n.startswith(prefix) and p.dim() == 2
    }


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_output_directions_match_finite_difference_on_tiny_lm(kind):
    model = _tiny_lm(kind)
    batch = _lm_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    T = int((batch["labels"][:, 1:] != -100).sum())
    deltas = {layer: _layer_deltas(model, layer, 20 + layer) for layer in range(2)}
    for layer in range(2):
        logits, u = output_directions(model, deltas[layer], batch, eps_check=1e-3, check_rtol=1e-3)
        assert logits.shape == u.shape == (T, 128)
        fd = finite_difference_directions(model, deltas[layer], batch, 1e-3)
        assert _rel(fd, u) <= 1e-3
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, ref[:, :-1][batch["labels"][:, 1:] != -100], rtol=1e-10, atol=1e-10)

    # layer_directions: logits once, one u per layer, same as separate calls
    logits_all, us = layer_directions(model, deltas, batch)
    torch.testing.assert_close(logits_all, logits, rtol=1e-12, atol=1e-12)
    for layer in range(2):
        torch.testing.assert_close(us[layer], output_directions(model, deltas[layer], batch)[1], rtol=1e-12, atol=1e-12)

    # end to end: K PSD, gains finite and non-negative
    targets = supervised_targets(batch)
    assert targets.shape == (T,)
    K, b = _K_b([us[0], us[1]], logits_all, targets)
    assert np.linalg.eigvalsh(K).min() >= -1e-10 * np.abs(K).max()
    assert 0.0 <= set_gain(K, b, [0]) <= set_gain(K, b, [0, 1]) + 1e-12


def test_output_directions_switch_sdpa_to_eager_and_back():
    model = _tiny_lm("llama", attn="sdpa")
    assert model.config._attn_implementation == "sdpa"
    batch = _lm_batch()
    deltas = _layer_deltas(model, 1, 30)
    _, u = output_directions(model, deltas, batch)
    assert torch.isfinite(u).all()
    assert model.config._attn_implementation == "sdpa"
    eager = _tiny_lm("llama", attn="eager")
    torch.testing.assert_close(output_directions(eager, deltas, batch)[1], u, rtol=1e-9, atol=1e-12)


def test_layer_deltas_reuse_the_cards_eigendecompositions():
    """Δ* from the eigh that card_from_stats already solved equals Δ* solved afresh (and no group is solved twice)."""
    from layercard.profile.coupling_pass import layer_deltas
    from layercard.discovery import discover
    from layercard.profile.profiler import card_from_stats, collect_stats

    model = _tiny_lm("qwen3")
    layout = discover(model)
    stats = collect_stats(model, layout, [_lm_batch(13), _lm_batch(14)])
    eigs: dict = {}
    card_from_stats(layout, stats, rank=2, ridge=1e-3, eigs=eigs)
    assert set(eigs) == set(stats.A)
    solved = {k: id(v) for k, v in eigs.items()}
    reused = layer_deltas(model, layout, stats, rank=2, ridge=1e-3, eigs=eigs)
    assert {k: id(v) for k, v in eigs.items()} == solved
    fresh = layer_deltas(model, layout, stats, rank=2, ridge=1e-3)
    for layer, tangents in fresh.items():
        for name, t in tangents.items():
            assert torch.equal(reused[layer][name], t), name


# ---------------------------------------------------------------------------------------------
# The label loss (profile.loss: label): one row per example, the answer tokens' columns only
# ---------------------------------------------------------------------------------------------
LABEL_IDS = [5, 9]


def _answer_lm_batch(seed: int = 13):
    """_lm_batch with each row's first answer token (t = 4) one of LABEL_IDS."""
    batch = _lm_batch(seed)
    first = torch.tensor([LABEL_IDS[1], LABEL_IDS[0]])
    batch["input_ids"][:, 4] = first
    batch["labels"][:, 4] = first
    return batch


def test_label_loss_K_and_b_match_brute_force_on_tiny_lm():
    """b_ℓ = −dL/dα of the summed label loss along Δ_ℓ (central difference of the real loss, float64),
    and K_ℓm = Σ_rows Σ_i p_i (u_ℓi − ū_ℓ)(u_mi − ū_m) with p the softmax over the answer tokens at
    the answer position and u from a finite difference of the full logits — written out by hand.
    (Differences at step 1e-3, tolerance 1e-3: the models' RMSNorm computes in float32 even for a
    float64 model, so smaller steps drown in its rounding.)"""
    from layercard.profile.coupling_pass import probe_terms
    from layercard.profile.directions import _perturbed

    model = _tiny_lm("qwen3")
    batch = _answer_lm_batch()
    deltas = {layer: _layer_deltas(model, layer, 40 + layer) for layer in range(2)}
    W, b = probe_terms(model, deltas, batch, None, LABEL_IDS)
    assert all(w.shape == (2, 2) for w in W.values())                 # 2 examples × 2 answer tokens
    K = coupling_from_embeddings([W[0], W[1]]).numpy()
    assert torch.equal(supervised_targets(batch, LABEL_IDS), torch.tensor([1, 0]))

    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    pick = lambda out: out.logits[:, 3][:, LABEL_IDS]             # noqa: E731  position 3 predicts token 4
    targets = torch.tensor([1, 0])

    def label_loss_sum() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(pick(model(**kwargs)), targets, reduction="sum"))

    with torch.no_grad():
        z = pick(model(**kwargs))
    p = torch.softmax(z, dim=-1)
    us = [module_finite_difference(model, deltas[l], 1e-3, (), kwargs, pick) for l in range(2)]
    for l in range(2):
        h = 1e-3
        with _perturbed(model, deltas[l], +h):
            plus = label_loss_sum()
        with _perturbed(model, deltas[l], -h):
            minus = label_loss_sum()
        assert b[l] == pytest.approx(-(plus - minus) / (2 * h), rel=1e-3)
        for m in range(2):
            ref = 0.0
            for r in range(2):
                ul, um = us[l][r], us[m][r]
                ubar_l, ubar_m = float((p[r] * ul).sum()), float((p[r] * um).sum())
                ref += sum(float(p[r, i]) * (float(ul[i]) - ubar_l) * (float(um[i]) - ubar_m) for i in range(2))
            assert K[l, m] == pytest.approx(ref, rel=1e-3)
    assert b[0] != 0 and K[0, 0] > 0
