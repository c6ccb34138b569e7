"""Streaming sufficient statistics (docs/design.md §1): plain float64 sums that add across batches,
data shards and machines.

Per *input group* g (modules that read the same tensor: q/k/v, gate/up) ``A_g = XᵀX`` and the
token count; per module m ``C_m = XᵀG`` (d_in × d_out, the transposed weight gradient) and
``gg_m = ‖G‖²_F``; per layer the block-influence sums (1 − cos(block input, output)).
Serialised as a flat name → tensor dict (safetensors), never pickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from layercard.errors import LayercardError


HALF = (torch.bfloat16, torch.float16)


def accumulate_cross(acc: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``acc + xᵀy`` (tokens × d_x, tokens × d_y), accumulated in place in float32 (float64 when
    the inputs are float64); ``acc=None`` starts a new sum.

    float32/float64 inputs multiply in their own precision, fused with the add (``addmm_``).
    Half-precision CUDA inputs multiply on tensor cores with float32 accumulation and output
    (``torch.mm(..., out_dtype=float32)``): a product of two bf16/fp16 numbers is exact in float32,
    so this is the float32 GEMM of the same values up to summation order — without casting the
    activations to float32 first, which made the statistics GEMMs the bulk of pass 1 on a GPU.
    Elsewhere half inputs are upcast to float32.
    """
    if x.dtype in HALF and x.is_cuda and y.dtype == x.dtype:
        p = torch.mm(x.T, y, out_dtype=torch.float32)
        return p if acc is None else acc.add_(p)
    if x.dtype in HALF:
        x, y = x.float(), y.float()
    y = y.to(x.dtype)
    return x.T @ y if acc is None else acc.addmm_(x.T, y)


def cross_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """xᵀy as float64, the product per :func:`accumulate_cross`."""
    return accumulate_cross(None, x, y).to(torch.float64)


@dataclass
class SufficientStats:
    A: dict[str, torch.Tensor] = field(default_factory=dict)    # group key → XᵀX (float64)
    n: dict[str, int] = field(default_factory=dict)             # group key → tokens seen
    C: dict[str, torch.Tensor] = field(default_factory=dict)    # module key → XᵀG (float64)
    gg: dict[str, float] = field(default_factory=dict)          # module key → ‖G‖²_F
    group_of: dict[str, str] = field(default_factory=dict)      # module key → group key
    bi_sum: dict[int, float] = field(default_factory=dict)      # layer → Σ_tokens (1 − cos(in, out))
    bi_n: dict[int, int] = field(default_factory=dict)          # layer → tokens

    @property
    def n_tokens(self) -> int:
        return max(self.n.values(), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes of the A and C matrices (what ``stats.safetensors`` holds, less its header)."""
        return sum(t.nbytes for t in [*self.A.values(), *self.C.values()])

    def add_sums(self, A: dict, n: dict, C: dict, gg: dict, group_of: dict) -> None:
        """Add sums (any float dtype, kept on their device: XᵀX per group with its token counts,
        XᵀG and ‖G‖² per module) into the float64 totals; new keys get float64 copies."""
        for k, a in A.items():
            if k in self.A:
                if self.A[k].shape != a.shape:
                    raise LayercardError(f"statistics for group '{k}' have shapes {tuple(self.A[k].shape)} and {tuple(a.shape)}")
                self.A[k] += a.to(device=self.A[k].device, dtype=torch.float64)
                self.n[k] += n[k]
            else:
                self.A[k], self.n[k] = a.to(torch.float64, copy=True), n[k]
        for k, c in C.items():
            if k in self.C:
                self.C[k] += c.to(device=self.C[k].device, dtype=torch.float64)
            else:
                self.C[k] = c.to(torch.float64, copy=True)
            self.gg[k] = self.gg.get(k, 0.0) + float(gg[k])
            self.group_of[k] = group_of[k]

    def add_block_influence(self, layer: int, total: float, count: int) -> None:
        self.bi_sum[layer] = self.bi_sum.get(layer, 0.0) + total
        self.bi_n[layer] = self.bi_n.get(layer, 0) + count

    def __add__(self, other: "SufficientStats") -> "SufficientStats":
        out = self.copy()
        out += other
        return out

    def __iadd__(self, other: "SufficientStats") -> "SufficientStats":
        self.add_sums(other.A, other.n, other.C, other.gg, other.group_of)
        for layer, v in other.bi_sum.items():
            self.add_block_influence(layer, v, other.bi_n[layer])
        return self

    def copy(self) -> "SufficientStats":
        return SufficientStats(
            {k: v.clone() for k, v in self.A.items()}, dict(self.n),
            {k: v.clone() for k, v in self.C.items()}, dict(self.gg), dict(self.group_of),
            dict(self.bi_sum), dict(self.bi_n),
        )

    # --- serialisation: tensors + a JSON header (no pickle); files are written by layercard.card.layer_card ---
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"A/{k}": v.contiguous() for k, v in self.A.items()}
        tensors.update({f"C/{k}": v.contiguous() for k, v in self.C.items()})
        header = {"n": self.n, "gg": self.gg, "group_of": self.group_of,
                  "bi_sum": {str(k): v for k, v in self.bi_sum.items()},
                  "bi_n": {str(k): v for k, v in self.bi_n.items()}}
        return tensors, {"layercard_stats": json.dumps(header)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> "SufficientStats":
        try:
            header = json.loads((metadata or {})["layercard_stats"])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise LayercardError("statistics have no valid 'layercard_stats' header") from None
        return cls(
            {k[2:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("A/")},
            {k: int(v) for k, v in header["n"].items()},
            {k[2:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("C/")},
            {k: float(v) for k, v in header["gg"].items()},
            dict(header["group_of"]),
            {int(k): float(v) for k, v in header["bi_sum"].items()},
            {int(k): int(v) for k, v in header["bi_n"].items()},
        )
