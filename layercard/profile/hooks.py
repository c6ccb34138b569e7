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
from layercard.profile.stats import HALF, SufficientStats, accumulate_cross


def _stat_dtype(t: torch.Tensor, keep_half: bool = False) -> torch.dtype:
    """float64 stays, half precision on CUDA stays when ``keep_half`` (tensor-core statistics GEMMs
    with float32 accumulation, see :func:`layercard.profile.stats.cross_product`), the rest is float32."""
    if t.dtype == torch.float64:
        return torch.float64
    if keep_half and t.is_cuda and t.dtype in HALF:
        return t.dtype
    return torch.float32


def _hidden_from(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class StatsCollector:
    """Context manager: ``with StatsCollector(model, layout, stats) as c: c.mask = ...; fwd; bwd; c.end_batch()``.

    Products accumulate on the device in float32 (float64 for float64 models) and are added into
    the float64 ``stats`` every ``flush_every`` batches and on exit. NaN/Inf: the fast path checks
    only what it computes anyway (‖G‖² per module, the diagonal of each batch's XᵀX sum);
    ``strict=True`` (what :func:`layercard.profile.profiler.collect_stats` re-runs a failing batch with)
    checks every module's input, output and gradient and names the first non-finite one.
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, stats: SufficientStats | None = None,
                 block_influence: bool = True, half_gemm: bool = True, strict: bool = False,
                 flush_every: int = 16):
        if flush_every < 1:
            raise LayercardError(f"flush_every must be >= 1, got {flush_every}")
        self.model, self.layout = model, layout
        self.half_gemm = half_gemm   # False: upcast half activations/gradients to float32 before the GEMMs
        self.strict, self.flush_every = strict, flush_every
        self.stats = stats if stats is not None else SufficientStats()
        self.block_influence = block_influence
        self._rows_idx: torch.Tensor | None = None     # indices of non-padding tokens, set per batch
        self._checks: list[tuple[str, torch.Tensor]] = []   # deferred finite checks (one sync per batch)
        self._A: dict[str, torch.Tensor] = {}          # device-side partial sums since the last flush
        self._n: dict[str, int] = {}
        self._C: dict[str, torch.Tensor] = {}
        self._gg: dict[str, torch.Tensor] = {}
        self._group_of: dict[str, str] = {}
        self._bi: dict[int, list] = {}                 # block influence sums on device
        self._groups: dict[tuple[int, int], tuple[str, torch.Tensor, torch.Tensor]] = {}
        self._batches = 0
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

    def __exit__(self, exc_type, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._groups.clear()
        self._checks.clear()
        if exc_type is None:
            self.flush()
            for layer, (total, count) in self._bi.items():
                self.stats.add_block_influence(layer, float(total), int(count))
        self._bi.clear()

    def flush(self) -> None:
        """Add the device-side partial sums into the float64 statistics and start new ones."""
        if self._A or self._C:
            self.stats.add_sums(self._A, self._n, self._C, self._gg, self._group_of)
        self._A, self._n, self._C, self._gg = {}, {}, {}, {}

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        """(B, T) attention mask of the next batch; padding rows never enter the statistics."""
        self._mask = mask
        self._rows_idx = None if mask is None or bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)

    _mask = None

    def end_batch(self) -> bool:
        """Run the batch's deferred NaN/Inf checks (one device sync) and drop per-batch references.

        Returns False when the fast path saw a non-finite value; strict mode raises instead, naming
        the first module whose input, output or gradient is non-finite."""
        checks = self._checks + [("", self._A[g].diagonal().sum(dtype=torch.float64))
                                 for g, _, _ in self._groups.values()]
        self._checks.clear()
        self._groups.clear()
        if checks:
            bad = ~torch.isfinite(torch.stack([total.to(torch.float64) for _, total in checks]))
            if bool(bad.any()):
                message = checks[int(bad.float().argmax())][0]
                if self.strict and message:
                    raise LayercardError(message)
                return False
        self._batches += 1
        if self._batches % self.flush_every == 0:
            self.flush()
        return True

    def _check_finite(self, t: torch.Tensor, message: str, total: torch.Tensor | None = None) -> None:
        """Defer a NaN/Inf check of ``t`` to :meth:`end_batch`. The float64 sum (or the given
        ``total``, any float64 reduction of ``t``) is non-finite iff ``t`` has a NaN or Inf: one
        kernel per check instead of isfinite's five, and no overflow for finite inputs.
        Only strict mode pays for the extra reductions; ``total`` is computed anyway."""
        if total is not None:
            self._checks.append((message, total))
        elif self.strict:
            self._checks.append((message, t.sum(dtype=torch.float64)))

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        if self._rows_idx is None:
            return flat
        return flat.index_select(0, self._rows_idx.to(flat.device))

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
                x = self._rows(x_full).detach().to(_stat_dtype(x_full, self.half_gemm))
                self._check_finite(x, f"non-finite activations (NaN/Inf) at the input of module '{info.full_name}'")
                group = f"{info.layer}.{info.name}"
                self._A[group] = accumulate_cross(self._A.get(group), x, x)
                self._n[group] = self._n.get(group, 0) + x.shape[0]
                self._groups[slot] = (group, x_full, x)
            group, _, x = self._groups[slot]
            if self.strict:   # finite input: the module's own weights
                self._check_finite(self._rows(output.detach()),
                                   f"non-finite activations (NaN/Inf) at the output of module '{info.full_name}'")
            if not output.requires_grad:
                raise LayercardError(f"module '{info.full_name}' output does not require grad; is it below the profiled layers?")

            def grad_hook(g):
                g_rows = self._rows(g).detach().to(x.dtype)
                gg = torch.linalg.vector_norm(g_rows, dtype=torch.float64).square()   # also the NaN/Inf check
                self._check_finite(g_rows, f"non-finite gradients (NaN/Inf) at the output of module '{info.full_name}'",
                                   total=gg)
                self._C[info.key] = accumulate_cross(self._C.get(info.key), x, g_rows)
                self._gg[info.key] = self._gg[info.key] + gg if info.key in self._gg else gg
                self._group_of[info.key] = group

            output.register_hook(grad_hook)
        return hook

    def _block_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            with torch.no_grad():
                h_in = _hidden_from(args, kwargs)
                h_out = _first_tensor(output)
                h_in, h_out = self._rows(h_in).to(_stat_dtype(h_in)), self._rows(h_out).to(_stat_dtype(h_out))
                cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1, eps=1e-12)
                total = (1.0 - cos).to(torch.float64).sum()
                prev = self._bi.get(layer)
                self._bi[layer] = [total, cos.numel()] if prev is None else [prev[0] + total, prev[1] + cos.numel()]
        return hook
