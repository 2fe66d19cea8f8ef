"""Filling a latency table: profile every signature of a space that the table lacks."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from search_spaces import SearchSpace

from .backends import Backend
from .signature import BlockSignature, signatures
from .table import LatencyTable, Measurement, check_device_name


@dataclass
class BuildReport:
    measured: list[BlockSignature]  # profiled in this run
    skipped: int  # already in the table
    seconds: float


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=transient,
    )


def build_table(
    space: SearchSpace,
    table: LatencyTable,
    backend: Backend,
    device: str,
    force: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Measure the space's signatures on `backend` into `table` under `device`.

    Only what the table lacks is measured unless `force` (then new rows are added; older
    rows stay). Each block is stored as soon as it is measured, so an interrupted build
    keeps what it did.
    """
    check_device_name(device)
    backend.test_connection()
    start = time.perf_counter()
    sigs = signatures(space, dtype=backend.precision)
    done = (
        set()
        if force
        else table.measured_hashes(device, backend.name, backend.compute_unit, backend.precision)
    )
    todo = [s for s in sigs if s.hash not in done]
    with progress_bar() as bar:
        task = bar.add_task(
            f"profiling {space.name} on {device}", total=len(todo), visible=progress
        )
        for sig in todo:
            bar.update(task, description=f"{sig.describe():<48}")
            timing = backend.profile(sig)
            table.add(
                Measurement(
                    device=device,
                    backend=backend.name,
                    compute_unit=backend.compute_unit,
                    precision=backend.precision,
                    signature=sig,
                    samples=timing.samples,
                    median_ms=timing.median_ms,
                    iqr_ms=timing.iqr_ms,
                    versions=timing.versions,
                )
            )
            bar.advance(task)
    return BuildReport(todo, len(sigs) - len(todo), time.perf_counter() - start)
