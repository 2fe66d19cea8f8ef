"""What the latency accuracy benchmarks share (latency_accuracy.py, its ExecuTorch sibling
latency_accuracy_executorch.py): their options, the spaces they run at which size, the pair of
backends that time blocks and whole networks, the machine's CPU steal, and the printed table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latency.backends import get_backend
from search_spaces import load_space

SPACES = ("sd15", "tiny")

# Options by their `dest`: (argparse settings, help). Each benchmark may set its own
# defaults and help texts; what an option means is the same in both.
_OPTIONS = {
    "samples": (dict(type=int, default=20), "random architectures per space"),
    "block_repeats": (dict(type=int, default=10), None),
    "net_repeats": (dict(type=int, default=5), None),
    "warmup": (dict(type=int, default=2), None),
    "rounds": (
        dict(type=int, default=2),
        "passes over the blocks and the networks, each in a new order; blocks keep their "
        "fastest, networks their fastest of one half of the passes (judged) and of the other "
        "half (the noise ceiling, judged against the first the same way)",
    ),
    "threads": (
        dict(type=int, default=1),
        "threads for blocks and networks alike (1: stable on a shared machine)",
    ),
    "seed": (dict(type=int, default=0), None),
    "calibration_samples": (
        dict(type=int, default=5),
        "other random architectures the calibration is fitted on",
    ),
}


def add_options(ap: argparse.ArgumentParser, defaults=None, **help: str) -> None:
    """Add the options both benchmarks take; `defaults` ({dest: value}) and `help`
    (dest=text) override the shared ones."""
    for dest, (settings, text) in _OPTIONS.items():
        settings = {**settings, "default": (defaults or {}).get(dest, settings["default"])}
        ap.add_argument("--" + dest.replace("_", "-"), **settings, help=help.get(dest, text))


def parse_spaces(ap: argparse.ArgumentParser, text: str) -> list[str]:
    """The names of a `--spaces` comma list, or argparse's exit 2 naming what is wrong."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(SPACES):
        ap.error(f"--spaces {text!r}: a comma list of {' and '.join(SPACES)}")
    return names


def bench_space(name: str, compute_unit: str = "cpu"):
    """The space at the size the benchmarks time: sd15 at a 32x32 latent on a CPU (a forward
    at 64x64 takes seconds), its own 64x64 on a GPU."""
    space = load_space(name)
    if name == "sd15" and compute_unit == "cpu":
        space = space.with_inputs(latent=(4, 32, 32))
    return space


def timing_backends(backend: str, compute_unit: str, args) -> tuple:
    """(the backend that times blocks, the one that times whole networks): the same setting,
    each with its own repeats."""
    return tuple(
        get_backend(
            backend,
            compute_unit=compute_unit,
            repeats=repeats,
            warmup=args.warmup,
            threads=args.threads,
        )
        for repeats in (args.block_repeats, args.net_repeats)
    )


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) CPU ticks since boot from /proc/stat (Linux), else None. Steal is time
    the hypervisor gave this VM's virtual CPUs to others: timings taken while it is high are
    slow and noisy whatever the table does."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def steal_since(ticks: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen since `cpu_ticks()` gave `ticks` (None: not Linux)."""
    end = cpu_ticks()
    return (end[0] - ticks[0]) / max(end[1] - ticks[1], 1) if ticks and end else None


def print_accuracy(rows: list[tuple[str, str, dict, str]]) -> None:
    """One line per (space, label, accuracy metrics, what else to say), under a header."""
    print(f"{'space':8} {'':11} {'MAPE %':>8} {'±5%':>6} {'±10%':>6} {'τ':>6}")
    for space, label, m, note in rows:
        within_5 = f"{m['within_5']:6.2f}" if "within_5" in m else " " * 6
        print(
            f"{space:8} {label:11} {m['mape']:8.2f} {within_5} "
            f"{m['within_10']:6.2f} {m['kendall_tau']:6.3f}  {note}".rstrip()
        )
