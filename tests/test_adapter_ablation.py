"""benchmarks/adapter_ablation.py: the all-layer adapter restricted to a layer set evaluates as a model that
carries only that set's adapters (built independently, with PEFT's ``layers_to_transform``), and as the
base model with none; restricting and restoring leaves the full adapter intact."""
from __future__ import annotations

import pytest
import torch

from tests.bench_scripts import load_benchmark
from tests.train.test_train import train_cfg


@pytest.fixture(scope="module")
def abl():
    return load_benchmark("adapter_ablation")


def _eval(model, plan, cfg) -> float:
    from layercard.train import training
    from layercard.train.local import RowShard
    from layercard.train.worker import _batches_once

    with torch.no_grad():
        fwd = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
        sums = training.evaluate(fwd, _batches_once(RowShard(plan.eval), cfg.batch_size, plan.pad_id),
                                 torch.device("cpu"), plan.label_token_ids)
    return training.eval_metrics(sums, False)["quality"]


def test_restricted_adapter_matches_a_model_with_only_those_layers(abl, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from layercard.models import load_model
    from layercard.train.worker import prepare

    cfg = train_cfg("strategy=all")
    plan = prepare(cfg)
    modules = ["q_proj", "v_proj", "down_proj"]
    # an "all-layer run": LoRA on every layer with random, non-zero B (a trained adapter's shape)
    torch.manual_seed(0)
    full = get_peft_model(load_model(cfg.model).model, LoraConfig(r=4, lora_alpha=8, target_modules=modules))
    for name, p in full.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    full.save_pretrained(tmp_path / "all")
    weights = {n: p.detach().clone() for n, p in full.named_parameters() if "lora_" in n}

    r = abl.Restricted(cfg, plan, tmp_path / "all", None)
    assert r.layers == [0, 1, 2, 3]
    q_all = r.quality(None)
    assert q_all == pytest.approx(_eval(full.eval(), plan, cfg), abs=1e-6)
    assert r.quality(set()) == pytest.approx(_eval(load_model(cfg.model).model.eval(), plan, cfg), abs=1e-6)

    # layers 1 and 3 alone: a separate PEFT model on those layers only, with the same A and B
    sub = get_peft_model(load_model(cfg.model).model,
                         LoraConfig(r=4, lora_alpha=8, target_modules=modules, layers_to_transform=[1, 3]))
    with torch.no_grad():
        for n, p in sub.named_parameters():
            if "lora_" in n:
                p.copy_(weights[n])
    q_sub = _eval(sub.eval(), plan, cfg)
    assert r.quality({1, 3}) == pytest.approx(q_sub, abs=1e-6)
    assert q_sub != pytest.approx(q_all, abs=1e-4)            # the restriction changed something
    assert r.quality(None) == pytest.approx(q_all, abs=1e-9)   # and was undone
