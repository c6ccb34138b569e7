"""Forward/backward hooks that turn one forward+backward per batch into sufficient statistics.

The forward hook of each target module keeps its input X (non-padding rows) and adds XᵀX once per
input group; a tensor hook on the module output receives G = ∂L/∂Y in the backward and adds XᵀG.
The input of the lowest profiled block is made to require grad, so the backward stops there:
frozen layers below it cost nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from layercard.discovery import ModelLayout, ModuleInfo, find_blocks
from layercard.errors import LayercardError
from layercard.stats import SufficientStats


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _hidden_from(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class StatsCollector:
    """Context manager: ``with StatsCollector(model, layout, stats) as c: c.mask = ...; fwd; bwd``."""

    def __init__(self, model: nn.Module, layout: ModelLayout, stats: SufficientStats | None = None,
                 block_influence: bool = True):
        self.model, self.layout = model, layout
        self.stats = stats if stats is not None else SufficientStats()
        self.block_influence = block_influence
        self.mask: torch.Tensor | None = None          # (B, T) bool, set per batch
        self._groups: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        _, blocks = find_blocks(self.model, self.layout.block_path)
        for info in self.layout.modules:
            module = blocks[info.layer].get_submodule(info.name)
            self._handles.append(module.register_forward_hook(self._module_hook(info)))
        lowest = blocks[self.layout.layers[0]]
        self._handles.append(lowest.register_forward_pre_hook(self._require_grad_hook, with_kwargs=True))
        if self.block_influence:
            for i in self.layout.layers:
                self._handles.append(blocks[i].register_forward_hook(self._block_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._groups.clear()

    def end_batch(self) -> None:
        """Drop the per-batch references (call after backward)."""
        self._groups.clear()

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        if self.mask is None:
            return flat
        return flat[self.mask.reshape(-1).to(flat.device)]

    @staticmethod
    def _require_grad_hook(module, args, kwargs):
        h = _hidden_from(args, kwargs).detach().requires_grad_(True)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def _module_hook(self, info: ModuleInfo):
        def hook(module, args, output):
            x_full = args[0]
            slot = (info.layer, id(x_full))
            if slot not in self._groups:
                x = self._rows(x_full).detach().to(_stat_dtype(x_full))
                if not torch.isfinite(x).all():
                    raise LayercardError(f"non-finite activations (NaN/Inf) at the input of module '{info.full_name}'")
                group = f"{info.layer}.{info.name}"
                self.stats.add_group(group, x)
                self._groups[slot] = (group, x_full, x)
            group, _, x = self._groups[slot]
            if not output.requires_grad:
                raise LayercardError(f"module '{info.full_name}' output does not require grad; is it below the profiled layers?")

            def grad_hook(g):
                g_rows = self._rows(g).detach().to(x.dtype)
                if not torch.isfinite(g_rows).all():
                    raise LayercardError(f"non-finite gradients (NaN/Inf) at the output of module '{info.full_name}'")
                self.stats.add_module(info.key, group, x, g_rows)

            output.register_hook(grad_hook)
        return hook

    def _block_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            with torch.no_grad():
                h_in = _hidden_from(args, kwargs)
                h_out = _first_tensor(output)
                h_in, h_out = self._rows(h_in).to(_stat_dtype(h_in)), self._rows(h_out).to(_stat_dtype(h_out))
                cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1, eps=1e-12)
                self.stats.add_block_influence(layer, float((1.0 - cos).sum()), int(cos.numel()))
        return hook
