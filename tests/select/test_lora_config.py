"""The emitted PEFT LoraConfig on real tiny models: exact layers and modules, ranks, the rank budget."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from layercard.card.layer_card import LayerCard, STAT_COLUMNS
from layercard.errors import LayercardError
from layercard.select.lora_config import (
    allocate_ranks,
    build_lora_config,
    card_rank_allocation,
    params_per_rank,
    chosen_modules,
    rank_decay,
    write_lora_config,
)

RANK = 4
TINY = {
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0),
    "bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 vocab_size=128, is_decoder=True),
}


def tiny_model(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **TINY[kind]))


def card_for(model, only=None, *, block_modules: bool = False) -> tuple[LayerCard, object]:
    """A card with the real layout of ``model`` (statistics made up, cost from layercard.profile.cost);
    ``only``: keep just these block-relative module names."""
    from dataclasses import replace

    from layercard.profile.cost import add_cost_columns, dims_from_model
    from layercard.discovery import discover

    layout = discover(model)
    if only is not None:
        layout = replace(layout, modules=tuple(m for m in layout.modules if m.name in only))
    L = layout.num_layers
    res2 = np.array([4.0, 3.0, 2.0, 1.0])
    t = pd.DataFrame({"layer": list(range(L)), "n_tokens": 100, **{c: 1.0 for c in STAT_COLUMNS}})
    t["res2"], t["res2_rank_r"] = res2, res2 * np.array([0.9, 0.5, 0.3, 0.2])   # fast- vs slow-decaying spectra
    t["gain_adj"], t["kappa"] = 0.5 * res2, 100.0
    t["b"] = np.sqrt(2 * np.array([0.2, 1.0, 0.3, 0.8]))
    K = np.eye(L)
    t["k_diag"] = 1.0
    mods = pd.DataFrame([{"layer": m.layer, "module": m.name, "target": m.target, "d_in": m.d_in, "d_out": m.d_out,
                          "n_tokens": 100, **{c: 1.0 for c in STAT_COLUMNS}} for m in layout.modules])
    meta = {"layers_pattern": layout.layers_pattern, "block_path": layout.block_path, "rank": RANK,
            "modules": sorted({m.name for m in layout.modules}), "target_modules": layout.targets}
    if block_modules:
        meta["block_modules"] = sorted({m.name for m in discover(model).modules})
    card = LayerCard(t, mods, np.eye(L), K, meta)
    add_cost_columns(card, layout, dims_from_model(model), seq_len=16)
    return card, layout


def adapted(peft_model) -> dict[str, int]:
    """Full module name (relative to the base model) → LoRA rank of every adapted module."""
    out = {}
    for name, mod in peft_model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out[name] = mod.lora_A["default"].weight.shape[0]
    return out


def apply(kind: str, directory):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # GPT-2 Conv1D: PEFT switches fan_in_fan_out itself
        return get_peft_model(tiny_model(kind), LoraConfig.from_pretrained(str(directory)))


# ---------------------------------------------------------------------------------------------
# PEFT on real tiny models
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_peft_adapts_exactly_the_selected_layers_and_modules(kind, tmp_path):
    card, layout = card_for(tiny_model(kind))
    layers = [1, 3]
    config, info = build_lora_config(card, layers)
    assert info["target_form"] == "list" and config.layers_pattern == layout.layers_pattern
    write_lora_config(config, tmp_path)
    model = apply(kind, tmp_path)
    expected = {m.full_name for m in layout.modules if m.layer in layers}
    assert set(adapted(model)) == expected
    assert set(adapted(model).values()) == {RANK}
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == info["adapter_params"] == sum(card.layers.set_index("layer").loc[layers, "adapter_params"])


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_rank_budget_ranks_are_applied_and_within_budget(kind, tmp_path):
    card, layout = card_for(tiny_model(kind))
    layers = [0, 1, 3]
    per_rank = params_per_rank(chosen_modules(card, layers))
    budget = 13 * per_rank[0] + 7                  # not a multiple: the last rank must not overshoot
    values = {0: 0.2, 1: 1.0, 3: 0.8}
    ranks = card_rank_allocation(card, layers, budget, values)
    assert sum(r * per_rank[l] for l, r in ranks.items()) <= budget
    assert len(set(ranks.values())) > 1 and min(ranks.values()) >= 1
    assert ranks[1] >= ranks[0]                    # more predicted gain → at least as much rank
    config, info = build_lora_config(card, layers, ranks=ranks)
    assert config.rank_pattern                     # ranks differ, so some go to rank_pattern
    write_lora_config(config, tmp_path)
    model = apply(kind, tmp_path)
    got = adapted(model)
    assert set(got) == {m.full_name for m in layout.modules if m.layer in layers}
    for m in layout.modules:
        if m.layer in layers:
            assert got[m.full_name] == ranks[m.layer], m.full_name
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == info["adapter_params"] <= budget
    # alpha_pattern keeps alpha/r the same in every layer
    scales = {round(mod.scaling["default"], 12) for _, mod in model.base_model.model.named_modules()
              if hasattr(mod, "lora_A") and "default" in mod.lora_A}
    assert scales == {config.lora_alpha / config.r}


def test_bert_ambiguous_target_becomes_an_exact_regex(tmp_path):
    card, layout = card_for(tiny_model("bert"))
    assert "output.dense" in {m.target for m in layout.modules}
    config, info = build_lora_config(card, [0, 2], ranks={0: 2, 2: 3})
    assert info["target_form"] == "regex" and info["ambiguous_targets"] == ["output.dense"]
    assert isinstance(config.target_modules, str) and config.layers_to_transform is None
    write_lora_config(config, tmp_path)
    got = adapted(apply("bert", tmp_path))
    assert got == {m.full_name: {0: 2, 2: 3}[m.layer] for m in layout.modules if m.layer in (0, 2)}


def test_bert_single_module_card_does_not_adapt_the_attention_output(tmp_path):
    card, layout = card_for(tiny_model("bert"), {"output.dense"}, block_modules=True)
    config, info = build_lora_config(card, [1])
    assert info["target_form"] == "regex"
    write_lora_config(config, tmp_path / "auto")
    assert set(adapted(apply("bert", tmp_path / "auto"))) == {"bert.encoder.layer.1.output.dense"}
    # why: the plain list form would also adapt attention.output.dense
    config, _ = build_lora_config(card, [1], target_form="list")
    write_lora_config(config, tmp_path / "list")
    assert "bert.encoder.layer.1.attention.output.dense" in adapted(apply("bert", tmp_path / "list"))


def test_cli_rank_budget_config_loads_into_peft(tmp_path):
    from pipelines.select import main

    model = tiny_model("qwen3")
    card, layout = card_for(model)
    card.save(tmp_path / "card")
    per_layer = params_per_rank(chosen_modules(card, [0]))[0]
    out = tmp_path / "sel"
    main([str(tmp_path / "card"), "--out", str(out), "--objective", "max-quality", "--k", "2",
          "--rank-budget", str(20 * per_layer), "--alpha", "16"])
    sel = json.loads((out / "selection.json").read_text())
    assert sel["layers"] == [1, 3] and sel["adapter_params"] <= 20 * per_layer
    got = adapted(apply("qwen3", out))
    assert {n: r for n, r in got.items()} == {m.full_name: sel["ranks"][str(m.layer)]
                                              for m in layout.modules if m.layer in (1, 3)}


# ---------------------------------------------------------------------------------------------
# Rank allocation maths and bad input
# ---------------------------------------------------------------------------------------------
def test_rank_decay_recovers_a_geometric_spectrum():
    for q in (0.3, 0.7, 0.95):
        sigma2 = q ** np.arange(64)
        assert rank_decay(sigma2[:8].sum(), sigma2.sum(), 8, 64) == pytest.approx(q, rel=1e-6)
    assert rank_decay(8.0, 64.0, 8, 64) == 1.0      # flat spectrum
    assert rank_decay(1.0, 1.0, 8, 64) == 0.0       # rank 1 captures all
    assert rank_decay(1.0, 1.0, 8, 8) == 1.0        # full rank ≤ R: nothing to learn from the ratio


def test_allocation_never_exceeds_the_budget_and_follows_value():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 6))
        per_rank = rng.integers(50, 500, size=n)
        budget = int(per_rank.sum() + rng.integers(0, 5000))
        ranks = allocate_ranks(rng.random(n), per_rank, rng.uniform(0.3, 1.0, n), np.full(n, 64), 8, budget)
        assert all(r >= 1 for r in ranks) and int(np.dot(ranks, per_rank)) <= budget
    ranks = allocate_ranks([1.0, 0.1], [100, 100], [0.8, 0.8], [64, 64], 8, 100 * 12)
    assert ranks[0] > ranks[1] and sum(ranks) == 12
    assert allocate_ranks([0.0, 0.0], [100, 100], [0.8, 0.8], [64, 64], 8, 10_000) == [1, 1]
    assert allocate_ranks([1.0], [100], [0.9], [3], 8, 10_000) == [3]        # capped at min(d_in, d_out)


def test_rank_budget_below_one_rank_1_adapter_is_an_error():
    with pytest.raises(LayercardError, match=r"--rank-budget 150 is below one rank-1 adapter on the 2 chosen layers \(200 parameters\)"):
        allocate_ranks([1.0, 1.0], [100, 100], [0.5, 0.5], [8, 8], 4, 150)


def test_config_bad_input():
    card, _ = card_for(tiny_model("qwen3"))
    with pytest.raises(LayercardError, match="no layers selected"):
        build_lora_config(card, [])
    with pytest.raises(LayercardError, match=r"layer 9 has no modules in the card"):
        build_lora_config(card, [9])
    with pytest.raises(LayercardError, match="ranks must be >= 1"):
        build_lora_config(card, [1], ranks={1: 0})
