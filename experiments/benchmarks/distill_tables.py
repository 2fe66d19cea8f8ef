"""The markdown tables of a distillation result (distill.json): CLIP per variant, the loss
terms per block at the start, and the exported networks' latency. Free of torch: the results
page writes them into docs/distill.md from the JSON alone."""

from __future__ import annotations

import statistics

LABELS = {
    "none": "found, no training",
    "task": "found, task loss only",
    "task+output": "found, task + output KD",
    "full": "found, the default loss",
    "bksdm": "found, BK-SDM's loss (plain feature MSEs summed, all weights 1)",
}


def _label(name: str, v: dict | None) -> str:
    if name in LABELS:
        label = LABELS[name]
    else:
        label = f"found, weights {name[2:]}"
    w = v.get("weights") if v else None
    if name == "full" and w:
        label += f" (weights {w['task']:g}, {w['output']:g}, {w['feature']:g}, {w['feature_loss']})"
    return label


def scales_table(result: dict) -> str:
    """The block scales at the start of distilling the found network, as markdown."""
    sc = result["block_scales"]
    rows = [
        f"task loss {sc['task']:.3f}, output KD {sc['output_kd']:.3f} (one batch of "
        f"{sc['batch']}, the target's mean square {sc['target_mean_square']:.2f})",
        "",
        "| block | teacher's mean square | plain MSE | relative error | matched |",
        "|---|---|---|---|---|",
    ]
    for name, b in sc["blocks"].items():
        rows.append(
            f"| `{name}` | {b['teacher_mean_square']:.2f} | {b['mse']:.3f} | "
            f"{b['relative']:.3f} | {'yes' if b['matched'] else 'no: nothing computed'} |"
        )
    total = sum(b["mse"] for b in sc["blocks"].values())
    matched = [b for b in sc["blocks"].values() if b["matched"]]
    rows.append(
        f"| sum (every block) / BK-SDM sum (matched) / mean relative (matched) | | {total:.2f} "
        f"/ {sum(b['mse'] for b in matched):.2f} | "
        f"{statistics.fmean(b['relative'] for b in matched):.3f} | |"
    )
    return "\n".join(rows)


def table(result: dict) -> str:
    """The result's markdown table: CLIP and its ratio to the full network (± standard error)
    on each protocol, per variant and the hand design, and the training time."""
    protocols = list(result["teacher_clip"])
    head = "| network | " + " | ".join(protocols) + " | training |"
    rows = [head, "|---" * (len(protocols) + 2) + "|"]
    teacher = result["teacher_clip"]
    rows.append(
        "| full network (teacher) | "
        + " | ".join(f"{teacher[p]:.2f}" for p in protocols)
        + " | - |"
    )

    def row(label: str, clip: dict, r: dict, seconds) -> str:
        cells = [
            f"{clip[p]:.2f} ({100 * r[p]['ratio']:.1f}% ± {100 * r[p]['se']:.1f})"
            for p in protocols
        ]
        t = f"{seconds:.0f} s" if seconds is not None else "-"
        return f"| {label} | " + " | ".join(cells) + f" | {t} |"

    for name, v in result["variants"].items():
        rows.append(row(_label(name, v), v["clip"], v["ratio"], v.get("train_seconds")))
    hand = result.get("hand_design")
    if hand:
        for name, v in hand["variants"].items():
            design = f"hand design `{hand['design']}`"
            if name == "none":
                design += f" ({hand['predicted_ms']:.2f} ms predicted)"
            label = _label(name, v).replace("found", design, 1)
            rows.append(row(label, v["clip"], v["ratio"], v.get("train_seconds")))
    return "\n".join(rows)


def latency_table(result: dict) -> str:
    """The exported networks timed whole, per runtime: measured and predicted ms, speed-up."""
    rows = [
        "| runtime | original: measured (table) | found: measured (table) | speed-up: measured "
        "(table) |",
        "|---|---|---|---|",
    ]
    for label, key in (
        ("torch, exported folder", "latency"),
        ("ExecuTorch XNNPACK, .pte", "latency_executorch"),
    ):
        d = result.get(key)
        if not d:
            continue
        m, p, s = d["measured_ms"], d["predicted_ms"], d["speedup"]
        rows.append(
            f"| {label} | {m['original']:.2f} ms ({p['original']:.2f}) | {m['found']:.2f} ms "
            f"({p['found']:.2f}) | {s['measured']:.2f}x ({s['predicted']:.2f}x) |"
        )
    return "\n".join(rows)


def all_tables(result: dict) -> str:
    """Every table of `result`, as `distill.py --table` prints them."""
    parts = [table(result)]
    if result.get("block_scales"):
        parts.append(scales_table(result))
    if result.get("latency"):
        parts.append(latency_table(result))
    return "\n\n".join(parts) + "\n"
