"""Typed configs: every YAML under configs/ validates into its class; dotted key=value overrides."""
from __future__ import annotations

import fnmatch
import importlib
from pathlib import Path

import pytest

from layercard.config import load_config, parse_override, read_yaml
from layercard.errors import LayercardError
from layercard.profile.config import ProfileConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))

# Every config file must be registered here (exact name or glob pattern → "module:Class").
# A new YAML that matches none of these fails test_every_config_is_registered.
# Train configs leave the choice of layers to the command line (``strategy=all`` or ``selection=DIR``);
# they are validated with ``strategy=all`` unless they set one themselves (REQUIRED_ON_COMMAND_LINE).
CONFIG_CLASSES = {
    "tiny.yaml": "layercard.profile.config:ProfileConfig",
    "qwen3-8b.yaml": "layercard.profile.config:ProfileConfig",
    "profile-*.yaml": "layercard.profile.config:ProfileConfig",
    "train-*.yaml": "layercard.train.config:TrainConfig",
    "search-*.yaml": "layercard.search.config:SearchConfig",
    "demo-*.yaml": "layercard.demo_config:DemoConfig",
}


REQUIRED_ON_COMMAND_LINE = {
    "layercard.train.config:TrainConfig": lambda data: [] if {"selection", "strategy"} & set(data) else ["strategy=all"],
}


def _class_spec(name: str) -> str | None:
    if name in CONFIG_CLASSES:
        return CONFIG_CLASSES[name]
    hits = [spec for pattern, spec in CONFIG_CLASSES.items() if fnmatch.fnmatch(name, pattern)]
    return hits[0] if hits else None


def _import_class(spec: str):
    module, cls = spec.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        pytest.skip(f"{spec} is not available yet ({err})")


def test_configs_exist():
    assert "tiny.yaml" in CONFIG_FILES


def test_every_config_is_registered():
    unknown = [name for name in CONFIG_FILES if _class_spec(name) is None]
    assert not unknown, f"register {unknown} in CONFIG_CLASSES of tests/test_config.py"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_loads(name):
    spec = _class_spec(name)
    if spec is None:
        pytest.fail(f"configs/{name} is not registered in CONFIG_CLASSES")
    cls = _import_class(spec)
    path = REPO / "configs" / name
    overrides = REQUIRED_ON_COMMAND_LINE.get(spec, lambda data: [])(read_yaml(path))
    cfg = load_config(cls, path, overrides)
    assert isinstance(cfg, cls)


def test_tiny_profile_config_values():
    cfg = load_config(ProfileConfig, REPO / "configs" / "tiny.yaml")
    assert cfg.model.config["model_type"] == "qwen3"
    assert cfg.model.config["num_hidden_layers"] <= 4 and cfg.model.config["hidden_size"] <= 64
    assert cfg.profile.rank == 4
    assert cfg.profile.ridge == pytest.approx(1e-3)
    assert cfg.data.path and (REPO / cfg.data.path).is_file()


# ----------------------------------------------------------------------------------------- overrides
TINY = REPO / "configs" / "tiny.yaml"


def test_override_int():
    cfg = load_config(ProfileConfig, TINY, ["profile.rank=16"])
    assert cfg.profile.rank == 16 and isinstance(cfg.profile.rank, int)


def test_override_float_and_bool():
    cfg = load_config(ProfileConfig, TINY, ["profile.ridge=0.5", "cost.measure=false"])
    assert cfg.profile.ridge == 0.5 and cfg.cost.measure is False


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("7e5", 7e5), ("2", 2.0)])
def test_float_in_exponent_notation(text, value, tmp_path):
    # YAML 1.1 reads 7e5 and 1e-3 (no dot) as strings; a float key takes them as numbers.
    cfg = load_config(ProfileConfig, TINY, [f"profile.ridge={text}"])
    assert cfg.profile.ridge == value and isinstance(cfg.profile.ridge, float)
    path = tmp_path / "p.yaml"
    path.write_text((REPO / "configs" / "tiny.yaml").read_text().replace("ridge: 1.0e-3", f"ridge: {text}"))
    cfg = load_config(ProfileConfig, path)
    assert cfg.profile.ridge == value


def test_override_list():
    cfg = load_config(ProfileConfig, TINY, ["profile.target_modules=[q_proj,v_proj]"])
    assert cfg.profile.target_modules == ["q_proj", "v_proj"]
    cfg = load_config(ProfileConfig, TINY, ["profile.layers=[0, 2]"])
    assert cfg.profile.layers == [0, 2]


def test_override_new_section_value():
    cfg = load_config(ProfileConfig, TINY, ["ray.address=auto"])
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize("override, key", [
    ("profile.rnk=16", "profile.rnk"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("model.dtyp=float64", "model.dtyp"),
])
def test_unknown_key_names_it(override, key):
    with pytest.raises(LayercardError, match=f"'{key}'") as exc:
        load_config(ProfileConfig, TINY, [override])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("override, key", [
    ("profile.rank=x", "profile.rank"),
    ("profile.rank=1.5", "profile.rank"),
    ("profile.ridge=abc", "profile.ridge"),
    ("profile.ridge=nan", "profile.ridge"),
    ("cost.measure=maybe", "cost.measure"),
    ("profile.target_modules=3", "profile.target_modules"),
    ("profile.layers=[0, a]", "profile.layers"),
    ("model.dtype=float8", "model.dtype"),
])
def test_ill_typed_value_names_key(override, key):
    with pytest.raises(LayercardError, match=f"'{key}") as exc:
        load_config(ProfileConfig, TINY, [override])
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("override, key", [("profile.ridge=0", "profile.ridge"), ("profile.rank=0", "profile.rank")])
def test_out_of_range_value_names_key(override, key):
    with pytest.raises(LayercardError, match=f"'{key}'"):
        load_config(ProfileConfig, TINY, [override])


def test_override_without_equals():
    with pytest.raises(LayercardError, match="profile.rank"):
        parse_override("profile.rank")


def test_missing_config_file(tmp_path):
    with pytest.raises(LayercardError, match="nope.yaml"):
        load_config(ProfileConfig, tmp_path / "nope.yaml")


def test_non_mapping_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(LayercardError, match="bad.yaml"):
        load_config(ProfileConfig, bad)


def test_missing_required_section(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {config: {model_type: llama}}\n")
    with pytest.raises(LayercardError, match="data"):
        load_config(ProfileConfig, cfg)
