"""GGUF loading through ``model.gguf_file`` for a Llama-architecture file written here with the
``gguf`` package: the weights come back exactly, and so does the tokenizer's BOS."""
from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch

from layercard.models import ModelConfig, load_model

TOKENS = ["<unk>", "<s>", "</s>", "▁"] + list(string.ascii_letters + string.digits + ".,:!?'\n")
HEADS, KV_HEADS = 4, 2
# transformers' GGUF names → the llama.cpp names of a block's tensors
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (interleaved rotary halves), which
    transformers' GGUF loader undoes: [n_head·2·d, …] rows regrouped per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=8, rms_norm_eps=1e-5,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def write_gguf(path: Path, state: dict[str, np.ndarray], config) -> None:
    """A float32 Llama GGUF with a SentencePiece-style ('llama') vocabulary that adds a BOS."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(config.max_position_embeddings)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_embedding_length(config.hidden_size)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(len(TOKENS) - 4)])
    w.add_token_types([2, 3, 3] + [1] * (len(TOKENS) - 3))      # unknown, control, control, normal…
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        for hf_name, name in BLOCK.items():
            t = state[f"model.layers.{i}.{hf_name}.weight"]
            if name in ("attn_q", "attn_k"):
                t = llama_cpp_permute(t, HEADS if name == "attn_q" else KV_HEADS)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    model = tiny_llama()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(path, {k: v.detach().numpy() for k, v in model.state_dict().items()}, model.config)
    return model, path


def test_llama_gguf_round_trips_its_weights_and_bos(written, tmp_path):
    model, path = written
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(llama_cpp_permute(q, HEADS), q)   # the file really holds permuted q/k rows
    lm = load_model(ModelConfig(gguf_file=str(path), cache_dir=str(tmp_path / "cache")))
    assert lm.model.config.model_type == "llama" and lm.model.config.num_key_value_heads == KV_HEADS
    got, want = lm.model.state_dict(), model.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert lm.tokenizer.start_ids == [1] and lm.tokenizer.eos_id == 2   # the GGUF's add_bos_token, kept
    assert lm.tokenizer.encode("ab c") == [TOKENS.index(t) for t in ("▁", "a", "b", "▁", "c")]
    ids = torch.tensor([[1, *lm.tokenizer.encode("Hello")]])
    assert torch.allclose(lm.model(ids).logits, model.eval()(ids).logits, atol=1e-6)
    again = load_model(ModelConfig(gguf_file=str(path), cache_dir=str(tmp_path / "cache")))   # from the cache
    assert again.weights_hash == lm.weights_hash
    assert len(list((tmp_path / "cache").iterdir())) == 1
