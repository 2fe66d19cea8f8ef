"""Latency accuracy on ExecuTorch: does a table of `.pte` blocks predict whole `.pte` networks?

For each space (tiny; sd15 at a 32x32 latent, batch 2), on this machine's CPU through
ExecuTorch's XNNPACK delegate (the CPU runtime of Android and iOS):

1. build a fresh table with `--backend executorch --compute-unit xnnpack` (every block lowered
   to a `.pte` and timed by the runtime; --rounds passes, each block keeps its fastest), and
   time the same blocks with torch eager for the ExecuTorch / eager ratio per block kind;
2. lower >= 20 random legal architectures + the original (and --calibration-samples others)
   to whole `.pte` programs, with the same attention processor as the blocks;
3. time every network in 2 x --rounds passes, each pass in a new order. A network's result is
   its fastest of the first --rounds passes; its fastest of the other --rounds passes is timed
   the same way, and the two scored against each other are the noise ceiling (what no table
   can beat on this machine while it is this busy);
4. compare with the table's prediction (Σ blocks + fixed parts): raw, and calibrated as the
   torch tables are (measured ~ a * predicted + b, fitted on the calibration networks only).

Targets: MAPE <= 5%, >= 95% within ±10%, Kendall τ >= 0.9. Writes
results/latency_accuracy_executorch.json (with sys.argv and every setting); the last line
printed is `executorch_mape_sd15: X` (or `executorch_mape_tiny: X` when sd15 is not run).

    python experiments/benchmarks/latency_accuracy_executorch.py --spaces tiny
    python experiments/benchmarks/latency_accuracy_executorch.py --spaces sd15 --samples 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scipy import stats

from latency import executorch as et
from latency.backends import get_backend
from latency.predict import Predictor
from latency.profile import build_table
from latency.signature import signatures
from latency.table import LatencyTable
from latency.validate import accuracy, random_archs
from nas.deploy.executorch import ExecuTorchNetworkTimer

sys.path.insert(0, str(Path(__file__).parent))
import latency_bench as bench  # noqa: E402
from provenance import provenance  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def eager_ratio(space, table, device, args) -> dict:
    """ExecuTorch / eager per block kind: Σ ET ms / Σ eager ms over the space's signatures,
    and the median of the per-block ratios (torch timed now, same threads)."""
    eager = get_backend(
        "torch", compute_unit="cpu", repeats=args.block_repeats, warmup=args.warmup, threads=1
    )
    eager.test_connection()
    sigs = signatures(space)
    rows = table.lookup(device, sigs)
    kinds: dict[str, list[tuple[float, float]]] = {}
    for sig in sigs:
        kinds.setdefault(sig.kind, []).append(
            (rows[sig.hash].median_ms, eager.profile(sig).median_ms)
        )
    return {
        kind: {
            "executorch_ms": sum(e for e, _ in pairs),
            "eager_ms": sum(t for _, t in pairs),
            "ratio_of_sums": sum(e for e, _ in pairs) / sum(t for _, t in pairs),
            "median_ratio": statistics.median(e / t for e, t in pairs),
            "blocks": len(pairs),
        }
        for kind, pairs in kinds.items()
    }


def run_space(space, args, tmp: Path) -> dict:
    device = "bench-executorch"
    block_backend, net_backend = bench.timing_backends("executorch", "xnnpack", args)
    out: dict = {"latent": list(space.latent), "batch": space.batch}
    db = tmp / f"{space.name}.db"
    db.unlink(missing_ok=True)  # a fresh table every run
    with LatencyTable(db) as table:
        print(f"   building the table ({len(signatures(space))} blocks) ...", flush=True)
        built = build_table(space, table, block_backend, device, rounds=args.rounds)
        out["table_build_seconds"] = built.seconds
        out["blocks"] = len(built.measured)
        out["noise_guard"] = built.guard.__dict__ if built.guard else None  # reference spread
        out["executorch_over_eager"] = eager_ratio(space, table, device, args)
        predictor = Predictor(space, table, device, calibrate=False)
    if args.samples == 0:  # the table alone: its build time and the ET / eager ratios
        return out

    tests = random_archs(space, args.samples, seed=args.seed)
    calib = random_archs(space, args.calibration_samples, args.seed + 10_000, False)
    calib = [a for a in calib if a not in tests]
    archs = tests + calib
    timer = ExecuTorchNetworkTimer(space, net_backend, folder=tmp / f"{space.name}-pte")
    start = time.perf_counter()
    for i, arch in enumerate(archs):  # lower everything first: no lowering between timings
        print(f"   lowering network {i + 1}/{len(archs)} ({arch.hash})", flush=True)
        timer.program(arch)
    out["networks_lower_seconds"] = time.perf_counter() - start

    times: list[list[float]] = [[] for _ in archs]
    order = list(range(len(archs)))
    rng = random.Random(args.seed)
    for r in range(2 * args.rounds):
        if r:
            rng.shuffle(order)
        print(f"   timing round {r + 1}/{2 * args.rounds}", flush=True)
        for i in order:
            times[i].append(timer(archs[i]))
    k = args.rounds
    first = [min(t[:k]) for t in times]  # the result: fastest of the first k rounds
    second = [min(t[k:]) for t in times]  # the same, from the other k rounds: noise ceiling
    predicted = [predictor.predict(a).raw_ms for a in archs]
    n = len(tests)
    fit = stats.linregress(predicted[n:], first[n:])
    calibrated = [fit.slope * p + fit.intercept for p in predicted[:n]]
    out.update(
        {
            "archs": [a.hash for a in tests],
            "predicted_ms": predicted[:n],
            "measured_ms": first[:n],
            "measured_other_rounds_ms": second[:n],
            "raw": accuracy(predicted[:n], first[:n]),
            "calibrated": {
                **accuracy(calibrated, first[:n]),
                "slope": float(fit.slope),
                "intercept": float(fit.intercept),
                "fitted_on": len(calib),
            },
            "noise": accuracy(second[:n], first[:n]),
            "network_lower_seconds": timer.lower_seconds,
        }
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--spaces", default="tiny,sd15", help="comma list of tiny and sd15")
    bench.add_options(
        ap,
        defaults={"calibration_samples": 4},
        samples="random architectures per space (0: build the table and compare with eager only)",
        rounds="k: blocks keep their fastest of k passes; networks are timed in 2k passes, the "
        "result from the first k and the noise ceiling from the other k",
        threads="ExecuTorch threads (1: shared CPU)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "latency_accuracy_executorch.json")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the lowered programs here (default: a temporary folder); a rerun with the "
        "same folder times them again without lowering them again",
    )
    args = ap.parse_args()
    names = bench.parse_spaces(ap, args.spaces)

    ticks, load_before = bench.cpu_ticks(), os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="diffnas-et-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # blocks are lowered into this folder: the build time includes lowering them
        os.environ["DIFFNAS_CACHE"] = str(work / "cache")
        for name in names:
            space = bench.bench_space(name)
            print(f"== {space.name}: latent {space.latent}, batch {space.batch}", flush=True)
            results[name] = run_space(space, args, work)
    steal = bench.steal_since(ticks)
    summary = {
        "benchmark": "latency_accuracy_executorch",
        "backend": {
            "backend": "executorch",
            "compute_unit": "xnnpack",
            **{k: v for k, v in get_backend("executorch").versions().items() if k != "threads"},
            "threads": args.threads,
        },
        "targets": {"mape": 5.0, "within_10": 0.95, "kendall_tau": 0.9},
        "results": results,
    }
    summary |= provenance(args)  # command, settings, commit, machine, created
    summary["load"] = {
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_steal_share": steal,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} (ExecuTorch {et.require()})")
    bench.print_accuracy(
        [
            (name, label, r[label], f"{len(r['archs'])} networks")
            for name, r in results.items()
            if "raw" in r
            for label in ("raw", "calibrated", "noise")
        ]
    )
    for name, r in results.items():
        print(f"{name:6} table: {r['blocks']} blocks in {r['table_build_seconds']:.1f} s")
        for kind, x in r["executorch_over_eager"].items():
            ratio, median = x["ratio_of_sums"], x["median_ratio"]
            print(f"{name:6} ET/eager {kind:16} {ratio:.2f} (median per block {median:.2f})")
    print(f"load average before/after: {load_before} / {summary['load']['loadavg_after']}")
    scored = [n for n in ("sd15", "tiny") if "calibrated" in results.get(n, {})]
    if scored:
        name = scored[0]
        print(f"executorch_mape_{name}: {results[name]['calibrated']['mape']:.2f}")


if __name__ == "__main__":
    main()
