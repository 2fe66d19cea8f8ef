"""`diffnas report SWEEP_DIR`: a sweep's front as a picture and a page.

With a `--compare` sweep (compare.json, nas.search.pareto): CLIP vs latency of the evolved
front, Optuna's and random search's at the same evaluation budget, the hand designs and the
original, all judged on the same held-out protocol, each point the mean over the sweep's
seeds with its seed-to-seed standard deviation as error bars; one panel per latency
(predicted by the table, and measured whole where the sweep measured). Without: the evolved
networks alone, with the CLIP their searches scored (search prompts, fine-tuned weights).

Reads only the sweep directory, so a report can be made anywhere, long after the sweep.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from nas.search.pareto import COMPARE
from nas.search.pareto_stats import summarize
from search_spaces import UserError

STYLE = {  # method -> (label, colour, marker)
    "evolution": ("evolution (diffnas)", "tab:red", "o"),
    "optuna": ("Optuna, same budget", "tab:blue", "s"),
    "random": ("best of N random, same budget", "tab:gray", "v"),
}
DESIGN_MARKERS = "DPXh*p"


def _finished_rows(path: Path) -> list[dict]:
    from nas.search.front import CONFIG, trial_name, trial_row

    if not (path / CONFIG).is_file():
        raise UserError(f"{path} is not a diffnas sweep directory (no {CONFIG})")
    config = json.loads((path / CONFIG).read_text())
    rows = [
        trial_row(path / trial_name(t, s), t, s, path)
        for t in config["targets"]
        for s in config["seeds"]
        if (path / trial_name(t, s) / "result.json").is_file()
    ]
    if not rows:
        raise UserError(
            f"{path}: no search of the sweep has finished (no trial has a result.json); run or "
            f"continue it with `diffnas sweep EXPERIMENT --resume {path}`"
        )
    return rows


def write_sweep_report(path: Path) -> Path:
    """front.png and report.html of a sweep directory; returns the page's path."""
    path = Path(path)
    rows = _finished_rows(path)
    compare = None
    if (path / COMPARE).is_file():
        compare = json.loads((path / COMPARE).read_text())
    else:  # the evolution alone, as its searches scored it
        points = [
            {"method": "evolution", "name": r["trial"], "target_ratio": r["target_ratio"]}
            | {"seed": r["seed"], "clip": r["clip"], "latency_ms": r["latency_ms"]}
            | {"measured_ms": None, "target_ms": r["target_ms"]}
            for r in rows
        ]
        for s in sorted({r["seed"] for r in rows}):
            first = next(r for r in rows if r["seed"] == s)
            points.append(
                {"method": "original", "name": "original", "seed": s}
                | {"clip": first["original_clip"], "latency_ms": first["original_ms"]}
                | {"measured_ms": None}
            )
        summary = summarize(points)
    summary = compare["summary"] if compare else summary
    png = plot_front(summary, path / "front.png", path.name, judged=compare is not None)
    page = path / "report.html"
    page.write_text(_html(path, rows, compare, summary, png.name))
    return page


def plot_front(summary: dict, out: Path, title: str, judged: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    measured = any(g["measured_ms"]["n"] for g in groups)
    kinds = [("latency_ms", "predicted latency (ms, lookup table)")]
    if measured:
        kinds.append(("measured_ms", "measured latency (ms, whole network here)"))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 5.4), dpi=130, squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], kinds, strict=True):
        for method, (label, colour, marker) in STYLE.items():
            rows = sorted(
                (g for g in groups if g["method"] == method and g[key]["n"]),
                key=lambda g: g[key]["mean"],
            )
            if not rows:
                continue
            xs = [g[key]["mean"] for g in rows]
            ys = [g["clip"]["mean"] for g in rows]
            ax.errorbar(
                xs,
                ys,
                xerr=[g[key]["sd"] for g in rows],
                yerr=[g["clip"]["sd"] for g in rows],
                color=colour,
                marker=marker,
                markersize=7,
                capsize=3,
                linewidth=1.5 if method == "evolution" else 1,
                linestyle="-" if method == "evolution" else "--",
                label=label,
                zorder=4 if method == "evolution" else 3,
            )
        designs = [g for g in groups if g["method"] == "design" and g[key]["n"]]
        for i, g in enumerate(designs):
            ax.errorbar(
                g[key]["mean"],
                g["clip"]["mean"],
                xerr=g[key]["sd"],
                yerr=g["clip"]["sd"],
                color="black",
                markerfacecolor="gold",
                marker=DESIGN_MARKERS[i % len(DESIGN_MARKERS)],
                markersize=9,
                capsize=3,
                linestyle="none",
                label=f"hand design: {g['name']}",
                zorder=5,
            )
            ax.annotate(
                g["name"],
                (g[key]["mean"], g["clip"]["mean"]),
                xytext=(6, 5 if i % 2 else -11),  # alternate sides: neighbours overlap less
                textcoords="offset points",
                fontsize=7.5,
                color="0.25",
            )
        for g in groups:
            if g["method"] == "original" and g[key]["n"]:
                ax.errorbar(
                    g[key]["mean"],
                    g["clip"]["mean"],
                    yerr=g["clip"]["sd"],
                    color="black",
                    marker="*",
                    markersize=13,
                    capsize=3,
                    linestyle="none",
                    label="original (full network)",
                    zorder=5,
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("CLIP score" + (" (held-out prompts)" if judged else " (search prompts)"))
        ax.grid(alpha=0.3)
    seeds = max(g["seeds"] for g in groups)
    how = "same held-out protocol and weights" if judged else "as each search scored it"
    fig.suptitle(f"sweep {title}: mean ± s.d. over {seeds} seed(s), {how}", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(out)
    plt.close(fig)
    return out


def _fmt(s: dict, digits: int = 2) -> str:
    if not s["n"]:
        return "—"
    sd = f" ± {s['sd']:.{digits}f}" if s["n"] > 1 else ""
    return f"{s['mean']:.{digits}f}{sd}"


def _sigma(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f}"


def _html(path: Path, rows, compare, summary, png: str) -> str:
    e = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>sweep {e(path.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#eee}</style>",
        f"<h1>sweep {e(path.name)}</h1>",
        f"<img src='{e(png)}' style='max-width:100%'>",
    ]
    if compare is None:
        parts.append(
            "<p>Evolution only (the sweep ran without <code>--compare</code>): each network's "
            "CLIP as its search scored it, on the search's prompts and its fine-tuned weights. "
            "<code>diffnas sweep --compare</code> adds Optuna and random search at the same "
            "budget and the hand designs, judged on held-out prompts.</p>"
        )
    else:
        p, f = compare["protocol"], compare["fine_tuning"]
        parts.append(
            f"<p>Every network judged on {p['prompts']} held-out prompts × {p['noises']} noises, "
            f"{p['steps']} DDIM steps, CFG {p['cfg']}, on {e(p['weights'])}. Fine-tuning: "
            f"{e(f['rule'])}. Optuna and random search scored as many images as the evolution "
            "of the same target and seed (budgets below).</p>"
        )
        parts.append("<h2>Hand designs against the evolved front</h2>")
        parts.append(
            "<table><tr><th>design</th><th>ms</th><th>CLIP</th><th>best evolved as fast"
            "</th><th>its CLIP</th><th>margin</th><th>σ</th><th>verdict</th></tr>"
        )
        for v in summary["designs"]:
            a, m = v["against"], v["margin"]
            parts.append(
                f"<tr><td>{e(v['design'])}</td><td>{v['latency_ms']:.2f}</td>"
                f"<td>{v['clip']:.2f}</td>"
                + (
                    f"<td>{a['target_ratio']:.2f}× ({a['latency_ms']:.2f} ms)</td>"
                    f"<td>{a['clip']:.2f}</td><td>{m['clip']:+.2f}</td>"
                    f"<td>{_sigma(m['sigma'])}</td>"
                    if a
                    else "<td colspan=4>—</td>"
                )
                + f"<td>{e(v['verdict'])}</td></tr>"
            )
        parts.append(
            "</table><p>σ: the margin over the combined standard error of the two "
            "means (seed to seed); beaten / lost beyond 2σ, matched within.</p>"
        )
    parts.append(
        "<h2>Every group</h2><table><tr><th>method</th><th>target</th><th>seeds</th>"
        "<th>predicted ms</th><th>measured ms</th><th>CLIP</th><th>target met</th></tr>"
    )
    for g in summary["groups"]:
        target = "" if g["target_ratio"] is None else f"{g['target_ratio']:.2f}"
        parts.append(
            f"<tr><td>{e(g['name'] if g['method'] == 'design' else g['method'])}</td>"
            f"<td>{target}</td><td>{g['seeds']}</td><td>{_fmt(g['latency_ms'])}</td>"
            f"<td>{_fmt(g['measured_ms'])}</td><td>{_fmt(g['clip'])}</td>"
            f"<td>{ {True: 'yes', False: 'no', None: ''}[g['target_met']] }</td></tr>"
        )
    parts.append("</table>")
    if compare is not None:
        parts.append(
            "<h2>Evaluation budgets (images scored)</h2><table><tr><th>trial</th>"
            "<th>evolution images</th><th>evolution architectures</th>"
            "<th>Optuna / random architectures</th></tr>"
        )
        for trial, b in compare["budgets"].items():
            parts.append(
                f"<tr><td>{e(trial)}</td><td>{b['images']}</td><td>{b['architectures']}</td>"
                f"<td>{b['baseline_architectures']} × {b['images_per_architecture']} images"
                "</td></tr>"
            )
        parts.append("</table>")
    parts.append(
        f"<p>{len(rows)} finished evolution(s). Data: sweep.json"
        + (", compare.json" if compare else "")
        + ".</p>"
    )
    return "\n".join(parts) + "\n"
