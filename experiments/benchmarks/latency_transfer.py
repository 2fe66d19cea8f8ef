"""Few-shot latency transfer: how well do K measurements on a new device fill its table?

On this machine's CPU, every block of a pool of signatures (tiny at batch 1/2/4, sd15 and
sd21 at a 16x16 latent, batch 1) is timed on two "devices", interleaved block by block so
that machine load hits both alike, in 3 rounds keeping each block's lowest median. The
pairs (--pairs) differ in kind, not only in speed:

    bf16:     A = fp32, 1 thread                B = bf16, 1 thread (other kernels)
    batch:    A = the block at its batch        B = the same block at twice the batch
    latent:   A = the block at its resolution   B = the same block at twice the side (4x pixels)
    threads:  A = fp32, 2 threads               B = fp32, 1 thread (same kernels: ranking B
              by A alone is already near the ceiling, so this pair shows little)
    executorch: A = torch eager, fp32, 1 thread B = the block lowered to an ExecuTorch XNNPACK
              program (.pte), 1 thread: another runtime (fused kernels, its own attention),
              as a phone's table is to a host's (needs the executorch extra; the first run
              lowers every block, minutes for the full pool)

B is timed twice (B and B'): τ(B, B') is the noise ceiling no predictor can beat. Then
`latency.transfer.transfer` fills B from A's full table and K of B's measurements (K = 5, 10,
20), and its predictions for the blocks it did not measure are compared with B's real ones:
Kendall τ and MAPE, against two baselines on the same blocks: ranking B by A (τ only), and
A scaled by the median B/A ratio of the K anchors (MAPE), and against the same model fitted
on K random anchors (mean of 10 draws) instead of the representative ones.

Target: τ >= 0.9 with K = 10 (HELP reports 0.93 rank correlation with 10 samples), and above
the column the method must beat: ranking B's blocks by A's latencies with no measurement.
Writes experiments/benchmarks/results/latency_transfer.json; the last line printed is
`transfer_tau_gain_k10_min: X`: over the pairs, the smallest gain in τ of the transfer over
ranking by A alone.

    python experiments/benchmarks/latency_transfer.py                # bf16, batch, latent
    python experiments/benchmarks/latency_transfer.py --pairs threads,bf16
    python experiments/benchmarks/latency_transfer.py --quick        # tiny only
    python experiments/benchmarks/latency_transfer.py --pairs executorch --quick
    python experiments/benchmarks/latency_transfer.py --pairs executorch --quick --max-blocks 12
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from provenance import provenance
from scipy import stats

from latency.backends import Timing, get_backend, setting_backend
from latency.jobs import in_call_order
from latency.signature import unet_parts
from latency.table import LatencyTable, Measurement
from latency.transfer import TransferModel, transfer
from search_spaces import UserError, load_space

RESULTS = Path(__file__).parent / "results"
KS = (5, 10, 20)


@dataclass(frozen=True)
class Pair:
    a_threads: int  # torch threads of device A
    a_dtype: str
    b_threads: int
    b_dtype: str
    b_scale: str | None = None  # "batch" or "latent": B runs each block at twice that size
    b_backend: str = "torch"  # "executorch": B runs each block as an XNNPACK .pte program

    @property
    def b_setting(self) -> dict:
        """B's table setting (A's is torch on the CPU)."""
        unit = "xnnpack" if self.b_backend == "executorch" else "cpu"
        return {"backend": self.b_backend, "compute_unit": unit, "precision": self.b_dtype}


PAIRS = {
    "bf16": Pair(1, "fp32", 1, "bf16"),
    "batch": Pair(1, "fp32", 1, "fp32", "batch"),
    "latent": Pair(1, "fp32", 1, "fp32", "latent"),
    "threads": Pair(2, "fp32", 1, "fp32"),
    "executorch": Pair(1, "fp32", 1, "fp32", b_backend="executorch"),
}


def signature_pool(pair: Pair, quick: bool = False) -> tuple[list, dict]:
    """A's blocks (at A's precision) and, by A's hash, the block B runs in its place."""
    spaces = [load_space("tiny").with_inputs(batch=b) for b in (1, 2, 4)]
    for name in () if quick else ("sd15", "sd21"):
        spaces.append(load_space(name).with_inputs(latent=(4, 16, 16), batch=1))
    pool, b_of = {}, {}
    for space in spaces:
        if pair.b_scale == "batch":
            b_space = space.with_inputs(batch=2 * space.batch)
        elif pair.b_scale == "latent":
            c, h, w = space.latent
            b_space = space.with_inputs(latent=(c, 2 * h, 2 * w))
        else:
            b_space = space
        b_parts = {p.name: p.signature for p in unet_parts(b_space, pair.b_dtype)}
        for part in unet_parts(space, pair.a_dtype):
            a = part.signature
            pool.setdefault(a.hash, in_call_order(a))
            b_of.setdefault(a.hash, in_call_order(b_parts[part.name]))
    return list(pool.values()), b_of


def measure_pair(pool, b_of, pair: Pair, repeats: int, warmup: int, rounds: int):
    """Every block on A, B and B again, interleaved block by block; the whole pool `rounds`
    times over, keeping each block's lowest round median. Background load on a shared
    machine only ever slows a block down, so the lowest median is the closest to the idle
    device the table is meant to describe. Blocks that do not run in a setting are left
    out of the pair. Returns (blocks kept, {setting: {hash: ms}}, what was left out, why)."""
    backend = get_backend("torch", compute_unit="cpu", repeats=repeats, warmup=warmup)
    runtimes = {"torch": None}
    if pair.b_backend != "torch":  # lowers each block once (cached), then times the program
        runtimes[pair.b_backend] = setting_backend(
            pair.b_setting,
            repeats=repeats,
            warmup=warmup,
            threads=pair.b_threads,
        )

    def time_block(sig, threads: int, runtime: str) -> float:
        if runtimes[runtime] is not None:
            return runtimes[runtime].profile(sig).median_ms
        module, inputs = sig.build(), sig.example_inputs()
        torch.set_num_threads(threads)
        return backend.time_callable(lambda m=module, x=inputs: m(*x)).median_ms

    times: dict[str, dict[str, float]] = {"A": {}, "B": {}, "B2": {}}
    skipped: dict[str, str] = {}
    start = time.perf_counter()
    for r in range(rounds):
        for sig in pool:
            if sig.hash in skipped:
                continue
            try:
                b = b_of[sig.hash]
                for key, threads, s, runtime in (
                    ("A", pair.a_threads, sig, "torch"),
                    ("B", pair.b_threads, b, pair.b_backend),
                    ("B2", pair.b_threads, b, pair.b_backend),
                ):
                    ms = time_block(s, threads, runtime)
                    times[key][s.hash] = min(ms, times[key].get(s.hash, math.inf))
            # e.g. a block that torch cannot run in bf16 on the CPU, or that a delegate
            # cannot lower
            except (RuntimeError, UserError) as e:
                skipped[sig.hash] = f"{sig.describe()}: {str(e).splitlines()[0]}"
        print(f"  round {r + 1}/{rounds} ({time.perf_counter() - start:.0f} s)", flush=True)
    kept = [s for s in pool if s.hash not in skipped]
    return kept, times, list(skipped.values())


def evaluate(
    pool, b_of, times, pair: Pair, k: int, tmp: Path, seed: int = 0, random_anchors=False
) -> dict:
    """Run the transfer with budget k and score its predictions against B's timings."""
    a_dtype = pair.a_dtype
    a_sigs = pool
    path = tmp / f"{k}-{seed}-{random_anchors}.db"
    with LatencyTable(path) as table:
        a_ms = {s.hash: times["A"][s.hash] for s in a_sigs}
        table.add(
            Measurement("A", "torch", "cpu", a_dtype, s, [a_ms[s.hash]], a_ms[s.hash], 0)
            for s in a_sigs
        )
        b_setting = pair.b_setting
        if random_anchors:  # the same model on random anchors, measured beforehand
            rng = random.Random(seed)
            for s in rng.sample(a_sigs, k):
                b = b_of[s.hash]
                ms = times["B"][b.hash]
                table.add(
                    Measurement("B", **b_setting, signature=b, samples=[ms], median_ms=ms, iqr_ms=0)
                )

        def measure(sig) -> Timing:
            return Timing([times["B"][sig.hash]])

        report = transfer(
            table,
            "A",
            "B",
            k,
            b_setting,
            measure,
            target_signature=lambda sig: b_of[sig.hash],
        )
    rest = sorted(report.predicted)
    pred = np.array([report.predicted[h] for h in rest])
    true = np.array([times["B"][h] for h in rest])
    a_of = {b_of[s.hash].hash: times["A"][s.hash] for s in a_sigs}
    a_rest = np.array([a_of[h] for h in rest])
    ratio = statistics.median(times["B"][h] / a_of[h] for h in report.anchors)
    all_pred = {**report.predicted, **{h: times["B"][h] for h in report.anchors}}
    every = sorted(all_pred)
    return {
        "k": k,
        "predicted_blocks": len(rest),
        "kendall_tau": float(stats.kendalltau(pred, true).statistic),
        "mape": float(100 * np.mean(np.abs(pred / true - 1))),
        "loo_mape_on_anchors": report.loo_mape,
        "ridge_lambda": report.lam,
        "source_quirks_tempered": report.quirks,
        "tau_whole_table": float(
            stats.kendalltau([all_pred[h] for h in every], [times["B"][h] for h in every]).statistic
        ),
        "baseline_tau_rank_by_A": float(stats.kendalltau(a_rest, true).statistic),
        "baseline_mape_median_ratio": float(100 * np.mean(np.abs(a_rest * ratio / true - 1))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--pairs", default="bf16,batch,latent", help="comma list of: " + ", ".join(PAIRS)
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per block and round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="passes over all blocks")
    ap.add_argument("--random-draws", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny's blocks only, 3 repeats")
    ap.add_argument(
        "--max-blocks",
        type=int,
        default=None,
        help="only the first N blocks of the pool (tiny at batch 1 first): a smoke run; "
        "K values of N or more are left out",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="score again from the block timings of the last run (no timing)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default: results/latency_transfer[_quick].json); the block "
        "timings that --reuse reads go beside it (NAME_times_PAIR.json)",
    )
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.rounds = 3, 2
    pairs = args.pairs.split(",")
    for p in pairs:
        if p not in PAIRS:
            ap.error(f"unknown pair {p!r}; choose from {', '.join(PAIRS)}")
    out_path = args.out or RESULTS / f"latency_transfer{'_quick' if args.quick else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    what = "tiny b1/b2/b4" + ("" if args.quick else ", sd15 + sd21 at 16x16 b1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in pairs:
            pair = PAIRS[name]
            pool, b_of = signature_pool(pair, args.quick)
            pool = pool[: args.max_blocks]
            print(f"{name}: {len(pool)} distinct blocks ({what})", flush=True)
            saved = out_path.with_name(f"{out_path.stem}_times_{name}.json")
            if args.reuse:
                data = json.loads(saved.read_text())
                kept = [s for s in pool if s.hash in set(data["kept"])]
                times, skipped = data["times"], data["skipped"]
            else:
                kept, times, skipped = measure_pair(
                    pool, b_of, pair, args.repeats, args.warmup, args.rounds
                )
                kept_hashes = [s.hash for s in kept]
                data = {"kept": kept_hashes, "times": times, "skipped": skipped}
                saved.write_text(json.dumps(data) + "\n")
            a_ms = [times["A"][s.hash] for s in kept]
            b = [times["B"][b_of[s.hash].hash] for s in kept]
            b2 = [times["B2"][b_of[s.hash].hash] for s in kept]
            out = {
                "setting": asdict(pair),
                "blocks": len(kept),
                "left_out": skipped,
                "noise_ceiling_tau_B_vs_B2": float(stats.kendalltau(b, b2).statistic),
                "noise_mape_B_vs_B2": float(100 * np.mean(np.abs(np.array(b2) / np.array(b) - 1))),
                "tau_A_vs_B_all_blocks": float(stats.kendalltau(a_ms, b).statistic),
                "by_k": {},
            }
            work = Path(tmp) / name  # each pair's tables of its own
            work.mkdir()
            for k in (k for k in KS if k < len(kept)):
                r = evaluate(kept, b_of, times, pair, k, work)
                draws = [
                    evaluate(kept, b_of, times, pair, k, work, seed, random_anchors=True)
                    for seed in range(args.random_draws)
                ]
                r["random_anchors_mean_tau"] = float(np.mean([d["kendall_tau"] for d in draws]))
                r["random_anchors_mean_mape"] = float(np.mean([d["mape"] for d in draws]))
                out["by_k"][str(k)] = r
            results[name] = out

    summary = {
        "benchmark": "latency_transfer",
        "model": f"{TransferModel.__doc__}",
        "target": {"kendall_tau_k10": 0.9, "and_above": "baseline_tau_rank_by_A"},
        "results": results,
    }
    summary |= provenance(args)
    out_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{'pair':8} {'K':>3} {'τ':>6} {'MAPE %':>7} {'τ rank-by-A':>12} {'MAPE ratio':>11}"
        f" {'τ random K':>11} {'τ ceiling':>10}"
    )
    for pair, out in results.items():
        for k, r in out["by_k"].items():
            print(
                f"{pair:8} {k:>3} {r['kendall_tau']:6.3f} {r['mape']:7.2f} "
                f"{r['baseline_tau_rank_by_A']:12.3f} {r['baseline_mape_median_ratio']:11.2f} "
                f"{r['random_anchors_mean_tau']:11.3f} {out['noise_ceiling_tau_B_vs_B2']:10.3f}"
            )
    gains = {
        name: out["by_k"]["10"]["kendall_tau"] - out["by_k"]["10"]["baseline_tau_rank_by_A"]
        for name, out in results.items()
        if "10" in out["by_k"]
    }
    for name, gain in gains.items():
        print(f"{name}: τ gain over ranking by A alone at K = 10: {gain:+.3f}")
    lowest = f"{min(gains.values()):.3f}" if gains else "n/a (no pair had more than 10 blocks)"
    print(f"transfer_tau_gain_k10_min: {lowest}")


if __name__ == "__main__":
    main()
