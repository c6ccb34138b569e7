"""Layer discovery: blocks, target modules and their dims across architectures; bad input errors."""
from __future__ import annotations

import json

import pytest
import torch

from layercard.discovery import count_parameters, discover, find_blocks
from layercard.errors import LayercardError
from layercard.models import ModelConfig, load_model

QWEN3_8B = dict(
    model_type="qwen3", hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    tie_word_embeddings=False, max_position_embeddings=40960,
)


def _meta(config: dict, dtype: str = "float32"):
    return load_model(ModelConfig(config=config, device="meta", dtype=dtype)).model


def _peft_matches(name: str, target: str) -> bool:
    """PEFT's list-form target_modules rule: exact name or a '.'-separated suffix."""
    return name == target or name.endswith("." + target)


# ------------------------------------------------------------------------------------------ Qwen3-8B
@pytest.fixture(scope="module")
def qwen3_8b():
    return _meta(QWEN3_8B, "bfloat16")


def test_qwen3_8b_shapes(qwen3_8b):
    assert all(p.device.type == "meta" for p in qwen3_8b.parameters())
    assert next(qwen3_8b.parameters()).dtype == torch.bfloat16
    layout = discover(qwen3_8b)
    assert layout.block_path == "model.layers"
    assert layout.num_layers == 36 and layout.layers == tuple(range(36))
    expected = {
        "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 1024), "self_attn.v_proj": (4096, 1024),
        "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (4096, 12288), "mlp.up_proj": (4096, 12288),
        "mlp.down_proj": (12288, 4096),
    }
    for layer in (0, 17, 35):
        mods = {m.name: m for m in layout.modules_of(layer)}
        assert set(mods) == set(expected)
        for name, dims in expected.items():
            m = mods[name]
            assert (m.d_in, m.d_out) == dims, name
            assert not m.transposed
            assert m.full_name == f"model.layers.{layer}.{name}"
            assert m.target == name.split(".")[-1]
    assert len(layout.modules) == 36 * 7
    assert layout.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_qwen3_8b_parameter_count(qwen3_8b):
    n = count_parameters(qwen3_8b)
    assert n == pytest.approx(8.19e9, rel=5e-3)
    assert qwen3_8b.lm_head.weight is not qwen3_8b.model.embed_tokens.weight  # untied head


# ------------------------------------------------------------------------------ tiny architectures
H, I, V, L = 64, 128, 256, 2
DECODER = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=I, vocab_size=V)
LLAMA_MODULES = {
    "self_attn.q_proj": (H, 64), "self_attn.k_proj": (H, 32), "self_attn.v_proj": (H, 32),
    "self_attn.o_proj": (64, H), "mlp.gate_proj": (H, I), "mlp.up_proj": (H, I), "mlp.down_proj": (I, H),
}
LLAMA_TARGETS = {n: n.split(".")[-1] for n in LLAMA_MODULES}

ARCHS = {
    "llama": (dict(model_type="llama", **DECODER), "model.layers", LLAMA_MODULES, LLAMA_TARGETS, False),
    "qwen2": (dict(model_type="qwen2", **DECODER), "model.layers", LLAMA_MODULES, LLAMA_TARGETS, False),
    "qwen3": (dict(model_type="qwen3", head_dim=16, **DECODER), "model.layers", LLAMA_MODULES, LLAMA_TARGETS, False),
    "mistral": (dict(model_type="mistral", **DECODER), "model.layers", LLAMA_MODULES, LLAMA_TARGETS, False),
    "gemma3_text": (dict(model_type="gemma3_text", head_dim=16, **DECODER), "model.layers", LLAMA_MODULES,
                    LLAMA_TARGETS, False),
    "gpt2": (
        dict(model_type="gpt2", n_embd=H, n_layer=L, n_head=4, vocab_size=V, n_positions=128, bos_token_id=1,
             eos_token_id=2),
        "transformer.h",
        {"attn.c_attn": (H, 3 * H), "attn.c_proj": (H, H), "mlp.c_fc": (H, 4 * H), "mlp.c_proj": (4 * H, H)},
        {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp.c_proj"},
        True,
    ),
    "bert": (
        dict(model_type="bert", hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=I,
             vocab_size=V, is_decoder=True),
        "bert.encoder.layer",
        {"attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
         "attention.output.dense": (H, H), "intermediate.dense": (H, I), "output.dense": (I, H)},
        {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.output.dense": "attention.output.dense", "intermediate.dense": "intermediate.dense"},
        False,
    ),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_discovery(arch):
    config, block_path, modules, targets, transposed = ARCHS[arch]
    model = _meta(config)
    layout = discover(model)
    assert layout.block_path == block_path
    assert layout.num_layers == L and layout.layers == tuple(range(L))
    assert layout.layers_pattern == block_path.rsplit(".", 1)[-1]
    for layer in range(L):
        found = {m.name: m for m in layout.modules_of(layer)}
        assert set(found) == set(modules), f"{arch} layer {layer}: {sorted(found)}"
        for name, (d_in, d_out) in modules.items():
            m = found[name]
            assert (m.d_in, m.d_out) == (d_in, d_out), f"{arch} {name}"
            assert m.transposed is transposed
            assert m.full_name == f"{block_path}.{layer}.{name}"
            # the weight the card names exists, with the layout of its kind
            w = model.get_parameter(m.weight_name)
            assert tuple(w.shape) == ((d_in, d_out) if transposed else (d_out, d_in))
        for name, target in targets.items():
            assert found[name].target == target, f"{arch} {name}"
            # PEFT's suffix rule picks out exactly this module in the block
            assert [n for n in found if _peft_matches(n, target)] == [name]


def test_gpt2_target_selection():
    model = _meta(ARCHS["gpt2"][0])
    layout = discover(model, ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    assert [m.name for m in layout.modules_of(0)] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    only_attn = discover(model, ["attn.c_proj"])
    assert [m.name for m in only_attn.modules] == ["attn.c_proj"] * L
    both = discover(model, ["c_proj"])  # the plain suffix matches both projections, as in PEFT
    assert [m.name for m in both.modules_of(1)] == ["attn.c_proj", "mlp.c_proj"]


def test_target_and_layer_subsets():
    model = _meta(dict(model_type="llama", **DECODER))
    layout = discover(model, ["q_proj", "v_proj"], layers=[1])
    assert layout.layers == (1,) and layout.num_layers == L
    assert [m.key for m in layout.modules] == ["1.self_attn.q_proj", "1.self_attn.v_proj"]
    assert discover(model, "all-linear").modules == discover(model).modules
    assert discover(model, layers=[1, 0]).layers == (0, 1)


def test_find_blocks_explicit_path():
    model = _meta(dict(model_type="llama", **DECODER))
    assert find_blocks(model, "model.layers")[0] == "model.layers"
    with pytest.raises(LayercardError, match="model.nope"):
        find_blocks(model, "model.nope")
    with pytest.raises(LayercardError, match="not a ModuleList"):
        find_blocks(model, "model.norm")


# ----------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def llama():
    return _meta(dict(model_type="llama", **DECODER))


def test_unmatched_target_modules(llama):
    with pytest.raises(LayercardError) as exc:
        discover(llama, ["q_proj", "qq_proj", "mlp.nope"])
    msg = str(exc.value)
    assert "qq_proj" in msg and "mlp.nope" in msg
    assert "'q_proj'" not in msg.split("available")[0]  # only the culprits are named as missing
    for name in LLAMA_MODULES:  # ... and it lists what exists
        assert name in msg
    assert "\n" not in msg


@pytest.mark.parametrize("layers, bad", [([0, 9], "9"), ([-1], "-1"), ([2], "2")])
def test_layer_out_of_range(llama, layers, bad):
    with pytest.raises(LayercardError) as exc:
        discover(llama, layers=layers)
    msg = str(exc.value)
    assert f"[{bad}]" in msg and "0..1" in msg and "\n" not in msg


def test_duplicate_layers(llama):
    with pytest.raises(LayercardError, match="duplicates"):
        discover(llama, layers=[1, 1])


def test_missing_model_path():
    with pytest.raises(LayercardError, match="/nonexistent") as exc:
        load_model(ModelConfig(path="/nonexistent"))
    assert "\n" not in str(exc.value)


def test_pickle_only_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **DECODER}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-really-a-pickle")
    with pytest.raises(LayercardError, match="safetensors") as exc:
        load_model(ModelConfig(path=str(tmp_path)))
    assert str(tmp_path) in str(exc.value)


def test_model_config_needs_exactly_one_source():
    with pytest.raises(LayercardError, match="exactly one"):
        ModelConfig()
    with pytest.raises(LayercardError, match="exactly one"):
        ModelConfig(path="/x", config={"model_type": "llama"})


def test_config_without_model_type():
    with pytest.raises(LayercardError, match="model_type"):
        load_model(ModelConfig(config={"hidden_size": 64}))
