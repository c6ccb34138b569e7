"""Find the transformer blocks of a model and the linear modules LoRA can target in each.

Modules are named by their path *inside a block* (``self_attn.q_proj``, ``mlp.c_proj``), which is
what PEFT's ``target_modules`` suffix matching understands; ``target`` is the shortest suffix that
is still unambiguous in the block (``q_proj`` for Llama, but ``attn.c_proj`` for GPT-2 whose MLP
also has a ``c_proj``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layercard.errors import LayercardError

try:  # GPT-2 family stores its projections as Conv1D with the weight transposed (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


@dataclass(frozen=True)
class ModuleInfo:
    layer: int
    name: str        # path inside the block, e.g. "self_attn.q_proj"
    target: str      # shortest unambiguous suffix for PEFT target_modules, e.g. "q_proj"
    d_in: int
    d_out: int
    transposed: bool  # True for Conv1D: weight is (d_in, d_out)
    full_name: str   # path in the model, e.g. "model.layers.3.self_attn.q_proj"

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def weight_name(self) -> str:
        return f"{self.full_name}.weight"


@dataclass(frozen=True)
class ModelLayout:
    block_path: str                 # e.g. "model.layers"
    num_layers: int                 # all blocks of the model
    layers: tuple[int, ...]         # the profiled layer indices
    modules: tuple[ModuleInfo, ...]
    block_modules: tuple[str, ...] = ()   # every linear module of a block, targeted or not

    @property
    def layers_pattern(self) -> str:
        """The ModuleList's attribute name, PEFT's ``layers_pattern`` (``layers``, ``h``, ``layer``)."""
        return self.block_path.rsplit(".", 1)[-1]

    @property
    def targets(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.modules:
            seen.setdefault(m.target, None)
        return list(seen)

    def modules_of(self, layer: int) -> list[ModuleInfo]:
        return [m for m in self.modules if m.layer == layer]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, transposed) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    d_in, d_out = module.weight.shape
    return int(d_in), int(d_out), True


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, block_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the given path, else the list holding the most parameters.

    Largest-by-parameters picks the language model over a vision tower in multimodal models.
    """
    if block_path:
        try:
            blocks = model.get_submodule(block_path)
        except AttributeError:
            raise LayercardError(f"block_path '{block_path}' does not exist in {type(model).__name__}") from None
        if not isinstance(blocks, nn.ModuleList):
            raise LayercardError(f"block_path '{block_path}' is a {type(blocks).__name__}, not a ModuleList")
        return block_path, blocks
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and any(
            is_linear(m) for m in module[0].modules()
        ):
            size = _param_count(module)
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise LayercardError(f"no transformer blocks (a ModuleList of blocks with linear layers) in {type(model).__name__}")
    return best[1], best[2]


def _short_targets(names: list[str]) -> dict[str, str]:
    """For each block-relative name, the shortest dotted suffix that PEFT matches to it alone."""
    out = {}
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
            if hits == [name]:
                out[name] = suffix
                break
        else:
            out[name] = name
    return out


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def discover(
    model: nn.Module,
    target_modules: list[str] | str | None = None,
    layers: list[int] | None = None,
    block_path: str | None = None,
) -> ModelLayout:
    """Blocks and their LoRA-targetable linear modules.

    ``target_modules``: None or "all-linear" for every linear module in a block, else names matched
    PEFT-style (exact block-relative name or a dotted suffix). A name that matches nothing is an error.
    ``layers``: layer indices to keep (default: all); out-of-range indices are an error.
    """
    block_path, blocks = find_blocks(model, block_path)
    num_layers = len(blocks)
    if layers is None:
        layers = list(range(num_layers))
    bad = [i for i in layers if not isinstance(i, int) or i < 0 or i >= num_layers]
    if bad:
        raise LayercardError(f"layer indices {bad} are out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise LayercardError(f"layer indices {layers} contain duplicates")
    layers = sorted(layers)
    if isinstance(target_modules, str):
        target_modules = None if target_modules == "all-linear" else [target_modules]

    available = [n for n, m in blocks[layers[0]].named_modules() if n and is_linear(m)]
    if target_modules is not None:
        if not target_modules:
            raise LayercardError("target_modules is empty")
        missing = [t for t in target_modules if not any(_matches(n, t) for n in available)]
        if missing:
            raise LayercardError(
                f"target_modules {missing} match no linear module in the blocks; available: {', '.join(available)}"
            )
    modules = []
    for i in layers:
        block = blocks[i]
        names = [n for n, m in block.named_modules() if n and is_linear(m)]
        short = _short_targets(names)
        for name in names:
            if target_modules is not None and not any(_matches(name, t) for t in target_modules):
                continue
            d_in, d_out, transposed = linear_dims(block.get_submodule(name))
            modules.append(ModuleInfo(i, name, short[name], d_in, d_out, transposed, f"{block_path}.{i}.{name}"))
    return ModelLayout(block_path, num_layers, tuple(layers), tuple(modules), tuple(available))


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once); works on the meta device."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def input_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
