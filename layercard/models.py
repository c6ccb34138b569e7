"""Model access: a local Hugging Face directory, a GGUF file, or a transformers config.

Nothing here downloads: a path that is not on disk is an error. GGUF files are dequantised once
and cached as a safetensors directory (``cache_dir``), so later loads take a fraction of a second.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from layercard.atomic import atomic_dir
from layercard.errors import LayercardError
from layercard.paths import resolve_path

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Where the frozen base model comes from (exactly one of ``path``, ``gguf_file``, ``config``)."""

    path: str | None = None
    """Local Hugging Face model directory (safetensors weights only)."""
    gguf_file: str | None = None
    """A GGUF file; dequantised to ``dtype`` and cached as safetensors under ``cache_dir``."""
    config: dict | None = None
    """transformers config kwargs incl. ``model_type``: a randomly initialised model (tests, planning)."""
    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N`` or ``meta`` (shapes only: planning big models without memory)."""
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    seed: int = 0
    """Seed of the random initialisation when building from ``config``."""
    trust_remote_code: bool = False
    attn_implementation: str = "eager"
    """``eager`` is required for the forward-mode AD of the coupling pass on CPU."""
    block_path: str | None = None
    """Override the discovered ModuleList of blocks, e.g. ``model.layers``."""
    cache_dir: str = "~/.cache/layercard/models"
    architecture: dict | None = None
    """transformers config kwargs (incl. ``model_type``) describing ``path``'s model, so
    ``layercard plan`` can size a cluster on a machine that does not hold the weights."""

    def __post_init__(self):
        self.path, self.gguf_file = resolve_path(self.path), resolve_path(self.gguf_file)
        given = [k for k in ("path", "gguf_file", "config") if getattr(self, k)]
        if len(given) != 1:
            raise LayercardError(f"model: give exactly one of path, gguf_file, config (got {given or 'none'})")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str
    weights_hash: str
    meta: dict = field(default_factory=dict)


WEIGHTS_HASH_KIND = "sha256"
"""What ``weights_hash`` of a path/GGUF model is: 16 hex of sha256 over every weight file's name and
full bytes. Cards record it as ``weights_hash_kind``; a card without it was hashed by
:func:`sampled_weights_hash` (sizes and first/last MiB only), which cards keep recording as
``weights_hash_sampled`` so records of both kinds stay comparable exactly."""
HASH_CACHE = "weights-hashes.json"


def sampled_weights_hash(paths: list[Path], chunk: int = 1 << 20) -> str:
    """The former fingerprint: name, size, and the first and last MiB of each file. Not a content
    hash (a fine-tune that changes only the middle of a file keeps it); kept to compare old records."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(chunk))
            if size > chunk:
                f.seek(max(size - chunk, chunk))
                h.update(f.read(chunk))
    return h.hexdigest()[:16]


def _file_sha256(path: Path, cache: dict) -> str:
    """sha256 of the whole file, cached by (resolved path, mtime, size): 16 GB are read once per change."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_mtime_ns}:{st.st_size}"
    if key not in cache:
        from layercard.card.layer_card import sha256_file

        cache[key] = sha256_file(path)
    return cache[key]


def _load_hash_cache() -> tuple[Path, dict]:
    from layercard.paths import cache_root

    path = cache_root() / HASH_CACHE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    return path, data if isinstance(data, dict) else {}


def _hash_files(paths: list[Path]) -> str:
    """16 hex of sha256 over each file's name and full content hash (see :data:`WEIGHTS_HASH_KIND`)."""
    cache_path, cache = _load_hash_cache()
    before = dict(cache)
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p.name}:{_file_sha256(p, cache)}\n".encode())
    if cache != before:
        try:
            from layercard.atomic import atomic_write_json

            atomic_write_json(cache_path, cache)
        except OSError:       # a read-only cache only means hashing again next time
            pass
    return h.hexdigest()[:16]


def weights_hash_meta(files: list[Path]) -> dict:
    """What a card records beside ``weights_hash``: its kind, and the sampled fingerprint that cards
    written before whole-file hashing carry as their ``weights_hash`` (so the two stay comparable)."""
    return {"weights_hash_kind": WEIGHTS_HASH_KIND, "weights_hash_sampled": sampled_weights_hash(files)}


def legacy_hash_note(meta: dict) -> str:
    """What to add to a weights-hash mismatch when the record carries no ``weights_hash_kind``: it was
    hashed by the sampled fingerprint, so the same weights now hash differently."""
    if not meta.get("weights_hash") or meta.get("weights_hash_kind"):
        return ""
    return ("; that hash was recorded before weights hashes covered whole files (a sampled fingerprint, "
            "the same weights hash differently now): re-profile the card (and select again)")


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over parameter names and bytes (meta tensors hash their shapes only)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type != "meta":
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _from_config(cfg: ModelConfig):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(cfg.config)
    model_type = kwargs.pop("model_type", None)
    if not model_type:
        raise LayercardError("model.config needs a 'model_type' (e.g. llama, qwen3, gpt2)")
    try:
        hf_config = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError) as err:
        raise LayercardError(f"model.config: {str(err).splitlines()[0]}") from None
    hf_config._attn_implementation = cfg.attn_implementation
    dtype = DTYPES[cfg.dtype]
    if cfg.device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        # the weights come from the model's seed; the caller's RNG (a training run's seed: LoRA init,
        # dropout) is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(cfg.device)
    return model


def _from_dir(path: Path, cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    if not path.is_dir():
        raise LayercardError(f"model path '{path}' does not exist or is not a directory")
    if not list(path.glob("*.safetensors")):
        raise LayercardError(f"model path '{path}' has no *.safetensors weights (pickle checkpoints are refused)")
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[cfg.dtype],
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        local_files_only=True,
    ).to(cfg.device)


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM to an fp32 safetensors directory (with its tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise LayercardError(f"GGUF file '{gguf_file}' does not exist")
    src = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(**src)
    loaded = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    # transformers flags GGUF-loaded models as quantised and refuses to save them: rebuild plainly.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    # strict=False only to tolerate a tied lm_head that the GGUF does not store; anything else is a bad conversion.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    bad = sorted(set(result.missing_keys) - tied) + sorted(result.unexpected_keys)
    if bad:
        raise LayercardError(f"GGUF '{gguf_file.name}': weights do not match the {config.model_type} model: {bad[:3]}")
    model.tie_weights()
    with atomic_dir(out_dir, replace=True) as tmp:   # no half-written directory after a failure
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json and chat_template.jinja
    return out_dir


def _gguf_dir(cfg: ModelConfig) -> Path:
    gguf = Path(cfg.gguf_file).expanduser()
    if not gguf.is_file():
        raise LayercardError(f"model.gguf_file '{gguf}' does not exist")
    out = Path(cfg.cache_dir).expanduser() / f"{gguf.stem}-{_hash_files([gguf])}"
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out)
    return out


def model_dir(cfg: ModelConfig) -> Path | None:
    """The safetensors directory behind ``path`` or ``gguf_file`` (converted once); None for ``config``."""
    if cfg.config:
        return None
    return Path(cfg.path).expanduser() if cfg.path else _gguf_dir(cfg)


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer alone (no weights): for data pipelines that tokenise away from the model."""
    from layercard.data.tokenizer import ByteTokenizer, HFTokenizer

    path = model_dir(cfg)
    if path is None:
        from transformers import AutoConfig

        kwargs = dict(cfg.config)
        return ByteTokenizer(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs).vocab_size)
    if not path.is_dir():
        raise LayercardError(f"model path '{path}' does not exist or is not a directory")
    return HFTokenizer.from_dir(path)


def build_meta_model(cfg: ModelConfig) -> nn.Module:
    """The model's modules on the ``meta`` device (shapes only, no memory) for planning."""
    from dataclasses import replace

    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(cfg.path).expanduser() if cfg.path else None
    if path is not None and (path / "config.json").is_file():
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[cfg.dtype])
    arch = cfg.config or cfg.architecture
    if not arch:
        raise LayercardError(f"cannot plan without the model's architecture: '{cfg.path or cfg.gguf_file}' has no "
                             "config.json here; set model.architecture")
    return _from_config(replace(cfg, path=None, gguf_file=None, config=arch, device="meta"))


def describe_model(cfg: ModelConfig) -> LoadedModel:
    """Identity, tokenizer and module shapes without putting weights on an accelerator — what a
    Ray driver (often a CPU-only head) needs. Path/GGUF models are built on ``meta`` and hashed from
    their files; config models are built on the CPU (their hash is that of the random weights)."""
    from dataclasses import replace

    from layercard.data.tokenizer import HFTokenizer

    if cfg.config:
        return load_model(replace(cfg, device="cpu"))
    path = model_dir(cfg)
    if not path.is_dir():
        raise LayercardError(f"model path '{path}' does not exist or is not a directory")
    model = build_meta_model(replace(cfg, path=str(path), gguf_file=None))
    files = list(path.glob("*.safetensors"))
    return LoadedModel(model, HFTokenizer.from_dir(path), str(cfg.path or cfg.gguf_file), _hash_files(files),
                       weights_hash_meta(files))


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the frozen base model (eval mode, no parameter requires grad) and its tokenizer."""
    from layercard.data.tokenizer import ByteTokenizer, HFTokenizer

    if cfg.config:
        model = _from_config(cfg)
        digest = hashlib.sha256(json.dumps(cfg.config, sort_keys=True).encode()).hexdigest()[:8]
        model_id = f"config:{cfg.config.get('model_type')}-{digest}-seed{cfg.seed}"
        whash, hmeta = state_dict_hash(model), {"weights_hash_kind": "state-dict"}
        tokenizer = ByteTokenizer(model.config.vocab_size)
    else:
        path = Path(cfg.path).expanduser() if cfg.path else _gguf_dir(cfg)
        model = _from_dir(path, cfg)
        model_id = str(cfg.path or cfg.gguf_file)
        files = list(path.glob("*.safetensors"))
        whash, hmeta = _hash_files(files), weights_hash_meta(files)
        tokenizer = HFTokenizer.from_dir(path)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, model_id, whash, hmeta)
