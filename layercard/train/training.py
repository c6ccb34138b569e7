"""LoRA training pieces with no Ray in them: the PEFT model, the DeepSpeed config, the backprop-depth
guard, evaluation and peak memory. ``layercard/train/worker.py`` wires them into Ray Train workers.

Why the backprop-depth guard: with adapters only on layers >= l0, autograd computes no activation
gradient below l0 -- that is where the cost saving of a high selection comes from (docs/design.md §1,
Cost). Three common habits silently undo it: ``enable_input_require_grads`` (makes the embedding
output require grad, so every block's backward runs), gradient checkpointing on the frozen lower
blocks (re-entrant checkpointing needs inputs that require grad), and trainable embeddings.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from layercard.errors import LayercardError
from layercard.train.losses import label_sums, lm_loss_sum, shift_for_lm
from layercard.models import ModelConfig, legacy_hash_note

ADAPTER_CONFIG = "adapter_config.json"
SELECTION_FILE = "selection.json"


# --------------------------------------------------------------------------- selection → LoraConfig
@dataclass
class Selection:
    """A selection directory: a PEFT ``adapter_config.json`` plus ``selection.json`` (layers, hashes)."""

    path: Path
    lora: dict                          # LoraConfig.to_dict(), JSON-able
    layers: list[int] | None            # layers_to_transform (None: every layer)
    weights_hash: str | None            # of the model the selection was made for
    card_id: str | None
    meta: dict = field(default_factory=dict)
    sequences: dict | None = None       # how its card built sequences (None: before that was recorded)


def _card_json(card_dir: Path) -> dict:
    meta_path = card_dir / "card.json"
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def _card_weights_hash(card_dir: Path) -> str | None:
    meta = _card_json(card_dir)
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    return meta.get("weights_hash") or model.get("weights_hash")


def read_selection(path: str | Path) -> Selection:
    """Read and check a selection dir; its weights hash is selection.json's, else its card's."""
    from peft import LoraConfig

    path = Path(path).expanduser()
    if not (path / ADAPTER_CONFIG).is_file():
        raise LayercardError(f"selection '{path}' has no {ADAPTER_CONFIG}")
    try:
        lora = LoraConfig.from_pretrained(str(path))
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise LayercardError(f"selection '{path}': {ADAPTER_CONFIG} is not a LoRA config: {str(err).splitlines()[0]}") from None
    meta = {}
    if (path / SELECTION_FILE).is_file():
        try:
            meta = json.loads((path / SELECTION_FILE).read_text())
        except json.JSONDecodeError as err:
            raise LayercardError(f"selection '{path}': {SELECTION_FILE} is not valid JSON ({err})") from None
    layers = lora.layers_to_transform
    layers = [layers] if isinstance(layers, int) else (sorted(layers) if layers is not None else None)
    if meta.get("layers") is not None and layers is not None and sorted(meta["layers"]) != layers:
        raise LayercardError(
            f"selection '{path}': {SELECTION_FILE} layers {sorted(meta['layers'])} differ from "
            f"{ADAPTER_CONFIG} layers_to_transform {layers}"
        )
    whash = meta.get("weights_hash")
    card = meta.get("card_dir") or meta.get("card")
    card_path = Path(card).expanduser() if card else None
    card_path = card_path if card_path is None or card_path.is_absolute() else path / card_path
    if not whash and card_path:
        whash = _card_weights_hash(card_path)
    sequences = meta.get("sequences") or (_card_json(card_path).get("sequences") if card_path else None)
    return Selection(path, lora_to_dict(lora), layers, whash, meta.get("card_id"), meta, sequences)


def check_selection_for_model(selection: Selection, weights_hash: str) -> None:
    if selection.weights_hash and selection.weights_hash != weights_hash:
        raise LayercardError(
            f"selection '{selection.path}' was made for another model: its weights hash is "
            f"{selection.weights_hash}, the configured model's is {weights_hash}{legacy_hash_note(selection.meta)}"
        )


def lora_to_dict(lora) -> dict:
    """A LoraConfig as plain JSON (sets become lists), so it can travel in a Ray worker's config."""
    return json.loads(json.dumps(lora.to_dict(), default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def all_layers_lora(model: nn.Module, r: int, alpha: float | None, dropout: float, block_path: str | None = None) -> dict:
    """``strategy=all``: every linear module of every block (target names from discovery)."""
    from peft import LoraConfig

    from layercard.discovery import discover

    layout = discover(model, block_path=block_path)
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                     target_modules=layout.targets)
    return lora_to_dict(cfg)


def lora_from_dict(data: dict, *, layers: list[int] | None = None, alpha: float | None = None,
                   dropout: float | None = None):
    """Rebuild a LoraConfig from :func:`lora_to_dict` output, optionally moving it to ``layers``."""
    from peft import LoraConfig

    data = dict(data)
    if layers is not None:
        data["layers_to_transform"] = sorted(int(i) for i in layers)
    if alpha is not None:
        data["lora_alpha"] = alpha
    if dropout is not None:
        data["lora_dropout"] = dropout
    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return LoraConfig(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- the PEFT model
def adapted_layers(model: nn.Module, block_path: str | None = None) -> list[int]:
    """Indices of the blocks that hold at least one LoRA module."""
    from peft.tuners.lora import LoraLayer

    from layercard.discovery import find_blocks

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _, blocks = find_blocks(base, block_path)
    return [i for i, b in enumerate(blocks) if any(isinstance(m, LoraLayer) for m in b.modules())]


def make_peft_model(model: nn.Module, lora_config, block_path: str | None = None):
    """Wrap the frozen base model with LoRA; the adapters must land on exactly the configured layers."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    got = adapted_layers(peft_model, block_path)
    want = lora_config.layers_to_transform
    want = [want] if isinstance(want, int) else want
    if not got:
        raise LayercardError(f"LoRA config (target_modules={lora_config.target_modules}) adapted no layer of the model")
    if want is not None and sorted(want) != got:
        raise LayercardError(f"LoRA layers_to_transform {sorted(want)} but adapters landed on layers {got} "
                             f"(the model has {len(find_blocks_of(peft_model, block_path))} layers)")
    return peft_model


def find_blocks_of(model: nn.Module, block_path: str | None = None) -> nn.ModuleList:
    from layercard.discovery import find_blocks

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return find_blocks(base, block_path)[1]


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_backprop_depth(model: nn.Module, block_path: str | None = None) -> int:
    """Assert nothing makes autograd reach below the lowest adapted layer l0; return l0.

    Raises LayercardError naming the culprit: trainable embeddings, a forward hook from
    ``enable_input_require_grads``, gradient checkpointing on a block below l0, or a trainable
    parameter below l0.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = find_blocks_of(model, block_path)
    layers = adapted_layers(model, block_path)
    if not layers:
        raise LayercardError("the model has no LoRA adapters")
    l0 = layers[0]
    emb = base.get_input_embeddings()
    if any(p.requires_grad for p in emb.parameters()):
        raise LayercardError("input embeddings require grad: backprop would run through every layer "
                             "(freeze them, or drop them from modules_to_save)")
    if getattr(base, "_require_grads_hook", None) is not None:
        raise LayercardError("enable_input_require_grads() is active: the embedding output requires grad and "
                             "backprop would run through every layer (call disable_input_require_grads())")
    for i in range(l0):
        if getattr(blocks[i], "gradient_checkpointing", False):
            raise LayercardError(f"gradient checkpointing is on for frozen layer {i} below the lowest adapted "
                                 f"layer {l0}: it forces activation gradients there (disable it below {l0})")
        bad = [n for n, p in blocks[i].named_parameters() if p.requires_grad]
        if bad:
            raise LayercardError(f"layer {i} below the lowest adapted layer {l0} has trainable parameter {bad[0]!r}")
    return l0


def build_lora_model(model: nn.Module, lora: dict, *, layers: list[int] | None = None,
                     alpha: float | None = None, dropout: float | None = None,
                     block_path: str | None = None):
    """Frozen base → PEFT LoRA model on the configured layers, with the backprop-depth guard checked."""
    peft_model = make_peft_model(model, lora_from_dict(lora, layers=layers, alpha=alpha, dropout=dropout), block_path)
    check_backprop_depth(peft_model, block_path)
    return peft_model


# --------------------------------------------------------------------------- DeepSpeed
def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(*, zero_stage: int, lr: float, warmup_steps: int, steps: int, batch_size: int,
                     world_size: int, bf16: bool, grad_clip: float = 1.0, weight_decay: float = 0.0,
                     overrides: dict | None = None) -> dict:
    """ZeRO stage 2/3, torch AdamW (``torch_adam``: no fused C++ op to build), linear warm-up then decay."""
    if zero_stage not in (2, 3):
        raise LayercardError(f"zero_stage must be 2 or 3, got {zero_stage!r}")
    cfg = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_size * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bool(bf16)},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": max(warmup_steps, 1),
            "total_num_steps": max(steps, warmup_steps + 1), "warmup_type": "linear"}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, overrides or {})


def skip_shm_op_build(force: bool = False) -> bool:
    """Stop DeepSpeed JIT-building its shared-memory comm op (``deepspeed_shm_comm``); True if skipped.

    Without a C++ compiler the build crashes (``CalledProcessError ... c++ --version``); with one
    it costs ~45 s the first time. The op only serves DeepSpeed's inference all-reduce and only
    when ``LOCAL_SIZE`` equals the world size, which Ray Train does not set -- training never
    uses it. ``importlib`` is needed: ``import deepspeed.comm.torch as m`` binds the wrong object.
    """
    if not force and shutil.which("c++") is not None:
        return False
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None
    return True


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters as full CPU tensors; collective under ZeRO-3 (all ranks call it)."""
    import deepspeed

    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


# --------------------------------------------------------------------------- evaluation
def eval_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss sum and token count over supervised tokens, and exact-match counts per example.

    An example counts as right when the argmax at every supervised (answer) token equals it --
    classification-as-generation scored on the answer tokens. logits: (B, T, V), labels: (B, T).
    """
    z, y = shift_for_lm(logits, labels)
    mask = y != -100
    hit = (z.argmax(-1) == y) | ~mask
    has = mask.any(dim=1)
    return {
        "loss_sum": float(lm_loss_sum(logits, labels)),
        "tokens": float(mask.sum()),
        "correct": float((hit.all(dim=1) & has).sum()),
        "examples": float(has.sum()),
    }


@torch.no_grad()
def evaluate(forward, batches, device, label_token_ids=None) -> dict[str, float]:
    """Sum :func:`eval_sums` (and, with ``label_token_ids``, the label-loss sums) over batches;
    ``forward(input_ids, attention_mask) -> logits``."""
    total: dict[str, float] = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0, "examples": 0.0}
    if label_token_ids:
        total.update(label_loss_sum=0.0, label_correct=0.0, label_examples=0.0)
    for batch in batches:
        labels = batch["labels"].to(device)
        logits = forward(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        sums = eval_sums(logits, labels)
        if label_token_ids:
            sums.update(label_sums(logits, labels, label_token_ids))
        for k, v in sums.items():
            total[k] += v
    return total


def eval_metrics(sums: dict[str, float], with_accuracy: bool) -> dict:
    """eval_loss = mean next-token loss over supervised tokens; accuracy only for prompt/answer data.

    With label sums (classification data with ``label_answers``): ``label_loss`` is the mean label
    loss (log-softmax over the answer tokens only, :mod:`layercard.train.label_loss`) and the metric is
    the label accuracy; otherwise the metric is exact match over the answer tokens. ``quality`` is
    what a layer set is judged by (lower is better): the label loss where defined, else eval_loss.
    """
    loss = sums["loss_sum"] / sums["tokens"] if sums["tokens"] else None
    out = {"eval_loss": loss, "metric": None, "metric_name": None, "label_loss": None}
    if sums.get("label_examples"):
        out.update(label_loss=sums["label_loss_sum"] / sums["label_examples"],
                   metric=sums["label_correct"] / sums["label_examples"], metric_name="label_accuracy")
    elif with_accuracy and sums["examples"]:
        out.update(metric=sums["correct"] / sums["examples"], metric_name="accuracy")
    out["quality"] = out["label_loss"] if out["label_loss"] is not None else loss
    out["quality_name"] = "label_loss" if out["label_loss"] is not None else "eval_loss"
    return out


# --------------------------------------------------------------------------- memory
def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak process RSS on CPU (ru_maxrss, KiB on Linux); peak allocated tensor bytes on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def model_identity(cfg: ModelConfig):
    """(tokenizer, model_id, weights_hash) without loading big weights: files are fingerprinted.

    A ``config`` model is random and small, so it is built (its hash is over its tensors).
    """
    from layercard import models
    from layercard.data.tokenizer import HFTokenizer

    if cfg.config:
        loaded = models.load_model(cfg)
        return loaded.tokenizer, loaded.model_id, loaded.weights_hash
    path = Path(cfg.path).expanduser() if cfg.path else models._gguf_dir(cfg)
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise LayercardError(f"model path '{path}' has no *.safetensors weights")
    return HFTokenizer.from_dir(path), str(cfg.path or cfg.gguf_file), models._hash_files(files)
