"""What a search trains, settled before any Ray work: the card checked against the model, the
candidates, the tokenized data, one trial per (candidate within budget, training seed)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layercard.card.layer_card import LayerCard
from layercard.data.examples import check_sequence_format
from layercard.errors import LayercardError
from layercard.models import legacy_hash_note
from layercard.search.config import SearchConfig
from layercard.select.candidates import Candidate, build_candidates, check_budget_fits, training_order
from layercard.train.worker import Plan, prepare


@dataclass
class Setup:
    cfg: SearchConfig
    out: Path
    card: LayerCard
    candidates: list[Candidate]
    plan: Plan                         # model identity and tokenized data
    trials: dict[str, dict]            # trial key → {candidate, seed, layers, lora}
    rungs: list[int] | None = None     # mode=explore: the successive-halving milestones (steps)
    extra_summary: list[str] | None = None   # mode=explore: its section of summary.md
    replays: dict | None = None        # fingerprint → Replay of the runs config key ``reuse`` names

    @property
    def storage(self) -> str:
        path = self.cfg.storage_path
        if path and "://" in path:
            return path
        return str(Path(path).expanduser().resolve()) if path else str(self.out / "tune")

    @property
    def experiment(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.cfg.name}"


def trial_key(candidate_id: str, seed: int) -> str:
    return f"{candidate_id}-s{seed}"


def check_card_for_model(card: LayerCard, card_dir: str, model_id: str, weights_hash: str) -> None:
    """The card must describe the model the trials train (its weights hash, docs/design.md §2)."""
    have = card.meta.get("weights_hash")
    if have != weights_hash:
        raise LayercardError(f"card '{card_dir}' was profiled on another model: its weights hash is {have} "
                             f"(model {card.meta.get('model_id')}), the search's train.model has weights hash "
                             f"{weights_hash} (model {model_id}){legacy_hash_note(card.meta)}")


def trial_lora(card: LayerCard, layers: list[int], cfg) -> tuple[dict, list[int] | None]:
    """The PEFT LoraConfig ``layercard select`` would write for ``layers``, as a JSON dict; the layers
    to pass the worker (None when the config names its layers in a regex: PEFT forbids both)."""
    from layercard.select.lora_config import build_lora_config
    from layercard.train.training import lora_to_dict

    t = cfg.train_config
    lora, _ = build_lora_config(card, layers, r=t.lora_r, alpha=t.lora_alpha)
    data = lora_to_dict(lora)
    return data, (None if isinstance(data.get("target_modules"), str) else list(layers))


def setup(cfg: SearchConfig, out: Path) -> Setup:
    """Load and check the card, build the candidates, tokenize the data: every input error before Ray."""
    if not cfg.card:
        raise LayercardError("search: give card=CARD_DIR (the Layer Card to search over)")
    card = LayerCard.load(Path(cfg.card).expanduser(), with_stats=False)
    plan = prepare(cfg.train_config)
    check_card_for_model(card, cfg.card, plan.model_id, plan.weights_hash)
    check_sequence_format(card.meta.get("sequences"), plan.sequences, f"card '{cfg.card}'")
    candidates = build_candidates(card, mode=cfg.mode, ks=cfg.ks, budget=cfg.budget, budget_unit=cfg.budget_unit,
                                  budget_fractions=cfg.budget_fractions, targets=cfg.targets,
                                  strategies=cfg.strategies, random_seeds=cfg.random_seeds,
                                  model=cfg.model, step_budget=recipe_step_budget(cfg.train_config), sets=cfg.sets)
    check_budget_fits(candidates, cfg.budget, cfg.budget_unit)
    trials = {}
    for c in training_order(candidates):        # Tune starts trials in this order
        if c.over_budget:
            continue
        lora, layers = trial_lora(card, c.layers, cfg)
        for seed in cfg.seeds:
            trials[trial_key(c.id, seed)] = {"candidate": c.id, "seed": seed, "layers": layers, "lora": lora}
    return Setup(cfg, out, card, candidates, plan, trials)


def recipe_step_budget(train) -> float:
    """ρ = Σ lr_t of the trials' recipe (what the adam/coverage set models need)."""
    from layercard.profile.adam_step import step_budget

    return step_budget(train.lr, train.steps, train.warmup_steps)
