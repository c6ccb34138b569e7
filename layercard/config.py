"""Typed pipeline configs: YAML is the single source of truth, ``key=value`` overrides on top.

Every config is a dataclass tree. Unknown keys and values of the wrong type fail with a
:class:`LayercardError` that names the dotted key, e.g. ``config key 'model.dtyp' is unknown``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from layercard.errors import LayercardError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _float_literal(text: str, key: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise LayercardError(f"config key '{key}' must be a float, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise LayercardError(f"config key '{key}' must be a finite float, got {text!r}")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (bool/int/float/str/list/Optional/Literal/dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except LayercardError as err:
                errors.append(str(err))
        raise LayercardError(errors[0] if errors else f"config key '{key}' has an invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise LayercardError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LayercardError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise LayercardError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise LayercardError(f"config key '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise LayercardError(f"config key '{key}' must be a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LayercardError(f"config key '{key}' must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _float_literal(value, key)  # YAML 1.1 reads "7e5" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LayercardError(f"config key '{key}' must be a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise LayercardError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise LayercardError(f"config key '{key}' has unsupported type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise LayercardError(f"config key '{prefix}{key}' is unknown (known: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise LayercardError(f"config section '{prefix.rstrip('.') or cls.__name__}': {err}") from None
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` → (["a", "b"], 3); the value is parsed as YAML (so ``[q_proj, v_proj]`` is a list)."""
    if "=" not in text:
        raise LayercardError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise LayercardError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise LayercardError(f"override '{text}': '{part}' is not a section")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LayercardError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise LayercardError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LayercardError(f"config file '{path}' must hold a mapping at top level")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read YAML ``path`` (optional), apply dotted ``key=value`` overrides, validate into ``cls``."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


def check_loss_keys(prefix: str, loss: str, label_answers) -> None:
    """``loss`` is lm or label; ``label`` needs ≥ 2 ``label_answers`` (shared by profile and train)."""
    if loss not in ("lm", "label"):
        raise LayercardError(f"config key '{prefix}loss' must be 'lm' or 'label', got {loss!r}")
    if loss == "label" and (label_answers is None or len(label_answers) < 2):
        raise LayercardError(f"config key '{prefix}loss: label' needs '{prefix}label_answers' "
                             f"with at least 2 answers, got {label_answers!r}")

