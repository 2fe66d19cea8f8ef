"""The exported networks of a distillation benchmark, timed whole (a part of distill.py).

Two runtimes, each against the prediction of a table measured with the same runtime:

- torch on this CPU: the standalone network `diffnas export --distilled` writes, loaded back
  from its folder, against the run's own table (the one its search used);
- ExecuTorch with XNNPACK (the CPU runtime of Android and iOS): the `.pte` programs that
  `diffnas export --format executorch` writes, timed with ExecuTorch's runtime, against a table
  of the space built with `--backend executorch` (here, unless one is given).

Whole networks run faster or slower than the sum of their blocks (a runtime fuses across
block boundaries; the table of record is calibrated for that), so the figure that must hold
is the speed-up: the original's time over the found network's, measured against predicted.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from latency.predict import Predictor
from latency.table import LatencyTable
from nas.deploy.distill import measure_ms
from nas.deploy.export import export_network, network_inputs, write_executorch
from nas.deploy.standalone import to_standalone
from nas.searched_unet import SearchedUNet2DConditionModel
from nas.supernet import ElasticUNet
from search_spaces import Architecture

ET_DEVICE = "bench-executorch"  # the table's device name in the benchmark's own database


def _summary(measured: dict, predicted: dict) -> dict:
    return {
        "predicted_ms": predicted,
        "measured_ms": measured,
        "measured_over_predicted": {k: measured[k] / predicted[k] for k in measured},
        "speedup": {
            "predicted": predicted["original"] / predicted["found"],
            "measured": measured["original"] / measured["found"],
        },
    }


def torch_latency(run: Path, supernet: ElasticUNet, predicted: dict, repeats: int) -> dict:
    """The exported diffusers-format network and the original, timed with torch in turns."""
    out, info = export_network(run, "diffusers", distilled=True, force=True)
    exported = SearchedUNet2DConditionModel.from_pretrained(out)
    if info["form"] == "UNet2DConditionModel":
        from diffusers import UNet2DConditionModel

        exported = UNet2DConditionModel.from_pretrained(out).eval()
    space = supernet.space
    original = to_standalone(supernet, space.original())
    measured = measure_ms({"original": original, "found": exported}, space, repeats)
    return {"export_form": info["form"], **_summary(measured, predicted)}


def executorch_latency(
    run: Path,
    supernet: ElasticUNet,
    found: Architecture,
    table_db: Path | None,
    repeats: int,
    threads: int,
) -> dict:
    """The distilled found network's `.pte` and the original's, timed in turns with ExecuTorch
    (XNNPACK, `threads`), against an ExecuTorch table's prediction (raw block sum and, where
    the table holds a calibration, calibrated)."""
    from latency import executorch as et
    from latency.backends import get_backend
    from latency.profile import build_table

    space = supernet.space
    bench = run / "bench_distill"
    backend = get_backend(
        "executorch", compute_unit="xnnpack", repeats=10, warmup=2, threads=threads
    )
    db = table_db or bench / "executorch.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    with LatencyTable(db) as table:
        start = time.perf_counter()
        built = build_table(space, table, backend, ET_DEVICE, rounds=2)
        build_seconds = time.perf_counter() - start
        predictor = Predictor(space, table, ET_DEVICE, backend="executorch")
        predictions = {
            "original": predictor.predict(space.original()),
            "found": predictor.predict(found),
        }

    found_pte, _ = export_network(run, "executorch", distilled=True, force=True)
    original_pte = bench / "original.pte"
    start = time.perf_counter()
    write_executorch(
        to_standalone(supernet, space.original()), space, original_pte, {"network": "original"}
    )
    lower_seconds = time.perf_counter() - start
    et.set_threads(threads)
    programs = {"original": et.load(original_pte), "found": et.load(found_pte)}
    samples = et.time_in_turns(programs, network_inputs(space), warmup=3, repeats=repeats)
    measured = {k: statistics.median(v) for k, v in samples.items()}
    quartiles = {k: statistics.quantiles(v, n=4) for k, v in samples.items()}
    raw = {k: p.raw_ms for k, p in predictions.items()}
    return {
        "export_form": "ExecuTorch program (.pte, XNNPACK, classic attention)",
        "threads": threads,
        "versions": et.versions(),
        "table": {
            "db": str(db),
            "blocks_measured_now": len(built.measured),
            "build_seconds": build_seconds,
            "noise_guard": built.guard.__dict__ if built.guard else None,
            "calibrated": predictor.calibration is not None,
        },
        "original_lower_seconds": lower_seconds,
        "iqr_ms": {k: q[2] - q[0] for k, q in quartiles.items()},
        "raw": _summary(measured, raw),
        **_summary(measured, {k: p.total_ms for k, p in predictions.items()}),
    }
