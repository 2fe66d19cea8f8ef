"""Distillation: does training the found network from the full one bring its CLIP back?

On the tiny world, for the network that `experiments/tiny.yaml` finds at 0.5x latency (a
finished run given with --run, or searched here), side by side, at the same step budget and
seed, each scored on the search's protocol and on a larger held-out one (the validation
prompts after the search's, `nas.search.run.held_out_prompts`, several noises each):

- ablation: no training / task loss only / + output KD / + feature KD (the full loss);
- the same full distillation of a hand-designed network: of the BK-SDM designs translated to
  the space (experiments/designs/), the one whose predicted latency is closest to the found
  network's;
- the exported standalone network (`diffnas export --distilled`, loaded back from its folder)
  timed whole with torch on this CPU, beside the latency table's prediction; the original
  network too.

Writes experiments/benchmarks/results/distill.json; the last line printed is
`distill_clip_ratio: X`, the fully distilled found network's held-out CLIP over the full
network's (target >= 0.99).

    python experiments/benchmarks/distill.py --run runs/tiny-...   # a finished tiny.yaml run
    python experiments/benchmarks/distill.py --variants full       # only the full loss
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from provenance import provenance

from latency.predict import Predictor
from latency.table import LatencyTable
from nas.deploy.distill import distill, measure_ms
from nas.deploy.export import export_network
from nas.deploy.searched_unet import SearchedUNet2DConditionModel
from nas.deploy.standalone import to_standalone
from nas.experiment import load_experiment
from nas.search.run import latency_db, run_search
from nas.supernet import ElasticUNet
from search_spaces import Architecture, SearchSpace

RESULTS = Path(__file__).parent / "results"
EXPERIMENT = Path(__file__).parents[1] / "tiny.yaml"
# loss weights (task, output KD, feature KD) of each ablation variant; "none" trains nothing
VARIANTS = {
    "none": None,
    "task": (1.0, 0.0, 0.0),
    "task+output": (1.0, 1.0, 0.0),
    "full": (1.0, 1.0, 1.0),
}


DESIGNS = Path(__file__).parents[1] / "designs"  # hand designs translated to each space


def hand_design(space: SearchSpace, predictor: Predictor, target_ms: float):
    """The BK-SDM hand design of `space` (experiments/designs/bksdm_*.<space>.arch.json)
    whose predicted latency is closest to `target_ms`: (name, architecture)."""
    found = sorted(DESIGNS.glob(f"bksdm_*.{space.name}.arch.json"))
    if not found:
        return None
    designs = {p.name.split(".")[0]: Architecture.load(p) for p in found}
    name = min(designs, key=lambda n: abs(predictor.predict(designs[n]).total_ms - target_ms))
    return name, designs[name]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", type=Path, default=EXPERIMENT)
    ap.add_argument("--run", type=Path, help="a finished run of the experiment (else: search)")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="where a search goes")
    ap.add_argument("--steps", type=int, help="training steps (default: the experiment's)")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}"
    )
    ap.add_argument("--no-hand", action="store_true", help="skip the hand-designed network")
    ap.add_argument("--held-out-seeds", type=int, default=4, help="noises per held-out prompt")
    ap.add_argument("--repeats", type=int, default=30, help="timed forwards per network")
    # one thread: on a machine busy with other work, torch's two threads wait on each other
    # (a tiny-world step measured 6x slower with two threads than with one)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "distill.json")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    if unknown := set(args.variants) - set(VARIANTS):
        ap.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    return args


def _scores(metrics: dict, key: str) -> dict[str, float]:
    """CLIP per protocol ("search", "held_out") of the student before or after, or teacher."""
    return metrics["clip"][key]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    exp = load_experiment(args.experiment)
    if args.run is None:
        result = run_search(exp, runs=args.runs, name=f"{exp.name}-distill-bench")
        args.run = result.run_dir
    run = args.run
    config = exp.distill.with_overrides(steps=args.steps, held_out_seeds=args.held_out_seeds)
    supernet = ElasticUNet.from_pretrained(run / "final")
    space = supernet.space
    table = LatencyTable(latency_db(exp))
    predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
    found = Architecture.load(run / "final.arch.json")
    found_ms = predictor.predict(found).total_ms
    original_ms = predictor.predict(space.original()).total_ms

    bench = run / "bench_distill"
    variants: dict[str, dict] = {}
    before = teacher = None  # the same for every variant: the supernet's weights, one teacher
    for name in [n for n in args.variants if VARIANTS[n] is not None]:
        task, output, feature = VARIANTS[name]
        c = config.with_overrides(task_weight=task, output_weight=output, feature_weight=feature)
        # "full" goes where `diffnas distill` puts it, so the run's report shows it
        folder = run / "distilled" if name == "full" else bench / name
        print(f"variant {name}: training {c.steps} steps", flush=True)
        m = distill(run, c, force=True, folder=folder)
        before, teacher = _scores(m, "before"), _scores(m, "teacher")
        variants[name] = {
            "weights": VARIANTS[name],
            "steps": m["steps"],
            "train_seconds": m["train_seconds"],
            "clip": _scores(m, "after"),
            "final_terms": {k: v[-1] for k, v in m["terms"].items()},
        }
        print(f"  {json.dumps(variants[name]['clip'])}", flush=True)
    if "none" in args.variants:
        if before is None:  # only "none" asked for: score without training
            m = distill(run, config.with_overrides(steps=1), force=True, folder=bench / "none")
            before, teacher = _scores(m, "before"), _scores(m, "teacher")
        variants = {"none": {"weights": None, "steps": 0, "clip": before}} | variants

    hand = None
    design = None if args.no_hand else hand_design(space, predictor, found_ms)
    if design is not None:
        design_name, hand_arch = design
        print(f"hand design {design_name}: training {config.steps} steps", flush=True)
        m = distill(run, config, force=True, arch=hand_arch, folder=bench / design_name)
        hand = {
            "design": design_name,
            "architecture": hand_arch.to_dict(),
            "predicted_ms": predictor.predict(hand_arch).total_ms,
            "params": space.params(hand_arch),
            "clip_before": _scores(m, "before"),
            "clip": _scores(m, "after"),
            "train_seconds": m["train_seconds"],
        }

    latency = None
    if "full" in variants:  # the exported standalone networks, loaded back from their folders
        out, info = export_network(run, "diffusers", distilled=True, force=True)
        exported = SearchedUNet2DConditionModel.from_pretrained(out)
        if info["form"] == "UNet2DConditionModel":
            from diffusers import UNet2DConditionModel

            exported = UNet2DConditionModel.from_pretrained(out).eval()
        original = to_standalone(supernet, space.original())
        measured = measure_ms({"original": original, "found": exported}, space, args.repeats)
        latency = {
            "export_form": info["form"],
            "predicted_ms": {"original": original_ms, "found": found_ms},
            "measured_ms": measured,
            "measured_over_predicted": {
                "original": measured["original"] / original_ms,
                "found": measured["found"] / found_ms,
            },
            "speedup": {
                "predicted": original_ms / found_ms,
                "measured": measured["original"] / measured["found"],
            },
        }

    ratios = {name: {p: v["clip"][p] / teacher[p] for p in teacher} for name, v in variants.items()}
    if hand is not None:
        ratios[hand["design"]] = {p: hand["clip"][p] / teacher[p] for p in teacher}
    out = {
        "benchmark": "distill",
        "run": str(run),
        "architecture": found.to_dict(),
        "predicted_ms": {"original": original_ms, "found": found_ms},
        "params": {"original": space.params(space.original()), "found": space.params(found)},
        "distill_config": config.to_dict(),
        "teacher_clip": teacher,
        "variants": variants,
        "hand_design": hand,
        "clip_ratio_to_full": ratios,
        "latency": latency,
        "seconds": time.perf_counter() - start,
    } | provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    for name, r in ratios.items():
        cells = ", ".join(f"{p} {100 * v:.1f}%" for p, v in r.items())
        print(f"{name}: CLIP / full network's: {cells}")
    if latency:
        m, p = latency["measured_ms"], latency["predicted_ms"]
        print(
            f"latency (torch CPU, exported): original {m['original']:.2f} ms (table "
            f"{p['original']:.2f}), found {m['found']:.2f} ms (table {p['found']:.2f})"
        )
    if "full" in ratios:
        key = "held_out" if "held_out" in ratios["full"] else "search"
        print(f"distill_clip_ratio: {ratios['full'][key]:.4f}")


if __name__ == "__main__":
    main()
