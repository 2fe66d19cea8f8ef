"""`diffnas report runs/<name>`: the run directory as pictures, gathered in report.html.

Reads only the run directory (history.jsonl, result.json, grids), so a report can be made
anywhere, long after the search.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from search_spaces import SearchSpace, UserError  # noqa: E402
from search_spaces.spec import SpaceSpec  # noqa: E402

KINDS = (("cross_attention", "CA"), ("resnet", "ResNet"))


def _load(run: Path) -> tuple[list[dict], dict]:
    history_file, result_file = run / "history.jsonl", run / "result.json"
    if not history_file.is_file():
        raise UserError(f"{run} is not a finished diffnas run (no history.jsonl)")
    history = [json.loads(line) for line in history_file.read_text().splitlines() if line]
    if not history:
        raise UserError(f"{run}: history.jsonl is empty; the search has not finished an iteration")
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    return history, result


def _train_steps(run: Path) -> int:
    """The robust-training steps the search ran before each iteration (0 if unknown)."""
    spec = run / "experiment.yaml"
    if not spec.is_file():
        return 0
    return (yaml.safe_load(spec.read_text()).get("search") or {}).get("train_steps", 0)


def _progress(history, result, path):
    its = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=120)
    ax.plot(its, [h["latency_ms"] for h in history], "o-", color="C0", label="latency")
    ax.axhline(history[0]["target_ms"], color="C0", ls="--", lw=1, label="target")
    ax.set_xlabel("iteration")
    ax.set_ylabel("predicted latency (ms)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(its, [h["clip"] for h in history], "s-", color="C3", label="CLIP")
    ax2.set_ylabel("CLIP score", color="C3")
    ax.set_xticks(its)
    ax.set_title("latency and CLIP score per iteration", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    # below the axes: inside them it hides points or tick labels
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.savefig(path)
    plt.close(fig)


def _counts(arch: dict, slots: dict) -> dict:
    out: dict = {}
    for path, n in arch["multiplicity"].items():
        stage, kind = slots[path]
        out[(stage, kind)] = out.get((stage, kind), 0) + n
    return out


def _heatmap(history, result, slots, stages, path):
    archs = [h["arch"] for h in history] + [history[-1]["arch_after"]]
    labels = [str(h["iteration"]) for h in history] + ["final"]
    rows = [(s, k) for s in stages for k, _ in KINDS if any(slots[p] == (s, k) for p in slots)]
    data = np.array([[_counts(a, slots).get(r, 0) for a in archs] for r in rows])
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(archs), 0.8 + 0.32 * len(rows)), dpi=120)
    ax.imshow(data, cmap="Blues", aspect="auto", vmin=0)
    for i in range(len(rows)):
        for j in range(len(archs)):
            ax.text(
                j,
                i,
                data[i, j],
                ha="center",
                va="center",
                fontsize=8,
                color="white" if data[i, j] > data.max() * 0.6 else "black",
            )
    ax.set_yticks(range(len(rows)), [f"{s} {dict(KINDS)[k]}" for s, k in rows], fontsize=8)
    ax.set_xticks(range(len(archs)), labels, fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_title("blocks per stage and kind", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _values(history, slots, path):
    actions = sorted(history[0]["actions"], key=lambda a: a["value"])
    if not actions:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.22 * len(actions)), dpi=120)
    colors = ["C0" if slots[a["slot"]][1] == "cross_attention" else "C1" for a in actions]
    ax.barh(range(len(actions)), [a["value"] for a in actions], color=colors)
    ax.set_yticks(range(len(actions)), [a["slot"] for a in actions], fontsize=7)
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_xlabel("value = ΔCLIP / ΔLatency (CLIP points per ms)")
    ax.set_title("block values at the first evaluation (blue: CA, orange: ResNet)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _stages(result, path):
    per = result["per_stage"]
    stages = list(per["original"])
    x = np.arange(len(stages))
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=120)
    for i, (name, hatch) in enumerate((("original", ""), ("found", "//"))):
        bottom = np.zeros(len(stages))
        for k, label in KINDS:
            v = np.array([per[name][s][k] for s in stages])
            ax.bar(
                x + (i - 0.5) * 0.38,
                v,
                0.36,
                bottom=bottom,
                hatch=hatch,
                color="C0" if k == "cross_attention" else "C1",
                edgecolor="white",
                label=f"{label} ({name})",
            )
            bottom += v
    ax.set_xticks(x, stages)
    ax.set_ylabel("predicted ms")
    ax.set_title("per-stage latency: original (left) vs found (right, hatched)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


GRID_COLUMNS = 8  # images per row of the grid PNGs (search.evolve.save_grid, deploy.distill)
GRID_PADDING = 2
COMPARISON_ROWS = 8  # prompts in comparison.png
TILE = 128  # pixels of one image in comparison.png at least (a 32x32 image: 4x)


def _tiles(path: Path, n: int) -> list:
    """The first n images of a grid PNG (torchvision's layout: GRID_COLUMNS per row, padded)."""
    from PIL import Image

    grid = Image.open(path).convert("RGB")
    columns = min(GRID_COLUMNS, n)
    side = (grid.width - GRID_PADDING) // columns - GRID_PADDING
    out = []
    for i in range(n):
        x = GRID_PADDING + (i % columns) * (side + GRID_PADDING)
        y = GRID_PADDING + (i // columns) * (side + GRID_PADDING)
        out.append(grid.crop((x, y, x + side, y + side)))
    return out


def _comparison(run: Path, prompts: list[str], networks: dict[str, Path], path: Path) -> None:
    """One row per prompt, the prompt beside it, one column per network: the same prompts
    and noises; each image enlarged by a whole factor (at least 4x a 32x32 one), nearest
    neighbour, so its pixels stay pixels."""
    from PIL import Image, ImageDraw, ImageFont

    n = min(COMPARISON_ROWS, len(prompts))
    columns = {name: _tiles(grid, len(prompts))[:n] for name, grid in networks.items()}
    side = next(iter(columns.values()))[0].width
    scale = max(1, -(-TILE // side))  # ceil: 32 px -> 4x
    size, gap, text_w, head = side * scale, 8, 330, 28
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    width = text_w + len(columns) * (size + gap)
    image = Image.new("RGB", (width, head + n * (size + gap)), "white")
    draw = ImageDraw.Draw(image)
    for j, name in enumerate(columns):
        draw.text((text_w + j * (size + gap), 6), name, fill="black", font=font)
    for i in range(n):
        y = head + i * (size + gap)
        lines, line = [], ""
        for word in prompts[i].split():  # wrap the prompt to the text column
            if line and draw.textlength(f"{line} {word}", font=font) > text_w - 16:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        draw.multiline_text((4, y + 4), "\n".join([*lines, line]), fill="black", font=font)
        for j, tiles in enumerate(columns.values()):
            big = tiles[i].resize((size, size), Image.Resampling.NEAREST)
            image.paste(big, (text_w + j * (size + gap), y))
    image.save(path)


def _distilled(run: Path) -> dict | None:
    """The run's distillation (RUN/distilled/metrics.json and config.json), if finished."""
    folder = run / "distilled"
    if not (folder / "metrics.json").is_file():
        return None
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["config"] = json.loads((folder / "config.json").read_text())
    return metrics


def write_report(run: str | Path) -> Path:
    run = Path(run)
    history, result = _load(run)
    space = json.loads((run / "space.json").read_text())
    sp = SearchSpace(SpaceSpec.model_validate(space))
    slots = {p: (s.stage, s.kind) for p, s in sp.slots.items()}  # from the run's own space
    _progress(history, result, run / "progress.png")
    _heatmap(history, result, slots, list(sp.stages), run / "architecture.png")
    has_values = _values(history, slots, run / "values.png")
    if result:
        _stages(result, run / "stages.png")
    distilled = _distilled(run)
    networks = {n: run / f"grid_{n}.png" for n in ("original", "found")}
    networks["distilled"] = run / "distilled" / "grid_distilled.png"
    networks["teacher"] = run / "distilled" / "grid_teacher.png"
    networks = {n: p for n, p in networks.items() if p.is_file()}
    comparison = bool(result.get("prompts")) and "found" in networks
    if comparison:
        _comparison(run, result["prompts"], networks, run / "comparison.png")
    (run / "report.html").write_text(_html(run, history, result, has_values, distilled, comparison))
    return run / "report.html"


def _distilled_rows(result: dict, d: dict) -> tuple[str, str]:
    """Table cells of the distilled network, and the rows only a distillation has."""
    clip, ms = d["clip"], d.get("measured_ms", {})
    default_teacher = d["config"]["teacher"] == "supernet (full network)"  # nas.deploy.distill's
    held = "held_out" in clip["after"]
    cells = {
        "latency": f"{result['latency_ms']:.2f} ms (same architecture)",
        "clip": f"{clip['after']['search']:.2f}",
        "params": f"{d['params']['student'] / 1e6:.2f}M",
    }
    rows = ""
    if held:
        teacher = f"{clip['teacher']['held_out']:.2f}" if default_teacher else "-"
        rows += (
            f"<tr><td>CLIP, held-out prompts</td><td>{teacher}</td>"
            f"<td>{clip['before']['held_out']:.2f}</td><td>{clip['after']['held_out']:.2f}</td>"
            "</tr>"
        )
    if ms:
        rows += (
            f"<tr><td>measured latency ({html.escape(ms['device'])}, torch, this machine)</td>"
            f"<td>{ms['teacher']:.2f} ms</td><td>{ms['student']:.2f} ms</td>"
            f"<td>{ms['student']:.2f} ms</td></tr>"
        )
    if not default_teacher:
        rows += (
            f"<tr><td>teacher {html.escape(d['config']['teacher'])}</td>"
            f"<td colspan=3>CLIP {clip['teacher']['search']:.2f}</td></tr>"
        )
    return cells, rows


def _html(run, history, result, has_values, distilled=None, comparison=False) -> str:
    e = html.escape
    rows, head = "", "<th></th><th>original</th><th>found</th>"
    if result:
        speedup = result["original_ms"] / result["latency_ms"]
        cells, extra = {}, ""
        if distilled is not None:
            cells, extra = _distilled_rows(result, distilled)
            head += "<th>distilled</th>"
        d = {k: f"<td>{v}</td>" for k, v in cells.items()}
        rows = (
            f"<tr><td>predicted latency</td><td>{result['original_ms']:.2f} ms</td>"
            f"<td>{result['latency_ms']:.2f} ms ({speedup:.2f}× faster; target "
            f"{result['target_ms']:.2f} ms)</td>{d.get('latency', '')}</tr>"
            f"<tr><td>CLIP score (final weights)</td><td>{result['original_clip']:.2f}</td>"
            f"<td>{result['clip']:.2f}</td>{d.get('clip', '')}</tr>"
            f"<tr><td>parameters</td><td>{result['params']['original'] / 1e6:.2f}M</td>"
            f"<td>{result['params']['found'] / 1e6:.2f}M</td>{d.get('params', '')}</tr>{extra}"
        )
    its = "".join(
        f"<tr><td>{h['iteration']}</td><td>{h['latency_ms']:.2f}</td><td>{h['clip']:.2f}</td>"
        f"<td>{e(h['decision'])}</td><td>{e(_applied(h))}</td>"
        f"<td>{_compute_cell(h)}</td><td>{h['seconds']:.0f} s</td></tr>"
        for h in history
    )
    grids = ""
    if comparison:
        grids = (
            "<h2>Same prompts, same noises</h2><p><small>Each row: one prompt of the search's "
            "protocol, one initial noise, through each network.</small></p>"
            "<img src=comparison.png>"
        )
    elif (run / "grid_original.png").exists():
        prompts = "".join(f"<li>{e(p)}</li>" for p in result.get("prompts", []))
        grids = (
            "<h2>Same prompts, same noises</h2><div class=row>"
            "<figure><img class=px src=grid_original.png><figcaption>original</figcaption>"
            "</figure><figure><img class=px src=grid_found.png><figcaption>found</figcaption>"
            f"</figure></div><details><summary>prompts (row by row)</summary><ol>{prompts}"
            "</ol></details>"
        )
    # a search that fine-tunes the supernet between iterations scores the summary's two networks
    # with the last weights and each iteration's row with the weights of that iteration: the
    # original's two CLIP scores differ, and the page says why
    steps = _train_steps(run)
    weights_note = (
        "<p><small>Both CLIP scores above use the supernet's weights at the end of the search, "
        f"which trained them for {steps} step{'s' * (steps != 1)} before each iteration; the "
        "CLIP of each iteration below uses the weights of that iteration.</small></p>"
        if result and steps
        else ""
    )
    values = "<img src=values.png>" if has_values else ""
    stages = "<img src=stages.png>" if result else ""
    return f"""<!doctype html><html><head><meta charset=utf-8><title>diffnas run {e(run.name)}
</title><style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
img{{max-width:100%}}img[src="comparison.png"]{{max-width:none}}.px{{image-rendering:pixelated;width:460px}}.row{{display:flex;gap:1em}}
figure{{margin:0}}</style></head><body>
<h1>diffnas run <code>{e(run.name)}</code></h1>
<table><tr>{head}</tr>{rows}</table>
{weights_note}<h2>Evolution</h2><img src=progress.png><img src=architecture.png>
<table><tr><th>iteration</th><th>ms</th><th>CLIP</th><th>decision</th><th>applied</th>
<th>evaluation compute</th><th>time</th></tr>{its}</table>{_compute_summary(run, history)}
<h2>Block values</h2>{values}<h2>Latency per stage</h2>{stages}{grids}
</body></html>
"""


def _compute_cell(record: dict) -> str:
    """An iteration's evaluation compute: actions, UNet calls, images ('-' before it was
    recorded)."""
    c = record.get("compute")
    if not c:
        return "-"
    return f"{c['n_actions']} actions: {c['unet_calls']:,} UNet calls, {c['images']:,} images"


def _compute_summary(run: Path, history: list[dict]) -> str:
    """The search's evaluation compute (nas.search.evolve.run_compute) and what it measured."""
    from nas.search.evolve import run_compute

    total = run_compute(history)
    if total is None:
        return ""
    spec = run / "experiment.yaml"
    e = (yaml.safe_load(spec.read_text()).get("evaluation") or {}) if spec.is_file() else {}
    how = ", ".join(
        f"{k} {e[k]}"
        for k in ("metric", "sampler", "steps", "prompts", "seeds", "racing")
        if k in e
    )
    calls = total["unet_calls"] - sum(h["compute"]["reference"]["unet_calls"] for h in history)
    rate = (
        f"; {1000 * total['action_seconds'] / calls:.2f} ms per UNet call on this machine "
        "(actions' wall time, decoding and CLIP included)"
        if calls
        else ""
    )
    return (
        f"<p>Evaluation compute: <b>{total['unet_calls']:,} UNet calls</b> (one latent through "
        f"the UNet; a guided step of one image is two) and {total['images']:,} images decoded and "
        f"CLIP-scored, over {total['iterations']} iterations and {total['actions']} actions "
        f"({total['unet_calls_per_action']:,.0f} calls per action, the current network's "
        f"included){rate}. Protocol: {html.escape(how)}. <code>diffnas plan</code> projects "
        "this for another protocol or device (docs/evaluation-cost.md).</p>"
    )


def _applied(record: dict) -> str:
    """The applied actions, each with the rule that chose it (histories before rules: none)."""
    rules = record.get("rules") or [""] * len(record["applied"])  # copies have no rule
    parts = [f"{a} ({r})" if r else a for a, r in zip(record["applied"], rules, strict=True)]
    return ", ".join(parts) or "-"
