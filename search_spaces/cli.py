"""`diffnas space ...`: list, show and validate search spaces."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .architecture import Architecture
from .registry import list_spaces, load_space
from .space import SearchSpace

app = typer.Typer(help="Search spaces: list, show, validate.", no_args_is_help=True)
console = Console()

KIND_LABEL = {"cross_attention": "Cross Attention", "resnet": "ResNet"}


@app.command("list")
def list_cmd() -> None:
    """Built-in and plug-in search spaces."""
    table = Table("name", "origin", "description")
    for entry in list_spaces():
        table.add_row(entry.name, entry.origin, entry.description)
    console.print(table)


def _stage_table(space: SearchSpace, arch: Architecture | None, arch_label: str) -> Table:
    """The paper's Table 3 layout: per stage and kind, dimension and block counts."""
    table = Table("Stage", "Resolution", "Type", "Dimension", "# Blocks Origin", title=space.name)
    if arch is not None:
        table.add_column(f"# Blocks {arch_label}")
    origin = space.counts(space.original())
    counts = space.counts(arch) if arch is not None else None
    for stage, paths in space.stages.items():
        slots = [space.slots[p] for p in paths]
        for kind in ("cross_attention", "resnet"):
            of_kind = [s for s in slots if s.kind == kind]
            if not of_kind:
                continue
            dims = sorted({s.block.out_channels for s in of_kind})
            sizes = sorted({(s.block.height, s.block.width) for s in of_kind}, reverse=True)
            row = [
                stage
                if kind == "cross_attention" or not any(s.kind == "cross_attention" for s in slots)
                else "",
                ", ".join(f"{h}×{w}" for h, w in sizes),
                KIND_LABEL[kind],
                ", ".join(map(str, dims)),
                str(origin[stage][kind]),
            ]
            if counts is not None:
                n = counts[stage][kind]
                changed = n != origin[stage][kind]
                row.append(f"[bold]{n}[/bold]" if changed else str(n))
            table.add_row(*row)
        table.add_section()
    return table


def _slot_table(space: SearchSpace, arch: Architecture | None) -> Table:
    table = Table(
        "slot",
        "stage",
        "kind",
        "in→out (+skip)",
        "size",
        "params",
        "removable",
        "max copies",
        title="slots",
    )
    if arch is not None:
        table.add_column("multiplicity")
    for path, s in space.slots.items():
        b = s.block
        skip = f" (+{b.skip_channels})" if b.skip_channels else ""
        row = [
            path,
            s.stage,
            s.kind,
            f"{b.in_channels}→{b.out_channels}{skip}",
            f"{b.height}×{b.width}",
            f"{b.params:,}",
            "yes" if s.removable else "no",
            str(s.max_copies),
        ]
        if arch is not None:
            row.append(str(arch[path]))
        table.add_row(*row)
    return table


@app.command("show")
def show_cmd(
    space: str = typer.Argument(..., help="Built-in or plug-in name, or a space YAML file."),
    arch: Path = typer.Option(None, "--arch", help="Architecture JSON to compare to the original."),
    slots: bool = typer.Option(False, "--slots", help="Also list every slot."),
    device: str = typer.Option(
        None, "--device", help="Also the predicted latency on this device of a lookup table."
    ),
    db: Path = typer.Option(
        None,
        "--db",
        help="With --device: the table file (default: $DIFFNAS_LATENCY_DB or ./latency.db).",
    ),
) -> None:
    """Blocks per stage (the paper's Table 3 layout), parameter counts, and with --device
    the predicted latency."""
    sp = load_space(space)
    architecture = None
    if arch is not None:
        architecture = Architecture.load(arch)
        sp.validate(architecture, source=str(arch))
    label = arch.name.removesuffix(".json").removesuffix(".arch") if arch else ""
    console.print(_stage_table(sp, architecture, label))
    if slots:
        console.print(_slot_table(sp, architecture))
    origin = sp.params(sp.original())
    console.print(f"parameters, origin: {origin:,} ({origin / 1e6:.1f}M)")
    if architecture is not None:
        p = sp.params(architecture)
        console.print(
            f"parameters, {label}: {p:,} ({p / 1e6:.1f}M, {100 * p / origin:.1f}% of origin)"
        )
    inputs = f"latent {'×'.join(map(str, sp.latent))}, context {'×'.join(map(str, sp.context))}"
    console.print(f"inputs: {inputs}, batch {sp.batch}")
    if device is not None:
        _print_latency(sp, architecture, label, device, db)


def _print_latency(sp: SearchSpace, arch: Architecture | None, label: str, device, db) -> None:
    """The table's predicted latency of the original (and `arch`) on `device`; a table that
    lacks the device or some of the space's blocks is an error naming the command to run."""
    from latency.cli import open_table
    from latency.predict import Predictor

    with open_table(db) as table:
        predictor = Predictor(sp, table, device)
        origin = predictor.predict(sp.original())
        where = f"{device} ({predictor.setting['backend']}/{predictor.setting['compute_unit']}/"
        where += f"{predictor.setting['precision']}, {table.path})"
        console.print(f"predicted latency on {where}, origin: {origin.total_ms:.2f} ms")
        if arch is not None:
            ms = predictor.predict(arch).total_ms
            console.print(
                f"predicted latency, {label}: {ms:.2f} ms ({100 * ms / origin.total_ms:.1f}% "
                "of origin)"
            )


@app.command("validate")
def validate_cmd(
    file: str = typer.Argument(..., help="A space YAML file (or a built-in / plug-in name)."),
    arch: Path = typer.Option(None, "--arch", help="Also validate this architecture JSON."),
) -> None:
    """Check a space file (and optionally an architecture) and summarise it."""
    sp = load_space(file)
    d = sp.describe()
    console.print(
        f"[green]ok[/green] space {sp.name!r}: {d['slots']} slots in {len(sp.stages)} stages, "
        f"{d['removable']} removable, {d['copyable']} copyable, {d['params']:,} parameters"
    )
    if arch is not None:
        architecture = Architecture.load(arch)
        sp.validate(architecture, source=str(arch))
        console.print(f"[green]ok[/green] architecture {str(arch)!r} ({architecture.hash})")
