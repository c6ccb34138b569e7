"""The typed config of ``python -m pipelines.demo`` (profile → report → select → train → compare)."""
from __future__ import annotations

from dataclasses import dataclass, field

from layercard.errors import LayercardError


@dataclass
class DemoConfig:
    profile_config: str
    """A ProfileConfig YAML (configs/profile-*.yaml)."""
    train_config: str
    """A TrainConfig YAML (configs/train-*.yaml); every run uses the same steps, data and seed."""
    profile_overrides: list[str] = field(default_factory=list)
    train_overrides: list[str] = field(default_factory=list)
    k: int = 5
    """Layers for the card-guided max-quality selection."""
    target: float = 0.95
    """Min-cost selection: cheapest set with predicted gain ≥ target × the all-layer gain."""
    fetch: list[str] = field(default_factory=list)
    """Tasks to fetch and prepare first (``layercard fetch --prepare``), e.g. [sentiment]; [] for none."""
    benchmark: str | None = None
    """A task of ``benchmarks/results/paper_table.json`` whose measured figures (the committed benchmark:
    longer training, 3 seeds, runs side by side) are printed below the demo's own table; None: none."""

    def __post_init__(self):
        if self.k < 1:
            raise LayercardError(f"config key 'k' must be >= 1, got {self.k}")
        if not 0 < self.target <= 1:
            raise LayercardError(f"config key 'target' must be in (0, 1], got {self.target}")
