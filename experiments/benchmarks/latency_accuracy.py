"""Latency accuracy: does the lookup table predict whole networks?

For each space (sd15 at a 32x32 latent, batch 2; and tiny), on this machine's CPU: measure
every block signature into a fresh table, then time >= 20 random legal architectures (and
the original) as whole networks and compare with the table's prediction. Block timings and
network timings are taken in the same run, on the same threads.

Targets: MAPE <= 5%, >= 90% of networks within ±10%, Kendall τ >= 0.9. Both the raw sum
and the calibrated prediction are reported; the calibration (a linear fit, as stored by
`diffnas latency validate --calibrate`) is fitted on 5 other random architectures, never on
the ones it is judged on. The headline is the calibrated MAPE. Blocks and networks alike are
measured in --rounds passes, each in a new order. Each network keeps its fastest over the odd
rounds, which the table is judged against; its fastest over the even rounds, judged against
the odd ones the same way, is the timing noise ceiling, printed as "noise" (what no table can
beat on this machine). `--protocol paired` (as `diffnas latency validate --protocol
paired`) times each network right after its own blocks instead, so that a drift of the
machine between the table and the networks does not count as the table's error (what is
left is the additive model's error and noise).
Writes experiments/benchmarks/results/latency_accuracy.json and a scatter PNG per space;
the last line printed is `latency_mape_sd15: X`.

    python experiments/benchmarks/latency_accuracy.py            # full (about 10 min, 2 cores)
    python experiments/benchmarks/latency_accuracy.py --quick    # tiny only, few networks
    python experiments/benchmarks/latency_accuracy.py --protocol paired --block-repeats 2
    python experiments/benchmarks/latency_accuracy.py --build-64 # also time the full sd15
                                                                 # table at 64x64
    python experiments/benchmarks/latency_accuracy.py --compute-unit cuda  # on a GPU (sd15 at
                                                    # 64x64; writes latency_accuracy_cuda.json)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import latency_bench as bench
import torch
from provenance import provenance

from latency.predict import Predictor
from latency.profile import build_table
from latency.table import LatencyTable
from latency.validate import accuracy, scatter_plot, validate
from nas.search.measure import NetworkTimer
from search_spaces import load_space

RESULTS = Path(__file__).parent / "results"


def run_space(space, device_name, args, db):
    block_backend, net_backend = bench.timing_backends("torch", args.compute_unit, args)
    timer = NetworkTimer(space, net_backend)
    with LatencyTable(db) as table:
        built = build_table(space, table, block_backend, device_name, rounds=args.rounds)
        predictor = Predictor(space, table, device_name, calibrate=False)
        how = {
            "rounds": args.rounds,
            "protocol": args.protocol,
            "profile": lambda sig: block_backend.profile(sig).median_ms,  # paired only
        }
        # calibration (measured ~ a * predicted + b) is fitted on other architectures than the
        # ones it is judged on: the held-out numbers are what a user of a calibrated table gets
        fit = validate(
            space,
            predictor,
            timer,
            args.calibration_samples,
            seed=args.seed + 10_000,
            include_original=False,
            **how,
        ).calibration
        report = validate(space, predictor, timer, args.samples, seed=args.seed, **how)
    # the scatter goes beside the JSON: latency_accuracy[...]_SPACE.png
    scatter_plot(report, args.out.with_name(f"{args.out.stem}_{space.name}.png"))
    out = report.to_dict()
    calibrated = [fit["slope"] * p + fit["intercept"] for p in report.predicted_ms]
    out["calibrated"] = {
        **accuracy(calibrated, report.measured_ms),
        "slope": fit["slope"],
        "intercept": fit["intercept"],
        "fitted_on": args.calibration_samples,
    }
    out["table_build_seconds"] = built.seconds
    out["blocks"] = len(built.measured)
    out["latent"] = list(space.latent)
    out["batch"] = space.batch
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    bench.add_options(
        ap,
        rounds="passes over the blocks and the networks, each in a new order: 1, or an even "
        "number; blocks keep their fastest, networks their fastest of the odd rounds (judged) "
        "and of the even rounds (the noise ceiling, judged against the odd ones the same way)",
        threads="torch threads for blocks and networks alike (1: stable on a shared machine)",
    )
    ap.add_argument(
        "--compute-unit",
        choices=["cpu", "cuda"],
        default="cpu",
        help="torch device; on cuda sd15 is measured at its own 64x64 latent (512 px)",
    )
    ap.add_argument(
        "--protocol",
        choices=["separate", "paired"],
        default="separate",
        help="separate: the table first, then every network (as a user's table is used); "
        "paired: each network right after a fresh timing of its own blocks (the table's model, "
        "free of the machine's drift between the two)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="6 networks per space, tiny only unless --spaces"
    )
    ap.add_argument(
        "--spaces",
        default=None,
        help="comma list of the spaces to validate (sd15, tiny; default both, or tiny with "
        "--quick); e.g. tiny alone with more repeats, which its millisecond networks afford",
    )
    ap.add_argument(
        "--build-64", action="store_true", help="also time building the full sd15 table at 64x64"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default: results/latency_accuracy[_quick][_cuda].json); "
        "the scatter plots go beside it (NAME_sd15.png, NAME_tiny.png)",
    )
    args = ap.parse_args()
    if args.rounds < 1 or (args.rounds > 1 and args.rounds % 2):
        ap.error(f"--rounds {args.rounds}: give 1 or an even number")
    if args.quick:
        args.samples = 6
    if args.out is None:
        suffix = ("_quick" if args.quick else "") + (
            "" if args.compute_unit == "cpu" else f"_{args.compute_unit}"
        )
        args.out = RESULTS / f"latency_accuracy{suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)

    if args.spaces is None:
        args.spaces = "tiny" if args.quick else "sd15,tiny"
    names = bench.parse_spaces(ap, args.spaces)
    spaces = [bench.bench_space(n, args.compute_unit) for n in ("sd15", "tiny") if n in names]
    results = {}
    ticks = bench.cpu_ticks()
    with tempfile.TemporaryDirectory() as tmp:
        for space in spaces:
            print(f"== {space.name}: latent {space.latent}, batch {space.batch}", flush=True)
            device_name = f"bench-{args.compute_unit}"
            results[space.name] = run_space(space, device_name, args, Path(tmp) / "t.db")
        if args.build_64:
            backend = bench.timing_backends("torch", "cpu", args)[0]
            with LatencyTable(Path(tmp) / "t64.db") as table:
                built = build_table(load_space("sd15"), table, backend, "bench-cpu-64")
            results["sd15_64x64_table_build_seconds"] = built.seconds
            results["sd15_64x64_table_blocks"] = len(built.measured)

    steal = bench.steal_since(ticks)
    summary = {
        "benchmark": "latency_accuracy",
        "compute_unit": args.compute_unit,
        "gpu": torch.cuda.get_device_name() if args.compute_unit == "cuda" else None,
        "targets": {"mape": 5.0, "within_10": 0.9, "kendall_tau": 0.9},
        "results": results,
    }
    summary |= provenance(args)
    summary["machine"]["cpu_steal_share"] = steal  # of all CPU time in the run (None: not Linux)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    spaces_run = {k: r for k, r in results.items() if isinstance(r, dict)}
    rows = [
        (key, label, m, f"table built in {r['table_build_seconds']:.1f} s")
        for key, r in spaces_run.items()
        for label, m in (("raw", r), ("calibrated", r["calibrated"]))
    ]
    rows += [
        (key, "noise", r["repeat"], "(the same networks, other rounds)")
        for key, r in spaces_run.items()
        if r.get("repeat")
    ]
    bench.print_accuracy(rows)
    if steal is not None:
        print(f"CPU steal during the run: {100 * steal:.1f}% of CPU time")
    if "sd15_64x64_table_build_seconds" in results:
        print(f"sd15 table at 64x64: {results['sd15_64x64_table_build_seconds']:.0f} s")
    headline = "sd15" if "sd15" in results else "tiny"
    print(f"latency_mape_{headline}: {results[headline]['calibrated']['mape']:.2f}")


if __name__ == "__main__":
    main()
