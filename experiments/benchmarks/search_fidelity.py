"""Search fidelity: is the architecture the evolution finds better than chance, on more than
one latency table, and on weights the search did not tune for it?

For each of `--tables` independently measured latency tables (each a fresh measurement of
this machine, taken one after the other), runs the tiny search (`experiments/tiny.yaml`) and
scores, side by side on one held-out protocol:

- the full network (the original architecture);
- the found architecture: does it meet the target, is its CLIP within 5% of the full one's;
- `--random` random legal architectures of the same predicted latency (±5% of the found
  one's), each reached by removing random legal blocks from the original: the found one
  should beat their mean.

Held out means held out: the judging prompts are the world's validation prompts after the
`evaluation.prompts` the search scored (no scene in common with the search's prompts nor with
training: `nas.search.run.held_out_prompts`), with noises the search never drew. Every network is
scored twice: with the run's final supernet (fine-tuned along the search's path, so it
favours the found network) and with the world's untuned supernet. A result holds only if it
holds on both.

Writes experiments/benchmarks/results/search_fidelity.json; the last line printed is
`fidelity_found_vs_full_min: X` (the smallest found/full CLIP ratio over tables and weights).

    python experiments/benchmarks/search_fidelity.py                # 3 tables, 3 searches
    python experiments/benchmarks/search_fidelity.py --run runs/tiny-...   # judge one run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance

from latency.predict import Predictor
from latency.table import LatencyTable
from nas.experiment import load_experiment
from nas.search.evaluate import Evaluator, Protocol
from nas.search.run import held_out_prompts, latency_db, open_world, run_search
from nas.supernet import ElasticUNet
from search_spaces import Architecture, load_space

RESULTS = Path(__file__).parent / "results"
EXPERIMENT = Path(__file__).parents[1] / "tiny.yaml"
WEIGHTS = ("final", "world")  # the run's fine-tuned supernet, the world's untuned one


def random_at_latency(space, predictor, target_ms: float, seed: int, band: float = 0.05):
    """A random legal architecture whose predicted latency is within ±band of target_ms:
    random legal removals from the original until the latency is at most target*(1+band).
    None if the walk undershoots the band (the caller draws again)."""
    rng = random.Random(seed)
    arch = space.original()
    while predictor.predict(arch).total_ms > target_ms * (1 + band):
        removals = [a for a in space.actions(arch) if a.kind == "remove"]
        if not removals:
            return None
        arch = arch.apply(rng.choice(removals))
    return arch if predictor.predict(arch).total_ms >= target_ms * (1 - band) else None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", type=Path, default=EXPERIMENT)
    ap.add_argument("--run", type=Path, help="judge this finished run instead of searching")
    ap.add_argument("--tables", type=int, default=3, help="independently measured tables")
    ap.add_argument("--random", type=int, default=10, help="random architectures to compare")
    ap.add_argument(
        "--prompts", type=int, default=None, help="held-out prompts (default: all held out)"
    )
    ap.add_argument("--seeds", type=int, default=3, help="noises per prompt")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the judging protocol")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "search_fidelity.json")
    args = ap.parse_args(argv)
    if args.tables < 1:
        ap.error(f"--tables {args.tables}: give at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    exp = load_experiment(args.experiment)
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is not None:
            tables.append(judge(exp, args.run, args) | {"search_seconds": None})
        for i in range(0 if args.run else args.tables):
            # a table of its own, measured now: the search builds what its table lacks
            db = Path(tmp) / f"table{i}.db"
            exp_i = exp.model_copy(
                update={"latency": exp.latency.model_copy(update={"db": str(db)})}
            )
            start = time.perf_counter()
            result = run_search(exp_i, runs=Path(tmp), name=f"fidelity-{i}", progress=True)
            seconds = time.perf_counter() - start
            tables.append(judge(exp_i, result.run_dir, args) | {"search_seconds": seconds})
            print(f"table {i}: {summary_line(tables[-1])}", flush=True)
    out = {"benchmark": "search_fidelity", "tables": tables, "summary": summarise(tables)}
    out |= provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    s = out["summary"]
    print(f"target met on {s['target_met']} of {len(tables)} tables")
    for w in WEIGHTS:
        r = s[w]
        print(
            f"{w} weights: found/full {100 * r['found_vs_full_mean']:.1f}% "
            f"(range {100 * r['found_vs_full_min']:.1f}-{100 * r['found_vs_full_max']:.1f}%; "
            f"target >= 95%), margin over random {r['margin_mean']:+.2f} "
            f"(min {r['margin_min']:+.2f})"
        )
    print(f"fidelity_found_vs_full_min: {s['found_vs_full_min']:.4f}")


def summary_line(t: dict) -> str:
    parts = [f"{t['found_ms']:.2f} ms (target {t['target_ms']:.2f})"]
    for w in WEIGHTS:
        r = t[w]
        parts.append(
            f"{w}: full {r['full_clip']:.1f}, found {r['found_clip']:.1f} "
            f"({100 * r['found_vs_full']:.1f}%), random {r['random_mean']:.1f} ± "
            f"{r['random_std']:.1f}"
        )
    return "; ".join(parts)


def summarise(tables: list[dict]) -> dict:
    out = {"target_met": sum(t["target_met"] for t in tables)}
    for w in WEIGHTS:
        ratios = [t[w]["found_vs_full"] for t in tables]
        margins = [t[w]["margin_vs_random"] for t in tables]
        out[w] = {
            "found_vs_full_mean": statistics.mean(ratios),
            "found_vs_full_min": min(ratios),
            "found_vs_full_max": max(ratios),
            "margin_mean": statistics.mean(margins),
            "margin_min": min(margins),
        }
    out["found_vs_full_min"] = min(out[w]["found_vs_full_min"] for w in WEIGHTS)
    return out


def judge(exp, run_dir: Path, args) -> dict:
    space = load_space(exp.space)
    result = json.loads((run_dir / "result.json").read_text())
    found = Architecture.load(run_dir / "final.arch.json")
    world = open_world(exp, space, progress=False)
    prompts = held_out_prompts(exp, world, args.prompts)
    protocol = Protocol(
        prompts, seeds=args.seeds, steps=args.steps, cfg=exp.evaluation.cfg, seed=exp.seed + 7919
    )
    with LatencyTable(latency_db(exp)) as table:
        predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
        found_ms = predictor.predict(found).total_ms
        randoms, seed = [], 0
        while len(randoms) < args.random and seed < 1000:
            arch = random_at_latency(space, predictor, found_ms, seed)
            seed += 1
            if arch is not None and arch != found:
                randoms.append(arch)
        random_ms = [predictor.predict(a).total_ms for a in randoms]
    final = ElasticUNet.from_pretrained(run_dir / "final")
    final.scheduler_config = world.supernet.scheduler_config  # the world's sampler
    judged = {
        "run": str(run_dir),
        "target_ms": result["target_ms"],
        "found_ms": found_ms,
        "original_ms": result["original_ms"],
        "target_met": found_ms <= result["target_ms"],
        "found_arch": found.to_dict(),
        "random_ms": random_ms,
        "iterations": result["iterations"],
        "protocol": {
            "prompts": len(prompts),
            "seeds": args.seeds,
            "steps": args.steps,
            "cfg": exp.evaluation.cfg,
            "noise_seed": exp.seed + 7919,
            "search_prompts": exp.evaluation.prompts,
            "held_out": True,  # nas.search.run.held_out_prompts: disjoint from the search's
        },
    }
    for name, model in (("final", final), ("world", world.supernet)):
        model.eval()
        evaluator = Evaluator(
            model, world.clip, protocol, world.encode_text, world.uncond(), world.decode
        )
        full = evaluator.clip_score(space.original())
        found_clip = evaluator.clip_score(found)
        random_clips = [evaluator.clip_score(a) for a in randoms]
        mean = statistics.mean(random_clips)
        judged[name] = {
            "full_clip": full,
            "found_clip": found_clip,
            "found_vs_full": found_clip / full,
            "random_clips": random_clips,
            "random_mean": mean,
            "random_std": statistics.stdev(random_clips) if len(random_clips) > 1 else 0.0,
            "found_beats_random_share": sum(found_clip > c for c in random_clips)
            / len(random_clips),
            "margin_vs_random": found_clip - mean,
        }
    return judged


if __name__ == "__main__":
    main()
