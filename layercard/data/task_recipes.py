"""How each real task (:mod:`layercard.data.tasks`) overrides the SmolLM2 profile and search configs: the
recipe every benchmark of the two tasks shares, and the task's Layer Card under a work directory."""
from __future__ import annotations

from pathlib import Path

__all__ = ["TASKS", "ensure_card"]

from layercard.data.tasks import OUTLET_ANSWERS

_answers = "[" + ", ".join(f'"{a}"' for a in OUTLET_ANSWERS) + "]"   # a YAML list keeping the leading spaces

TASKS = {
    # label loss (log-softmax over the two answers' first tokens) is the sentiment quality
    "sentiment": {"profile": [], "train": [], "accuracy": True},
    # mean eval loss per title token; prompts are ~80 words, so longer sequences
    "headline": {
        "profile": ["data.path=cache:tasks/headline/calibration.jsonl", "data.max_seq_len=160",
                    "data.num_samples=128", "profile.loss=lm", "profile.label_answers=null",
                    # the LM loss gives K one rank per supervised title token (~15 a record)
                    "coupling.probe_samples=16",
                    # titles without an EOS, as the committed results were measured
                    "data.answer_eos=false"],
        "train": ["train.data.path=cache:tasks/headline/train.jsonl", "train.data.max_seq_len=160",
                  "train.eval_data.path=cache:tasks/headline/eval.jsonl", "train.eval_data.max_seq_len=160",
                  "train.eval_data.num_samples=200", "train.label_answers=null", "train.loss=lm",
                  "train.batch_size=4", "train.data.answer_eos=false", "train.eval_data.answer_eos=false"],
        # the trainer's exact match of a whole title (argmax at every title token) is ~0 for every set
        "accuracy": False,
    },
    # 9-way outlet classification from a news title; label loss over the outlets' first tokens
    "outlet": {
        "profile": ["data.path=cache:tasks/outlet/calibration.jsonl", "data.max_seq_len=48",
                    f"profile.label_answers={_answers}",
                    # each probe record gives K up to 8 ranks (9 answers)
                    "coupling.probe_samples=32"],
        "train": ["train.data.path=cache:tasks/outlet/train.jsonl", "train.data.max_seq_len=48",
                  "train.eval_data.path=cache:tasks/outlet/eval.jsonl", "train.eval_data.max_seq_len=48",
                  "train.eval_data.num_samples=300", f"train.label_answers={_answers}"],
        "accuracy": True,
    },
}


def ensure_card(task: str, work: Path, extra: list[str], profile_yaml: Path) -> Path:
    """WORK/TASK/card: the task's Layer Card, profiled from ``profile_yaml`` with the task's overrides
    (and ``extra``) when it is not there yet."""
    from layercard.config import load_config
    from layercard.profile.config import ProfileConfig
    from layercard.profile.run import run_profile

    card_dir = Path(work) / task / "card"
    if not (card_dir / "card.json").exists():
        cfg = load_config(ProfileConfig, profile_yaml, [*TASKS[task]["profile"], *extra])
        print(f"== {task}: profiling → {card_dir}", flush=True)
        run_profile(cfg).save(card_dir)
    return card_dir
