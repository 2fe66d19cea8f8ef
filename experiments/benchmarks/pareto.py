"""Pareto front: is the search worth it against the networks researchers design by hand?

On the tiny world (`experiments/tiny.yaml`), runs `diffnas sweep --compare` over latency
targets × seeds: per (target, seed) the evolution, then Optuna and the best of N random legal
networks at the evolution's own evaluation budget (images scored); then judges every found
network, the space's hand designs (experiments/designs/: BK-SDM Base / Small / Tiny, SnapGen)
and the original on the world's held-out prompts (nas.search.run.held_out_prompts), once per seed,
all on the world's supernet as built (fine-tuning: none for all). See docs/pareto.md.

The targets are each hand design's own latency (its predicted latency over the original's,
rounded down to 0.01; designs within 0.03 of each other share the lowest) plus the profile's
extra ratios not within 0.03 of a design's, so that at every design's latency there is an
evolved network as fast.

Headline, last line: `pareto_min_margin_sigma: X`, the smallest margin over the hand designs
of the best evolved network (mean over seeds) whose predicted latency is at most the design's:
its mean held-out CLIP minus the design's, in combined standard errors (seed to seed). The
line before, `pareto_found_beats_designs: k/n`: of the n hand designs, k are beaten by more
than 2 of those units; the JSON gives each design's verdict (beaten / matched / lost).

Also, for the sd15 space: each hand design's and SnapFusion's Table 3 network's parameters
and predicted latency on a CPU sd15 table at its own size (latent 64×64, batch 2), measured
here on first use into the cache (`<DIFFNAS_CACHE>/sd15_cpu.db`, then reused).

Writes experiments/benchmarks/results/pareto.json and pareto.png.

    python experiments/benchmarks/pareto.py                  # quick: design targets + 0.4, 2 seeds
    python experiments/benchmarks/pareto.py --profile full   # + 0.8/0.65/0.5/0.35, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance

from latency.coreml import cache_dir
from latency.predict import Predictor
from nas.experiment import load_experiment
from nas.search.pareto import CompareSpec, default_designs
from nas.search.run import experiment_space, latency_table
from nas.search.sweep import local_cpus, run_sweep
from search_spaces import Architecture, load_space

RESULTS = Path(__file__).parent / "results"
EXPERIMENT = Path(__file__).parents[1] / "tiny.yaml"
PROFILES = {  # extra target ratios, seeds per target, judging noises per prompt
    "quick": {"extra": [0.4], "seeds": 2, "noises": 2},
    "full": {"extra": [0.8, 0.65, 0.5, 0.35], "seeds": 3, "noises": 2},
}


def design_targets(ratios: dict[str, float], merge: float = 0.03) -> list[float]:
    """Each design's latency ratio rounded down to 0.01; designs within `merge` of a lower one
    share its target (an evolved network within it is as fast as each of them)."""
    out: list[float] = []
    for r in sorted(math.floor(100 * r) / 100 for r in ratios.values()):
        if not out or r - out[-1] > merge + 1e-9:  # 0.63 - 0.60 is 0.0300...03 in floats
            out.append(r)
    return out


def sweep_targets(ratios: dict[str, float], extra: list[float], merge: float = 0.03) -> list[float]:
    """The design targets plus the extra ratios, highest first. An extra ratio within `merge`
    of a design's target is left out: the front already has a point there, and each target
    costs a search per seed with its two baselines (a quarter of the full profile's time)."""
    designs = design_targets(ratios, merge)
    kept = [t for t in extra if all(abs(t - d) > merge + 1e-9 for d in designs)]
    return sorted(set(designs) | set(kept), reverse=True)


def sd15_designs(args) -> dict:
    """Parameters and predicted CPU latency of sd15's hand designs and Table 3 network."""
    from latency.backends import get_backend
    from latency.profile import build_table
    from latency.table import LatencyTable

    space = load_space("sd15")
    db = args.sd15_db or cache_dir() / "sd15_cpu.db"
    backend = get_backend("torch", repeats=args.sd15_repeats, warmup=1, threads=1)
    start = time.perf_counter()
    with LatencyTable(db) as table:
        built = build_table(space, table, backend, "cpu-local", progress=False)  # lacking only
        predictor = Predictor(space, table, "cpu-local")
        builds = [
            {k: b[k] for k in ("spread", "max_spread", "blocks", "created")}
            for b in table.builds("cpu-local")
            if b["space"] == space.name
        ]
        origin = predictor.predict(space.original()).total_ms
        rows = {"original": {"params": space.params(space.original()), "latency_ms": origin}}
        for name, file in default_designs(space).items():
            arch = Architecture.load(file)
            ms = predictor.predict(arch).total_ms
            rows[name] = {"params": space.params(arch), "latency_ms": ms, "ratio": ms / origin}
    return {
        "table": str(db),
        "device": "cpu-local (torch, 1 thread)",
        "latent": list(space.latent),
        "batch": space.batch,
        "seconds_with_build": time.perf_counter() - start,
        "measured_now": len(built.measured),  # 0: the table was complete (measured earlier)
        # the builds that measured the table: a spread above max_spread means a busy machine
        "builds": builds,
        "networks": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default="quick")
    ap.add_argument("--experiment", type=Path, default=EXPERIMENT)
    ap.add_argument("--seeds", type=int, default=None, help="default: the profile's")
    ap.add_argument(
        "--extra", default=None, help="extra target ratios, comma-separated ('' for none)"
    )
    ap.add_argument("--judge-steps", type=int, default=20, help="DDIM steps of the judging")
    ap.add_argument("--workers", type=int, default=None, help="trials at a time (default: CPUs)")
    ap.add_argument("--runs", type=Path, default=None, help="keep the sweep here (default: tmp)")
    ap.add_argument("--sd15", choices=["table", "skip"], default="table")
    ap.add_argument("--sd15-db", type=Path, default=None)
    ap.add_argument("--sd15-repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "pareto.json")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    seeds = args.seeds or profile["seeds"]
    start = time.perf_counter()
    exp = load_experiment(args.experiment, **{"ray.workers": args.workers or local_cpus()})
    space = experiment_space(exp)
    with latency_table(exp, space, progress=True) as table:
        predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
        origin = predictor.predict(space.original()).total_ms
        designs = default_designs(space)
        ratios = {
            n: predictor.predict(Architecture.load(f)).total_ms / origin for n, f in designs.items()
        }
    extra = (
        profile["extra"] if args.extra is None else [float(t) for t in args.extra.split(",") if t]
    )
    targets = sweep_targets(ratios, extra)
    print(f"design latency ratios: {ratios}; targets {targets} x {seeds} seeds", flush=True)
    spec = CompareSpec(designs, noises=profile["noises"], steps=args.judge_steps)
    runs = args.runs or Path(tempfile.mkdtemp(prefix="pareto-"))
    name = f"pareto-{args.profile}"
    if (runs / name / "sweep_config.json").is_file():  # an earlier run cut short: continue it
        result = run_sweep(exp, None, None, resume=runs / name)
    else:
        result = run_sweep(exp, targets, seeds, runs=runs, name=name, compare=spec)
    compare = json.loads((result.path / "compare.json").read_text())
    config = json.loads((result.path / "sweep_config.json").read_text())
    targets, seeds = config["targets"], len(config["seeds"])  # a continued run's own
    sweep_seconds = time.perf_counter() - start
    sd15 = sd15_designs(args) if args.sd15 == "table" else None

    verdicts = compare["summary"]["designs"]
    beaten = sum(v["verdict"] == "beaten" for v in verdicts)
    sigmas = [v["margin"]["sigma"] for v in verdicts if v["margin"] and v["margin"]["sigma"]]
    out = {
        "benchmark": "pareto",
        "profile": args.profile,
        "targets": targets,
        "seeds": seeds,
        "design_ratios": ratios,
        "sweep": str(result.path),
        "sweep_seconds": sweep_seconds,
        "headline": {
            "found_beats_designs": f"{beaten}/{len(verdicts)}",
            "rule": "beaten: the best evolved network (mean over seeds) at most as slow as the "
            "design (predicted) has a mean held-out CLIP higher by > 2 combined standard errors",
            "min_margin_sigma": min(sigmas) if sigmas else None,
        },
        "compare": {k: compare[k] for k in ("protocol", "fine_tuning", "budgets", "summary")},
        "points": compare["points"],
        "sd15": sd15,
    }
    out |= provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    shutil.copy(result.path / "front.png", args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    for g in compare["summary"]["groups"]:
        if g["method"] in ("evolution", "optuna", "random"):
            c = g["clip"]
            print(
                f"{g['method']:>9} at {g['target_ratio']:.2f}: {g['latency_ms']['mean']:.2f} ms, "
                f"CLIP {c['mean']:.2f} ± {c['sd']:.2f}"
            )
    for v in verdicts:
        m = v["margin"]
        sigma = "" if not m or m["sigma"] is None else f" ({m['sigma']:+.1f} sigma)"
        margin = "" if not m else f", margin {m['clip']:+.2f}{sigma}"
        print(
            f"{v['design']}: {v['latency_ms']:.2f} ms, CLIP {v['clip']:.2f}: {v['verdict']}{margin}"
        )
    if sd15:
        for name, r in sd15["networks"].items():
            print(f"sd15 {name}: {r['params'] / 1e6:.1f}M, {r['latency_ms']:.0f} ms predicted")
    print(f"sweep wall time: {sweep_seconds / 60:.1f} min on {torch.get_num_threads()} threads")
    mins = out["headline"]["min_margin_sigma"]
    print(f"pareto_found_beats_designs: {beaten}/{len(verdicts)}")
    print(f"pareto_min_margin_sigma: {'n/a' if mins is None else f'{mins:.2f}'}")


if __name__ == "__main__":
    main()
