"""The typed config of ``layercard profile`` (configs/*.yaml); every key documented once here."""
from __future__ import annotations

from dataclasses import dataclass, field

from layercard.config import check_loss_keys
from layercard.data.examples import DataConfig, with_answer_eos
from layercard.errors import LayercardError
from layercard.models import ModelConfig


SAVE_STATS_AUTO_BYTES = 2 * 1024 ** 3
"""``profile.save_stats: null`` writes the statistics when they are smaller than this."""


def should_save_stats(setting: bool | None, stats_bytes: int) -> bool:
    """``profile.save_stats`` resolved for statistics of ``stats_bytes`` bytes."""
    return stats_bytes < SAVE_STATS_AUTO_BYTES if setting is None else bool(setting)


@dataclass
class ProbeSettings:
    """What to profile."""

    target_modules: list[str] | None = None
    """PEFT-style module names (``q_proj``, ``mlp.c_proj``); null = every linear module of a block."""
    layers: list[int] | None = None
    """Layer indices to profile; null = all."""
    rank: int = 8
    """The LoRA rank the card is made for (``res2_rank_r``, the rank-r update Δ*)."""
    ridge: float = 1e-3
    """Relative ridge: λ = ridge · tr(A) / d_in. Must be > 0."""
    loss: str = "lm"
    """The loss L the card is made for. ``lm``: next-token cross-entropy over the answer (supervised)
    tokens. ``label``: the label loss — cross-entropy of the log-softmax restricted to the first
    tokens of ``label_answers``, at the position that predicts the answer (classification tasks,
    where the quality that matters is telling the classes apart, not learning the answer format)."""
    label_answers: list[str] | None = None
    """The answer strings for ``loss: label``, e.g. [" negative", " positive"]."""
    save_stats: bool | None = None
    """Write the summed statistics (``stats.safetensors``: float64 A per input group and C per module)
    into the card. null: only when they are under :data:`SAVE_STATS_AUTO_BYTES` (2 GiB; SmolLM2's are
    1.65 GB, a Qwen3-8B's ~106 GiB); true: always; false: never. The card's tables, selection and
    training need no statistics; re-solving a card at another rank or ridge does."""

    def __post_init__(self):
        if self.rank < 1:
            raise LayercardError(f"config key 'profile.rank' must be >= 1, got {self.rank}")
        if not self.ridge > 0:
            raise LayercardError(f"config key 'profile.ridge' must be > 0, got {self.ridge}")
        check_loss_keys("profile.", self.loss, self.label_answers)


@dataclass
class CouplingSettings:
    """Second pass: output directions u_ℓ = J_ℓ Δ*_ℓ on a probe subset → K, b, ρ."""

    enabled: bool = True
    probe_samples: int = 32
    """Records of the calibration data used as the probe set (the first N)."""
    sketch_dim: int = 512
    """JL sketch width for vocabularies above ``sketch_above_vocab``."""
    sketch_above_vocab: int = 32768
    seed: int = 0
    adam: bool = True
    """Also probe the direction of Adam's first LoRA step per layer (sign-step Gram ``k_adam``, columns
    ``adam_b``/``adam_h``): what the default selection model (``--model adam``) needs; doubles the JVPs."""


@dataclass
class CostSettings:
    """Measured step time / peak memory with the lowest adapted layer at a few depths."""

    measure: bool = True
    points: int = 3
    """How many lowest-layer depths to time (at least first, middle, last)."""
    steps: int = 3
    """Timed optimizer steps per point (after one warm-up step)."""


@dataclass
class RaySettings:
    """Where pass 1 and pass 2 run. ``num_actors: 0`` profiles in this process without Ray."""

    address: str | None = None
    """Ray cluster to join; null = RAY_ADDRESS if set, else start a local Ray."""
    num_actors: int = 0
    """Total probe actors = layer_slices × data replicas (must be a multiple of layer_slices)."""
    layer_slices: int = 1
    """Layers are split into this many contiguous slices; each actor holds statistics for one slice."""
    num_shards: int | None = None
    """Data shards (default: number of data replicas × 2); results are keyed by (slice, shard)."""
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    fail_once_at_shard: int | None = None
    """Test-only fault injection: the actor processing this shard dies once (retried by Ray)."""
    fail_once_in: str = "pass1"
    """Test-only: the phase of that fault — ``pass1`` (the actor summing the shard), ``reduce`` (the
    slice owner receiving it from a replica) or ``pass2`` (the actor probing that probe shard)."""
    fault_marker_dir: str | None = None
    """Where the fault injection leaves its marker (default: a temporary directory)."""

    def __post_init__(self):
        if self.num_actors < 0:
            raise LayercardError(f"config key 'ray.num_actors' must be >= 0, got {self.num_actors}")
        if self.layer_slices < 1:
            raise LayercardError(f"config key 'ray.layer_slices' must be >= 1, got {self.layer_slices}")
        if self.fail_once_in not in ("pass1", "reduce", "pass2"):
            raise LayercardError(f"config key 'ray.fail_once_in' must be one of pass1, reduce, pass2, got "
                                 f"'{self.fail_once_in}'")
        if self.num_actors and self.num_actors % self.layer_slices:
            raise LayercardError(
                f"config key 'ray.num_actors' ({self.num_actors}) must be a multiple of ray.layer_slices ({self.layer_slices})")


@dataclass
class ProfileConfig:
    model: ModelConfig
    data: DataConfig
    profile: ProbeSettings = field(default_factory=ProbeSettings)
    coupling: CouplingSettings = field(default_factory=CouplingSettings)
    cost: CostSettings = field(default_factory=CostSettings)
    ray: RaySettings = field(default_factory=RaySettings)

    def __post_init__(self):
        self.data = with_answer_eos(self.data, self.profile.loss)
