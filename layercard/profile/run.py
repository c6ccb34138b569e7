"""The whole profile of ``layercard profile``: pass 1 (statistics), pass 2 (coupling directions), cost.

In this process (``ray.num_actors: 0``) or on Ray actors (:mod:`layercard.profile.distributed`); the card
comes back unsaved.
"""
from __future__ import annotations

import time

from layercard.config import to_dict
from layercard.profile.coupling_pass import coupling_pass, make_sketch
from layercard.discovery import discover
from layercard.data.examples import batches_of, examples_hash, load_examples, sequence_format
from layercard.train.label_loss import check_answer_tokens
from layercard.models import load_model
from layercard.profile.config import ProfileConfig
from layercard.profile.profiler import profile_model


def profile_label_ids(cfg: ProfileConfig, tokenizer, examples) -> list[int] | None:
    """The answer tokens of ``profile.loss: label`` (None for the LM loss); every calibration
    example must start its answer with one of them."""
    if cfg.profile.loss != "label":
        return None
    return check_answer_tokens(cfg.profile.label_answers, tokenizer, examples, "calibration")


def card_meta(cfg: ProfileConfig, lm, examples, label_ids=None) -> dict:
    return {
        "loss": cfg.profile.loss, "label_token_ids": label_ids,
        "model_id": lm.model_id, "weights_hash": lm.weights_hash, **lm.meta, "model_type": lm.model.config.model_type,
        "data_id": str(cfg.data.path), "data_hash": examples_hash(examples), "n_records": len(examples),
        "tokenizer": lm.tokenizer.name, "seq_len": cfg.data.max_seq_len, "dtype": cfg.model.dtype,
        "sequences": sequence_format(lm.tokenizer, cfg.data),   # BOS, answer EOS, chat template
        "config": to_dict(cfg),
    }


def profile_local(cfg: ProfileConfig, progress: bool = True):
    """Single-process profile: the reference every distributed layout must reproduce."""
    lm = load_model(cfg.model)
    examples = load_examples(cfg.data, lm.tokenizer)
    label_ids = profile_label_ids(cfg, lm.tokenizer, examples)
    batches = batches_of(examples, cfg.data.batch_size, lm.tokenizer.pad_id)
    t0 = time.perf_counter()
    card = profile_model(lm.model, batches, target_modules=cfg.profile.target_modules, layers=cfg.profile.layers,
                         rank=cfg.profile.rank, ridge=cfg.profile.ridge, block_path=cfg.model.block_path,
                         progress=progress, meta=card_meta(cfg, lm, examples, label_ids), label_ids=label_ids)
    if progress:
        dt = time.perf_counter() - t0
        print(f"pass 1: {card.meta['n_tokens']} tokens in {dt:.1f}s ({card.meta['n_tokens'] / dt:.0f} tokens/s)")
    return card, lm, examples


def probe_batches(cfg: ProfileConfig, examples: list[dict], pad_id: int) -> list[dict]:
    """The coupling probe set: the first ``coupling.probe_samples`` calibration records."""
    return batches_of(examples[: cfg.coupling.probe_samples], cfg.data.batch_size, pad_id)


def sketch_for(cfg: ProfileConfig, vocab: int):
    """The JL sketch of pass 2's directions, or None: exact below ``sketch_above_vocab`` and always
    for the label loss (its softmax has one column per answer)."""
    c = cfg.coupling
    return None if cfg.profile.loss == "label" else make_sketch(vocab, c.sketch_dim, c.sketch_above_vocab, c.seed)


def add_coupling_local(card, cfg: ProfileConfig, lm, examples, progress: bool = True) -> None:
    layout = discover(lm.model, cfg.profile.target_modules, cfg.profile.layers, cfg.model.block_path)
    t0 = time.perf_counter()
    probe = probe_batches(cfg, examples, lm.tokenizer.pad_id)
    coupling_pass(lm.model, layout, card, probe, sketch=sketch_for(cfg, lm.model.config.vocab_size),
                  label_ids=card.meta.get("label_token_ids"), adam=cfg.coupling.adam)
    if progress:
        dt = time.perf_counter() - t0
        print(f"pass 2: {card.meta['coupling_tokens']} probe tokens × {len(layout.layers)} layers in {dt:.1f}s")


def add_cost(card, cfg: ProfileConfig, model, batch: dict, progress: bool = True) -> None:
    """Analytic cost columns; with ``cost.measure`` also timed PEFT steps (lowest layer at
    ``cost.points`` depths) that calibrate the predicted seconds/step (``meta['cost_r2']``)."""
    from layercard.profile.cost import add_cost_columns, dims_from_model
    from layercard.train.step_timing import StepTimingConfig, measure_card_cost

    layout = discover(model, cfg.profile.target_modules, cfg.profile.layers, cfg.model.block_path)
    if not cfg.cost.measure:
        add_cost_columns(card, layout, dims_from_model(model, layout.block_path), rank=cfg.profile.rank,
                         seq_len=int(batch["input_ids"].shape[1]))
        return
    t0 = time.perf_counter()
    timing = StepTimingConfig(points=max(2, min(cfg.cost.points, len(layout.layers))), steps=cfg.cost.steps, warmup=1)
    measure_card_cost(card, model, batch, config=timing, layout=layout)
    if progress:
        r2 = card.meta.get("cost_r2")
        print(f"cost: {timing.points} depths timed in {time.perf_counter() - t0:.1f}s"
              + (f", R² of predicted step time {r2:.3f}" if r2 is not None else ""))


def run_profile(cfg: ProfileConfig, progress: bool = True):
    """The whole card: pass 1, the coupling pass, cost — in this process or on Ray actors."""
    if cfg.ray.num_actors == 0:
        card, lm, examples = profile_local(cfg, progress=progress)
        if cfg.coupling.enabled:
            add_coupling_local(card, cfg, lm, examples, progress=progress)
        bs = cfg.data.batch_size
        add_cost(card, cfg, lm.model, batches_of(examples[:bs], bs, lm.tokenizer.pad_id)[0], progress=progress)
        return card
    from layercard.profile.distributed import profile_on_ray

    card, _, _ = profile_on_ray(cfg, progress=progress)   # cost is measured on an actor's device
    return card
