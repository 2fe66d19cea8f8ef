"""SD-v1.5 projection: what a whole SnapFusion search on Stable Diffusion v1.5 costs on one GPU
under a cheap evaluation protocol, against the paper's (`nas.search.plan`, docs/evaluation-cost.md).

1. the sd15 space on this machine's CPU table (latent 32x32, batch 2, torch: the table
   latency_accuracy.py builds; measured into the cache's latency.db if it lacks blocks);
2. the target: the predicted latency of SnapFusion's Table 3 network
   (experiments/snapfusion_sd15.arch.json) on that table;
3. the search of experiments/snapfusion_sd15.yaml (group size 2, copies on) that ends at that
   network: its removals and copies, `group_size` per iteration, then one iteration that finds
   nothing more to do; the legal removals (actions) each iteration scores; and, for scale, the
   removal orders that bound any search to that latency (`nas.search.plan.make_plan`);
4. per-action and per-iteration compute of each protocol (UNet calls of one latent, images), with
   SD's CFG 7.5: the paper's (2,000 prompts x 50 DDIM steps) and the tiny benchmark's
   protocols (eval_outcome.py) on snapfusion_sd15.yaml's guidance;
5. device time per call and per image from results/sd15_action_cuda.json (fp16, H100; the
   original network's, so hours are upper bounds) -> GPU-hours of evaluation; robust training
   (train_steps x batch per iteration) estimated as 3 UNet calls per training latent (forward
   and backward, fp32 per-call time): an estimate, not a measurement.

The chosen protocol is eval_outcome.json's cheapest that met its goal (--protocol to name one);
if none did, the shipped tiny.yaml protocol, marked as not validated. Writes
experiments/benchmarks/results/sd15_plan.json with the arithmetic; the last line printed is
`sd15_search_gpu_hours: X` (chosen protocol, search ending at Table 3's network; goal <= 24).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from eval_outcome import PROTOCOLS
from provenance import provenance

from latency.backends import get_backend
from latency.coreml import cache_dir
from latency.predict import Predictor
from latency.profile import build_table
from latency.table import LatencyTable
from nas.experiment import load_experiment
from nas.search.evaluate import Cost
from nas.search.plan import Timing, cost_protocol, iteration_cost, make_plan
from search_spaces import Action, Architecture, load_space

HERE = Path(__file__).parent
RESULTS = HERE / "results"
EXPERIMENTS = HERE.parent
GOAL_HOURS = 24.0


def table3_path(space, arch: Architecture, group: int) -> tuple[list[int], int, int]:
    """Actions per iteration of a search from the original to `arch`: its removals, `group`
    per iteration (in slot order: any order removes one legal action per removal, so the
    counts barely depend on it), then its copies, then the iteration that finds nothing to do.
    Also the numbers of removals and copies."""
    original = space.original()
    removed = [p for p in space.slots if arch[p] < original[p]]
    copied = [(p, arch[p] - original[p]) for p in space.slots if arch[p] > original[p]]
    current, actions = original, []
    for i in range(0, len(removed), group):
        actions.append(sum(a.kind == "remove" for a in space.actions(current)))
        for p in removed[i : i + group]:
            current = current.apply(Action("remove", p))
    copies = [p for p, k in copied for _ in range(k)]
    for i in range(0, len(copies), group):
        actions.append(sum(a.kind == "remove" for a in space.actions(current)))
        for p in copies[i : i + group]:
            current = current.apply(Action("copy", p))
    assert current == arch, "the path does not end at the network"
    actions.append(sum(a.kind == "remove" for a in space.actions(current)))  # nothing left to do
    return actions, len(removed), len(copies)


def chosen_protocol(name: str | None) -> tuple[str, bool, str]:
    """(protocol, validated on the tiny world, why)."""
    outcome = RESULTS / "eval_outcome.json"
    if name:
        return name, False, "named on the command line"
    if outcome.is_file():
        summary = json.loads(outcome.read_text())["summary"]
        met = [(r["unet_calls_per_search"], n) for n, r in summary.items() if r.get("goal_met")]
        if met:
            best = min(met)[1]
            return best, True, f"the cheapest protocol that met eval_outcome.json's goal: {best}"
    return "tiny", False, "no eval_outcome.json protocol met its goal: tiny.yaml's, unvalidated"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--protocol", choices=["paper", *PROTOCOLS], help="default: see above")
    ap.add_argument("--timing", type=Path, default=RESULTS / "sd15_action_cuda.json")
    ap.add_argument("--db", type=Path, help="latency table (default: the cache's latency.db)")
    ap.add_argument("--device", default="cpu-local", help="its device name")
    ap.add_argument("--block-repeats", type=int, default=5, help="when measuring blocks")
    ap.add_argument("--walks", type=int, default=20, help="random removal orders")
    ap.add_argument("--out", type=Path, default=RESULTS / "sd15_plan.json")
    args = ap.parse_args(argv)

    base = load_experiment(EXPERIMENTS / "snapfusion_sd15.yaml")
    tiny = load_experiment(EXPERIMENTS / "tiny.yaml").evaluation
    space = load_space("sd15").with_inputs(latent=(4, 32, 32))  # latency_accuracy.py's table
    table3 = Architecture.load(EXPERIMENTS / "snapfusion_sd15.arch.json")
    per_call = Timing.from_action_benchmark(args.timing, "fp16")
    fp32 = Timing.from_action_benchmark(args.timing, "fp32")
    name, validated, why = chosen_protocol(args.protocol)

    def experiment(protocol: str):
        """snapfusion_sd15.yaml with a protocol's evaluation (the tiny benchmark's options on
        tiny.yaml's sizes; SD's CFG, batch and precision fp16)."""
        data = base.model_dump(mode="json")
        data["evaluation"]["precision"] = "fp16"
        if protocol != "paper":
            sizes = {k: getattr(tiny, k) for k in ("prompts", "seeds", "steps", "racing")}
            data["evaluation"] |= sizes | PROTOCOLS[protocol]
        return type(base).model_validate(data)

    db = args.db or cache_dir() / "latency.db"
    with LatencyTable(db) as table:
        backend = get_backend("torch", repeats=args.block_repeats, warmup=1, threads=1)
        built = build_table(space, table, backend, args.device, progress=False)
        predictor = Predictor(space, table, args.device)
        original_ms = predictor.predict(space.original()).total_ms
        target_ms = predictor.predict(table3).total_ms
        group = base.search.group_size
        actions, removals, copies = table3_path(space, table3, group)
        protocols = {}
        for p in ["paper", *PROTOCOLS]:
            exp = experiment(p)
            e = exp.evaluation
            protocol = cost_protocol(exp)
            per_iteration = [iteration_cost(protocol, a, e.racing, group) for a in actions]
            total = sum(per_iteration, start=Cost())
            seconds = total.seconds(per_call.per_call_s, per_call.per_image_s)
            plan = make_plan(exp, space, predictor, target_ms, per_call, walks=args.walks)
            protocols[p] = {
                "evaluation": e.model_dump(mode="json"),
                "per_action": protocol.score_cost(protocol.images).to_dict(),
                "per_iteration_reference": protocol.reference_cost(protocol.images).to_dict(),
                "per_iteration_unet_calls": [c.unet_calls for c in per_iteration],
                "unet_calls": total.unet_calls,
                "images": total.images,
                "arithmetic": (
                    f"{total.unet_calls:,} calls x {per_call.per_call_s * 1000:.3f} ms + "
                    f"{total.images:,} images x {per_call.per_image_s * 1000:.2f} ms = "
                    f"{seconds:,.0f} s"
                ),
                "evaluation_gpu_hours": seconds / 3600,
                "bounds": {
                    k: {"iterations": v.iterations, "gpu_hours": plan.hours(k)}
                    for k, v in plan.paths.items()
                },
            }
    s = base.search
    iterations = len(actions)
    train_calls = iterations * s.train_steps * s.batch_size * 3
    train_hours = train_calls * fp32.per_call_s / 3600
    chosen = protocols[name]
    total_hours = chosen["evaluation_gpu_hours"] + train_hours
    paper = protocols["paper"]["evaluation_gpu_hours"] + train_hours
    out = {
        "benchmark": "sd15_plan",
        "table": {
            "db": str(db),
            "device": args.device,
            "latent": list(space.latent),
            "batch": space.batch,
            "blocks_measured_now": len(built.measured),
        },
        "original_ms": original_ms,
        "table3_ms": target_ms,
        "table3_ratio": target_ms / original_ms,
        "path_to_table3": {
            "removals": removals,
            "copies": copies,
            "group_size": group,
            "iterations": iterations,
            "iterations_arithmetic": f"ceil({removals}/{group}) + ceil({copies}/{group}) + 1 = "
            f"{math.ceil(removals / group)} + {math.ceil(copies / group)} + 1",
            "actions_per_iteration": actions,
            "actions_total": sum(actions),
        },
        "timing": {
            "source": per_call.source,
            "seconds_per_unet_call_fp16": per_call.per_call_s,
            "seconds_per_image_fp16": per_call.per_image_s,
            "seconds_per_unet_call_fp32": fp32.per_call_s,
            "note": "the original network's: an upper bound as blocks go",
        },
        "protocols": protocols,
        "chosen": {"protocol": name, "validated_on_tiny": validated, "why": why},
        "robust_training_estimate": {
            "arithmetic": f"{iterations} iterations x {s.train_steps} steps x batch "
            f"{s.batch_size} x 3 calls x {fp32.per_call_s * 1000:.2f} ms (fp32)",
            "gpu_hours": train_hours,
            "note": "forward + backward ~ 3 forward calls: an estimate, not measured",
        },
        "search_gpu_hours": total_hours,
        "paper_protocol_search_gpu_hours": paper,
        "goal_gpu_hours": GOAL_HOURS,
    }
    out |= provenance(args)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(
        f"sd15 on {args.device}: original {original_ms:.1f} ms, Table 3 network {target_ms:.1f} "
        f"ms ({100 * target_ms / original_ms:.0f}%); path: {removals} removals, {copies} copies, "
        f"{iterations} iterations, actions {actions}"
    )
    for p, r in protocols.items():
        mark = " <- chosen" if p == name else ""
        print(
            f"{p:12s} per action {r['per_action']['unet_calls']:>9,} calls; search "
            f"{r['unet_calls']:>12,} calls, {r['evaluation_gpu_hours']:8.2f} GPU-h "
            f"(bounds {r['bounds']['fewest']['gpu_hours']:.2f}-"
            f"{r['bounds']['most']['gpu_hours']:.2f}){mark}"
        )
    print(f"robust training (estimate): {train_hours:.2f} GPU-h; chosen: {why}")
    print(f"paper protocol, whole search: {paper:.1f} GPU-h")
    print(f"sd15_search_gpu_hours: {total_hours:.2f}")


if __name__ == "__main__":
    main()
