"""The LM head on supervised rows only (``logits_to_keep``): same loss and gradients as the full
logits, the head really sees fewer rows, and models without the argument fall back."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from layercard.train.losses import (accepts_logits_to_keep, lm_loss_sum, loss_count, loss_positions, next_token_labels,
                              supervised_loss_sum)
from layercard.models import ModelConfig, load_model

V = 96
CONFIGS = {
    "qwen3": dict(model_type="qwen3", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=64, vocab_size=V),
    "llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=V),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=32, bos_token_id=1,
                 eos_token_id=2),
}


def _prompt_answer_batch(seed: int = 0) -> dict:
    """Right-padded rows of different lengths; labels only on each row's last 1-3 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths, width = [9, 14, 6, 12], 14
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, V, (n,), generator=g)
        mask[i, :n] = 1
        answer = 1 + i % 3
        labels[i, n - answer:n] = ids[i, n - answer:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_next_token_labels_shift():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, -100, 7]])
    assert next_token_labels(labels).tolist() == [[5, 6, -100, -100], [-100, -100, 7, -100]]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_kept_rows_give_the_full_loss_and_gradients(arch):
    model = load_model(ModelConfig(config=CONFIGS[arch], dtype="float64", seed=1)).model.requires_grad_(True)
    assert accepts_logits_to_keep(model)
    batch = _prompt_answer_batch()
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape))

    fast = supervised_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], use_cache=False)
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    full = lm_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits, batch["labels"])
    full.backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    hook.remove()

    assert seen[0][:-1].numel() == supervised          # the head ran on the supervised rows only
    assert seen[1][:-1].numel() == batch["input_ids"].numel()
    assert torch.allclose(fast, full, rtol=1e-12, atol=0)
    assert g_fast.keys() == g_full.keys()
    for n in g_full:
        assert torch.allclose(g_fast[n], g_full[n], rtol=1e-9, atol=1e-12), n


def test_peft_wrapped_model_takes_the_fast_path():
    model = load_model(ModelConfig(config=CONFIGS["qwen3"], dtype="float32", seed=2)).model
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert accepts_logits_to_keep(peft)
    batch = _prompt_answer_batch(3)
    fast = supervised_loss_sum(peft, **batch)
    full = lm_loss_sum(peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                       batch["labels"])
    assert torch.allclose(fast, full, rtol=1e-5)


class _NoKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: the loss still comes out right."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 8)
        self.head = torch.nn.Linear(8, V)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.head(self.emb(input_ids))})()


def test_models_without_logits_to_keep_fall_back():
    model = _NoKeep()
    assert not accepts_logits_to_keep(model)
    batch = _prompt_answer_batch(4)
    fast = supervised_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    full = lm_loss_sum(model(batch["input_ids"]).logits, batch["labels"])
    assert torch.allclose(fast, full, rtol=1e-6)


# ------------------------------------------------------------------------------------ label loss
LABELS = [4, 17]


def _answer_batch(seed: int = 5) -> dict:
    """_prompt_answer_batch with every row's first answer token one of LABELS."""
    batch = _prompt_answer_batch(seed)
    for i in range(batch["labels"].shape[0]):
        t = int((batch["labels"][i] != -100).nonzero()[0])
        batch["input_ids"][i, t] = batch["labels"][i, t] = LABELS[i % 2]
    return batch


def _brute_label_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total = logits.new_zeros(())
    for i in range(labels.shape[0]):
        t = int((labels[i] != -100).nonzero()[0])
        total = total - torch.log_softmax(logits[i, t - 1, LABELS], dim=0)[LABELS.index(int(labels[i, t]))]
    return total


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_label_loss_sum_and_gradients_equal_brute_force(arch):
    """``label_ids``: Σ over rows of −log softmax(answer tokens' logits)[target] at the answer
    position — the head runs on one row per example — with the full-logits gradients (float64)."""
    model = load_model(ModelConfig(config=CONFIGS[arch], dtype="float64", seed=3)).model.requires_grad_(True)
    batch = _answer_batch()
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    fast = supervised_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], LABELS)
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    full = _brute_label_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"])
    full.backward()
    hook.remove()
    assert seen[0][:-1].numel() == 4                    # one row per example
    assert torch.allclose(fast, full, rtol=1e-12, atol=0)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(g_fast[n], p.grad, rtol=1e-9, atol=1e-12), n


def test_label_loss_falls_back_without_logits_to_keep():
    model = _NoKeep()
    batch = _answer_batch(6)
    fast = supervised_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], LABELS)
    assert torch.allclose(fast, _brute_label_loss_sum(model(batch["input_ids"]).logits, batch["labels"]), rtol=1e-6)


def test_loss_count_and_positions():
    labels = torch.tensor([[-100, -100, 4, 9, -100], [-100, 17, 3, -100, -100]])
    assert loss_count(labels) == 4 and loss_count(labels, LABELS) == 2
    keep, targets = loss_positions(labels, LABELS)
    assert keep.tolist() == [[False, True, False, False, False], [True, False, False, False, False]]
    assert targets.tolist() == [0, 1]
    keep, targets = loss_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert targets.tolist() == [4, 9, 17, 3]


def test_loss_positions_refuses_labels_that_are_not_batch_by_seq():
    from layercard.errors import LayercardError
    from layercard.train.losses import loss_positions

    with pytest.raises(LayercardError, match=r"labels must be \(batch, seq\), got shape \(5,\)"):
        loss_positions(torch.full((5,), -100))
