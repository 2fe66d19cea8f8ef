"""Action evaluation on Ray: 2 actors against in-process evaluation, and what Ray costs.

On the default tiny world (`load_tiny_world()`, built on first use) and the evaluation
protocol of experiments/tiny.yaml (its prompts, DDIM steps, CFG), evaluates every removal
action of the full architecture — what one evolution iteration scores — three ways, side by
side in one run:

  (a) in process: `Evaluator.evaluate` (what `--workers 1` does), torch with 1 thread;
  (b) a Ray pool with 1 actor  (`RayEvaluator`, 1 CPU and 1 torch thread per actor);
  (c) a Ray pool with 2 actors.

One local Ray instance holds both pools (3 logical CPUs, so the idle pool's actor keeps its
place; only the pool being timed computes); everything runs on CPUs, GPUs or not. The actors
are started, have loaded the world and scored one architecture before any timing. Each round
times (a), (b) and (c) once, in a rotating order, so drift in machine load hits all three
alike; the time per action is the median over rounds of (wall time of the whole evaluation)
/ (number of actions), as the search's driver sees it. The three must give the same values
(max |ΔCLIP| difference reported).

The headline is what a user gains over what she runs without Ray: speed-up = (a) / (c)
(target >= 1.6 on two cores). Beside it: overhead = (b) / (a) per action (target <= 1.10) and
the scaling (b) / (c). Run it on an otherwise idle machine: it needs both cores.

    python experiments/benchmarks/ray_scaling.py               # default world, 3 rounds
    python experiments/benchmarks/ray_scaling.py --miniature   # smoke run: the miniature world

Writes experiments/benchmarks/results/ray_scaling.json (ray_scaling_miniature.json with
--miniature); the last line printed is `ray_speedup_2_vs_in_process: X`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import ray
import torch
from provenance import provenance

from latency.predict import Predictor
from nas.cluster import RayCluster
from nas.experiment import RaySpec, load_experiment
from nas.search.ray import RayEvaluator
from nas.search.run import (
    experiment_space,
    latency_table,
    make_evaluator,
    open_evaluator,
    open_world,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"


def timed(evaluator, arch, predictor, base_clip: float) -> tuple[float, list]:
    start = time.perf_counter()
    values = evaluator.evaluate(arch, predictor, ("remove",), base_clip)
    return time.perf_counter() - start, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--miniature", action="store_true", help="the miniature world (smoke)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3; 1)")
    parser.add_argument(
        "--experiment", type=Path, default=ROOT / "experiments" / "tiny.yaml", help="protocol"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.miniature else 3)
    torch.set_num_threads(1)

    exp = load_experiment(args.experiment, **{"world.miniature": args.miniature or None})
    space = experiment_space(exp)
    table = latency_table(exp, space, progress=True)
    predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
    world = open_world(exp, space, progress=True)  # built (if need be) before any actor loads
    local = make_evaluator(exp, world)
    arch = space.original()
    n = sum(a.kind == "remove" for a in space.actions(arch))
    load_1min = os.getloadavg()[0]
    print(
        f"world {world.folder.name if world.folder else '?'}"
        f"{' (miniature)' if args.miniature else ''}: {n} removal actions, "
        f"{len(local.prompts)} prompts, {exp.evaluation.steps} DDIM steps; load {load_1min:.2f}"
    )

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    pools: dict[str, RayEvaluator] = {}
    try:
        t0 = time.perf_counter()
        for name, workers in (("ray_1", 1), ("ray_2", 2)):
            cluster = RayCluster.connect(RaySpec(workers=workers, gpus=False))  # CPU vs CPU
            pools[name] = RayEvaluator(local, partial(open_evaluator, exp), cluster)
        for pool in pools.values():
            pool.nodes()  # started, world loaded
        actors_start_s = time.perf_counter() - t0
        base_clip = local.clip_score(arch)  # also the in-process warm-up
        for pool in pools.values():  # weights shipped and loaded, first forward done
            assert abs(pool.clip_score(arch) - base_clip) < 1e-3
        setups = {"in_process": local, **pools}
        times: dict[str, list[float]] = {k: [] for k in setups}
        values: dict[str, list] = {}
        names = list(setups)
        for r in range(rounds):
            order = names[r % 3 :] + names[: r % 3]
            for name in order:
                seconds, got = timed(setups[name], arch, predictor, base_clip)
                times[name].append(seconds)
                values[name] = got
                each = seconds / n
                print(f"round {r + 1}/{rounds} {name:10s} {seconds:8.2f} s ({each:.3f} s/action)")
    finally:
        for pool in pools.values():
            pool.close()
        ray.shutdown()
        table.close()

    per_action = {k: statistics.median(v) / n for k, v in times.items()}
    overhead = per_action["ray_1"] / per_action["in_process"]
    scaling = per_action["ray_1"] / per_action["ray_2"]
    speedup = per_action["in_process"] / per_action["ray_2"]
    ref = values["in_process"]
    max_diff = max(
        abs(a.delta_clip - b.delta_clip)
        for k in ("ray_1", "ray_2")
        for a, b in zip(ref, values[k], strict=True)
    )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "load_1min_at_start": load_1min,
        },
        "world": {
            "miniature": args.miniature,
            "folder": str(world.folder) if world.folder else None,
            "actions": n,
            "prompts": len(local.prompts),
            "steps": exp.evaluation.steps,
            "cfg": exp.evaluation.cfg,
        },
        "rounds": rounds,
        "seconds": times,
        "seconds_per_action": per_action,
        "actor_seconds_per_action": {
            k: sum(v.seconds for v in values[k]) / n for k in ("ray_1", "ray_2")
        },
        "speedup_2_vs_in_process": speedup,  # the headline
        "overhead_ray1_vs_in_process": overhead,
        "scaling_2v1": scaling,
        "max_delta_clip_difference": max_diff,
        "ray_start_seconds": ray_start_s,
        "actors_start_seconds": actors_start_s,
        "targets": {"speedup_2_vs_in_process_min": 1.6, "overhead_max": 1.10},
    }
    result |= provenance(args)
    out = args.out or RESULTS / (
        "ray_scaling_miniature.json" if args.miniature else "ray_scaling.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in per_action.items():
        print(f"{k:10s} {v:.3f} s/action")
    print(f"max |ΔCLIP| difference to in-process: {max_diff:.2e}")
    print(f"Ray startup {ray_start_s:.1f} s, actors (world loaded) {actors_start_s:.1f} s")
    print(f"wrote {out}")
    print(f"Ray, 1 actor vs in process: {overhead:.3f}x the time per action (target <= 1.10)")
    print(f"Ray, 2 actors vs 1: {scaling:.2f}x faster")
    print(f"ray_speedup_2_vs_in_process: {speedup:.2f}")


if __name__ == "__main__":
    main()
