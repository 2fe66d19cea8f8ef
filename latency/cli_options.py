"""What the `diffnas latency` commands share: where the table lives, the options that time
blocks, and the console they print to (latency/cli.py and latency/service_cli.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .table import LatencyTable

console = Console()

DB_HELP = "SQLite table file (default: $DIFFNAS_LATENCY_DB or ./latency.db)."


def default_db() -> Path:
    return Path(os.environ.get("DIFFNAS_LATENCY_DB", "latency.db"))


def db_path(db: Path | None) -> Path:
    """The table file a command works on: --db, or the default."""
    return db or default_db()


def open_table(db: Path | None) -> LatencyTable:
    return LatencyTable(db_path(db))


# Options by meaning (`name: Type = default`, the default where each command sets it).
Db = Annotated[Path, typer.Option("--db", help=DB_HELP)]
Repeats = Annotated[int, typer.Option("--repeats", help="Timed runs per block.")]
Warmup = Annotated[int, typer.Option("--warmup", help="Untimed runs first.")]
Threads = Annotated[int, typer.Option("--threads", help="torch threads (default: torch's).")]
Adb = Annotated[
    str,
    typer.Option(
        "--adb", help="executorch: time on this Android phone (adb serial) instead of here."
    ),
]
Runner = Annotated[
    Path,
    typer.Option("--runner", help="With --adb: ExecuTorch's executor_runner built for the phone."),
]
