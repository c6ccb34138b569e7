"""The statistics hooks against autograd: C, A, gg, n; padding; additivity; input groups; backward
depth; a planted signal; non-finite activations."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from layercard.data.examples import collate
from layercard.discovery import discover, find_blocks
from layercard.errors import LayercardError
from layercard.train.losses import lm_loss_sum
from layercard.models import ModelConfig, load_model
from layercard.profile.profiler import collect_stats, profile_model

V = 128
QWEN3 = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=128, vocab_size=V)
GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64, bos_token_id=1,
            eos_token_id=2)



def _model(config: dict, dtype: str = "float64", seed: int = 0):
    return load_model(ModelConfig(config=config, dtype=dtype, seed=seed)).model


@pytest.fixture(scope="module")
def qwen3():
    return _model(QWEN3)


@pytest.fixture(scope="module")
def gpt2():
    return _model(GPT2)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def _batch(seed: int, rows: int, width: int, prompt: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _right_pad(batch: dict, extra: int, pad_id: int = 0) -> dict:
    rows = batch["input_ids"].shape[0]
    return {
        "input_ids": torch.cat([batch["input_ids"], torch.full((rows, extra), pad_id)], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(rows, extra, dtype=torch.long)], 1),
        "labels": torch.cat([batch["labels"], torch.full((rows, extra), -100)], 1),
    }


def _assert_stats_equal(s1, s2, keys_C=None, rel=1e-10):
    keys_C = list(s1.C) if keys_C is None else keys_C
    groups = {s1.group_of[k] for k in keys_C}
    for k in keys_C:
        assert _rel(s2.C[k], s1.C[k]) < rel, k
        assert s2.gg[k] == pytest.approx(s1.gg[k], rel=rel), k
        assert s2.group_of[k] == s1.group_of[k]
    for grp in groups:
        assert _rel(s2.A[grp], s1.A[grp]) < rel, grp
        assert s2.n[grp] == s1.n[grp], grp


def _autograd_reference(model, layout, batch, loss_fn=lm_loss_sum):
    """Independent reference on a copy: weight grads by autograd, X and ∂L/∂Y by plain hooks;
    ``loss_fn(full logits, labels)`` is the summed loss."""
    ref = copy.deepcopy(model)
    _, blocks = find_blocks(ref, layout.block_path)
    mask = batch["attention_mask"].bool().reshape(-1)
    inputs, outputs, handles = {}, {}, []
    for m in layout.modules:
        module = blocks[m.layer].get_submodule(m.name)
        module.weight.requires_grad_(True)

        def hook(mod, args, out, key=m.key):
            inputs[key] = args[0].detach()
            out.retain_grad()
            outputs[key] = out

        handles.append(module.register_forward_hook(hook))
    out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    loss_fn(out.logits, batch["labels"]).backward()
    for h in handles:
        h.remove()
    res = {}
    for m in layout.modules:
        x = inputs[m.key].reshape(-1, m.d_in)[mask]
        g = outputs[m.key].grad.reshape(-1, m.d_out)[mask]
        w = blocks[m.layer].get_submodule(m.name).weight
        res[m.key] = dict(grad=w.grad.detach().clone(), A=x.T @ x, gg=float(g.pow(2).sum()), n=x.shape[0])
    return res


# ------------------------------------------------------------------------- C, A, gg, n vs autograd
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_stats_match_autograd(arch, request):
    model = request.getfixturevalue(arch)
    layout = discover(model)
    batch = _batch(1, rows=3, width=24, prompt=5)  # the first tokens are unsupervised (labels -100)
    stats = collect_stats(model, layout, [batch])
    ref = _autograd_reference(model, layout, batch)
    assert len(layout.modules) == len(ref) == len(stats.C)
    for m in layout.modules:
        r = ref[m.key]
        C = stats.C[m.key]
        assert C.shape == (m.d_in, m.d_out) and C.dtype == torch.float64
        # Linear stores W as (d_out, d_in): C = Wgradᵀ; GPT-2's Conv1D stores (d_in, d_out): C = Wgrad.
        expected = r["grad"] if m.transposed else r["grad"].T
        assert m.transposed is (arch == "gpt2")
        assert _rel(C, expected) < 1e-8, m.key
        A = stats.A[stats.group_of[m.key]]
        assert _rel(A, r["A"]) < 1e-8, m.key
        assert stats.gg[m.key] == pytest.approx(r["gg"], rel=1e-8), m.key
        assert stats.n[stats.group_of[m.key]] == r["n"] == 3 * 24
        assert float(C.norm()) > 0 and stats.gg[m.key] > 0


LABEL_IDS = [7, 11]   # the answer tokens of the label-loss tests


def _answer_batch(seed: int, rows: int, width: int, prompt: int) -> dict:
    """Prompt of ``prompt`` tokens, then an answer whose first token is one of LABEL_IDS, then more answer tokens."""
    batch = _batch(seed, rows, width, prompt)
    g = torch.Generator().manual_seed(seed + 100)
    first = torch.tensor(LABEL_IDS)[torch.randint(0, 2, (rows,), generator=g)]
    batch["input_ids"][:, prompt] = first
    batch["labels"][:, prompt] = first
    return batch


def _label_loss_sum(logits, labels):
    """Brute force: for each row, −log softmax over LABEL_IDS of the logits one position before its first answer token."""
    total = logits.new_zeros(())
    for r in range(labels.shape[0]):
        t = int((labels[r] != -100).nonzero()[0])
        z = logits[r, t - 1, LABEL_IDS]
        total = total - torch.log_softmax(z, dim=0)[LABEL_IDS.index(int(labels[r, t]))]
    return total


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_label_loss_stats_match_autograd(arch, request):
    """``label_ids``: C, gg are those of the label loss (one answer position per row, two columns of
    the softmax), checked against autograd of a per-row brute-force loss on the full logits."""
    model = request.getfixturevalue(arch)
    layout = discover(model)
    batch = _answer_batch(2, rows=3, width=20, prompt=6)
    stats = collect_stats(model, layout, [batch], label_ids=LABEL_IDS)
    ref = _autograd_reference(model, layout, batch, loss_fn=_label_loss_sum)
    lm = collect_stats(model, layout, [batch])
    for m in layout.modules:
        r = ref[m.key]
        expected = r["grad"] if m.transposed else r["grad"].T
        assert _rel(stats.C[m.key], expected) < 1e-8, m.key
        assert stats.gg[m.key] == pytest.approx(r["gg"], rel=1e-8), m.key
        assert _rel(stats.A[stats.group_of[m.key]], r["A"]) < 1e-8, m.key
        assert _rel(lm.C[m.key], stats.C[m.key]) > 0.1, m.key   # a different loss, not the LM loss again


def test_label_loss_rejects_an_answer_outside_the_labels(qwen3):
    batch = _answer_batch(3, rows=2, width=12, prompt=4)
    batch["labels"][1, 4] = 5
    with pytest.raises(LayercardError, match="row 1 starts its answer with token 5"):
        collect_stats(qwen3, discover(qwen3), [batch], label_ids=LABEL_IDS)


# ---------------------------------------------------------------------------------------- padding
@pytest.fixture
def float64_softmax(monkeypatch):
    """transformers' eager Llama/Qwen attention takes its softmax in float32 even in a float64 model
    (``softmax(w, dim=-1, dtype=torch.float32)``); the backward's row sums then depend on the row width
    (padding included) at the 1e-8 level. Keep float64 inputs in float64 so padding is tested exactly."""
    real = torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        return real(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_right_padding_does_not_change_stats(arch, request, float64_softmax):
    model = request.getfixturevalue(arch)
    layout = discover(model)
    batch = _batch(2, rows=3, width=20, prompt=4)
    plain = collect_stats(model, layout, [batch])
    for extra in (1, 7):
        padded = collect_stats(model, layout, [_right_pad(batch, extra=extra)])
        _assert_stats_equal(plain, padded, rel=1e-10)
        assert padded.n_tokens == 3 * 20


def test_right_padding_with_float32_softmax(qwen3):
    """Without the float64 softmax: A and n still exact; C and gg to float32 precision (see above)."""
    layout = discover(qwen3)
    batch = _batch(2, rows=3, width=20, prompt=4)
    plain = collect_stats(qwen3, layout, [batch])
    padded = collect_stats(qwen3, layout, [_right_pad(batch, extra=7)])
    _assert_stats_equal(plain, padded, rel=1e-6)
    for grp in plain.A:
        assert _rel(padded.A[grp], plain.A[grp]) < 1e-10 and padded.n[grp] == plain.n[grp]


def test_ragged_padding_counts_only_real_tokens(qwen3):
    layout = discover(qwen3)
    examples = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 17, 11)]
    stats = collect_stats(qwen3, layout, [collate(examples, pad_id=0)])
    assert set(stats.n.values()) == {5 + 17 + 11}


# ------------------------------------------------------------------------------------- additivity
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_three_batches_sum_to_concatenation(arch, request, float64_softmax):
    model = request.getfixturevalue(arch)
    layout = discover(model)
    g = torch.Generator().manual_seed(3)
    batches, examples = [], []
    for rows, width in [(2, 9), (3, 16), (1, 23)]:
        part = [{"input_ids": torch.randint(3, V, (width - i,), generator=g).tolist()} for i in range(rows)]
        for e in part:
            e["labels"] = [-100] * 2 + e["input_ids"][2:]
        batches.append(collate(part, pad_id=0))
        examples += part
    separate = collect_stats(model, layout, batches)
    summed = collect_stats(model, layout, batches[:1]) + collect_stats(model, layout, batches[1:2]) \
        + collect_stats(model, layout, batches[2:])
    together = collect_stats(model, layout, [collate(examples, pad_id=0)])
    _assert_stats_equal(together, separate, rel=1e-10)
    _assert_stats_equal(together, summed, rel=1e-10)
    assert together.n_tokens == sum(len(e["input_ids"]) for e in examples)


# ----------------------------------------------------------------------------------- input groups
@pytest.mark.parametrize("dtype, rel", [("float64", 1e-12), ("float32", 1e-5)])
def test_flush_interval_does_not_change_statistics(dtype, rel):
    """Device-side partial sums added into float64 after every batch or after several: the same."""
    model = _model(QWEN3, dtype=dtype)
    layout = discover(model)
    batches = [_right_pad(_batch(s, rows=2, width=9, prompt=3), extra=s % 3) for s in range(5)]
    every = collect_stats(model, layout, batches, flush_every=1)
    for k in (2, 16):
        _assert_stats_equal(every, collect_stats(model, layout, batches, flush_every=k), rel=rel)
    assert every.A[next(iter(every.A))].dtype == torch.float64


def test_input_groups_qwen3(qwen3):
    stats = collect_stats(qwen3, discover(qwen3), [_batch(4, rows=2, width=12)])
    for layer in range(4):
        grp = {name: stats.group_of[f"{layer}.{name}"] for name in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        assert grp["self_attn.q_proj"] == grp["self_attn.k_proj"] == grp["self_attn.v_proj"]
        assert grp["mlp.gate_proj"] == grp["mlp.up_proj"]
        distinct = {grp["self_attn.q_proj"], grp["self_attn.o_proj"], grp["mlp.gate_proj"], grp["mlp.down_proj"]}
        assert len(distinct) == 4
        assert all(g.startswith(f"{layer}.") for g in grp.values())
    assert len(stats.A) == 4 * 4


def test_input_groups_gpt2(gpt2):
    stats = collect_stats(gpt2, discover(gpt2), [_batch(4, rows=2, width=12)])
    assert len(set(stats.group_of.values())) == len(stats.group_of) == 2 * 4


# -------------------------------------------------------------------------------- backward depth
def test_backward_stops_at_lowest_profiled_layer(qwen3):
    batch = _batch(5, rows=2, width=16, prompt=3)
    _, blocks = find_blocks(qwen3)

    def profile_watched(layers):
        """Stats for ``layers``, and which blocks' backward ran (module backward hook + output tensor hook)."""
        fired, out_grads, requires = {0: [], 2: []}, {0: [], 2: []}, {}

        def watch(i):
            def hook(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                requires[i] = out.requires_grad
                if out.requires_grad:
                    out.register_hook(lambda g: out_grads[i].append(g.shape))
            return hook

        handles = [blocks[i].register_forward_hook(watch(i)) for i in fired]
        handles += [blocks[i].register_full_backward_hook(lambda m, gi, go, i=i: fired[i].append(1)) for i in fired]
        try:
            stats = collect_stats(qwen3, discover(qwen3, layers=layers), [batch])
        finally:
            for h in handles:
                h.remove()
        return stats, fired, out_grads, requires

    part, fired, out_grads, requires = profile_watched([2, 3])
    assert requires == {0: False, 2: True}
    assert fired[0] == [] and out_grads[0] == []  # nothing below layer 2 is differentiated
    assert fired[2] == [1] and len(out_grads[2]) == 1
    assert all(p.grad is None for p in qwen3.parameters())
    full, fired, out_grads, _ = profile_watched(None)
    assert fired[0] == [1] and len(out_grads[0]) == 1  # control: the hooks do fire when layer 0 is profiled
    keys = [k for k in full.C if k.split(".")[0] in ("2", "3")]
    assert sorted(part.C) == sorted(keys)
    _assert_stats_equal(full, part, keys_C=keys, rel=1e-12)


# ----------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("poison, value, culprit", [
    ("model.layers.1.input_layernorm.weight", float("nan"), "model.layers.1.self_attn.q_proj"),
    ("model.layers.2.mlp.up_proj.weight", float("inf"), "model.layers.2.mlp."),
    ("model.embed_tokens.weight", float("nan"), "model.layers.0.self_attn.q_proj"),
    ("model.layers.3.mlp.down_proj.weight", float("nan"), "model.layers.3.mlp.down_proj"),
])
def test_non_finite_activations_name_the_module(poison, value, culprit):
    model = _model(QWEN3, dtype="float32")
    with torch.no_grad():
        model.get_parameter(poison).view(-1)[:].fill_(value) if "embed" in poison else \
            model.get_parameter(poison).view(-1)[0].fill_(value)
    batch = _batch(6, rows=2, width=10)
    with pytest.raises(LayercardError, match="non-finite") as exc:
        collect_stats(model, discover(model), [batch])
    msg = str(exc.value)
    assert culprit in msg and "\n" not in msg
    # the hooks were removed: the model is usable again after the error
    assert not any(m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------------- planted signal
@pytest.fixture(scope="module")
def planted_setup():
    """A tiny Qwen3 with initializer_range 0.2 and 4096 tokens labelled with its own argmax predictions."""
    base = _model({**QWEN3, "initializer_range": 0.2}, dtype="float32", seed=0)
    g = torch.Generator().manual_seed(100)
    ids = torch.randint(3, V, (64, 64), generator=g)
    with torch.no_grad():
        argmax = base(input_ids=ids, use_cache=False).logits.argmax(-1)
    labels = torch.cat([ids[:, :1], argmax[:, :-1]], 1)  # labels[t+1] = the base model's prediction at t
    batches = [{"input_ids": ids[i:i + 16], "attention_mask": torch.ones_like(ids[i:i + 16]),
                "labels": labels[i:i + 16]} for i in range(0, 64, 16)]
    return base, batches


LAYER0_XFAIL = pytest.mark.xfail(strict=True, reason=(
    "known limitation, reported on issue 2: a perturbed layer 0 raises its own res_frac (0.014 → 0.02) but "
    "stays below the higher baseline res_frac of layers 1-3 (0.67-0.78x the runner-up over 6 seeds)"))


@pytest.mark.parametrize("target", [pytest.param(0, marks=LAYER0_XFAIL), 1, 2, 3])
def test_planted_signal_has_the_highest_res_frac(planted_setup, target):
    """Perturb one layer of 4 (noise of 0.5× each weight's std on all its linear weights) and label with
    the *unperturbed* model's argmax: the perturbed layer's gradient is the one a linear correction at that
    layer explains best, so it has the highest res_frac = Res²/‖G‖².

    Two settings make the planted signal visible above the layer-to-layer spread of res_frac (reported on
    issue 2): weights at initializer_range 0.2 (at the default 0.02 every block adds almost nothing to the
    residual stream, all layers see nearly the same normalised embeddings and res_frac simply falls with
    depth: a perturbed layer 2 or 3 is never highest), and n = 4096 tokens ≫ d_in (res_frac of a gradient
    unrelated to X is ≈ d_in/n; with 1536 tokens the margin shrinks to 1.05-1.15×). Measured over seeds
    0-5: layers 1-3 are singled out every time, 1.16-1.42× the runner-up.
    """
    base, batches = planted_setup
    perturbed = copy.deepcopy(base)
    _, blocks = find_blocks(perturbed)
    g = torch.Generator().manual_seed(1000 + target)
    with torch.no_grad():
        for module in blocks[target].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(0.5 * module.weight.std() * torch.randn(module.weight.shape, generator=g))
    card = profile_model(perturbed, batches, rank=4, ridge=1e-3)
    res_frac = card.layers.set_index("layer")["res_frac"]
    others = res_frac.drop(index=target)
    assert res_frac.idxmax() == target, res_frac.round(4).to_dict()
    assert res_frac[target] > 1.1 * others.max(), res_frac.round(4).to_dict()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cross_product_matches_float64_brute_force(dtype):
    """xᵀy in float64 out, for every input precision (half inputs: the exact products of their values)."""
    from layercard.profile.stats import cross_product

    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 7, generator=g).to(dtype)
    y = torch.randn(200, 5, generator=g).to(dtype)
    xd, yd = x.double(), y.double()     # the values the product sees, exactly
    ref = [[sum(xd[t, i] * yd[t, j] for t in range(200)) for j in range(5)] for i in range(7)]
    out = cross_product(x, y)
    assert out.dtype == torch.float64
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float64), rtol=tol, atol=tol * 10)
