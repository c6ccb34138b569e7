"""The typed config of ``layercard search``: which layer subsets to try, under which budget, how.

The ``train`` section holds :class:`~layercard.train.config.TrainConfig` keys: every trial is a
``layercard train`` run (its own worker function) on the trial's layers, so the search sets
``selection``/``strategy`` per trial and keeps the runs under its own storage path.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from layercard.select.baselines import STRATEGIES
from layercard.config import from_dict
from layercard.errors import LayercardError
from layercard.train.config import TrainConfig

SET_BY_SEARCH = ("selection", "strategy", "storage_path", "name")


@dataclass
class AshaConfig:
    """Asynchronous successive halving on the eval loss the trials report along the way."""

    enabled: bool | None = None
    """None: on in ``mode=subsets``, off in ``mode=per-layer`` (every layer must train the same steps)."""
    grace_period: int = 2
    """Steps before a trial can be stopped (the first rung)."""
    reduction_factor: float = 2.0
    """Keep the best 1/reduction_factor of the trials at each rung."""
    max_t: int | None = None
    """Steps of the last rung; None: ``train.steps``."""

    def __post_init__(self):
        if self.grace_period < 1:
            raise LayercardError(f"config key 'asha.grace_period' must be >= 1, got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise LayercardError(f"config key 'asha.reduction_factor' must be > 1, got {self.reduction_factor}")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise LayercardError(f"config key 'asha.max_t' must be >= asha.grace_period ({self.grace_period}), "
                                 f"got {self.max_t}")


@dataclass
class ExploreConfig:
    """``mode=explore``: a card-seeded pool per k, successive halving on a rung quality, picks on every seed."""

    card_candidates: bool = True
    """False: the ablation — the same schedule on a pool without the card's pick and its neighbours
    (same size, filled with stratified random sets)."""
    pool_size: int | None = None
    """Candidates per k; None: the largest pool whose expected steps fit ``budget_factor`` x the fixed
    table's steps (see layercard.search.pool), at most ``max_pool``."""
    max_pool: int = 48
    n_shifts: int = 2
    """The card's best one-shift neighbours of its pick (one layer moved by 1..shift_max positions)."""
    n_swaps: int = 2
    """The card's best one-swap neighbours of its pick (one layer swapped for any other), besides the shifts."""
    shift_max: int = 2
    seed: int = 0
    """Seed of the stratified random sets (one layer per depth bin)."""
    budget_factor: float = 1.1
    """The search's training steps stay within this x the fixed table's (card pick, baselines at k and all
    layers, to the end on every seed)."""
    grace_period: int | None = None
    """Steps before a trial can be stopped (the first rung); None: train.steps // 6 (at least 1)."""
    reduction_factor: float = 3.0
    """Keep the best 1/reduction_factor of the trials at each rung."""
    rung_eval_examples: int = 64
    """The rung quality is measured on the first this many examples of the eval split (a fixed subset)."""
    second_round: bool = False
    """Add neighbours of the survivors (those trained to the end) as new candidates while budget remains."""
    second_round_max: int = 8
    paper_table: str | None = None
    """A paper-table JSON (benchmarks/results/paper_table.json): the best fixed strategy at k when the pool's
    baselines were not all trained to the end."""
    task: str | None = None
    """The task name written into explore.json (None: the training data file's stem)."""

    def __post_init__(self):
        for key in ("max_pool", "rung_eval_examples", "second_round_max", "shift_max"):
            if getattr(self, key) < 1:
                raise LayercardError(f"config key 'explore.{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("n_shifts", "n_swaps", "seed"):
            if getattr(self, key) < 0:
                raise LayercardError(f"config key 'explore.{key}' must be >= 0, got {getattr(self, key)}")
        if self.pool_size is not None and self.pool_size < 2:
            raise LayercardError(f"config key 'explore.pool_size' must be >= 2 or null, got {self.pool_size}")
        if not self.budget_factor > 0:
            raise LayercardError(f"config key 'explore.budget_factor' must be > 0, got {self.budget_factor}")
        if self.grace_period is not None and self.grace_period < 1:
            raise LayercardError(f"config key 'explore.grace_period' must be >= 1 or null, got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise LayercardError(f"config key 'explore.reduction_factor' must be > 1, got {self.reduction_factor}")


@dataclass
class SearchConfig:
    """Layer-subset search on Ray Tune: card-guided candidates and baselines, each trial a LoRA run."""

    train: dict
    """TrainConfig keys for every trial (model, data, steps, lr, zero_stage, num_workers, ...)."""
    card: str | None = None
    """The Layer Card directory the candidates come from (usually ``card=DIR`` on the command line)."""
    budget: float | str | None = None
    """Largest predicted cost of a trained candidate, in ``budget_unit``; None: no cap. (A string is
    parsed as a number: YAML 1.1 reads ``budget=7e5`` without a dot as the string "7e5".)"""
    budget_unit: Literal["flops", "seconds"] = "flops"
    """flops = predicted FLOPs/token; seconds = predicted seconds/step (needs the card's measured steps)."""
    mode: Literal["subsets", "per-layer", "explore"] = "subsets"
    """subsets: card-guided sets and baselines; per-layer: every card layer alone, a fixed number of steps;
    explore: a card-seeded pool per k under successive halving, the best set trained on every seed."""
    ks: list[int] = field(default_factory=lambda: [1, 2])
    """Set sizes: max-quality (|S| <= k) and every baseline strategy at each k."""
    budget_fractions: list[float] = field(default_factory=lambda: [1.0])
    """max-quality is also asked for the best set under fraction x budget, for each fraction."""
    targets: list[float] = field(default_factory=list)
    """min-cost candidates: the cheapest set reaching target x the all-layer predicted gain."""
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    """Baselines trained beside the card-guided sets (layercard.select.baselines.STRATEGIES)."""
    random_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the ``random`` baseline (one candidate per seed and k)."""
    sets: list[list[int]] = field(default_factory=list)
    """mode=subsets: layer sets to train besides the proposals (e.g. an explore search's survivors, on more
    seeds); with ``ks=[]`` and ``strategies=[all]`` only they and the all-layer reference are trained."""
    model: str | None = None
    """Set model the card-guided sets are chosen with (layercard.select.gain_models: newton, adam, coverage);
    None: the default when the card carries its columns. Its step budget ρ = Σ lr_t is the ``train`` recipe's."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds: every candidate is trained once per seed (results are averaged)."""
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.01
    """CPUs of a trial's own Tune function (the Train workers take ``train.cpus_per_worker`` each; Ray refuses 0)."""
    asha: AshaConfig = field(default_factory=AshaConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    """``mode=explore`` only (its own successive halving; the ``asha`` section, ``targets`` and
    ``budget_fractions`` are not used there)."""
    storage_path: str | None = None
    """Ray Tune storage (shared storage on a multi-node cluster); None: ``OUT/tune``."""
    name: str = "search"
    """Experiment name under ``storage_path``."""
    store: str | None = None
    """A card store (path or URI): the new card version is also published there."""
    reuse: list[str] = field(default_factory=list)
    """Earlier searches' OUT directories or run-record files (``*.jsonl``, ``layercard export-runs``): a trial
    one of them ran with the same recipe, data, model, layers and seed replays its reports instead of
    training (training is deterministic per seed; see layercard.search.reuse). Also allowed with ``--resume``."""
    records: str | None = None
    """A run-record file (``*.jsonl``) the search keeps its runs in: it replays the runs the file holds (as
    ``reuse`` does) and merges every run it reports into the file when it ends, finished or interrupted, so a
    search restarted on another machine, or from nothing, trains only what no record holds. Also allowed with
    ``--resume``."""
    resume: bool = False
    """Resume the search in OUT if it holds one (same as ``layercard search --resume OUT``)."""
    stop_after_trials: int | None = None
    """Test-only: the driver interrupts itself (as Ctrl+C does) once this many trials have completed."""
    train_config: TrainConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        bad = [k for k in SET_BY_SEARCH if self.train.get(k) is not None]
        if bad:
            raise LayercardError(f"config key 'train.{bad[0]}' is set by the search (per trial / under its storage); "
                                 "remove it")
        try:
            self.train_config = from_dict(TrainConfig, {**self.train, "strategy": "all"}, prefix="train.")
        except LayercardError as err:   # TrainConfig names its own keys; here they live under train.
            msg = str(err)
            if "'train." not in msg:
                msg = msg.replace("config key '", "config key 'train.", 1)
            raise LayercardError(msg) from None
        t = self.train_config
        if isinstance(self.budget, str):
            try:
                self.budget = float(self.budget)
            except ValueError:
                raise LayercardError(f"config key 'budget' must be a number, got {self.budget!r}") from None
        if self.budget is not None and not self.budget > 0:
            raise LayercardError(f"config key 'budget' must be > 0, got {self.budget}")
        from layercard.select.gain_models import MODELS

        if self.model is not None and self.model not in MODELS:
            raise LayercardError(f"config key 'model' is {self.model!r}; use one of {', '.join(MODELS)} (or null)")
        _check_list("ks", self.ks, lambda k: k >= 1, ">= 1", nonempty=self.mode == "subsets" and not self.sets)
        if self.sets and self.mode != "subsets":
            raise LayercardError(f"config key 'sets' is for mode=subsets, not mode={self.mode}")

        _check_list("budget_fractions", self.budget_fractions, lambda f: 0 < f <= 1, "in (0, 1]")
        _check_list("targets", self.targets, lambda f: 0 < f <= 1, "in (0, 1]")
        _check_list("strategies", self.strategies, lambda s: s in STRATEGIES, f"one of {list(STRATEGIES)}")
        _check_list("seeds", self.seeds, lambda s: s >= 0, ">= 0", nonempty=True)
        _check_list("random_seeds", self.random_seeds, lambda s: s >= 0, ">= 0",
                    nonempty="random" in self.strategies)
        if len(set(self.seeds)) != len(self.seeds):
            raise LayercardError(f"config key 'seeds' repeats a seed: {self.seeds}")
        if self.max_concurrent_trials < 1:
            raise LayercardError(f"config key 'max_concurrent_trials' must be >= 1, got {self.max_concurrent_trials}")
        if not self.trial_cpus > 0:
            raise LayercardError(f"config key 'trial_cpus' must be > 0 (Ray refuses 0), got {self.trial_cpus}")
        if self.stop_after_trials is not None and self.stop_after_trials < 1:
            raise LayercardError(f"config key 'stop_after_trials' must be >= 1 or null, got {self.stop_after_trials}")
        _check_list("reuse", self.reuse, lambda r: isinstance(r, str) and r != "",
                    "a search directory or run-record file")
        if self.records is not None and (not isinstance(self.records, str) or not self.records.endswith(".jsonl")):
            raise LayercardError(f"config key 'records' must be a run-record file ending in .jsonl, got {self.records!r}")
        if not self.name or "/" in self.name:
            raise LayercardError(f"config key 'name' must be a plain directory name, got {self.name!r}")
        if self.mode == "per-layer" and self.asha.enabled:
            raise LayercardError("config key 'asha.enabled' must be false with mode=per-layer: every layer trains "
                                 "the same fixed number of steps")
        if self.use_asha:
            self._check_asha(t)
        if self.mode == "explore":
            self._check_explore(t)

    def _check_explore(self, t: TrainConfig) -> None:
        if self.asha.enabled:
            raise LayercardError("config key 'asha.enabled' must not be true with mode=explore: explore runs its "
                                 "own successive halving (the explore section)")
        if self.explore.grace_period is not None and self.explore.grace_period >= t.steps:
            raise LayercardError(f"config key 'explore.grace_period' ({self.explore.grace_period}) must be below "
                                 f"train.steps ({t.steps})")
        if t.steps < 2:
            raise LayercardError(f"config key 'train.steps' must be >= 2 with mode=explore, got {t.steps}")

    @property
    def grace_period(self) -> int:
        """The first rung of mode=explore, in steps."""
        return self.explore.grace_period or max(1, self.train_config.steps // 6)

    def _check_asha(self, t: TrainConfig) -> None:
        # ASHA decides on `quality` (label loss, else eval loss): every report a trial sends must carry one.
        if t.eval_every is None:
            raise LayercardError("config key 'train.eval_every' must be set when ASHA is on: it stops trials on the "
                                 "eval loss they report along the way")
        for key in ("report_every", "checkpoint_every"):
            if getattr(t, key) % t.eval_every:
                raise LayercardError(f"config key 'train.{key}' ({getattr(t, key)}) must be a multiple of "
                                     f"train.eval_every ({t.eval_every}): ASHA needs eval_loss in every report")
        if self.asha.grace_period > t.steps:
            raise LayercardError(f"config key 'asha.grace_period' ({self.asha.grace_period}) exceeds "
                                 f"train.steps ({t.steps})")
        if self.asha.max_t is not None and self.asha.max_t > t.steps:
            raise LayercardError(f"config key 'asha.max_t' ({self.asha.max_t}) exceeds train.steps ({t.steps})")

    @property
    def use_asha(self) -> bool:
        if self.mode == "explore":
            return False
        return self.mode == "subsets" if self.asha.enabled is None else self.asha.enabled

    def to_dict(self) -> dict:
        """The config as loaded (``train`` as given), JSON-able; ``from_dict`` rebuilds it."""
        out = {}
        for f in dataclasses.fields(self):
            if f.init:
                v = getattr(self, f.name)
                out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
        return out


def _check_list(key: str, values: list, ok, what: str, nonempty: bool = False) -> None:
    if nonempty and not values:
        raise LayercardError(f"config key '{key}' must not be empty")
    for i, v in enumerate(values):
        if not ok(v):
            raise LayercardError(f"config key '{key}[{i}]' must be {what}, got {v!r}")
