"""What the distributed profile's driver receives and holds as the model widens, and what Ray costs.

    python benchmarks/profile_scaling.py [--widths 128 256 512 1024] [--no-demo]

Tiny random Qwen3 models of growing width (hidden 128 → 1024, intermediate 2 × hidden, 4 layers, the
same 64 records of 64 tokens, 16 probe records, coupling on, cost analytic): each profiled on Ray
(2 actors, one slice, 2 shards) and in one process, one after the other on the same data. From the
Ray card's ``ray_layout``: the bytes the driver received from the actors and its
peak RSS; beside them the statistics' size (what a driver summing them would have received per
shard). The demo entry profiles SmolLM2-135M (128 calibration records, 16 probe records, coupling and
the measured cost on) on 2 actors and in one process.

Each profile runs in its own process (peak RSS is per process) against one local Ray cluster started
here first, as on a cluster where Ray is up before ``ray job submit``: the wall time is the profile's
(``run_profile``), Ray's own start-up excluded, everything else (actor start, model loads, data
read) included. Writes benchmarks/results/profile_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "profile_scaling.json"


def width_overrides(hidden: int) -> list[str]:
    return [f"model.config={{model_type: qwen3, hidden_size: {hidden}, num_hidden_layers: 4, num_attention_heads: 8, "
            f"num_key_value_heads: 4, head_dim: {hidden // 8}, intermediate_size: {2 * hidden}, vocab_size: 512}}",
            "model.dtype=float32", f"data.path={ROOT / 'configs/data/tiny.jsonl'}", "data.prompt_column=null",
            "data.answer_column=null", "data.num_samples=64", "data.max_seq_len=64", "data.batch_size=16",
            "coupling.probe_samples=16", "cost.measure=false"]


DEMO = ["data.num_samples=128", "coupling.probe_samples=16"]   # configs/profile-smollm2.yaml: SmolLM2-135M
RAY = ["ray.num_actors=2", "ray.layer_slices=1", "ray.num_shards=2", "ray.num_cpus_per_actor=1"]


def one(config: str, overrides: list[str]) -> dict:
    """Profile once in this process; the result as a dict (run by a child process)."""
    import resource

    from layercard.config import load_config
    from layercard.profile.config import ProfileConfig
    from layercard.profile.run import run_profile

    cfg = load_config(ProfileConfig, config, overrides)
    t0 = time.perf_counter()
    card = run_profile(cfg, progress=False)
    out = {"seconds": time.perf_counter() - t0, "stats_bytes": card.stats.nbytes,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    out.update({k: card.meta.get("ray_layout", {}).get(k) for k in
                ("driver_bytes_received", "driver_peak_rss_bytes")})
    return out


def run_child(config: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--one", config, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LAYERCARD_VERBOSE": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"profile failed ({' '.join(overrides[-3:])}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--no-demo", action="store_true", help="skip the SmolLM2 entry (needs `layercard fetch`)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1:])))
        return 0

    import ray

    ctx = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    os.environ["RAY_ADDRESS"] = ctx.address_info["address"]
    tiny = str(ROOT / "configs" / "tiny.yaml")
    rows = []
    try:
        for h in args.widths:
            r = run_child(tiny, [*width_overrides(h), *RAY])
            s = run_child(tiny, [*width_overrides(h), "ray.num_actors=0"])
            rows.append({"hidden": h, "stats_bytes": r["stats_bytes"],
                         "driver_bytes_received": r["driver_bytes_received"],
                         "driver_peak_rss_bytes": r["driver_peak_rss_bytes"],
                         "single_peak_rss_bytes": s["peak_rss_bytes"],
                         "ray_profile_s": round(r["seconds"], 2), "single_profile_s": round(s["seconds"], 2)})
            print(f"hidden {h}: done", flush=True)
        demo = None
        if not args.no_demo:
            smol = str(ROOT / "configs" / "profile-smollm2.yaml")
            r = run_child(smol, [*DEMO, *RAY])
            s = run_child(smol, [*DEMO, "ray.num_actors=0"])
            demo = {"ray_profile_s": round(r["seconds"], 2), "single_profile_s": round(s["seconds"], 2),
                    "driver_bytes_received": r["driver_bytes_received"],
                    "driver_peak_rss_bytes": r["driver_peak_rss_bytes"], "stats_bytes": r["stats_bytes"]}
    finally:
        ray.shutdown()

    print(f"{'hidden':>6} {'stats MiB':>10} {'driver recv MiB':>16} {'driver RSS MiB':>15} "
          f"{'ray s':>7} {'single s':>9} {'ray/single':>11}")
    for w in rows:
        print(f"{w['hidden']:>6} {w['stats_bytes'] / 2**20:>10.1f} {w['driver_bytes_received'] / 2**20:>16.2f} "
              f"{w['driver_peak_rss_bytes'] / 2**20:>15.0f} "
              f"{w['ray_profile_s']:>7.1f} {w['single_profile_s']:>9.1f} "
              f"{w['ray_profile_s'] / w['single_profile_s']:>10.2f}×")
    if demo:
        print(f"demo (SmolLM2, 128 records, 16 probe, 2 actors): Ray {demo['ray_profile_s']:.1f} s, one process "
              f"{demo['single_profile_s']:.1f} s ({demo['ray_profile_s'] / demo['single_profile_s']:.2f}×)")
    sys.path.insert(0, str(ROOT))
    from benchmarks.provenance import commit

    doc = {"command": "python benchmarks/profile_scaling.py " + " ".join(sys.argv[1:]), "commit": commit(),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.machine()},
           "widths": rows, "demo": demo}
    from layercard.atomic import atomic_write_text

    atomic_write_text(Path(args.out), json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
