"""A sweep directory's trials and its front: the names of the trials' run directories, the row
each finished one adds to the results, and the Pareto front of (latency, CLIP) points with its
picture. The sweep (`nas.search.sweep`), its comparison (`nas.search.pareto`) and the Optuna
strategy all read and draw these.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

CONFIG = "sweep_config.json"  # a sweep directory's own settings: targets, seeds, compare


def trial_name(target: float, seed: int) -> str:
    return f"target{target:.2f}-seed{seed}"


def trial_row(run_dir: Path, target: float, seed: int, sweep: Path) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    return {
        "trial": run_dir.name,
        "target_ratio": target,
        "seed": seed,
        "target_ms": result["target_ms"],
        "latency_ms": result["latency_ms"],
        "target_met": result["target_met"],
        "clip": result["clip"],
        "original_clip": result["original_clip"],
        "original_ms": result["original_ms"],
        "params": result["params"]["found"],
        "iterations": result["iterations"],
        "run_dir": str(run_dir.relative_to(sweep)),
    }


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, CLIP) points that no other point beats — as fast or faster
    and as good or better, one of them strictly — ordered by latency."""
    front = []
    for i, (ms, clip) in enumerate(points):
        beaten = any(
            (m <= ms and c >= clip) and (m < ms or c > clip)
            for j, (m, c) in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_pareto(
    points: Sequence[tuple[float, float]],
    path: Path,
    title: str,
    labels: Sequence[str] | None = None,
    targets_ms: Sequence[float] = (),
    original: tuple[float, float] | None = None,
    front: Sequence[int] | None = None,
) -> Path:
    """Predicted latency (x) vs CLIP (y): every point, the Pareto front drawn as a line
    (`front`: indices of its points; default: `pareto_front(points)`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(points) if front is None else sorted(front, key=lambda i: points[i])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for t in targets_ms:
        ax.axvline(t, color="0.75", linestyle="--", linewidth=1, zorder=0)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.scatter(xs, ys, s=28, color="tab:blue", alpha=0.6, label="architectures", zorder=2)
    fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
    ax.plot(fx, fy, color="tab:red", linewidth=1.5, drawstyle="steps-post", zorder=3)
    ax.scatter(fx, fy, s=60, color="tab:red", edgecolor="black", label="Pareto front", zorder=4)
    if original is not None:
        ax.scatter(*original, s=140, marker="*", color="black", label="original", zorder=5)
    if labels is not None:
        for (x, y), text in zip(points, labels, strict=True):
            ax.annotate(text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("CLIP score")
    ax.set_title(title)
    if targets_ms:
        ax.plot([], [], color="0.75", linestyle="--", linewidth=1, label="targets")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
