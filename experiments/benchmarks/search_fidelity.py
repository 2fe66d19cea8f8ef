"""Search fidelity: is the architecture the evolution finds better than chance?

Runs the tiny search (`experiments/tiny.yaml`, or `--run DIR` to judge a finished run), then
scores, side by side with one held-out protocol (validation prompts and noise seeds the
search never used; the run's final supernet weights):

- the full supernet (the original architecture);
- the found architecture: does it meet the target, is its CLIP within 5% of the full one's;
- `--random` random legal architectures of the same predicted latency (±5% of the found
  one's), each reached by removing random legal blocks from the original: the found one
  should beat their mean.

Writes experiments/benchmarks/results/search_fidelity.json; the last line printed is
`fidelity_margin_vs_random: X` (found CLIP minus the random architectures' mean).

    python experiments/benchmarks/search_fidelity.py              # search, then judge
    python experiments/benchmarks/search_fidelity.py --run runs/tiny-...   # judge a run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latency.predict import Predictor
from latency.table import LatencyTable
from nas.evaluate import Evaluator, Protocol
from nas.experiment import load_experiment
from nas.search import latency_db, open_world, run_search
from nas.supernet import ElasticUNet
from search_spaces import Architecture, load_space

RESULTS = Path(__file__).parent / "results"
EXPERIMENT = Path(__file__).parents[1] / "tiny.yaml"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", type=Path, default=EXPERIMENT)
    ap.add_argument("--run", type=Path, help="judge this finished run instead of searching")
    ap.add_argument("--random", type=int, default=10, help="random architectures to compare")
    ap.add_argument("--prompts", type=int, default=48, help="held-out validation prompts")
    ap.add_argument("--seeds", type=int, default=2, help="noises per prompt")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the judging protocol")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "search_fidelity.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    exp = load_experiment(args.experiment)
    search_seconds = None
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run
        if run_dir is None:
            start = time.perf_counter()
            result = run_search(exp, runs=Path(tmp), name="fidelity", progress=True)
            search_seconds = time.perf_counter() - start
            run_dir = result.run_dir
        judged = judge(exp, run_dir, args)
    judged["search_seconds"] = search_seconds
    judged["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    judged["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(judged, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(
        f"target met: {judged['target_met']} ({judged['found_ms']:.2f} <= "
        f"{judged['target_ms']:.2f} ms)"
    )
    print(
        f"CLIP full {judged['full_clip']:.2f}, found {judged['found_clip']:.2f} "
        f"({100 * judged['found_vs_full']:.1f}% of full; target >= 95%)"
    )
    print(
        f"random at the same latency: {judged['random_mean']:.2f} ± {judged['random_std']:.2f}"
        f" over {len(judged['random_clips'])}"
    )
    print(f"fidelity_margin_vs_random: {judged['margin_vs_random']:.2f}")


def judge(exp, run_dir: Path, args) -> dict:
    space = load_space(exp.space)
    result = json.loads((run_dir / "result.json").read_text())
    found = Architecture.load(run_dir / "final.arch.json")
    with LatencyTable(latency_db(exp)) as table:
        predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
        world = open_world(exp, space, progress=False)
        # the run's final supernet: the weights the search ended with
        model = ElasticUNet.from_pretrained(run_dir / "final")
        model.eval()
        model.scheduler_config = world.supernet.scheduler_config  # the world's sampler
        # held-out protocol: the validation prompts after those the search scored, new noises
        used = exp.evaluation.prompts
        prompts = world.val_prompts[used : used + args.prompts]
        if len(prompts) < args.prompts:
            prompts = world.val_prompts[: args.prompts]
        protocol = Protocol(
            prompts,
            seeds=args.seeds,
            steps=args.steps,
            cfg=exp.evaluation.cfg,
            seed=exp.seed + 7919,
        )
        evaluator = Evaluator(
            model, world.clip, protocol, world.encode_text, world.uncond(), world.decode
        )
        found_ms = predictor.predict(found).total_ms
        randoms, seed = [], 0
        while len(randoms) < args.random and seed < 1000:
            arch = random_at_latency(space, predictor, found_ms, seed)
            seed += 1
            if arch is not None and arch != found:
                randoms.append(arch)
        full = evaluator.clip_score(space.original())
        found_clip = evaluator.clip_score(found)
        random_clips = [evaluator.clip_score(a) for a in randoms]
        random_ms = [predictor.predict(a).total_ms for a in randoms]
    mean = statistics.mean(random_clips)
    return {
        "benchmark": "search_fidelity",
        "run": str(run_dir),
        "target_ms": result["target_ms"],
        "found_ms": found_ms,
        "original_ms": result["original_ms"],
        "target_met": found_ms <= result["target_ms"],
        "found_arch": found.to_dict(),
        "full_clip": full,
        "found_clip": found_clip,
        "found_vs_full": found_clip / full,
        "random_clips": random_clips,
        "random_ms": random_ms,
        "random_mean": mean,
        "random_std": statistics.stdev(random_clips) if len(random_clips) > 1 else 0.0,
        "found_beats_random_share": sum(found_clip > c for c in random_clips) / len(random_clips),
        "margin_vs_random": found_clip - mean,
        "protocol": {
            "prompts": len(prompts),
            "seeds": args.seeds,
            "steps": args.steps,
            "cfg": exp.evaluation.cfg,
            "held_out": True,
        },
        "iterations": result["iterations"],
    }


if __name__ == "__main__":
    main()
