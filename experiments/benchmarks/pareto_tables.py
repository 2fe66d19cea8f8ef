"""The markdown tables of a Pareto result (pareto.json): every network's latency and held-out
CLIP, each hand design's verdict, and the sd15 hand designs' predicted latency. Free of torch:
the results page writes them into docs/pareto.md from the JSON alone."""

from __future__ import annotations

LABELS = {
    "original": "original",
    "evolution": "evolution",
    "optuna": "Optuna, same budget",
    "random": "best of N random, same budget",
}


def _ms(stat: dict | None) -> str:
    return "-" if not stat else f"{stat['mean']:.2f}"


def _clip(stat: dict) -> str:
    sd = f" ± {stat['sd']:.1f}" if stat.get("n", 1) > 1 else ""
    return f"{stat['mean']:.1f}{sd}"


def groups_table(result: dict) -> str:
    """One row per network group: predicted and measured ms, held-out CLIP over the seeds."""
    seeds = result["seeds"]
    rows = [
        f"| network | target | predicted ms | measured ms | held-out CLIP (mean ± s.d., "
        f"{seeds} seeds) |",
        "|---|---|---|---|---|",
    ]
    for g in result["compare"]["summary"]["groups"]:
        label = LABELS.get(g["method"]) or f"hand design `{g['name']}`"
        target = "-" if g["target_ratio"] is None else f"{g['target_ratio']:.2f}"
        rows.append(
            f"| {label} | {target} | {_ms(g['latency_ms'])} | {_ms(g.get('measured_ms'))} | "
            f"{_clip(g['clip'])} |"
        )
    return "\n".join(rows)


def designs_table(result: dict) -> str:
    """Each hand design against the best evolved network at most as slow (predicted)."""
    rows = [
        "| hand design | its ms / CLIP | evolved network against it: target, ms / CLIP | "
        "margin (CLIP, σ) | verdict |",
        "|---|---|---|---|---|",
    ]
    for v in result["compare"]["summary"]["designs"]:
        a, m = v.get("against"), v.get("margin")
        against = (
            "-" if not a else f"{a['target_ratio']:.2f}, {a['latency_ms']:.2f} / {a['clip']:.1f}"
        )
        margin = "-"
        if m:
            sigma = "" if m["sigma"] is None else f", {m['sigma']:+.1f} σ"
            margin = f"{m['clip']:+.1f}{sigma}"
        rows.append(
            f"| `{v['design']}` | {v['latency_ms']:.2f} / {v['clip']:.1f} | {against} | "
            f"{margin} | {v['verdict']} |"
        )
    h = result["headline"]
    rows.append("")
    rows.append(
        f"`pareto_found_beats_designs: {h['found_beats_designs']}`, "
        f"`pareto_min_margin_sigma: {h['min_margin_sigma']:.2f}` ({h['rule']}); the sweep took "
        f"{result['sweep_seconds'] / 60:.0f} min."
    )
    return "\n".join(rows)


def sd15_table(result: dict) -> str:
    """The sd15 hand designs' parameters and predicted latency over the original's."""
    sd15 = result.get("sd15")
    if not sd15:
        return ""
    latent = "×".join(str(n) for n in sd15["latent"][1:])
    spread = max((b["spread"] for b in sd15.get("builds", [])), default=None)
    guard = "" if spread is None else f"; noise guard spread {spread:.2f}"
    rows = [
        f"sd15 at latent {latent}, batch {sd15['batch']}, {sd15['device']}{guard}:",
        "",
        "| network | parameters | predicted ms | over the original |",
        "|---|---|---|---|",
    ]
    for name, r in sd15["networks"].items():
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "1"
        rows.append(f"| `{name}` | {r['params'] / 1e6:.1f}M | {r['latency_ms']:.0f} | {ratio} |")
    return "\n".join(rows)


def all_tables(result: dict) -> str:
    parts = [groups_table(result), designs_table(result), sd15_table(result)]
    return "\n\n".join(p for p in parts if p) + "\n"
