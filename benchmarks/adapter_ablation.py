"""Does the all-layer LoRA run say which layers pay? A measured predictor from the reference run.

Every search trains LoRA on all layers (the reference its gain fractions are measured against). This
benchmark takes that run's adapter (seed 0, the task's recipe, trained here in one process with the
loop a Ray Train worker runs, so it is the same run) and evaluates the model with only some of its
layers' adapters switched on (the others' ``lora_B`` zeroed), on the same eval split:

- ``only``: each layer's adapter alone, ``base − q({ℓ})``;
- ``drop`` (with ``--drop``): all but one, ``q(all − ℓ) − q(all)``;
- ``restricted``: every measured set S, its own adapters of the all-layer run, as a gain fraction
  ``(base − q(S)) / (base − q(all))``.

Each is scored like the card's predictors (``benchmarks/predictors.py``): within-k Spearman ρ with the
measured gain fractions of the paper table's sets (seed means), and, with ``--searches``, over every
set a search trained to the end at its k on seed 0. No constant is fitted.

    python benchmarks/adapter_ablation.py --task sentiment --search runs/paper-label/sentiment/explore-k5 \\
        --searches runs/paper-label/sentiment/explore-k5 runs/paper-label/sentiment/explore-k5-ablation

Writes ``RESULTS/adapter_ablation_<task>.json`` (the evaluated qualities too, so a score can be
recomputed) and prints the table. The adapter is kept under ``--work`` and reused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.provenance import commit, machine  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"


def _predictors():
    import importlib.util

    spec = importlib.util.spec_from_file_location("predictors", ROOT / "benchmarks" / "predictors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_reference(scfg, card, plan, work: Path, seed: int) -> tuple[Path, dict]:
    """The search's all-layer trial on ``seed`` (same LoRA, same loop), its adapter saved under ``work``
    (reused when there)."""
    from layercard.search.setup import trial_lora
    from layercard.train.local import run_trial
    from layercard.train.worker import worker_config

    adapter = work / f"all-s{seed}"
    metrics_file = work / f"all-s{seed}.json"
    if adapter.is_dir() and metrics_file.is_file():
        return adapter, json.loads(metrics_file.read_text())
    base = worker_config(scfg.train_config, plan, work / "storage")
    lora, layers = trial_lora(card, [int(l) for l in card.layers["layer"]], scfg)
    reports = run_trial(base, {"seed": seed, "lora": lora, "layers": layers}, plan, adapter_dir=adapter)
    final = {k: v for k, v in reports[-1].items() if isinstance(v, (int, float, str, bool)) or v is None}
    from layercard.atomic import atomic_write_json

    atomic_write_json(metrics_file, final)      # last: an adapter without it is trained again
    return adapter, final


class Restricted:
    """The base model with the reference adapter, able to switch off any layers' adapters."""

    def __init__(self, cfg, plan, adapter: Path, n_examples: int | None):
        import torch
        from peft import PeftModel

        from layercard.models import load_model

        from layercard.discovery import find_blocks

        lm = load_model(cfg.model)
        self.model = PeftModel.from_pretrained(lm.model, str(adapter)).eval()
        _, blocks = find_blocks(self.model)
        self.b = {}        # layer → [(its lora_B weight, a copy)]
        for layer, block in enumerate(blocks):
            for mod in block.modules():
                if "default" in getattr(mod, "lora_B", {}):
                    w = mod.lora_B["default"].weight
                    self.b.setdefault(layer, []).append((w, w.detach().clone()))
        self.layers = sorted(self.b)
        self.eval_rows = plan.eval[:n_examples] if n_examples else plan.eval
        self.cfg, self.pad_id, self.label_ids = cfg, plan.pad_id, plan.label_token_ids
        self.torch = torch

    def quality(self, on: set[int] | None) -> float:
        """The eval quality with only the adapters of ``on`` (None: every layer's): the mean label loss,
        or the mean LM loss per supervised token, as the trainer's eval computes it (the LM head run on
        the supervised rows only)."""
        from layercard.train.local import RowShard
        from layercard.train.losses import loss_count, supervised_loss_sum
        from layercard.train.worker import _batches_once

        torch = self.torch
        total, count = 0.0, 0
        with torch.no_grad():
            for layer, mods in self.b.items():
                for w, saved in mods:
                    w.copy_(saved if on is None or layer in on else torch.zeros_like(saved))
            for batch in _batches_once(RowShard(self.eval_rows), self.cfg.batch_size, self.pad_id):
                total += float(supervised_loss_sum(self.model, batch["input_ids"], batch["attention_mask"],
                                                   batch["labels"], self.label_ids))
                count += loss_count(batch["labels"], self.label_ids)
        return total / count


class Cache:
    """Evaluated qualities by layer set, written down as each is measured (a rerun skips them)."""

    def __init__(self, path: Path, restricted: Restricted):
        self.path, self.r = path, restricted
        self.q: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, on: set[int] | None) -> float:
        from layercard.atomic import atomic_write_json

        key = "all" if on is None else ",".join(map(str, sorted(on)))
        if key not in self.q:
            self.q[key] = self.r.quality(on)
            atomic_write_json(self.path, self.q)
        return self.q[key]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True)
    p.add_argument("--search", required=True, type=Path, help="a finished search of the task (its recipe)")
    p.add_argument("--searches", type=Path, nargs="*", default=[], help="searches whose sets are pooled too")
    p.add_argument("--table", type=Path, default=RESULTS / "paper_table.json")
    p.add_argument("--work", type=Path, default=None, help="where the reference adapter goes (default: SEARCH/..)")
    p.add_argument("--eval-examples", type=int, default=None, help="eval on the first N of the eval split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop", action="store_true", help="also evaluate all layers but one, for each layer")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    from layercard.atomic import atomic_write_json
    from layercard.config import from_dict
    from layercard.search.config import SearchConfig
    from layercard.card.layer_card import LayerCard
    from layercard.search.run import read_saved_search
    from layercard.train.worker import prepare

    started = time.time()
    pred = _predictors()
    saved = read_saved_search(a.search.resolve())
    scfg = from_dict(SearchConfig, {**saved["config"], "resume": False})
    cfg = scfg.train_config
    card = LayerCard.load(Path(saved["card"]), with_stats=False)
    plan = prepare(cfg)
    work = (a.work or a.search.resolve().parent / "adapter-ablation")
    work.mkdir(parents=True, exist_ok=True)
    adapter, ref = train_reference(scfg, card, plan, work, a.seed)
    print(f"reference: all layers, seed {a.seed}: quality {ref['quality']:.4f} (base {ref['initial_quality']:.4f})",
          flush=True)

    rows = json.loads(a.table.read_text())
    sets = pred.measured_sets(rows, a.task)
    pooled = pred.search_sets(list(a.searches), a.task, rows) if a.searches else None
    r = Restricted(cfg, plan, adapter, a.eval_examples)
    quality = Cache(work / f"qualities-s{a.seed}-{len(r.eval_rows)}.json", r)

    q_all = quality(None)
    q_base = quality(set())
    print(f"restricted evals on {len(r.eval_rows)} examples: all {q_all:.4f}, none {q_base:.4f}", flush=True)
    only = {}
    for l in r.layers:
        only[l] = q_base - quality({l})
        print(f"  layer {l} alone: {only[l]:+.4f}", flush=True)
    todo = {tuple(ls) for v in sets.values() for ls, _ in v} | (set(pooled[2]) if pooled else set())
    for i, ls in enumerate(sorted(todo)):
        print(f"  set {i + 1}/{len(todo)} {list(ls)}: {quality(set(ls)):.4f}", flush=True)
    drop = {}
    if a.drop:
        for l in r.layers:
            drop[l] = quality(set(r.layers) - {l}) - q_all
            print(f"  layer {l} dropped: {drop[l]:+.4f}", flush=True)

    def restricted(ls) -> float:
        return (q_base - quality(set(ls))) / (q_base - q_all)

    scores = {"restricted all-layer adapter": restricted,
              "Σ only (each layer's adapter alone)": lambda ls: sum(only[l] for l in ls),
              **({"Σ drop (all but one layer)": lambda ls: sum(drop[l] for l in ls)} if drop else {})}
    measured = {k: np.array([g for _, g in v]) for k, v in sets.items()}
    board = {"task": a.task, "seed": a.seed, "eval_examples": len(r.eval_rows), "reference": ref,
             "q_all": q_all, "q_none": q_base, "only": only, "drop": drop, "qualities": quality.q, "within_k": {}, "pooled": {}}
    for name, fn in scores.items():
        sc = {k: np.array([fn(ls) for ls, _ in v]) for k, v in sets.items()}
        board["within_k"][name] = pred.within_k(sc, measured, 2000)
        if pooled:
            k, _, gf = pooled
            lsets = sorted(gf)
            board["pooled"][name] = pred.within_k({k: np.array([fn(ls) for ls in lsets])},
                                                  {k: np.array([gf[ls] for ls in lsets])}, 2000)
    board["meta"] = {"command": "python benchmarks/adapter_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "commit": commit(), "machine": machine(),
                     "minutes_this_invocation": round((time.time() - started) / 60, 1),
                     "evals_cached": len(quality.q)}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / f"adapter_ablation_{a.task}.json", board, default=float)
    print(f"\n{a.task}: within-k Spearman ρ with the measured gain fraction")
    print("| score | " + " | ".join(f"k = {k}" for k in sorted(sets)) + " | mean | p | pooled |")
    for name in scores:
        w = board["within_k"][name]
        pl = board["pooled"].get(name)
        print(f"| {name} | " + " | ".join(f"{w['per_k'][str(k)]:+.2f}" for k in sorted(sets))
              + f" | {w['mean']:+.2f} | {w['p_value']:.3f} | {'' if pl is None else format(pl['mean'], '+.2f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
