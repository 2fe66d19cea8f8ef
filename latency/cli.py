"""`diffnas latency ...`: build, show, predict, import and export lookup tables."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from search_spaces import Architecture, load_space

from . import service_cli
from .backends import get_backend
from .cli_options import Adb, Db, Repeats, Runner, Threads, Warmup, console, db_path, open_table
from .measurement import check_device_name
from .predict import Predictor
from .profile import NoiseGuard, build_table
from .signature import unet_parts
from .table import LatencyTable

app = typer.Typer(
    help="Latency lookup tables: build, show, predict, validate.", no_args_is_help=True
)


@app.command("build")
def build_cmd(
    space: str = typer.Argument(..., help="Space name or YAML file."),
    device: str = typer.Option(..., "--device", help="Name of the device in the table."),
    backend: str = typer.Option("torch", "--backend", help="torch, coreml or executorch."),
    compute_unit: str = typer.Option(
        None,
        "--compute-unit",
        help="torch: cpu|cuda|mps; coreml: ALL|CPU_ONLY|...; executorch: the delegate, "
        "xnnpack (timed here) or coreml|vulkan (built here, timed on the device)",
    ),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16."),
    db: Db = None,
    repeats: Repeats = 10,
    warmup: Warmup = 3,
    threads: Threads = None,
    force: bool = typer.Option(False, "--force", help="Measure again what the table has."),
    rounds: int = typer.Option(
        1, "--rounds", help="Passes over the blocks in new orders; each keeps its fastest."
    ),
    attention: str = typer.Option(
        None,
        "--attention",
        help="executorch: the diffusers attention processor blocks are exported with, classic "
        "(AttnProcessor, the default: lowers fully to XNNPACK) or sdpa (diffusers' default)",
    ),
    max_spread: float = typer.Option(
        1.25,
        "--max-spread",
        help="Noise guard: a reference block is timed before, during and after the build; "
        "a slowest/fastest ratio above this warns.",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Noise guard above --max-spread: store nothing (exit 2)."
    ),
    adb: Adb = None,
    runner: Runner = None,
) -> None:
    """Profile every block signature of SPACE that the table lacks."""
    check_device_name(device)
    if rounds < 1:
        raise typer.BadParameter("need at least 1 round", param_hint="--rounds")
    if max_spread < 1:
        raise typer.BadParameter("a spread is a ratio >= 1", param_hint="--max-spread")
    extra = {}
    if attention is not None:
        if backend != "executorch":
            raise typer.BadParameter(
                "--attention is a setting of --backend executorch", param_hint="--attention"
            )
        extra["attention"] = attention
    b = get_backend(
        backend,
        adb=adb,
        runner=runner,
        compute_unit=compute_unit,
        precision=precision,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        **extra,
    )
    sp = load_space(space)
    guard = NoiseGuard(max_spread=max_spread, strict=strict)
    with open_table(db) as table:
        report = build_table(sp, table, b, device, force=force, rounds=rounds, guard=guard)
        console.print(
            f"measured {len(report.measured)} block(s), {report.skipped} already in "
            f"{table.path}, in {report.seconds:.1f} s"
        )
        if report.guard is not None:
            style = "" if report.guard.ok else "[bold yellow]warning:[/] "
            console.print(f"{style}noise guard: {report.guard.describe()}")


@app.command("show")
def show_cmd(
    device: str = typer.Option(None, "--device", help="Device to show (default: list devices)."),
    space: str = typer.Option(None, "--space", help="Break the original network down by stage."),
    plot: Path = typer.Option(None, "--plot", help="Write per-stage CA/ResNet bars (PNG)."),
    db: Db = None,
    backend: str = typer.Option(None, "--backend"),
    precision: str = typer.Option(None, "--precision"),
    ops: str = typer.Option(
        None,
        "--ops",
        help="executorch: per-operator times of this block (signature hash or prefix) from "
        "an ETDump, and which ops stayed outside the delegate.",
    ),
) -> None:
    """Devices of a table, a device's measurements, or a space's per-stage latency."""
    with open_table(db) as table:
        if device is None:
            t = Table(
                "device", "backend", "compute unit", "precision", "signatures", "rows", "spread"
            )
            for d in table.devices():
                t.add_row(
                    d["device"],
                    d["backend"],
                    d["compute_unit"],
                    d["precision"],
                    str(d["signatures"]),
                    str(d["rows"]),
                    _last_spread(table, d),
                )
            console.print(t)
            return
        if ops is not None:
            from .ops import show_ops

            show_ops(table, device, ops, console)
            return
        if space is None:
            setting = table.setting(device, backend=backend, precision=precision)
            t = Table("hash", "block", "median ms", "IQR ms", "n", title=device)
            rows = {
                m.signature.hash: m
                for m in table.rows(device)
                if m.backend == setting["backend"] and m.precision == setting["precision"]
            }
            for h, m in sorted(rows.items(), key=lambda kv: -kv[1].median_ms):
                t.add_row(
                    h,
                    m.signature.describe(),
                    f"{m.median_ms:.3f}",
                    f"{m.iqr_ms:.3f}",
                    str(len(m.samples)),
                )
            console.print(t)
            for b in table.builds(device):
                if (b["backend"], b["precision"]) == (setting["backend"], setting["precision"]):
                    times = " / ".join(f"{m:.3g}" for m in b["reference_ms"])
                    kept = "" if b["stored"] else " (refused: nothing stored)"
                    console.print(
                        f"build of {b['space']}, {b['blocks']} block(s): noise guard spread "
                        f"{b['spread']:.2f} (limit {b['max_spread']:g}), reference "
                        f"{b['reference']}: {times} ms{kept}"
                    )
            return
        sp = load_space(space)
        predictor = Predictor(sp, table, device, backend=backend, precision=precision)
        pred = predictor.predict(sp.original())
        t = Table("stage", "cross-attention ms", "ResNet ms", title=f"{sp.name} on {device}")
        for stage, kinds in pred.per_stage.items():
            t.add_row(stage, f"{kinds['cross_attention']:.2f}", f"{kinds['resnet']:.2f}")
        t.add_row("fixed parts", "", f"{pred.fixed_ms:.2f}")
        console.print(t)
        console.print(f"total (original): {pred.raw_ms:.2f} ms")
        if plot is not None:
            stage_plot(sp, pred, device, plot)
            console.print(f"wrote {plot}")


def _last_spread(table: LatencyTable, setting: dict) -> str:
    """The noise-guard spread of the setting's newest build ("" if none was recorded)."""
    keys = ("device", "backend", "compute_unit", "precision")
    found = [b for b in table.builds(setting["device"]) if all(b[k] == setting[k] for k in keys)]
    if not found:
        return ""
    b = found[-1]
    return f"{b['spread']:.2f}" + ("" if b["spread"] <= b["max_spread"] else " (busy)")


def stage_plot(space, prediction, device: str, path: Path) -> None:
    """The paper's Fig. 2: latency and parameters of CA and ResNet blocks per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = list(space.stages)
    x = np.arange(len(stages))
    params = {
        k: [
            sum(space.slots[p].block.params for p in space.stages[s] if space.slots[p].kind == k)
            / 1e6
            for s in stages
        ]
        for k in ("cross_attention", "resnet")
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    for ax, values, unit in [
        (axes[0], {k: [prediction.per_stage[s][k] for s in stages] for k in params}, "ms"),
        (axes[1], params, "M parameters"),
    ]:
        ax.bar(x - 0.2, values["cross_attention"], 0.4, label="cross-attention", color="C0")
        ax.bar(x + 0.2, values["resnet"], 0.4, label="ResNet", color="C1")
        ax.set_xticks(x, stages)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    axes[0].set_title(f"latency on {device}", fontsize=10)
    axes[1].set_title("parameters", fontsize=10)
    fig.suptitle(f"{space.name}: blocks per stage", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@app.command("predict")
def predict_cmd(
    space: str = typer.Argument(..., help="Space name or YAML file."),
    arch: Path = typer.Argument(None, help="Architecture JSON (default: the original)."),
    device: str = typer.Option(..., "--device"),
    db: Db = None,
    backend: str = typer.Option(None, "--backend"),
    precision: str = typer.Option(None, "--precision"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Predicted latency of an architecture, with a per-stage breakdown."""
    sp = load_space(space)
    architecture = sp.original() if arch is None else Architecture.load(arch)
    sp.check_fits(architecture, str(arch) if arch else "architecture")
    with open_table(db) as table:
        predictor = Predictor(sp, table, device, backend=backend, precision=precision)
        pred = predictor.predict(architecture)
        origin = predictor.predict(sp.original())
    if as_json:
        console.print_json(json.dumps({**pred.to_dict(), "original_ms": origin.total_ms}))
        return
    t = Table("stage", "cross-attention ms", "ResNet ms")
    for stage, kinds in pred.per_stage.items():
        t.add_row(stage, f"{kinds['cross_attention']:.2f}", f"{kinds['resnet']:.2f}")
    t.add_row("fixed parts", "", f"{pred.fixed_ms:.2f}")
    console.print(t)
    note = " (calibrated)" if pred.calibrated else ""
    console.print(
        f"predicted: {pred.total_ms:.2f} ms{note}; original {origin.total_ms:.2f} ms "
        f"({100 * pred.total_ms / origin.total_ms:.1f}%)"
    )


@app.command("export")
def export_cmd(
    out: Path = typer.Argument(..., help="Output file: .json or .csv."),
    device: str = typer.Option(None, "--device", help="Only this device."),
    db: Db = None,
) -> None:
    """Write the table's rows as JSON or CSV."""
    if out.exists():
        raise typer.BadParameter(f"{out} exists; choose another name", param_hint="OUT")
    with open_table(db) as table:
        text = table.export_csv(device) if out.suffix == ".csv" else table.export_json(device)
    out.write_text(text)
    console.print(f"wrote {out}")


@app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="A JSON or CSV export, or an app's results.json."),
    db: Db = None,
    device: str = typer.Option(
        None, "--device", help="The device of on-device results (required for them)."
    ),
) -> None:
    """Add an export's rows, or a phone's bundle results, to the table (all or nothing)."""
    from .bundle import is_results_file

    if is_results_file(file):
        from .bundle import import_results
        from .jobs import JobStore

        if device is None:
            raise typer.BadParameter("on-device results need --device", param_hint="--device")
        with JobStore(db_path(db)) as store:
            r = import_results(store, device, file)
        console.print(
            f"imported {len(r.stored)} result(s) for {device}; {len(r.already)} already stored, "
            f"{len(r.failed)} failed on the device, {len(r.missing)} not in the file"
        )
        return
    if device is not None:
        raise typer.BadParameter(
            "--device is for on-device results; a table export names its devices itself",
            param_hint="--device",
        )
    with open_table(db) as table:
        n = table.import_file(file)
    console.print(f"imported {n} row(s)")


@app.command("signatures")
def signatures_cmd(
    space: str = typer.Argument(..., help="Space name or YAML file."),
    precision: str = typer.Option("fp32", "--precision"),
) -> None:
    """The distinct block signatures of a space (what a device table needs)."""
    sp = load_space(space)
    t = Table("hash", "block", "used by")
    users: dict = {}
    for part in unet_parts(sp, precision):
        users.setdefault(part.signature, []).append(part.name)
    for sig, names in users.items():
        t.add_row(
            sig.hash, sig.describe(), ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        )
    console.print(t)


def register_validate(measure_factory) -> None:
    """Add `latency validate`; the nas side supplies how whole networks are timed
    (`measure_factory(space, backend) -> callable(arch) -> ms`), keeping latency free of nas."""
    from .validate_cli import validate_command

    app.command("validate")(validate_command(measure_factory))


service_cli.register(app)
