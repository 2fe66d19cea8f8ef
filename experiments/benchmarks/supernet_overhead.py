"""What ElasticUNet's gates cost: its forward against diffusers' own, on the same weights.

ElasticUNet runs the original architecture through a gate on every block (a Python function
that looks up the architecture and calls the block's own forward). This times that against a
plain `UNet2DConditionModel` holding a copy of the same weights, in eval mode, without skips,
under `torch.no_grad()`.

The two are timed interleaved in one process (warm-up first, then A/B, B/A, A/B, ... so that
drift in machine load and any first-runner advantage hit both alike), and each side's median
and interquartile range are reported, with the ratio of medians elastic / diffusers.

    python experiments/benchmarks/supernet_overhead.py             # tiny + sd15 on CPU
    python experiments/benchmarks/supernet_overhead.py --quick     # tiny only, a few repeats
    python experiments/benchmarks/supernet_overhead.py --device cuda --dtype fp16

Writes experiments/benchmarks/results/supernet_overhead[_quick][_cuda_DTYPE].json (separate files,
so a quick or a GPU run does not overwrite the CPU reference). The last line printed is
`supernet_overhead_ratio: X`, the sd15 ratio (the tiny ratio with --quick).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DConditionModel
from provenance import provenance
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nas.supernet import ElasticUNet
from search_spaces import load_space

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# the table is ~90 columns; rich would wrap it to 80 when the output is a file or a pipe
stdout = Console() if sys.stdout.isatty() else Console(width=100)
stderr = Console(stderr=True)  # the progress bars, kept out of what a caller may parse


@dataclass
class Case:
    space: str
    latent: tuple[int, int, int] | None  # None: the space's own
    batch: int | None
    repeats: int
    warmup: int


def cases(args: argparse.Namespace) -> list[Case]:
    if args.quick:
        return [Case("tiny", None, None, args.tiny_repeats or 5, 1)]
    gpu = args.device == "cuda"
    # on a CPU sd15 at 32x32 latents (not the space's 64x64): a forward is ~3 s even so;
    # on a GPU the space's own 64x64 (512 px images), the size of the paper's A100 figure
    return [
        Case("tiny", None, None, args.tiny_repeats or (100 if gpu else 30), args.warmup),
        Case(
            "sd15", None if gpu else (4, 32, 32), 2, args.repeats or (30 if gpu else 5), args.warmup
        ),
    ]


def build(case: Case, device: str, dtype: torch.dtype):
    """The ElasticUNet (random weights) and a plain diffusers UNet with the same weights."""
    space = load_space(case.space)
    torch.manual_seed(0)
    elastic = ElasticUNet(space)
    plain = UNet2DConditionModel.from_config(space.unet_config)
    plain.load_state_dict(elastic.unet.state_dict())
    for model in (elastic, plain):
        model.eval().to(device)  # eval: no robust-training skips; the original architecture
        if dtype != torch.float32:  # (diffusers warns on any dtype cast, even a no-op one)
            model.to(dtype)
    batch = case.batch or space.batch
    latent = case.latent or tuple(space.latent)
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(batch, *latent, generator=g).to(device, dtype),
        torch.full((batch,), 500.0, device=device),
        torch.randn(batch, *space.context, generator=g).to(device, dtype),
    )
    return elastic, plain, inputs, {"latent": list(latent), "batch": batch}


def timed(model, inputs, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()  # the clock must not start while earlier kernels still run
    start = time.perf_counter()
    model(*inputs, return_dict=False)
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA calls return before the kernels finish
    return time.perf_counter() - start


def summary(times: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {
        "median_s": statistics.median(times),
        "iqr_s": q3 - q1,
        "min_s": min(times),
        "times_s": times,
    }


@torch.no_grad()
def run_case(case: Case, device: str, dtype: torch.dtype, progress: Progress) -> dict:
    task = progress.add_task(f"{case.space}: building", total=None)
    elastic, plain, inputs, shapes = build(case, device, dtype)
    # the comparison is only fair if both compute the same thing
    diff = (elastic(*inputs, return_dict=False)[0] - plain(*inputs, return_dict=False)[0]).abs()
    models = {"elastic": elastic, "diffusers": plain}
    progress.update(
        task, description=f"{case.space}: timing", total=2 * (case.warmup + case.repeats)
    )
    for _ in range(case.warmup):
        for model in models.values():
            timed(model, inputs, device)
            progress.advance(task)
    times = {name: [] for name in models}
    for i in range(case.repeats):
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(timed(models[name], inputs, device))
            progress.advance(task)
    del elastic, plain, models
    gc.collect()  # sd15 is 3.4 GB per copy in fp32: free it before the next case
    stats = {name: summary(t) for name, t in times.items()}
    paired = [e / d for e, d in zip(times["elastic"], times["diffusers"], strict=True)]
    return {
        **shapes,
        "repeats": case.repeats,
        "warmup": case.warmup,
        "max_abs_diff": diff.max().item(),
        **stats,
        "ratio": stats["elastic"]["median_s"] / stats["diffusers"]["median_s"],
        "paired_ratio_median": statistics.median(paired),  # per-repeat ratio: load drift cancels
        # other processes only ever add time, so on a busy machine the fastest runs are the
        # closest to what each forward costs
        "min_ratio": stats["elastic"]["min_s"] / stats["diffusers"]["min_s"],
    }


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(results: dict[str, dict]) -> Table:
    t = Table(title="ElasticUNet vs diffusers forward (same weights, interleaved)")
    columns = ("space", "input", "n", "elastic ms", "diffusers ms", "ratio", "paired", "min")
    for col in columns:
        t.add_column(col, justify="left" if col == "space" else "right")

    def ms(side: dict) -> str:
        median, half_iqr = side["median_s"] * 1e3, side["iqr_s"] * 1e3 / 2
        digits = 0 if median >= 100 else 2
        return f"{median:.{digits}f} ± {half_iqr:.{digits}f}"

    for name, r in results.items():
        t.add_row(
            name,
            f"{r['batch']}x" + "x".join(map(str, r["latent"])),
            str(r["repeats"]),
            ms(r["elastic"]),
            ms(r["diffusers"]),
            f"{r['ratio']:.3f}",
            f"{r['paired_ratio_median']:.3f}",
            f"{r['min_ratio']:.3f}",
        )
    t.caption = (
        "median ± half the IQR; ratio = elastic / diffusers median; paired = median of "
        "per-repeat ratios; min = ratio of the fastest runs"
    )
    return t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp16 needs --device cuda")
    p.add_argument("--repeats", type=int, help="sd15 timed repeats (default 5 CPU, 30 CUDA)")
    p.add_argument("--tiny-repeats", type=int, help="tiny timed repeats (default 30 CPU, 100 CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each model first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny only, few repeats (a smoke test)")
    p.add_argument("--out", type=Path, help="result JSON (default under results/)")
    args = p.parse_args(argv)
    if args.dtype == "fp16" and args.device == "cpu":
        p.error("--dtype fp16 needs --device cuda (fp16 convolutions on CPU are not a fair test)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    for name in ("repeats", "tiny_repeats"):
        if (n := getattr(args, name)) is not None and n < 2:
            p.error(f"--{name.replace('_', '-')} must be at least 2 (for an interquartile range)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    load_start = os.getloadavg()
    results = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=stderr) as progress:
        for case in cases(args):
            results[case.space] = run_case(case, args.device, dtype, progress)
    stdout.print(table(results))

    headline = "sd15" if "sd15" in results else "tiny"
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(args),
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine(args.device),
        # other processes on the machine make timings noisy: the load says how much
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "spaces": results,
        "headline_space": headline,
        "ratio": results[headline]["ratio"],
    }
    suffix = ("_quick" if args.quick else "") + (
        f"_cuda_{args.dtype}" if args.device == "cuda" else ""
    )
    out = args.out or RESULTS / f"supernet_overhead{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    stdout.print(f"wrote {out}")
    print(f"supernet_overhead_ratio: {report['ratio']:.4f}", flush=True)


if __name__ == "__main__":
    main()
