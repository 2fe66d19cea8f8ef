"""The tiny world: is ΔCLIP a real signal?

Loads (or builds, on first use) the default tiny world and measures, side by side in one run,
on the first --prompts validation prompts (scenes never seen in training), DDIM --steps steps,
CFG --cfg, the same noises for every network:

- the full supernet's CLIP score, per noise seed, and its seed-to-seed standard deviation σ;
- the same images scored against shuffled prompts (what "not following the prompt" scores);
- the drawn reference images of the prompts (what following them perfectly scores);
- every cross-attention block removed at once: the drop, and the drop in units of σ;
- every removable block removed alone: its ΔCLIP; measured on two disjoint halves of the
  prompts, whose rank correlation says whether single-block ΔCLIPs are distinguishable;
- shape accuracy: for "a <colour> <shape> in the center", each colour, the same noises for
  every shape: how often the CLIP prefers the image's own shape to each other shape (does
  the UNet draw the shape it is asked for? 0.5 is chance), beside the drawn shapes' share.

CLIP score = 100 * max(cos, 0) (torchmetrics' definition), averaged over images.
Also reports the world's build times and its CLIP's zero-shot retrieval accuracy.
Writes experiments/benchmarks/results/tiny_world.json; the last line printed is
`tiny_clip_drop_no_ca_sigma: X`.

    python experiments/benchmarks/tiny_world.py             # default world (builds if needed)
    python experiments/benchmarks/tiny_world.py --quick     # fewer prompts, no single removals
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance
from scipy.stats import spearmanr

from nas.worlds import shapes
from nas.worlds.generate import check_eta, initial_noise
from nas.worlds.tiny import TinyWorldConfig, load_tiny_world
from search_spaces import UserError

RESULTS = Path(__file__).parent / "results"


def shape_accuracy(world, args, noises: int = 4) -> dict[str, dict[str, float]]:
    """Per pair of shapes (a, b): how often the CLIP scores an image generated for "a <colour>
    a in the center" higher against its own prompt than against the same prompt with b (and
    the other way round), over every colour and `noises` noises; 0.5 is chance. The same
    for the shapes drawn at one place: what telling them apart scores."""
    n = len(shapes.COLOURS) * noises
    noise = initial_noise(world.space, n, seed=0)
    original = world.space.original()

    def prompts(kind: str) -> list[str]:
        return [f"a {c} {kind} in the center" for c in shapes.COLOURS for _ in range(noises)]

    generated, drawn = {}, {}
    for kind in shapes.SHAPES:
        generated[kind] = world.generate(
            prompts(kind), noise=noise, steps=args.steps, cfg=args.cfg, arch=original, eta=args.eta
        )
        drawn[kind] = shapes.render_batch(
            [
                shapes.Scene((shapes.Shape(c, kind, 16.0, 16.0, 6.0),), "", "")
                for c in shapes.COLOURS
            ]
        )

    def wins(images: dict, a: str, b: str, every: int) -> float:
        """Share of a's images and b's images that score higher against their own shape
        (`every`: the prompt stride; the drawn shapes have one image per colour)."""
        won = []
        for own, other in ((a, b), (b, a)):
            texts = prompts(own)[::every]
            swapped = [t.replace(f" {own} ", f" {other} ") for t in texts]
            won.append(world.score(images[own], texts) > world.score(images[own], swapped))
        return torch.cat(won).float().mean().item()

    pairs = [(a, b) for i, a in enumerate(shapes.SHAPES) for b in shapes.SHAPES[i + 1 :]]
    return {
        f"{a}_{b}": {
            "generated": wins(generated, a, b, 1),
            "drawn": wins(drawn, a, b, noises),
            # images compared per pair (both shapes' images, each against the other shape)
            "generated_images": 2 * len(prompts(a)),
            "drawn_images": 2 * len(shapes.COLOURS),
        }
        for a, b in pairs
    }


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation with no fixed point: every image gets another prompt."""
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="validation prompts used")
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds for σ")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance weight")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="16 prompts, no single removals")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    world = parser.add_mutually_exclusive_group()  # each names the whole world: one or the other
    world.add_argument("--miniature", action="store_true", help="the test world (smoke run)")
    world.add_argument(
        "--world-config", type=Path, default=None, help="JSON of TinyWorldConfig fields"
    )
    args = parser.parse_args()
    if args.out is None:
        name = "tiny_world_miniature.json" if args.miniature else "tiny_world.json"
        args.out = RESULTS / name
    if args.quick:
        args.prompts = min(args.prompts, 16)
    try:
        check_eta(args.eta)  # the sampler's rule, checked before the world is built
    except UserError:
        parser.error(f"--eta {args.eta}: DDIM's eta is in [0, 1]")
    start = time.perf_counter()

    # built (if not cached) with torch's default threads, as `make run` builds it; --threads is
    # for the measurements after
    if args.world_config is not None:
        config = TinyWorldConfig.from_json(args.world_config)
    else:
        config = TinyWorldConfig.miniature() if args.miniature else TinyWorldConfig()
    world = load_tiny_world(config, progress=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    space, m = world.space, world.metrics
    prompts = world.val_prompts[: args.prompts]
    n = len(prompts)
    shuffled = [prompts[j] for j in derangement(n, 0)]
    original = space.original()
    no_ca = original
    for path, slot in space.slots.items():
        if slot.kind == "cross_attention":
            no_ca = no_ca.with_multiplicity(path, 0)

    def clip_of(images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return world.score(images, texts)

    def run(arch, seed: int) -> torch.Tensor:  # from initial_noise(space, n, seed)
        return world.generate(
            prompts, seed=seed, steps=args.steps, cfg=args.cfg, arch=arch, eta=args.eta
        )

    full, full_shuffled, cut = [], [], []
    base = None  # per-image scores of the full network at seed 0: the base of single removals
    t_gen = time.perf_counter()
    for seed in range(args.seeds):
        images = run(original, seed)
        scores = clip_of(images, prompts)
        base = scores if base is None else base
        full.append(scores.mean().item())
        full_shuffled.append(clip_of(images, shuffled).mean().item())
        cut.append(clip_of(run(no_ca, seed), prompts).mean().item())
        print(
            f"seed {seed}: full {full[-1]:.2f}, shuffled {full_shuffled[-1]:.2f}, "
            f"no CA {cut[-1]:.2f}",
            flush=True,
        )
    seconds_per_eval = (time.perf_counter() - t_gen) / (2 * args.seeds)
    reference = shapes.render_batch(shapes.scenes_for_prompts(prompts, seed=0))
    sigma = statistics.stdev(full) if len(full) > 1 else float("nan")
    drop = statistics.mean(full) - statistics.mean(cut)

    singles: dict[str, dict] = {}
    rank_corr = None
    if not args.quick:
        half = n // 2
        for path, slot in space.slots.items():
            if not slot.removable:
                continue
            scores = clip_of(run(original.with_multiplicity(path, 0), 0), prompts)
            delta = base - scores  # the paper's ΔCLIP of removing the block (positive: worse)
            singles[path] = {
                "kind": slot.kind,
                "stage": slot.stage,
                "delta_clip": delta.mean().item(),
                "delta_clip_half_a": delta[:half].mean().item(),
                "delta_clip_half_b": delta[half:].mean().item(),
            }
            print(f"remove {path:28s} ΔCLIP {singles[path]['delta_clip']:6.2f}", flush=True)
        a = [s["delta_clip_half_a"] for s in singles.values()]
        b = [s["delta_clip_half_b"] for s in singles.values()]
        rank_corr = float(spearmanr(a, b).statistic)

    accuracy = shape_accuracy(world, args)
    deltas = [s["delta_clip"] for s in singles.values()]
    result = {
        "world": {
            "config_hash": m.get("config_hash"),
            "built_in_this_run": world.built,
            "build_seconds": m.get("build_seconds"),
            "build_cpu_seconds": m.get("build_cpu_seconds"),
            "clip_seconds": m.get("clip_seconds"),
            "unet_seconds": m.get("unet_seconds"),
            "build_torch_threads": m.get("torch_threads"),
            "clip_val_retrieval_top1": m.get("clip_val_retrieval_top1"),
            "val_prompts": len(world.val_prompts),
        },
        "protocol": {
            "prompts": n,
            "seeds": args.seeds,
            "ddim_steps": args.steps,
            "cfg": args.cfg,
            "ddim_eta": args.eta,
            "clip_score": "100 * max(cos, 0), mean over images",
        },
        "clip": {
            "full_per_seed": full,
            "full_mean": statistics.mean(full),
            "full_seed_std": sigma,
            "shuffled_prompts_mean": statistics.mean(full_shuffled),
            "reference_images": clip_of(reference, prompts).mean().item(),
            "reference_images_shuffled": clip_of(reference, shuffled).mean().item(),
            "no_cross_attention_per_seed": cut,
            "no_cross_attention_mean": statistics.mean(cut),
            "drop_no_cross_attention": drop,
            "drop_no_cross_attention_sigma": drop / sigma,
        },
        "single_removals": singles,
        "single_removals_summary": {
            "blocks": len(singles),
            "delta_min": min(deltas) if deltas else None,
            "delta_max": max(deltas) if deltas else None,
            "delta_std_across_blocks": statistics.stdev(deltas) if len(deltas) > 1 else None,
            "spearman_between_prompt_halves": rank_corr,
        },
        "shape_accuracy": accuracy,
        "seconds_per_evaluation": seconds_per_eval,
        "seconds": time.perf_counter() - start,
    }
    result |= provenance(args)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    c = result["clip"]
    print(f"wrote {args.out}")
    print(f"tiny_world_build_seconds: {m.get('build_seconds', float('nan')):.0f}")
    print(f"tiny_clip_retrieval_top1: {m.get('clip_val_retrieval_top1', float('nan')):.3f}")
    print(f"tiny_clip_reference_images: {c['reference_images']:.2f}")
    print(f"tiny_clip_full: {c['full_mean']:.2f} ± {sigma:.2f}")
    print(f"tiny_clip_shuffled_prompts: {c['shuffled_prompts_mean']:.2f}")
    print(f"tiny_clip_no_ca: {c['no_cross_attention_mean']:.2f}")
    if singles:
        s = result["single_removals_summary"]
        print(f"tiny_single_delta_range: {s['delta_min']:.2f} .. {s['delta_max']:.2f}")
        print(f"tiny_single_delta_spearman_halves: {rank_corr:.2f}")
    for pair, d in accuracy.items():
        print(f"tiny_shape_accuracy_{pair}: {d['generated']:.2f} (drawn {d['drawn']:.2f})")
    print(f"tiny_clip_drop_no_ca_sigma: {c['drop_no_cross_attention_sigma']:.1f}")


if __name__ == "__main__":
    main()
