"""Evolution vs Optuna at the same evaluation budget, on the tiny world.

Runs, side by side in one process, on the same experiment, target and seed:

1. the evolution (`diffnas search`, the paper's Alg. 1), and counts the architectures it
   scored: per iteration the current one and every legal removal;
2. the Optuna strategy (`diffnas search --strategy optuna`) with exactly that many
   architectures to score (`--trials`).

Each strategy delivers an architecture within the target. Their CLIP scores are compared
two ways, with the same prompts and initial noises:

- as delivered: the evolution's network carries the supernet weights it fine-tuned while
  searching (`train_steps` per iteration); Optuna's carries the world's supernet as built;
- on the same weights: both architectures scored on the world's supernet (what the search
  strategy found, with the training left out). The headline is this one.

Writes experiments/benchmarks/results/strategy_compare.json (strategy_compare_miniature.json
with --miniature); the last line printed is `optuna_minus_evolution_clip: X` (same weights).

    python experiments/benchmarks/strategy_compare.py                # the tiny world
    python experiments/benchmarks/strategy_compare.py --miniature    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance

from nas.experiment import load_experiment
from nas.search.evolve import RunDir
from nas.search.optuna import run_optuna
from nas.search.run import experiment_space, make_evaluator, open_world, run_search

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).parent / "results"
# the miniature world exercises the code paths in seconds (its models are barely trained)
MINIATURE = {
    "world.miniature": True,
    "search.max_iterations": 2,
    "search.train_steps": 1,
    "search.batch_size": 4,
    "evaluation.prompts": 4,
    "evaluation.steps": 2,
    "evaluation.batch_size": 4,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "tiny.yaml")
    parser.add_argument("--target-ratio", type=float, default=None, help="default: the file's")
    parser.add_argument("--seed", type=int, default=None, help="default: the file's")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--miniature", action="store_true", help="the test world (smoke run)")
    parser.add_argument("--runs", type=Path, default=None, help="keep the run directories here")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    if args.out is None:
        name = "strategy_compare_miniature.json" if args.miniature else "strategy_compare.json"
        args.out = RESULTS / name
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"target.ratio": args.target_ratio, "seed": args.seed}
    if args.miniature:
        overrides.update(MINIATURE)
    exp = load_experiment(args.experiment, **overrides)
    runs = args.runs or Path(tempfile.mkdtemp(prefix="strategy_compare-"))
    start = time.perf_counter()

    # 1. the evolution, and the architectures it scored
    t0 = time.perf_counter()
    evolution = run_search(exp, runs=runs, name="evolution")
    evolution_seconds = time.perf_counter() - t0
    history = RunDir(evolution.run_dir).history()
    budget = sum(1 + len(h["actions"]) for h in history)
    print(f"evolution: {len(history)} iteration(s), {budget} architectures scored")

    # 2. Optuna with the same number of architectures to score
    t0 = time.perf_counter()
    study = run_optuna(exp, budget, runs=runs, name="optuna")
    optuna_seconds = time.perf_counter() - t0

    # 3. both architectures on the same weights (the world's supernet), same protocol
    space = experiment_space(exp)
    world = open_world(exp, space, progress=False)
    evaluator = make_evaluator(exp, world)
    same = {
        "evolution": evaluator.clip_score(evolution.arch),
        "optuna": evaluator.clip_score(study.arch),
        "original": evaluator.clip_score(space.original()),
    }
    evo_result = json.loads((evolution.run_dir / "result.json").read_text())
    opt_report = json.loads((study.run_dir / "optuna.json").read_text())
    result = {
        "experiment": exp.model_dump(mode="json"),
        "miniature": args.miniature,
        "target_ms": evolution.target_ms,
        "budget_architectures_scored": budget,
        "evolution": {
            "arch_hash": evolution.arch.hash,
            "latency_ms": evolution.latency_ms,
            "target_met": evo_result["target_met"],
            "clip_as_delivered": evolution.clip,  # on the supernet it fine-tuned
            "clip_same_weights": same["evolution"],
            "iterations": len(history),
            "architectures_scored": budget,
            "params": evo_result["params"]["found"],
            "seconds": evolution_seconds,
        },
        "optuna": {
            "arch_hash": study.arch.hash,
            "latency_ms": study.latency_ms,
            "target_met": study.latency_ms <= study.target_ms,
            "clip_as_delivered": study.clip,  # on the world's supernet
            "clip_same_weights": same["optuna"],
            "architectures_scored": study.iterations,
            "trials_in_study": opt_report["trials_in_study"],
            "pruned_illegal": sum(t["state"] == "pruned" for t in opt_report["trials"]),
            "repeated": sum(t["duplicate_of"] is not None for t in opt_report["trials"]),
            "pareto_front_size": len(opt_report["pareto_front"]),
            "seconds": optuna_seconds,
        },
        "original_clip_same_weights": same["original"],
        "optuna_minus_evolution_clip": same["optuna"] - same["evolution"],
        "optuna_minus_evolution_clip_as_delivered": study.clip - evolution.clip,
        "runs": str(runs),
        "seconds": time.perf_counter() - start,
    }
    result |= provenance(args)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    e, o = result["evolution"], result["optuna"]
    print(f"wrote {args.out}")
    print(f"target: {result['target_ms']:.2f} ms; budget: {budget} architectures scored each")
    for name, r in (("evolution", e), ("optuna", o)):
        print(
            f"{name:>9}: {r['latency_ms']:.2f} ms (met: {r['target_met']}), CLIP "
            f"{r['clip_same_weights']:.2f} same weights, {r['clip_as_delivered']:.2f} as "
            f"delivered, {r['architectures_scored']} scored, {r['seconds']:.0f} s"
        )
    print(f"optuna_minus_evolution_clip: {result['optuna_minus_evolution_clip']:.3f}")


if __name__ == "__main__":
    main()
