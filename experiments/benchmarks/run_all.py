"""`make bench` and `make bench-full`: the benchmarks, one after the other, then a summary.

Each script measures its ratios side by side in one run, writes its JSON and prints
`name: value` as its last line; this driver collects those lines into summary.json and
summary.md (with the command and wall time of each). Each profile has its own folder, so
a long run never replaces the quick results the README quotes: experiments/benchmarks/results/
for quick, results/full/ for full (the scripts are given `--out` there).

Two profiles (--profile):

    quick  `make bench`: the seven benchmarks of the method (tiny world, supernet overhead,
           latency accuracy, latency transfer, search fidelity, Ray scaling, the Pareto front
           against the hand designs) with fewer repeats: about 32 minutes on 2 CPU cores once
           the tiny world is cached, without the Pareto sweep (its own time is in
           results/pareto.json; the first script builds the world otherwise: +8 min); then
           the evaluation outcome in its quick profile (ten whole searches: an hour or more)
           and the SD-v1.5 projection, which reads its result. The README's results are this
           profile's.
    full   `make bench-full`: every script with more repeats (mostly its own defaults;
           latency accuracy in the paired protocol), plus the evaluation-cost and strategy
           comparisons (about 35 minutes on 2 cores), and the GPU benchmark (sd15_action)
           where torch sees a CUDA GPU. Its results go to results/full/.

    python experiments/benchmarks/run_all.py                      # quick
    python experiments/benchmarks/run_all.py --profile full
    python experiments/benchmarks/run_all.py --only tiny_world,ray_scaling

--only re-runs some and keeps the other rows of the profile's last summary (each row says
when it ran). Both profiles end by rewriting docs/results.md and the README's results table
from the JSON results (results_page.py, beside this file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

# script -> flags, per profile (the world is built first: the others reuse it). The quick
# flags keep every issue's sample sizes (>= 20 networks, K = 10, 10 random networks) and
# cut repeats and rounds. latency_accuracy stays at 1 thread: at 2 threads on this 2-core
# machine the table over-predicted sd15 networks by up to 76% (MAPE 45% vs 9% at 1 thread).
PROFILES: dict[str, dict[str, list[str]]] = {
    "quick": {
        "tiny_world": ["--threads", "1"],
        "supernet_overhead": ["--threads", "1", "--repeats", "9", "--tiny-repeats", "10"],
        "latency_accuracy": [
            "--net-repeats",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--block-repeats",
            "5",
        ],
        # the pairs of another kind (bf16, twice the batch, twice the resolution) on tiny's
        # blocks; bench-full adds sd15's and sd21's
        "latency_transfer": ["--quick"],
        "search_fidelity": [],  # three searches, each on a table of its own
        "ray_scaling": ["--rounds", "1"],
        # the design targets + 0.4, 2 seeds: evolution, Optuna and random per trial
        "pareto": [],
        # every protocol's whole search, 2 seeds, the reference raced (its PROFILES); long
        "eval_outcome": ["--profile", "quick"],
        # the sd15 CPU table (built if the cache lacks it) and the plan: a minute or two
        "sd15_plan": [],
    },
    "full": {
        "tiny_world": ["--threads", "1"],
        # more sd15 repeats than quick's 9: at the script's default 5 one slow run moves the
        # median ratio by 10% on this CPU
        "supernet_overhead": ["--threads", "1", "--repeats", "15"],
        # the paired protocol (each network right after its own blocks) with 3 repeats each:
        # the additive model's own error, free of drift; make bench's row is the separate one
        "latency_accuracy": [
            "--protocol",
            "paired",
            "--net-repeats",
            "3",
            "--block-repeats",
            "3",
            "--warmup",
            "1",
        ],
        "latency_transfer": [],
        "search_fidelity": [],
        "eval_cost": [],
        "eval_outcome": [],  # 3 seeds per protocol, the reference plain: hours on 2 cores
        "sd15_plan": [],
        "ray_scaling": [],
        "strategy_compare": ["--threads", "1"],
        "sd15_action": [],  # only where a CUDA GPU is seen
        "pareto": ["--profile", "full"],
    },
}
GPU_ONLY = {"sd15_action"}


def run(name: str, flags: list[str], folder: Path) -> dict:
    root = HERE.parents[1]  # the repository: commands run from there, as `make bench` does
    if folder != RESULTS:  # the scripts write under RESULTS unless told otherwise
        flags = [*flags, "--out", os.path.relpath(folder / f"{name}.json", root)]
    command = [sys.executable, str(HERE / f"{name}.py"), *flags]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, cwd=root)
    seconds = time.perf_counter() - start
    sys.stdout.write(proc.stdout)
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    metric, _, value = last.partition(": ")
    ok = proc.returncode == 0 and bool(value)
    return {
        "benchmark": name,
        "command": " ".join(["python", f"experiments/benchmarks/{name}.py", *flags]),
        "seconds": round(seconds, 1),
        "ok": ok,
        "returncode": proc.returncode,
        "metric": metric if ok else None,
        "value": value.strip() if ok else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_pages() -> None:
    """docs/results.md and the README's short table, from the result files now on disk."""
    # loaded by path: the driver also runs as a module of its own tests, off sys.path
    spec = importlib.util.spec_from_file_location(
        "results_page", Path(__file__).with_name("results_page.py")
    )
    page = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = page  # dataclasses look their module up there
    spec.loader.exec_module(page)
    root = HERE.parents[1]
    page.write_all(results=RESULTS, page=root / "docs" / "results.md", readme=root / "README.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", choices=list(PROFILES), default="quick")
    ap.add_argument("--only", help="comma list of the profile's benchmarks (default: all)")
    args = ap.parse_args()
    benchmarks = PROFILES[args.profile]
    names = list(benchmarks)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in benchmarks]
        if unknown:
            print(
                f"unknown benchmark(s) {', '.join(unknown)} in profile {args.profile}; choose "
                f"from {', '.join(benchmarks)}",
                file=sys.stderr,
            )
            sys.exit(2)
    if GPU_ONLY & set(names):
        import torch  # only asked here: the driver itself needs no torch

        if not torch.cuda.is_available():
            skipped = sorted(GPU_ONLY & set(names))
            print(f"no CUDA GPU: skipping {', '.join(skipped)}", flush=True)
            names = [n for n in names if n not in GPU_ONLY]
    folder = RESULTS if args.profile == "quick" else RESULTS / args.profile
    rows = [run(n, benchmarks[n], folder) for n in names]
    folder.mkdir(parents=True, exist_ok=True)
    summary_path = folder / "summary.json"
    if args.only and summary_path.is_file():  # re-running some: keep the others' rows
        before = json.loads(summary_path.read_text())
        if before.get("profile") == args.profile:
            fresh = {r["benchmark"]: r for r in rows}
            kept = [fresh.pop(r["benchmark"], r) for r in before["benchmarks"]]
            rows = kept + list(fresh.values())
    summary = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(["python", "experiments/benchmarks/run_all.py", *sys.argv[1:]]),
        "profile": args.profile,
        "benchmarks": rows,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    table = [
        "| benchmark | metric | value | seconds | command | ran |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        shown = r["value"] if r["ok"] else f"FAILED (exit {r['returncode']})"
        table.append(
            f"| {r['benchmark']} | {r['metric'] or ''} | {shown} | {r['seconds']} | "
            f"`{r['command']}` | {r.get('created', '')} |"
        )
    (folder / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    write_pages()
    failed = [r["benchmark"] for r in rows if not r["ok"]]
    total = sum(r["seconds"] for r in rows)  # of the rows shown, including kept ones
    print(f"bench_total_minutes: {total / 60:.1f}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
