"""Filling a latency table: profile every signature of a space that the table lacks."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from search_spaces import SearchSpace, UserError

from .backends import Backend, Timing
from .signature import BlockSignature, signatures
from .table import LatencyTable, Measurement, check_device_name

logger = logging.getLogger(__name__)


@dataclass
class NoiseGuard:
    """Times a reference block before, during and after a build: a table measured while the
    machine was busy is wrong by many times with nothing said (seen here: a CPU table built
    under load predicted 7.8 s for a network that takes 0.69 s idle)."""

    max_spread: float = 1.25  # slowest / fastest reference median above which a build warns
    strict: bool = False  # above it, store nothing and raise instead of warning


@dataclass
class GuardReport:
    reference: str  # the reference block (signature hash)
    label: str  # its description
    medians_ms: list[float]  # before, at the middle of each round, after
    spread: float  # max / min of medians_ms
    max_spread: float
    ok: bool

    def describe(self) -> str:
        times = " / ".join(f"{m:.3g}" for m in self.medians_ms)
        verdict = "ok" if self.ok else f"above {self.max_spread:g}: the machine was busy"
        return f"reference {self.label}: {times} ms, spread {self.spread:.2f} ({verdict})"


@dataclass
class BuildReport:
    measured: list[BlockSignature]  # profiled in this run
    skipped: int  # already in the table
    seconds: float
    guard: GuardReport | None = field(default=None)  # None: nothing measured, or no guard


def reference_signature(sigs: list[BlockSignature]) -> BlockSignature:
    """The guard's reference: the space's first ResNet (any backend builds it; it is neither
    the smallest block, whose time is all overhead, nor the largest)."""
    return next((s for s in sigs if s.kind == "resnet"), sigs[0])


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
    guard: NoiseGuard | None = NoiseGuard(),  # noqa: B008  (frozen in use: never mutated)
) -> BuildReport:
    """Measure the space's signatures on `backend` into `table` under `device`.

    Only what the table lacks is measured unless `force` (then new rows are added; older
    rows stay). With `rounds` > 1 every block is profiled once per round, each round in a new
    order, and its fastest round is stored — as `validate` times whole networks, so that a
    slow spell of the machine does not stick to the blocks measured in it. Each block is
    stored as soon as its last round is measured, so an interrupted build keeps what it
    finished.

    `guard` (default on) times a reference block before the build, in the middle of every
    round and after it, and records the spread of those timings with the table
    (`LatencyTable.builds`). Above `guard.max_spread` the build warns; with `guard.strict`
    nothing is stored (the blocks are kept back until the guard has passed) and a UserError
    says why.
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
    strict = guard is not None and guard.strict
    ref = reference_signature(sigs) if guard is not None and todo else None
    ref_ms = [backend.profile(ref).median_ms] if ref is not None else []
    with progress_bar() as bar:
        task = bar.add_task(
            f"profiling {space.name} on {device}", total=rounds * len(todo), visible=progress
        )
        for r in range(rounds):
            if r:
                rng.shuffle(order)  # round 1 in signature order, later ones shuffled
            for i, sig in enumerate(order):
                if ref is not None and i == len(order) // 2:
                    ref_ms.append(backend.profile(ref).median_ms)
                bar.update(task, description=f"{sig.describe():<48}")
                timing = backend.profile(sig)
                if sig.hash not in best or timing.median_ms < best[sig.hash].median_ms:
                    best[sig.hash] = timing
                if r == rounds - 1 and not strict:
                    _store(table, backend, device, sig, best[sig.hash])
                bar.advance(task)
    report = BuildReport(todo, len(sigs) - len(todo), time.perf_counter() - start)
    if ref is None:
        return report
    ref_ms.append(backend.profile(ref).median_ms)
    spread = max(ref_ms) / min(ref_ms)
    report.guard = GuardReport(
        ref.hash, ref.describe(), ref_ms, spread, guard.max_spread, spread <= guard.max_spread
    )
    setting = (device, backend.name, backend.compute_unit, backend.precision)
    stored = not strict or report.guard.ok
    table.add_build(*setting, space.name, report.guard, stored=stored, blocks=len(todo))
    if not report.guard.ok:
        if strict:
            raise UserError(
                f"noise guard: {report.guard.describe()}; nothing was stored (--strict). "
                "Build again when the machine is quiet, or raise --max-spread"
            )
        logger.warning("noise guard: %s", report.guard.describe())
    elif strict:
        for sig in todo:
            _store(table, backend, device, sig, best[sig.hash])
    return report


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
