"""Filling a latency table: profile every signature of a space that the table lacks."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from search_spaces import SearchSpace

from .backends import Backend, Timing
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
    rounds: int = 1,
) -> BuildReport:
    """Measure the space's signatures on `backend` into `table` under `device`.

    Only what the table lacks is measured unless `force` (then new rows are added; older
    rows stay). With `rounds` > 1 every block is profiled once per round, each round in a new
    order, and its fastest round is stored — as `validate` times whole networks, so that a
    slow spell of the machine does not stick to the blocks measured in it. Each block is
    stored as soon as its last round is measured, so an interrupted build keeps what it
    finished.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: measure every block at least once")
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
    best: dict[str, Timing] = {}
    order = list(todo)
    rng = random.Random(0)
    with progress_bar() as bar:
        task = bar.add_task(
            f"profiling {space.name} on {device}", total=rounds * len(todo), visible=progress
        )
        for r in range(rounds):
            if r:
                rng.shuffle(order)  # round 1 in signature order, later ones shuffled
            for sig in order:
                bar.update(task, description=f"{sig.describe():<48}")
                timing = backend.profile(sig)
                if sig.hash not in best or timing.median_ms < best[sig.hash].median_ms:
                    best[sig.hash] = timing
                if r == rounds - 1:
                    _store(table, backend, device, sig, best[sig.hash])
                bar.advance(task)
    return BuildReport(todo, len(sigs) - len(todo), time.perf_counter() - start)


def _store(table: LatencyTable, backend: Backend, device: str, sig: BlockSignature, timing):
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
