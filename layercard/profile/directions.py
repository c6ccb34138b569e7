"""Output-space directions u = J·Δ of parameter updates, by forward-mode AD (docs/design.md §1).

``torch.func.jvp`` through ``torch.func.functional_call`` differentiates the model's logits with
respect to ONLY the parameters named in ``deltas`` (every other parameter and buffer is read from
the module as a constant). One JVP gives the logits and their directional derivative at once.

Forward-mode AD does not go through the CPU SDPA kernels (NOTES.md "Forward-mode AD"), so the
model is switched to ``attn_implementation="eager"`` for the duration of the call and switched back
afterwards.

Supervised positions follow the Hugging Face causal-LM shift: ``logits[:, t]`` predicts
``labels[:, t + 1]``; positions whose shifted label is -100 are dropped. Rows come out in
row-major (batch, position) order, the same order as :func:`supervised_targets`. With
``label_ids`` (the label loss) there is one row per example — the position that predicts its first
answer token — and the columns are the answer tokens' logits only (:func:`layercard.train.losses.loss_positions`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from layercard.errors import LayercardError
from layercard.train.losses import keep_logits_kwargs, loss_logits, loss_positions

__all__ = [
    "IGNORE_INDEX",
    "supervised_targets",
    "module_jvp",
    "module_finite_difference",
    "output_directions",
    "layer_directions",
    "finite_difference_directions",
    "eager_attention",
]

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def supervised_targets(batch: Mapping, label_ids=None) -> Tensor:
    """(T,) targets aligned with the rows of the directions: next-token ids at the supervised
    positions, or with ``label_ids`` each example's index into ``label_ids``."""
    return loss_positions(batch["labels"], label_ids)[1]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_inputs(model: nn.Module, batch: Mapping, label_ids=None) -> tuple[dict, Tensor]:
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise LayercardError(f"batch has no '{key}'; output directions need input_ids, attention_mask and labels")
    device = _model_device(model)
    kwargs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    labels = batch["labels"].to(device)
    if labels.shape != batch["input_ids"].shape:
        raise LayercardError(
            f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(batch['input_ids'].shape)}"
        )
    extra, keep, _ = keep_logits_kwargs(model, labels, label_ids)   # the LM head (and its tangent) on the loss's rows only
    kwargs.update(extra)
    return kwargs, keep


def _select_logits(keep: Tensor, label_ids=None) -> Callable[[object], Tensor]:
    """Logits at the loss's rows (T, V), whether the model already sliced them or not; with
    ``label_ids`` only the answer tokens' columns (T, C)."""
    def select(out) -> Tensor:
        logits = out.logits if hasattr(out, "logits") else out
        logits = logits if logits.dim() == 2 else logits[keep]
        return logits if label_ids is None else loss_logits(logits, label_ids)

    return select


# ---------------------------------------------------------------------------------------------
# Core: JVP and finite difference through any nn.Module
# ---------------------------------------------------------------------------------------------
def _check_deltas(module: nn.Module, deltas: Mapping[str, Tensor]) -> tuple[dict, dict]:
    if not deltas:
        raise LayercardError("no parameter tangents given (deltas is empty)")
    named = dict(module.named_parameters(remove_duplicate=False))
    primals, tangents = {}, {}
    for name, delta in deltas.items():
        if name not in named:
            raise LayercardError(f"parameter '{name}' is not in the model")
        p = named[name]
        if tuple(delta.shape) != tuple(p.shape):
            raise LayercardError(
                f"tangent for '{name}' has shape {tuple(delta.shape)}, the parameter has {tuple(p.shape)}"
            )
        primals[name] = p.detach()
        tangents[name] = delta.detach().to(device=p.device, dtype=p.dtype)
    return primals, tangents


def module_jvp(
    module: nn.Module,
    deltas: Mapping[str, Tensor],
    args: tuple = (),
    kwargs: Mapping | None = None,
    select: Callable[[object], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(select(module(*args, **kwargs)), its derivative along ``deltas``) by one forward-mode JVP.

    Only the parameters named in ``deltas`` are dual; the rest of the module is constant.
    ``select`` maps the module output to the tensor of interest (default: the output itself).
    """
    primals, tangents = _check_deltas(module, deltas)
    names = list(primals)
    kwargs = dict(kwargs or {})
    select = select or (lambda out: out)

    def f(*params: Tensor) -> Tensor:
        return select(functional_call(module, dict(zip(names, params)), args, kwargs))

    with torch.no_grad():
        out, tangent_out = jvp(f, tuple(primals[n] for n in names), tuple(tangents[n] for n in names))
    return out, tangent_out


@contextlib.contextmanager
def _perturbed(module: nn.Module, deltas: Mapping[str, Tensor], scale: float) -> Iterator[None]:
    """Add ``scale·Δ`` to the named parameters in place; restore the exact original values on exit."""
    named = dict(module.named_parameters(remove_duplicate=False))
    saved = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                p = named[name]
                if name not in saved:
                    saved[name] = p.detach().clone()
                p.add_(delta.to(device=p.device, dtype=p.dtype), alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                named[name].copy_(value)


def module_finite_difference(
    module: nn.Module,
    deltas: Mapping[str, Tensor],
    step: float,
    args: tuple = (),
    kwargs: Mapping | None = None,
    select: Callable[[object], Tensor] | None = None,
) -> Tensor:
    """Central difference (f(θ + hΔ) − f(θ − hΔ)) / 2h; a cross-check for :func:`module_jvp`."""
    _check_deltas(module, deltas)
    if not step > 0:
        raise LayercardError(f"finite-difference step must be positive, got {step}")
    kwargs = dict(kwargs or {})
    select = select or (lambda out: out)
    with torch.no_grad():
        with _perturbed(module, deltas, +step):
            plus = select(module(*args, **kwargs)).clone()
        with _perturbed(module, deltas, -step):
            minus = select(module(*args, **kwargs)).clone()
    return (plus - minus) / (2.0 * step)


# ---------------------------------------------------------------------------------------------
# Transformers causal LMs
# ---------------------------------------------------------------------------------------------
def _attn_impl(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with ``attn_implementation="eager"`` (forward AD needs it); restore afterwards."""
    original = _attn_impl(model)
    if original is None or original == "eager":
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise LayercardError(
            f"forward-mode AD needs attn_implementation='eager' but the model uses '{original}' "
            "and cannot switch; load it with attn_implementation='eager'"
        )
    setter("eager")
    if _attn_impl(model) != "eager":
        raise LayercardError(
            f"forward-mode AD needs attn_implementation='eager' but the model stayed on '{_attn_impl(model)}'; "
            "load it with attn_implementation='eager'"
        )
    try:
        yield
    finally:
        setter(original)


def _prepare(model: nn.Module) -> None:
    model.eval()


def output_directions(
    model: nn.Module,
    deltas: Mapping[str, Tensor],
    batch: Mapping,
    *,
    eps_check: float | None = None,
    check_rtol: float = 1e-2,
    label_ids=None,
) -> tuple[Tensor, Tensor]:
    """(logits, u) at the supervised positions, both (T, V); u = J·Δ for the tangents ``deltas``.

    ``deltas`` maps names from ``model.named_parameters()`` to tangents of that parameter's own
    shape (for a GPT-2 Conv1D weight, (d_in, d_out)). With ``eps_check`` set, u is also computed
    by a central difference with that step and a LayercardError is raised if
    ‖u_fd − u‖ / ‖u‖ > ``check_rtol``.
    """
    _prepare(model)
    kwargs, keep = _model_inputs(model, batch, label_ids)
    select = _select_logits(keep, label_ids)
    with eager_attention(model):
        logits, u = module_jvp(model, deltas, (), kwargs, select)
        _check_finite(logits)
        if eps_check is not None:
            u_fd = module_finite_difference(model, deltas, eps_check, (), kwargs, select)
            _compare(u, u_fd, check_rtol, eps_check)
    return logits, u


def _check_finite(logits: Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise LayercardError(
            "model produced non-finite logits at supervised positions (float64 eager attention turns "
            "fully padded query rows into NaN: pad on the right or use float32)"
        )


def _compare(u: Tensor, u_fd: Tensor, rtol: float, step: float) -> None:
    num = (u_fd.double() - u.double()).norm().item()
    den = max(u.double().norm().item(), u_fd.double().norm().item())
    rel = num / den if den > 0 else num
    if not rel <= rtol:
        raise LayercardError(
            f"JVP and finite difference (step {step:g}) disagree: relative error {rel:.3g} > {rtol:g}"
        )


def layer_directions(
    model: nn.Module,
    deltas_by_layer: Mapping[int, Mapping[str, Tensor]],
    batch: Mapping,
    label_ids=None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Logits (T, V) once and u (T, V) per layer: one JVP per layer with all its modules perturbed
    (with ``label_ids``: one row per example, the answer tokens' columns)."""
    _prepare(model)
    kwargs, keep = _model_inputs(model, batch, label_ids)
    select = _select_logits(keep, label_ids)
    logits = None
    us: dict[int, Tensor] = {}
    with eager_attention(model):
        for layer, deltas in deltas_by_layer.items():
            out, u = module_jvp(model, deltas, (), kwargs, select)
            if logits is None:
                logits = out
            us[layer] = u
        if logits is None:
            with torch.no_grad():
                logits = select(model(**kwargs))
    _check_finite(logits)
    return logits, us


def finite_difference_directions(
    model: nn.Module, deltas: Mapping[str, Tensor], batch: Mapping, step: float, label_ids=None
) -> Tensor:
    """u (T, V) by a central difference; parameters are perturbed in place and restored exactly."""
    _prepare(model)
    kwargs, keep = _model_inputs(model, batch, label_ids)
    with eager_attention(model):
        return module_finite_difference(model, deltas, step, (), kwargs, _select_logits(keep, label_ids))
