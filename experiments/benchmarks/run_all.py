"""`make bench`: every benchmark, one after the other, then a summary table.

Each script measures its ratios side by side in one run, writes its JSON under
experiments/benchmarks/results/ and prints `name: value` as its last line; this driver
collects those lines into results/summary.json and results/summary.md (with the command
and wall time of each). With these flags the whole run takes about an hour on 2 CPU cores
(estimated from the scripts' separate runs: latency_accuracy ~18 min, eval_cost ~9 min,
ray_scaling ~6 min, the rest ~5 min each); pick some with --only. `--full` uses each
script's own defaults.

    python experiments/benchmarks/run_all.py                 # all, about an hour
    python experiments/benchmarks/run_all.py --only tiny_world,eval_cost
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

# script -> flags (the world is built first: the others reuse it)
BENCHMARKS: dict[str, list[str]] = {
    "tiny_world": ["--threads", "1"],
    "supernet_overhead": ["--threads", "1"],
    "latency_accuracy": [],
    "latency_transfer": [],
    "search_fidelity": [],
    "eval_cost": [],
    "ray_scaling": [],
    "strategy_compare": ["--threads", "1"],
}


def run(name: str, flags: list[str]) -> dict:
    command = [sys.executable, str(HERE / f"{name}.py"), *flags]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True)
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
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", help="comma list of benchmarks (default: all)")
    ap.add_argument("--full", action="store_true", help="each script's own default flags")
    args = ap.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            sys.exit(
                f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
            )
    rows = [run(n, [] if args.full else BENCHMARKS[n]) for n in names]
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "benchmarks": rows,
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = ["| benchmark | metric | value | seconds | command |", "|---|---|---|---|---|"]
    for r in rows:
        shown = r["value"] if r["ok"] else f"FAILED (exit {r['returncode']})"
        table.append(
            f"| {r['benchmark']} | {r['metric'] or ''} | {shown} | {r['seconds']} | "
            f"`{r['command']}` |"
        )
    (RESULTS / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    failed = [r["benchmark"] for r in rows if not r["ok"]]
    total = sum(r["seconds"] for r in rows)
    print(f"bench_total_minutes: {total / 60:.1f}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
