"""Distillation: does training the found network from the full one bring its CLIP back?

On the tiny world, for the network that `experiments/tiny.yaml` finds at 0.5x latency (a
finished run given with --run, or searched here), side by side, at the same step budget and
seed, each scored on the search's protocol and on a larger held-out one (the validation
prompts after the search's, `nas.search.run.held_out_prompts`, several noises each):

- ablation: no training / task loss only / + output KD / + feature KD (the full loss);
- the same distillation of a hand-designed network (`--hand-variants`, default: none and the
  default loss): of the BK-SDM designs translated to the space (experiments/designs/), the one
  whose predicted latency is closest to the found network's;
- the exported standalone network timed whole beside the original, with torch on this CPU
  and as ExecuTorch XNNPACK programs (`.pte`), each against a table of its runtime
  (exported_latency.py).

Every ratio comes with its standard error: student and teacher are scored on the same prompts
and noises, so the error is the one of the mean paired difference (per image) over the
teacher's mean.

Writes experiments/benchmarks/results/distill.json; the last line printed is
`distill_clip_ratio: X`, the found network distilled with the default loss: its held-out CLIP
over the full network's (target >= 0.99).

    python experiments/benchmarks/distill.py --run runs/tiny-...   # a finished tiny.yaml run
    python experiments/benchmarks/distill.py --variants full       # only the default loss
    # the feature-weight sweep behind the default (docs/distill.md, "Choosing the weights")
    python experiments/benchmarks/distill.py --run R --no-hand --no-export \
        --variants w:1,1,0.1,w:1,1,0.3,w:1,1,1 --out results/distill_weights.json
    python experiments/benchmarks/distill.py --table results/distill.json   # markdown rows

A variant is `none` (no training), `task`, `task+output`, `full` (the default loss:
DistillConfig's weights), `bksdm` (BK-SDM's loss: plain feature MSEs summed, every weight 1),
or `w:T,O,F` / `w:T,O,F,mse` (task, output KD and feature KD weights; relative feature loss
unless `mse`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from distill_tables import all_tables
from exported_latency import executorch_latency, torch_latency
from provenance import provenance

from latency.predict import Predictor
from latency.table import LatencyTable
from nas.deploy.distill import distill
from nas.deploy.standalone import to_standalone
from nas.distill_config import DistillConfig
from nas.experiment import load_experiment
from nas.search.run import latency_db, run_search
from nas.supernet import ElasticUNet
from search_spaces import Architecture, SearchSpace

RESULTS = Path(__file__).parent / "results"
EXPERIMENT = Path(__file__).parents[1] / "tiny.yaml"
# each named variant: (task, output KD, feature KD weights, feature loss); "none" trains nothing,
# "full" is DistillConfig's default loss
DEFAULT = DistillConfig()
VARIANTS = {
    "none": None,
    "task": (1.0, 0.0, 0.0, DEFAULT.feature_loss),
    "task+output": (1.0, 1.0, 0.0, DEFAULT.feature_loss),
    "full": (
        DEFAULT.task_weight,
        DEFAULT.output_weight,
        DEFAULT.feature_weight,
        DEFAULT.feature_loss,
    ),
    "bksdm": (1.0, 1.0, 1.0, "mse"),
}


def variant_weights(name: str):
    """(task, output, feature, feature_loss) of a variant name, or None ("none")."""
    if name in VARIANTS:
        return VARIANTS[name]
    if not name.startswith("w:"):
        raise ValueError(name)
    parts = name[2:].split(",")
    loss = parts.pop() if parts and parts[-1] in ("mse", "relative") else "relative"
    if len(parts) != 3:
        raise ValueError(name)
    task, output, feature = map(float, parts)
    return task, output, feature, loss


def split_variants(text: str) -> list[str]:
    """ "none,w:1,1,0.3,full" -> ["none", "w:1,1,0.3", "full"] (a w: spec keeps its commas)."""
    out: list[str] = []
    for item in filter(None, text.split(",")):
        spec = out[-1].split(",") if out and out[-1].startswith("w:") else None
        if spec and len(spec) < 3 and item.replace(".", "", 1).isdigit():
            out[-1] += "," + item
        elif spec and len(spec) == 3 and item in ("mse", "relative"):
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def folder_name(name: str) -> str:
    return name.replace("w:", "w").replace(",", "_")


def ratio(student: list[float], teacher: list[float]) -> dict[str, float]:
    """Mean CLIP over the teacher's, and the standard error of that ratio from the paired
    per-image differences (the teacher's mean taken as fixed)."""
    diff = [s - t for s, t in zip(student, teacher, strict=True)]
    mean_t = statistics.fmean(teacher)
    se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
    return {"ratio": statistics.fmean(student) / mean_t, "se": se / mean_t}


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


def seed_before(folder: Path, scored: Path | None) -> bool:
    """Start `folder` afresh, holding `scored` (another variant's before.json: the same
    student, teacher and prompts score the same) so that distill does not score them again;
    True where it did (distill then resumes: nothing to resume but the scores)."""
    if folder.exists():
        shutil.rmtree(folder)
    if scored is None:
        return False
    folder.mkdir(parents=True)
    shutil.copyfile(scored, folder / "before.json")
    return True


def finished(folder: Path, config: DistillConfig, arch: Architecture) -> dict | None:
    """metrics.json of `folder` where it holds a finished distillation of `arch` from the
    default teacher with `config` (and each image's scores), else None."""
    if not (folder / "metrics.json").is_file() or not (folder / "config.json").is_file():
        return None
    saved = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    same = (
        saved.get("distill") == config.to_dict()
        and saved.get("architecture_hash") == arch.hash
        and saved.get("teacher") == "supernet (full network)"
        and (metrics.get("clip_images") or {}).get("before") is not None
    )
    return metrics if same else None


def reuse(run: Path, bench: Path, folder: Path, config: DistillConfig, arch: Architecture):
    """A finished distillation with these settings, from `folder` or (copied into it) from
    another folder of the run; None where there is none."""
    for candidate in [folder, run / "distilled", *sorted(bench.glob("*"))]:
        if (metrics := finished(candidate, config, arch)) is not None:
            if candidate != folder:
                if folder.exists():
                    shutil.rmtree(folder)
                shutil.copytree(candidate, folder)
            return metrics
    return None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", type=Path, default=EXPERIMENT)
    ap.add_argument("--run", type=Path, help="a finished run of the experiment (else: search)")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="where a search goes")
    ap.add_argument("--steps", type=int, help="training steps (default: the experiment's)")
    ap.add_argument(
        "--variants",
        default="none,task,task+output,full,bksdm",
        help=f"comma list of {', '.join(VARIANTS)}, w:T,O,F[,mse]",
    )
    ap.add_argument("--no-hand", action="store_true", help="skip the hand-designed network")
    ap.add_argument(
        "--hand-variants", default="none,full", help="the variants of the hand design (as above)"
    )
    ap.add_argument("--no-export", action="store_true", help="skip the exported network's timing")
    ap.add_argument(
        "--no-executorch", action="store_true", help="skip the ExecuTorch programs' timing"
    )
    ap.add_argument(
        "--executorch-table",
        type=Path,
        help="an ExecuTorch latency database of the space (default: built in the run folder)",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="read a variant a folder of the run already holds, finished with the same settings",
    )
    # 8 noises: the standard error of a ratio near 1 is ~0.9 points, not ~1.3 with 4
    ap.add_argument("--held-out-seeds", type=int, default=8, help="noises per held-out prompt")
    ap.add_argument("--repeats", type=int, default=30, help="timed forwards per network")
    # one thread: on a machine busy with other work, torch's two threads wait on each other
    # (a tiny-world step measured 6x slower with two threads than with one)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "distill.json")
    ap.add_argument(
        "--table", type=Path, nargs="+", help="print the markdown rows of these results; no run"
    )
    args = ap.parse_args(argv)
    args.variants = split_variants(args.variants)
    args.hand_variants = split_variants(args.hand_variants)
    for name in args.variants + args.hand_variants:
        try:
            variant_weights(name)
        except ValueError:
            ap.error(f"--variants: unknown {name!r}")
    return args


def _scores(metrics: dict, key: str) -> dict[str, float]:
    """CLIP per protocol ("search", "held_out") of the student before or after, or teacher."""
    return metrics["clip"][key]


def _ratios(images: dict[str, list[float]], teacher: dict[str, list[float]]) -> dict:
    return {p: ratio(images[p], teacher[p]) for p in teacher}


def block_scales(exp, supernet: ElasticUNet, arch: Architecture, batch: int = 64) -> dict:
    """Why feature KD needs a scale: on one training batch (seed 0) at the start of
    distillation, the task loss, output KD, and per block the teacher's output mean square,
    the plain MSE between student and teacher and the relative error, and whether the block
    is matched (the student computes in it)."""
    from diffusers import DDPMScheduler

    from nas.search.run import experiment_space, open_world
    from nas.training.distillation import _capture, feature_points, matched_points
    from nas.training.robust import _loss, _timesteps

    world = open_world(exp, experiment_space(exp), progress=False)
    supernet.set_architecture(supernet.space.original())
    teacher = supernet.eval().requires_grad_(False)
    student = to_standalone(supernet, arch).eval()
    tc = world.train_config(steps=1, batch_size=batch, seed=0)
    scheduler = DDPMScheduler(
        num_train_timesteps=tc.num_train_timesteps,
        beta_schedule=tc.beta_schedule,
        beta_start=tc.beta_start,
        beta_end=tc.beta_end,
        prediction_type=tc.prediction_type,
    )
    data = world.dataset(batch, 0)
    images, captions = zip(*(data[i] for i in range(batch)), strict=True)
    x, cond = world.encode_batch(torch.stack(images), list(captions))
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x.shape, generator=g), _timesteps(tc, batch, g)
    noisy = scheduler.add_noise(x, noise, t)
    target = noise if tc.prediction_type == "epsilon" else scheduler.get_velocity(x, noise, t)
    names = list(feature_points(student))
    with torch.no_grad():
        with _capture(list(feature_points(student).values())) as s_out:
            pred = student(noisy, t, encoder_hidden_states=cond).sample
        with _capture(list(feature_points(teacher).values())) as t_out:
            teacher_pred = teacher(noisy, t, encoder_hidden_states=cond).sample
    matched = set(matched_points(student))
    blocks = {}
    for name, a, b in zip(names, s_out, t_out, strict=True):
        mse, ms = float((a - b).pow(2).mean()), float(b.pow(2).mean())
        # as the relative feature loss computes it: per sample, then the mean over samples
        relative = (a - b).pow(2).flatten(1).mean(1) / b.pow(2).flatten(1).mean(1)
        blocks[name] = {"teacher_mean_square": ms, "mse": mse, "relative": float(relative.mean())}
        blocks[name]["matched"] = name in matched
    return {
        "batch": batch,
        "task": float(_loss(pred, target, t, scheduler, tc)),
        "output_kd": float((pred - teacher_pred).pow(2).mean()),
        "target_mean_square": float(target.pow(2).mean()),
        "blocks": blocks,
    }


def run_variants(
    args, run: Path, bench: Path, config, arch: Architecture, names: list[str], folders, prefix=""
) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """Distil `arch` with each variant of `names` (same steps and seed), each into its folder:
    `folders[name]`, else bench/<prefix>-<name>; with --reuse a finished one is read. The
    results per variant, and the teacher's per-image scores."""
    variants: dict[str, dict] = {}
    before = teacher = None  # the same for every variant: the supernet's weights, one teacher
    scored = None  # the first variant's before.json: the student's and teacher's scores
    label = f"{prefix} " if prefix else ""
    for name in names:
        weights = variant_weights(name)
        if weights is None:
            continue
        task, output, feature, loss = weights
        c = config.with_overrides(
            task_weight=task, output_weight=output, feature_weight=feature, feature_loss=loss
        )
        folder = folders.get(name) or bench / "-".join(filter(None, [prefix, folder_name(name)]))
        m = reuse(run, bench, folder, c, arch) if args.reuse else None
        if m is None:
            print(f"{label}variant {name}: training {c.steps} steps", flush=True)
            m = distill(run, c, resume=seed_before(folder, scored), arch=arch, folder=folder)
        else:
            print(f"{label}variant {name}: read from {folder}", flush=True)
        scored = scored or folder / "before.json"
        before, teacher = m["clip_images"]["before"], m["clip_images"]["teacher"]
        variants[name] = {
            "weights": {"task": task, "output": output, "feature": feature, "feature_loss": loss},
            "steps": m["steps"],
            "train_seconds": m["train_seconds"],
            "clip": _scores(m, "after"),
            "ratio": _ratios(m["clip_images"]["after"], teacher),
            "first_terms": {k: v[0] for k, v in m["terms"].items()},
            "final_terms": {k: statistics.fmean(v[-20:]) for k, v in m["terms"].items()},
        }
        print(f"  {json.dumps(variants[name]['clip'])}", flush=True)
    if "none" in names:
        if before is None:  # only "none" asked for: score without training
            folder = bench / "-".join(filter(None, [prefix, "none"]))
            c = config.with_overrides(steps=1)
            m = distill(run, c, force=True, arch=arch, folder=folder)
            before, teacher = m["clip_images"]["before"], m["clip_images"]["teacher"]
        means = {p: statistics.fmean(v) for p, v in before.items()}
        none = {"weights": None, "steps": 0, "clip": means, "ratio": _ratios(before, teacher)}
        variants = {"none": none} | variants
    return variants, teacher


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        for path in args.table:
            print(all_tables(json.loads(path.read_text())), end="")
        return
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
    table_ = LatencyTable(latency_db(exp))
    predictor = Predictor(space, table_, exp.latency.device, precision=exp.latency.precision)
    found = Architecture.load(run / "final.arch.json")
    found_ms = predictor.predict(found).total_ms
    original_ms = predictor.predict(space.original()).total_ms

    scales = block_scales(exp, ElasticUNet.from_pretrained(run / "final"), found)
    bench = run / "bench_distill"
    # "full" of the found network goes where `diffnas distill` puts it: the run's report shows it
    variants, teacher = run_variants(
        args, run, bench, config, found, args.variants, {"full": run / "distilled"}
    )
    hand = None
    design = None if args.no_hand else hand_design(space, predictor, found_ms)
    if design is not None:
        design_name, hand_arch = design
        hand_variants, _ = run_variants(
            args, run, bench, config, hand_arch, args.hand_variants, {}, prefix=design_name
        )
        hand = {
            "design": design_name,
            "architecture": hand_arch.to_dict(),
            "predicted_ms": predictor.predict(hand_arch).total_ms,
            "params": space.params(hand_arch),
            "variants": hand_variants,
        }

    latency = executorch = None
    if "full" in variants and not args.no_export:  # the exported network, timed whole
        predicted = {"original": original_ms, "found": found_ms}
        latency = torch_latency(run, supernet, predicted, args.repeats)
        if not args.no_executorch:
            executorch = executorch_latency(
                run, supernet, found, args.executorch_table, args.repeats, args.threads
            )

    ratios = {name: v["ratio"] for name, v in variants.items()}
    if hand is not None:
        for name, v in hand["variants"].items():
            ratios[f"{hand['design']} {name}"] = v["ratio"]
    out = {
        "benchmark": "distill",
        "run": str(run),
        "architecture": found.to_dict(),
        "predicted_ms": {"original": original_ms, "found": found_ms},
        "params": {"original": space.params(space.original()), "found": space.params(found)},
        "distill_config": config.to_dict(),
        "block_scales": scales,
        "protocols": {
            p: {"images": len(v), "teacher_clip": statistics.fmean(v)} for p, v in teacher.items()
        }
        if teacher
        else None,
        "teacher_clip": {p: statistics.fmean(v) for p, v in teacher.items()} if teacher else None,
        "variants": variants,
        "hand_design": hand,
        "clip_ratio_to_full": ratios,
        "latency": latency,
        "latency_executorch": executorch,
        "seconds": time.perf_counter() - start,
    } | provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    for name, r in ratios.items():
        cells = ", ".join(
            f"{p} {100 * v['ratio']:.1f}% ± {100 * v['se']:.1f}" for p, v in r.items()
        )
        print(f"{name}: CLIP / full network's: {cells}")
    if latency:
        m, p = latency["measured_ms"], latency["predicted_ms"]
        print(
            f"latency (torch CPU, exported): original {m['original']:.2f} ms (table "
            f"{p['original']:.2f}), found {m['found']:.2f} ms (table {p['found']:.2f})"
        )
    if executorch:
        s = executorch["speedup"]
        print(
            f"speed-up (ExecuTorch XNNPACK, exported .pte): measured {s['measured']:.2f}x, "
            f"its table predicted {s['predicted']:.2f}x"
        )
    if "full" in ratios:
        key = "held_out" if "held_out" in ratios["full"] else "search"
        print(f"distill_clip_ratio: {ratios['full'][key]['ratio']:.4f}")


if __name__ == "__main__":
    main()
