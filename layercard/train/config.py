"""The typed config of ``layercard train`` (and of each trial of the layer-subset search)."""
from __future__ import annotations

from dataclasses import dataclass, field

from layercard.config import check_loss_keys
from layercard.data.examples import DataConfig, with_answer_eos
from layercard.errors import LayercardError
from layercard.models import ModelConfig


@dataclass
class TrainConfig:
    """LoRA on the selected layers, Ray Train workers under DeepSpeed ZeRO."""

    model: ModelConfig
    data: DataConfig
    """Training data; with prompt/answer columns the loss is on answer tokens and eval reports accuracy."""
    eval_data: DataConfig | None = None
    """Held-out data; without it the last ``eval_fraction`` of the (shuffled) training examples."""
    eval_fraction: float = 0.1
    label_answers: list[str] | None = None
    """Classification as generation, e.g. [" negative", " positive"]: eval also reports the label loss
    (log-softmax over these answers' first tokens only) and the label accuracy."""
    loss: str = "lm"
    """Training loss. ``lm``: next-token cross-entropy over the answer tokens. ``label``: the label
    loss over ``label_answers`` (the quality the eval reports), at the answer position."""
    selection: str | None = None
    """A selection dir: ``adapter_config.json`` (PEFT LoraConfig) + ``selection.json`` (layers, weights_hash)."""
    strategy: str | None = None
    """``all``: every linear module of every layer (instead of a selection)."""
    steps: int = 100
    """Optimizer steps (each worker runs one micro-batch of ``batch_size`` per step)."""
    lr: float = 2e-4
    warmup_steps: int = 10
    """Linear warm-up from 0 to ``lr``, then linear decay to 0 at ``steps``."""
    batch_size: int = 8
    """Examples per worker per step."""
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    lora_r: int = 8
    """Rank for ``strategy=all`` (a selection carries its own ``r``/``rank_pattern``)."""
    lora_alpha: float | None = None
    """None: the selection's value (``2 * lora_r`` for ``strategy=all``)."""
    lora_dropout: float | None = None
    """None: the selection's value (0.0 for ``strategy=all``)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 2 (optimizer state + gradients sharded) or 3 (parameters too)."""
    ds_overrides: dict = field(default_factory=dict)
    """Merged into the generated DeepSpeed config, e.g. ``{zero_optimization: {stage3_param_persistence_threshold: 0}}``."""
    ds_shm_op: bool = False
    """JIT-build DeepSpeed's shm comm op when a compiler exists (~45 s once; Ray Train never uses it)."""
    num_workers: int = 2
    use_gpu: bool = False
    """GPU workers use NCCL and bf16; CPU workers use gloo and fp32."""
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 50
    """Steps between checkpoints (each one is a DeepSpeed save plus a Ray report: not cheap)."""
    report_every: int = 10
    """Steps between metric-only reports (what Tune's schedulers see)."""
    eval_every: int | None = None
    """Steps between evaluations (None: only at the end)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train allows; each resumes from the last checkpoint."""
    seed: int = 0
    fail_at_step: int | None = None
    """Test-only fault injection: the rank-0 worker dies at this step, once per run."""
    address: str | None = None
    """Ray cluster address (``auto``, ``ray://...``); None: RAY_ADDRESS or a local cluster."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints (shared storage on a multi-node cluster); None: ``OUT/ray``.
    A run already at ``storage_path/name`` is resumed, which unpickles its DeepSpeed checkpoint: a local
    directory that group or others can write to is refused (cluster/README.md, Security)."""
    name: str = "train"
    """Run name under ``storage_path``."""
    base_eval_cache: str | None = None
    """A JSON file that keeps the base model's eval numbers (the ``initial_*`` metrics) for runs that
    share the model, eval data and eval settings: LoRA starts at B = 0, so every layer set starts
    from exactly the base model, and only the first run pays for that evaluation."""

    def __post_init__(self):
        if (self.selection is None) == (self.strategy is None):
            raise LayercardError("train: give exactly one of selection=DIR or strategy=all")
        if self.strategy is not None and self.strategy != "all":
            raise LayercardError(f"config key 'strategy' must be 'all', got {self.strategy!r}")
        if self.zero_stage not in (2, 3):
            raise LayercardError(f"config key 'zero_stage' must be 2 or 3, got {self.zero_stage!r}")
        positive = ("steps", "batch_size", "num_workers", "checkpoint_every", "report_every", "lora_r")
        for key in positive:
            if getattr(self, key) < 1:
                raise LayercardError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "max_failures"):
            if getattr(self, key) < 0:
                raise LayercardError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.eval_every is not None and self.eval_every < 1:
            raise LayercardError(f"config key 'eval_every' must be >= 1 or null, got {self.eval_every}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise LayercardError(f"config key 'eval_fraction' must be in (0, 1), got {self.eval_fraction}")
        if self.lr <= 0:
            raise LayercardError(f"config key 'lr' must be > 0, got {self.lr}")
        if self.cpus_per_worker <= 0:
            raise LayercardError(f"config key 'cpus_per_worker' must be > 0, got {self.cpus_per_worker}")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            raise LayercardError(f"config key 'lora_dropout' must be in [0, 1), got {self.lora_dropout}")
        if self.label_answers is not None and len(self.label_answers) < 2:
            raise LayercardError(f"config key 'label_answers' needs at least 2 answers, got {self.label_answers!r}")
        if self.label_answers is not None and (self.eval_data or self.data).prompt_column is None:
            raise LayercardError("config key 'label_answers' needs prompt/answer data (data.prompt_column, data.answer_column)")
        check_loss_keys("", self.loss, self.label_answers)
        self.data = with_answer_eos(self.data, self.loss)
        if self.eval_data is not None:
            self.eval_data = with_answer_eos(self.eval_data, self.loss)
        if self.fail_at_step is not None and not 1 <= self.fail_at_step <= self.steps:
            raise LayercardError(f"config key 'fail_at_step' must be in 1..steps ({self.steps}), got {self.fail_at_step}")
