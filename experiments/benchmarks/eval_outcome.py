"""Evaluation outcome: does a cheap protocol's search find as good a network as an expensive
one's, and at how much less compute?

On the default tiny world (experiments/tiny.yaml, target 0.5x), every protocol below runs the
whole search from the same start (the world's supernet, one shared latency table) with the
same seeds (`seed` seeds robust training and the evaluation noises). Each found network is
scored on one large held-out protocol (`nas.search.run.held_out_prompts`: validation prompts the
search never scored, noises it never drew, 20 DDIM steps), with the run's final weights and
with the world's untuned supernet (as search_fidelity.py judges). Per protocol: evaluation
compute per search (UNet calls, images: recorded by the run, `nas.search.evolve.run_compute`), found
CLIP mean ± σ over seeds, and the gap to the reference's mean in units of the pooled σ. The
compute ratio of the goal is against the full profile's reference, whose compute per search
`nas.search.plan` projects (`full_reference_projected_unet_calls`) when a smaller one ran.

    reference     4x tiny.yaml's images and steps: 32 prompts x 4 noises, DDIM 20 steps,
                  every action on every image (full profile; quick: see PROFILES)
    tiny          tiny.yaml as shipped: 32 images, DDIM 5 steps, racing from 8
    dpm_solver    the same with DPM-Solver++ 5 steps
    x0_clip       32 images sampled (DPM-Solver++ 5 steps) once per iteration, noised to
                  t = 250, 500, 750; actions: CLIP of one-call x0 predictions; racing from 8
    x0_distance   the same, scored by distance to the current network's predictions

Goal: a protocol within 1σ of the reference (gap >= -1) at >= 20x less compute per search.
Results are written after every search (a run stopped part way keeps what it finished, and
--resume continues it). The last line printed is `eval_outcome_best_x: X`: the compute
ratio (reference / protocol) of the cheapest protocol that meets the 1σ goal on both weights
(0 if none does; nan if no reference search finished).

    python experiments/benchmarks/eval_outcome.py                    # full: 3 seeds
    python experiments/benchmarks/eval_outcome.py --profile quick    # see PROFILES
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance
from search_fidelity import EXPERIMENT, RESULTS, WEIGHTS

from latency.predict import Predictor
from nas.experiment import load_experiment
from nas.search.evaluate import Evaluator, Protocol
from nas.search.evolve import resolve_target, run_compute
from nas.search.plan import make_plan
from nas.search.run import held_out_prompts, latency_table, open_world, run_search
from nas.supernet import ElasticUNet
from search_spaces import Architecture, load_space

# evaluation: overrides of experiments/tiny.yaml's, per protocol
PROTOCOLS: dict[str, dict] = {
    "reference": {"prompts": 32, "seeds": 4, "steps": 20, "racing": 0},
    "tiny": {},
    "dpm_solver": {"sampler": "dpm_solver"},
    "x0_clip": {"sampler": "dpm_solver", "metric": "x0_clip", "timesteps": [250, 500, 750]},
    "x0_distance": {
        "sampler": "dpm_solver",
        "metric": "x0_distance",
        "timesteps": [250, 500, 750],
    },
}
PROFILES = {
    # seeds per protocol, held-out noises per prompt, the reference's overrides of its own
    "full": {"seeds": 3, "held_out_seeds": 3, "reference": {}},
    # what fits an hour of a loaded 2-core machine: 2 seeds, 2 held-out noises, and a smaller
    # reference: 2x tiny.yaml's images and steps (32 prompts x 2 noises, 10 steps), raced from
    # 16 images (racing reached the plain protocol's decisions within noise: eval_cost.py).
    # Its compute ratios are against that reference, not the full profile's 4x one
    "quick": {
        "seeds": 2,
        "held_out_seeds": 2,
        "reference": {"seeds": 2, "steps": 10, "racing": 16},
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default="full")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma list (run order)")
    ap.add_argument("--seeds", type=int, help="searches per protocol (default: the profile's)")
    ap.add_argument("--held-out-steps", type=int, default=20, help="DDIM steps of the judge")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--resume", action="store_true", help="keep the searches --out holds")
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="add the searches of these results of this script (e.g. run side by side)",
    )
    ap.add_argument(
        "--no-search", action="store_true", help="only summarise what --out (and --merge) hold"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_outcome.json")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.protocols.split(",")]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        ap.error(f"--protocols: from {', '.join(PROTOCOLS)}")
    args.protocol_names = names
    args.merge = [str(p) for p in args.merge]  # recorded in the result's settings
    return args


def experiment_of(exp, name: str, seed: int, profile: dict):
    """tiny.yaml with the protocol's evaluation and the seed."""
    evaluation = dict(PROTOCOLS[name])
    if name == "reference":
        evaluation |= profile["reference"]
    data = exp.model_dump(mode="json")
    data["evaluation"] |= evaluation
    data["seed"] = seed
    return type(exp).model_validate(data)


def judge(exp, run_dir: Path, world, cache: dict, args, held_out_seeds: int) -> dict:
    """Held-out CLIP of the found network with both weights (the world's: cached per
    architecture, the same for every run)."""
    space = world.space
    found = Architecture.load(run_dir / "final.arch.json")
    prompts = held_out_prompts(exp, world)
    protocol = Protocol(
        prompts,
        seeds=held_out_seeds,
        steps=args.held_out_steps,
        cfg=exp.evaluation.cfg,
        seed=7919,  # one judge for every run: noises no search drew
    )
    final = ElasticUNet.from_pretrained(run_dir / "final")
    final.scheduler_config = world.supernet.scheduler_config
    out = {"found_arch": found.to_dict(), "found_hash": found.hash}
    for weights, model in (("final", final), ("world", world.supernet)):
        key = (weights, found.hash)
        if weights == "world" and key in cache:
            out[weights] = cache[key]
            continue
        model.eval()
        ev = Evaluator(model, world.clip, protocol, world.encode_text, world.uncond(), world.decode)
        out[weights] = ev.clip_score(found)
        if weights == "world":
            cache[key] = out[weights]
    if ("full", space.original().hash) not in cache:
        ev = Evaluator(
            world.supernet, world.clip, protocol, world.encode_text, world.uncond(), world.decode
        )
        cache[("full", space.original().hash)] = ev.clip_score(space.original())
    out["held_out"] = {
        "prompts": len(prompts),
        "seeds": held_out_seeds,
        "steps": args.held_out_steps,
    }
    return out


def full_reference_projection(base) -> dict:
    """What the full profile's reference (4x images and steps, every action on every image)
    spends on a whole search, projected by `nas.search.plan` (its compute is known before it runs):
    the yardstick of the >= 20x goal when the quick profile ran a smaller reference."""
    exp = experiment_of(base, "reference", 0, PROFILES["full"])
    space = load_space(exp.space)
    with latency_table(exp, space, progress=False) as table:
        predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
        plan = make_plan(exp, space, predictor, resolve_target(exp, space, predictor))
    return {k: p.unet_calls for k, p in plan.paths.items()} | {
        "iterations": {k: p.iterations for k, p in plan.paths.items()}
    }


def summarise(runs: list[dict], names: list[str], full_reference: dict | None = None) -> dict:
    by = {n: [r for r in runs if r["protocol"] == n] for n in names}
    ref = by.get("reference", [])
    out = {}
    for name, rs in by.items():
        if not rs:
            continue
        calls = [r["compute"]["unet_calls"] for r in rs]
        row = {
            "searches": len(rs),
            "unet_calls_per_search": statistics.mean(calls),
            "images_per_search": statistics.mean(r["compute"]["images"] for r in rs),
            "iterations_mean": statistics.mean(r["compute"]["iterations"] for r in rs),
            "search_seconds_mean": statistics.mean(r["search_seconds"] for r in rs),
            "target_met": sum(r["target_met"] for r in rs),
            "found": sorted({r["found_hash"] for r in rs}),
        }
        if ref:
            ref_calls = statistics.mean(r["compute"]["unet_calls"] for r in ref)
            row["compute_x_less_than_reference"] = ref_calls / row["unet_calls_per_search"]
        if full_reference:  # against the full 4x reference along a typical search path
            row["compute_x_less_than_full_reference_projected"] = (
                full_reference["typical"] / row["unet_calls_per_search"]
            )
        for w in WEIGHTS:
            clips = [r[w] for r in rs]
            row[w] = {
                "clips": clips,
                "mean": statistics.mean(clips),
                "std": statistics.stdev(clips) if len(clips) > 1 else None,
            }
            if ref and name != "reference":
                rc = [r[w] for r in ref]
                sds = [s for s in (row[w]["std"], statistics.stdev(rc) if len(rc) > 1 else None)]
                known = [s for s in sds if s is not None]
                pooled = (sum(s * s for s in known) / len(known)) ** 0.5 if known else None
                gap = row[w]["mean"] - statistics.mean(rc)
                row[w]["gap_to_reference"] = gap
                row[w]["pooled_std"] = pooled
                row[w]["gap_sigma"] = gap / pooled if pooled else None
        if ref and name != "reference":
            gaps = [row[w].get("gap_sigma") for w in WEIGHTS]
            within = all(g is not None and g >= -1 for g in gaps)
            row["within_1_sigma_both_weights"] = within
            ratio = row.get(
                "compute_x_less_than_full_reference_projected",
                row["compute_x_less_than_reference"],
            )
            row["goal_met"] = within and ratio >= 20
        out[name] = row
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = dict(PROFILES[args.profile])
    seeds = args.seeds or profile["seeds"]
    base = load_experiment(EXPERIMENT)
    args.full_reference = full_reference_projection(base)
    world = open_world(base, load_space(base.space), progress=True)
    runs = []
    if (args.resume or args.no_search) and args.out.is_file():
        runs = json.loads(args.out.read_text()).get("runs", [])
    for other in args.merge:
        runs += json.loads(Path(other).read_text()).get("runs", [])
    done = {(r["protocol"], r["seed"]) for r in runs}
    runs = list({(r["protocol"], r["seed"]): r for r in runs}.values())
    cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(0 if args.no_search else seeds):  # every protocol's seed 0 first
            for name in args.protocol_names:
                if (name, seed) in done:
                    continue
                exp = experiment_of(base, name, seed, profile)
                start = time.perf_counter()
                result = run_search(exp, runs=Path(tmp), name=f"{name}-{seed}", progress=False)
                seconds = time.perf_counter() - start
                history = [
                    json.loads(line)
                    for line in (result.run_dir / "history.jsonl").read_text().splitlines()
                ]
                row = {
                    "protocol": name,
                    "seed": seed,
                    "evaluation": exp.evaluation.model_dump(mode="json"),
                    "compute": run_compute(history),
                    "search_seconds": seconds,
                    "found_ms": result.latency_ms,
                    "target_ms": result.target_ms,
                    "target_met": result.latency_ms <= result.target_ms,
                    "decisions": [h["applied"] for h in history],
                }
                row |= judge(exp, result.run_dir, world, cache, args, profile["held_out_seeds"])
                runs.append(row)
                print(
                    f"{name} seed {seed}: {row['compute']['unet_calls']:,} UNet calls, "
                    f"{seconds:.0f} s; found {row['found_hash']} held-out CLIP final "
                    f"{row['final']:.2f}, world {row['world']:.2f}",
                    flush=True,
                )
                write(args, profile, seeds, runs, cache)
    out = write(args, profile, seeds, runs, cache)
    report(out)


def write(args, profile, seeds, runs, cache) -> dict:
    full = next((v for (k, _), v in cache.items() if k == "full"), None)
    if full is None and args.out.is_file():  # summarising what an earlier run judged
        full = json.loads(args.out.read_text()).get("full_network_held_out_clip_world")
    out = {
        "benchmark": "eval_outcome",
        "profile": args.profile,
        "profile_settings": profile | {"seeds": seeds},
        "protocols": {n: PROTOCOLS[n] for n in args.protocol_names},
        "base_experiment": str(EXPERIMENT.name),
        "full_network_held_out_clip_world": full,
        "goal": "within 1 pooled sigma of the reference's found CLIP (both weights) at >= 20x "
        "less evaluation compute per search",
        "compute_unit": "UNet calls of one latent (a guided step of one image: 2)",
        "runs": runs,
        "full_reference_projected_unet_calls": args.full_reference,
        "summary": summarise(runs, args.protocol_names, args.full_reference),
    }
    out |= provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def report(out: dict) -> None:
    print(f"wrote {out['settings']['out']}")
    best = None
    for name, r in out["summary"].items():
        line = (
            f"{name:12s} {r['searches']} searches, {r['unet_calls_per_search']:>12,.0f} UNet calls "
            f"per search ({r.get('compute_x_less_than_reference', 1):.1f}x less than the "
            f"reference run, {r.get('compute_x_less_than_full_reference_projected', 0):.1f}x "
            "less than the full reference projected)"
        )
        for w in WEIGHTS:
            s = r[w]
            std = f" ± {s['std']:.2f}" if s["std"] is not None else ""
            gap = f", gap {s['gap_sigma']:+.2f}σ" if s.get("gap_sigma") is not None else ""
            line += f"; {w} {s['mean']:.2f}{std}{gap}"
        print(line)
        if r.get("goal_met") and (best is None or r["unet_calls_per_search"] < best[1]):
            ratio = r.get("compute_x_less_than_full_reference_projected")
            best = (name, r["unet_calls_per_search"], ratio or r["compute_x_less_than_reference"])
    if "reference" not in out["summary"]:  # stopped before the reference's first search
        print("no reference search finished: no protocol can be judged")
        print("eval_outcome_best_x: nan")
        return
    print(f"best: {best[0] if best else 'none meets the goal'}")
    print(f"eval_outcome_best_x: {best[2] if best else 0:.1f}")


if __name__ == "__main__":
    main()
