"""Evaluation cost: how small can the ΔCLIP protocol be, and how much does racing save?

On the default tiny world, the original architecture, every removal action (what one
evolution iteration evaluates), side by side in one run:

1. per-image CLIP scores of the base and of every action on --images images (the validation
   prompts in turn, each round with new noises) at the DDIM steps in --steps; a protocol
   (P images, S steps) is the first P images at S steps, so every protocol is measured in
   the same run, on the same noises;
2. for each protocol, Kendall τ of its action values against the protocols 4x larger (4P
   images at S steps, and 2P images at 2S steps), each on images of its own: other
   prompts and other noises than the protocol's (a reference that shared them would agree
   with it for free); the smallest protocol with τ >= --tau against both is the cheapest
   honest one; also the standard error of each ΔCLIP;
3. racing (`nas.search.racing.race`: all actions on a few images, more only near the cut) on all
   images at the search's step count: does it pick the same `group_size` removals as every
   action on every image, at what share of the cost;
4. time per action, and each cost relative to the paper's protocol (2000 prompts x 50
   steps per action). The tiny world is not SD-v1.5: the ratios say how much the method's
   evaluation can be cut, not what an SD protocol must be.

Writes experiments/benchmarks/results/eval_cost.json; the last line printed is
`eval_cheaper_than_paper_x: X` (paper's image-steps per iteration / racing's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from provenance import provenance
from scipy.stats import kendalltau
from tqdm import tqdm

from latency.predict import Predictor
from nas.experiment import load_experiment
from nas.search.evaluate import Evaluator, Protocol, action_value
from nas.search.racing import race
from nas.search.run import latency_table, open_world
from search_spaces import load_space

RESULTS = Path(__file__).parent / "results"
EXPERIMENT = Path(__file__).parents[1] / "tiny.yaml"
PAPER_IMAGE_STEPS = 2000 * 50  # per action: 2K MS-COCO prompts, 50 DDIM steps


def independent_images(prompts: list[str], p: int, n: int) -> list[int] | None:
    """Indices of n images sharing neither prompt nor noise with the first p (image i has
    noise i, so other indices are other noises), or None if there are too few."""
    taken = set(prompts[:p])
    rest = [i for i in range(p, len(prompts)) if prompts[i] not in taken]
    return rest[:n] if len(rest) >= n else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=128, help="largest protocol's images")
    ap.add_argument("--steps", default="5,10", help="DDIM step counts measured")
    ap.add_argument("--tau", type=float, default=0.8, help="ranking agreement asked for")
    ap.add_argument(
        "--first", type=int, help="racing: images of the first round (default: the experiment's)"
    )
    ap.add_argument("--growth", type=int, default=4, help="racing: image growth per round")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "eval_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps_list = sorted(int(s) for s in args.steps.split(","))

    exp = load_experiment(EXPERIMENT)
    space = load_space(exp.space)
    table = latency_table(exp, space, progress=False)
    predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
    world = open_world(exp, space, progress=True)
    arch = space.original()
    actions = [a for a in space.actions(arch) if a.kind == "remove"]
    base_ms = predictor.predict(arch).raw_ms
    after_ms = [predictor.predict(arch.apply(a)).raw_ms for a in actions]
    rounds = -(-args.images // len(world.val_prompts))
    prompts = (world.val_prompts * rounds)[: args.images]  # image i gets noise i: all differ

    def evaluator(steps: int) -> Evaluator:
        protocol = Protocol(prompts, steps=steps, cfg=exp.evaluation.cfg, seed=exp.seed)
        return Evaluator(
            world.supernet, world.clip, protocol, world.encode_text, world.uncond(), world.decode
        )

    # 1. per-image scores, every step count
    per_image: dict[int, dict] = {}
    seconds: dict[int, float] = {}
    for steps in steps_list:
        ev = evaluator(steps)
        start = time.perf_counter()
        base = ev.scores(arch)
        rows = [ev.scores(arch.apply(a)) for a in tqdm(actions, desc=f"{steps} steps: actions")]
        seconds[steps] = (time.perf_counter() - start) / (len(actions) + 1)
        per_image[steps] = {"base": base, "actions": rows}
        print(f"{steps:3d} steps: {seconds[steps]:.2f} s per action ({len(prompts)} images)")

    def values(images: list[int] | int, steps: int) -> list[float]:
        """Action values on these images (or the first n) at `steps`."""
        idx = torch.tensor(list(range(images)) if isinstance(images, int) else images)
        data = per_image[steps]
        base = float(data["base"][idx].mean())
        return [
            action_value(a, base, float(s[idx].mean()), base_ms, ms, 0.0).value
            for a, s, ms in zip(actions, data["actions"], after_ms, strict=True)
        ]

    def independent(p: int, n: int) -> list[int] | None:
        return independent_images(prompts, p, n)

    # 2. each protocol against the ones 4x larger, on independent images
    protocols = []
    p = 4
    while independent(p, 2 * p) is not None:
        for steps in steps_list:
            row = {"images": p, "steps": steps, "cost": p * steps}
            if (four := independent(p, 4 * p)) is not None:
                row["tau_4x_images"] = kendalltau(values(p, steps), values(four, steps)).statistic
            if 2 * steps in per_image:
                bigger = values(independent(p, 2 * p), 2 * steps)
                row["tau_2x2"] = kendalltau(values(p, steps), bigger).statistic
            taus = [v for k, v in row.items() if k.startswith("tau")]
            if taus:
                row["tau"] = min(taus)
                protocols.append(row)
                shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("tau_"))
                print(f"P={p:3d} S={steps:3d}: {shown}")
        p *= 2
    top = per_image[steps_list[0]]
    diffs = torch.stack([top["base"] - s for s in top["actions"]])  # actions x images
    stderr = {
        str(a): {"delta_clip": float(d.mean()), "stderr": float(d.std() / len(d) ** 0.5)}
        for a, d in zip(actions, diffs, strict=True)
    }
    passing = [r for r in protocols if r["tau"] >= args.tau]
    smallest = min(passing, key=lambda r: r["cost"]) if passing else None

    # 3. racing at the largest protocol, against its plain evaluation
    # at the search's own step count (experiments/tiny.yaml), over all images
    top_steps = exp.evaluation.steps if exp.evaluation.steps in per_image else steps_list[0]
    full = values(len(prompts), top_steps)
    keep = exp.search.group_size
    start = time.perf_counter()
    first = args.first or exp.evaluation.racing or 8
    raced = race(evaluator(top_steps), arch, predictor, keep, first, args.growth)
    race_seconds = time.perf_counter() - start
    raced_values = [v.value for v in raced.values]

    def lowest(vals: list[float]) -> set[str]:
        order = sorted(range(len(actions)), key=lambda i: vals[i])
        return {str(actions[i]) for i in order[:keep]}

    same_decision = lowest(full) == lowest(raced_values)
    race_tau = kendalltau(full, raced_values).statistic
    race_share = raced.cost / raced.full_cost

    # 4. cost relative to the paper, per iteration (every action + the base)
    n_actions = len(actions)
    paper = PAPER_IMAGE_STEPS * (n_actions + 1)
    racing_image_steps = raced.cost * top_steps
    e = exp.evaluation  # the search's own protocol: its time per action, scaled from ours
    per_action_exp = seconds[e.steps] * e.prompts / len(prompts) if e.steps in seconds else None
    result = {
        "benchmark": "eval_cost",
        "actions": n_actions,
        "images": len(prompts),
        "delta_clip_stderr": stderr,
        "seconds_per_action": {str(s): seconds[s] for s in steps_list},
        "seconds_per_action_at_experiment_protocol": per_action_exp,
        "protocols": protocols,
        "tau_target": args.tau,
        "smallest_protocol": smallest,
        "smallest_vs_paper_x": PAPER_IMAGE_STEPS / smallest["cost"] if smallest else None,
        "racing": {
            "first": first,
            "growth": args.growth,
            "keep": keep,
            "same_decision_as_full": same_decision,
            "tau_vs_full": race_tau,
            "images": raced.cost,
            "full_images": raced.full_cost,
            "share_of_full": race_share,
            "seconds": race_seconds,
            "image_steps": racing_image_steps,
        },
        "paper_image_steps_per_iteration": paper,
        # the raw material, for other rankings: per-image CLIP scores, base and each action
        "per_image_scores": {
            str(steps): {
                "base": d["base"].tolist(),
                **{str(a): s.tolist() for a, s in zip(actions, d["actions"], strict=True)},
            }
            for steps, d in per_image.items()
        },
        "delta_ms": {str(a): base_ms - ms for a, ms in zip(actions, after_ms, strict=True)},
        "racing_vs_paper_x": paper / racing_image_steps,
        "reference": "independent: other prompts and noises than the protocol's",
    }
    result |= provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table.close()
    print(f"wrote {args.out}")
    if smallest:
        print(
            f"smallest protocol with τ >= {args.tau}: {smallest['images']} images x "
            f"{smallest['steps']} steps ({result['smallest_vs_paper_x']:.0f}x below the paper's)"
        )
    else:
        print(f"no protocol reached τ >= {args.tau}")
    print(
        f"racing: same decision as the full protocol: {same_decision}, τ {race_tau:.3f}, "
        f"{100 * race_share:.0f}% of its images"
    )
    print(f"eval_cheaper_than_paper_x: {result['racing_vs_paper_x']:.0f}")


if __name__ == "__main__":
    main()
