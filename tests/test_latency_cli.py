"""`diffnas latency ...` end to end, in process through `nas.cli.main`.

One real (fast) table of the tiny space is built once per module; the other commands read it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch

import latency.cli
from latency.predict import Predictor, predict
from latency.signature import signatures
from latency.table import LatencyTable, Measurement
from nas.cli import main
from search_spaces import load_space

REPO = Path(__file__).resolve().parents[1]
SD15_ARCH = REPO / "experiments" / "snapfusion_sd15.arch.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACOS_ONLY = "Core ML timing needs macOS: run the agent on a Mac, or use --backend torch"
DEVICE = "cpu-test"
# one thread: on a busy two-core machine two torch threads are many times slower than one
BUILD = "latency build tiny --repeats 1 --warmup 0 --threads 1"
VALIDATE = "latency validate tiny --samples 2 --repeats 1 --threads 1"


def invoke(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    return 0


def run(capsys, *args) -> tuple[int, str, str]:
    code = invoke(*args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clear_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert err.startswith("error: ") and err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, err


def row_count(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Work in tmp_path, never touch ./latency.db, print wide enough not to wrap, and give
    torch back the thread count that `--threads 1` changes."""
    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFNAS_LATENCY_DB", str(tmp_path / "default.db"))
    monkeypatch.setattr(latency.cli.console, "width", 200)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


@pytest.fixture(scope="module")
def sigs(space):
    return signatures(space)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """(table path, output of the build) of a real torch-CPU table of tiny."""
    db = tmp_path_factory.mktemp("built") / "t.db"
    buf = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency.cli.console, "width", 200)
        code = invoke(*BUILD.split(), "--device", DEVICE, "--db", db)
    torch.set_num_threads(threads)
    assert code == 0, buf.getvalue()
    return db, buf.getvalue()


@pytest.fixture
def db(built) -> Path:
    return built[0]


def test_build_measures_every_signature_then_nothing(sigs, built, capsys):
    db, first = built
    n = len(sigs)
    assert re.search(rf"measured {n} block\(s\), 0 already in", first), first
    with LatencyTable(db) as table:
        [d] = table.devices()
        assert (d["device"], d["backend"], d["compute_unit"], d["precision"]) == (
            DEVICE,
            "torch",
            "cpu",
            "fp32",
        )
        assert d["signatures"] == d["rows"] == n
        assert all(len(m.samples) == 1 and m.median_ms > 0 for m in table.rows())
    code, out, err = run(capsys, *BUILD.split(), "--device", DEVICE, "--db", db)
    assert code == 0, err
    assert re.search(rf"measured 0 block\(s\), {n} already in", out), out
    assert row_count(db) == n


def test_show_lists_the_devices(db, capsys, monkeypatch):
    code, out, err = run(capsys, "latency", "show", "--db", db)
    assert code == 0, err
    assert DEVICE in out and "torch" in out and "fp32" in out
    # the default table comes from DIFFNAS_LATENCY_DB
    monkeypatch.setenv("DIFFNAS_LATENCY_DB", str(db))
    code, out, err = run(capsys, "latency", "show")
    assert code == 0 and DEVICE in out


def test_show_a_device_lists_its_blocks(sigs, db, capsys):
    code, out, err = run(capsys, "latency", "show", "--db", db, "--device", DEVICE)
    assert code == 0, err
    assert all(s.hash in out for s in sigs)


def test_show_a_space_writes_the_stage_plot(db, space, tmp_path, capsys):
    png = tmp_path / "p.png"
    code, out, err = run(
        capsys, "latency", "show", "--device", DEVICE, "--space", "tiny", "--plot", png, "--db", db
    )
    assert code == 0, err
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert all(stage in out for stage in space.stages)
    with LatencyTable(db) as table:
        total = predict(space, space.original(), table, DEVICE).raw_ms
    assert f"total (original): {total:.2f} ms" in out


def test_predict_json(db, space, tmp_path, capsys):
    with LatencyTable(db) as table:
        predictor = Predictor(space, table, DEVICE)
    original = predictor.predict(space.original())
    code, out, err = run(
        capsys, "latency", "predict", "tiny", "--device", DEVICE, "--db", db, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["total_ms"] == pytest.approx(original.total_ms) and result["total_ms"] > 0
    assert result["original_ms"] == pytest.approx(original.total_ms)
    assert set(result["per_stage"]) == set(space.stages)
    assert result["calibrated"] is False
    # an architecture file of the space
    arch = space.original().with_multiplicity("mid_block.attentions.0", 0)
    arch_file = tmp_path / "arch.json"
    arch.save(arch_file)
    want = predictor.predict(arch)
    code, out, err = run(
        capsys, "latency", "predict", "tiny", arch_file, "--device", DEVICE, "--db", db, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["total_ms"] == pytest.approx(want.total_ms)
    assert result["original_ms"] == pytest.approx(original.total_ms)
    assert result["total_ms"] == pytest.approx(
        original.total_ms - predictor.block_ms("mid_block.attentions.0")
    )
    assert result["per_slot"] == pytest.approx(want.per_slot)
    # and the human form
    code, out, err = run(
        capsys, "latency", "predict", "tiny", arch_file, "--device", DEVICE, "--db", db
    )
    assert code == 0, err
    assert f"predicted: {want.total_ms:.2f} ms" in out


@pytest.mark.parametrize("suffix", ["json", "csv"])
def test_export_then_import_into_another_table(sigs, db, tmp_path, capsys, suffix):
    out_file = tmp_path / f"out.{suffix}"
    code, out, err = run(capsys, "latency", "export", out_file, "--db", db)
    assert code == 0, err
    assert out_file.is_file()
    other = tmp_path / "other.db"
    code, out, err = run(capsys, "latency", "import", out_file, "--db", other)
    assert code == 0, err
    n = len(sigs)
    assert f"imported {n} row(s)" in out
    with LatencyTable(db) as a, LatencyTable(other) as b:
        left, right = a.lookup(DEVICE, sigs), b.lookup(DEVICE, sigs)
        assert len(left) == n
        assert {h: m.to_dict() for h, m in left.items()} == {
            h: m.to_dict() for h, m in right.items()
        }


def test_export_refuses_to_overwrite(db, tmp_path, capsys):
    existing = tmp_path / "precious.json"
    existing.write_text("keep me\n")
    code, out, err = run(capsys, "latency", "export", existing, "--db", db)
    assert code == 2
    assert existing.read_text() == "keep me\n"
    assert "exists" in err and "Traceback" not in out + err


def test_import_of_a_bad_file_imports_nothing(db, tmp_path, capsys):
    with LatencyTable(db) as table:
        records = json.loads(table.export_json())
    records[3]["median_ms"] = -1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    other = tmp_path / "other.db"
    code, out, err = run(capsys, "latency", "import", bad, "--db", other)
    assert_one_clear_error(code, out, err, "record 3", "nothing was imported")
    assert row_count(other) == 0


def test_signatures_lists_every_distinct_block(sigs, capsys):
    code, out, err = run(capsys, "latency", "signatures", "tiny")
    assert code == 0, err
    assert all(s.hash in out for s in sigs)


def test_validate_writes_the_report_and_the_plot(db, tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, out, err = run(
        capsys, *VALIDATE.split(), "--device", DEVICE, "--db", db, "--out", out_dir
    )
    assert code == 0, err
    report = json.loads((out_dir / f"tiny-{DEVICE}.json").read_text())
    assert report["space"] == "tiny" and report["device"] == DEVICE
    assert len(report["archs"]) == len(report["predicted_ms"]) == len(report["measured_ms"]) == 3
    assert all(m > 0 for m in report["measured_ms"])
    assert report["mape"] >= 0 and 0 <= report["within_10"] <= 1
    assert {"slope", "intercept", "mape_after"} <= set(report["calibration"])
    assert (out_dir / f"tiny-{DEVICE}.png").read_bytes()[:8] == PNG_MAGIC
    assert "MAPE" in out
    with LatencyTable(db) as table:
        assert table.calibration(DEVICE, "tiny") is None  # only stored with --calibrate


def test_validate_paired_times_each_networks_blocks_and_leaves_the_table(db, tmp_path, capsys):
    rows = row_count(db)
    out_dir = tmp_path / "paired"
    args = ("--device", DEVICE, "--db", db, "--out", out_dir, "--protocol", "paired")
    code, out, err = run(capsys, *VALIDATE.split(), *args)
    assert code == 0, err
    report = json.loads((out_dir / f"tiny-{DEVICE}.json").read_text())
    assert report["protocol"] == "paired" and len(report["measured_ms"]) == 3
    assert all(p > 0 for p in report["predicted_ms"])
    assert "(paired)" in out
    assert row_count(db) == rows  # the fresh block timings are not stored


def test_validate_unknown_protocol(db, tmp_path, capsys):
    args = ("--device", DEVICE, "--db", db, "--out", tmp_path / "r", "--protocol", "both")
    code, out, err = run(capsys, *VALIDATE.split(), *args)
    assert code == 2 and "Traceback" not in out + err
    flat = " ".join(err.replace("│", " ").split())  # typer wraps its message in a box
    assert "unknown protocol 'both'; choose from separate, paired" in flat
    assert not (tmp_path / "r").exists()


def test_validate_a_device_with_several_settings(sigs, db, tmp_path, capsys):
    copy = tmp_path / "two-settings.db"
    with sqlite3.connect(db) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    with LatencyTable(copy) as table:
        sig = sigs[0].with_dtype("bf16")
        table.add(Measurement(DEVICE, "torch", "cpu", "bf16", sig, [1.0], 1.0, 0.0))
    code, out, err = run(
        capsys,
        *VALIDATE.split(),
        *("--device", DEVICE, "--precision", "fp32", "--db", copy, "--out", tmp_path / "r"),
    )
    assert code == 0, err


# -- bad input: exit 2, one message, no traceback --------------------------------------------------


def test_unknown_backend(tmp_path, capsys):
    db = tmp_path / "x.db"
    code, out, err = run(
        capsys, "latency", "build", "tiny", "--device", DEVICE, "--backend", "nope", "--db", db
    )
    assert_one_clear_error(code, out, err, "unknown backend 'nope'", "coreml", "torch")
    assert not db.exists()


def test_unknown_compute_unit(tmp_path, capsys):
    db = tmp_path / "x.db"
    code, out, err = run(
        capsys, "latency", "build", "tiny", "--device", DEVICE, "--compute-unit", "tpu", "--db", db
    )
    assert_one_clear_error(code, out, err, "'tpu'", "cpu, cuda, mps")
    assert not db.exists()


def test_unknown_precision(tmp_path, capsys):
    code, out, err = run(
        capsys,
        "latency",
        "build",
        "tiny",
        "--device",
        DEVICE,
        "--precision",
        "fp8",
        "--db",
        tmp_path / "x.db",
    )
    assert_one_clear_error(code, out, err, "'fp8'", "fp32, fp16, bf16")


@pytest.mark.parametrize("name", ["a/b", "../x", "a b"])
def test_bad_device_name(tmp_path, capsys, name):
    db = tmp_path / "x.db"
    code, out, err = run(capsys, "latency", "build", "tiny", "--device", name, "--db", db)
    assert_one_clear_error(code, out, err, f"invalid device name {name!r}")
    assert not db.exists()


@pytest.mark.parametrize("command", ["build", "validate"])
def test_zero_rounds_is_a_usage_error(tmp_path, capsys, command):
    db = tmp_path / "x.db"
    code, out, err = run(
        capsys, "latency", command, "tiny", "--device", DEVICE, "--rounds", "0", "--db", db
    )
    assert code == 2 and "--rounds: need at least 1 round" in err and "Traceback" not in err
    assert not db.exists()


def test_odd_validation_rounds_are_a_usage_error(tmp_path, capsys):
    # half the rounds are judged, the other half is the noise ceiling: they must be equal
    db = tmp_path / "x.db"
    code, out, err = run(
        capsys, "latency", "validate", "tiny", "--device", DEVICE, "--rounds", "3", "--db", db
    )
    assert code == 2 and "--rounds: 3: give 1, or an even number" in err
    assert "Traceback" not in err and not db.exists()


def test_coreml_build_on_linux_says_it_needs_macos(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("latency.backends.coreml.platform.system", lambda: "Linux")
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "x.db"
    code, out, err = run(
        capsys, "latency", "build", "tiny", "--device", "iphone", "--backend", "coreml", "--db", db
    )
    assert_one_clear_error(code, out, err)
    assert err == f"error: {MACOS_ONLY}\n"
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["latency", "show"],
        ["latency", "build", "tiny", "--device", DEVICE, "--repeats", "1", "--warmup", "0"],
        ["latency", "predict", "tiny", "--device", DEVICE],
        ["latency", "import", "nothing.json"],
    ],
)
def test_db_that_is_not_a_table(tmp_path, capsys, command):
    notes = tmp_path / "notes.db"
    data = b"\x00\x01 these are someone's notes, not a database \xff" * 64
    notes.write_bytes(data)
    code, out, err = run(capsys, *command, "--db", notes)
    assert_one_clear_error(code, out, err, "not a diffnas latency table")
    assert notes.read_bytes() == data


def test_predict_an_architecture_of_another_space(db, capsys):
    code, out, err = run(
        capsys, "latency", "predict", "tiny", SD15_ARCH, "--device", DEVICE, "--db", db
    )
    assert_one_clear_error(code, out, err, "'sd15'", "'tiny'")


def test_predict_on_a_device_the_table_lacks(db, capsys):
    code, out, err = run(capsys, "latency", "predict", "tiny", "--device", "iphone", "--db", db)
    assert_one_clear_error(
        code, out, err, "no measurements for device 'iphone'", DEVICE, "diffnas latency build"
    )


def test_predict_on_a_table_missing_blocks(db, space, tmp_path, capsys):
    partial = tmp_path / "partial.db"
    with LatencyTable(db) as full, LatencyTable(partial) as table:
        rows = full.rows()
        table.add(rows[1:])
    code, out, err = run(capsys, "latency", "predict", "tiny", "--device", DEVICE, "--db", partial)
    assert_one_clear_error(
        code, out, err, rows[0].signature.hash, f"diffnas latency build tiny --device {DEVICE}"
    )
