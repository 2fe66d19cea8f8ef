"""Phones: a bundle of Core ML models or ExecuTorch programs with its manifest, and the app's
results brought back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from small_blocks import attention_sig, resnet_sig
from test_service_support import cache_unet_parts, cli, tiny_blocks

from latency import executorch as et
from latency.backends import get_backend
from latency.coreml import input_spec
from latency.jobs import JobStore
from latency.table import LatencyTable


@pytest.fixture(autouse=True)
def _parts(monkeypatch, tmp_path):
    cache_unet_parts(monkeypatch)
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path / "cache"))


def test_bundle_export_and_results_import(tmp_path, capsys):
    db, out = tmp_path / "t.db", tmp_path / "bundle"
    small = [s for s in tiny_blocks() if s.kind in ("conv_in", "concat")]
    picked = {s.kind: s.with_dtype("fp16") for s in small}
    with JobStore(db) as store:  # a phone's device and two small blocks in its queue
        store.add_device("phone", "iphone-14-pro", "coreml", "CPU_AND_NE", "fp16")
        store.add_device("cpu", "xeon", "torch")
        store.enqueue("phone", picked.values())

    code, text = cli("latency", "bundle", "--device", "cpu", out, "--db", db, capsys=capsys)
    assert code == 2 and "Run `diffnas latency agent`" in text
    code, text = cli("latency", "bundle", "--device", "phone", out, "--db", db, capsys=capsys)
    assert code == 0, text

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "diffnas-bundle" and manifest["version"] == 1
    assert (manifest["device"], manifest["compute_unit"], manifest["precision"]) == (
        "phone",
        "CPU_AND_NE",
        "fp16",
    )
    assert manifest["timing"] == {"warmup": 3, "repeats": 10}
    models = {m["signature"]["kind"]: m for m in manifest["models"]}
    for kind, model in models.items():
        assert model["sig_hash"] == picked[kind].hash
        assert (out / model["path"] / "Manifest.json").is_file()  # a real .mlpackage
        # the app feeds inputs by the package's own names and shapes, as the manifest lists
        spec = input_spec(out / model["path"])
        assert [(i["name"], i["shape"]) for i in model["inputs"]] == list(spec.items())
        assert [i["shape"] for i in model["inputs"]] == [
            list(shape) for _, shape in picked[kind].inputs
        ]
        assert {i["dtype"] for i in model["inputs"]} == {"float32"}
        assert model["outputs"][0]["name"] == "output"

    conv, concat = models["conv_in"]["sig_hash"], models["concat"]["sig_hash"]
    good = {
        "format": "diffnas-results",
        "version": 1,
        "bundle_id": manifest["bundle_id"],
        "device": "phone",
        "compute_unit": "CPU_AND_NE",
        "environment": {"os": "iOS 17.5", "model": "iPhone15,2", "app": "timer 1.0"},
        "results": [
            {"sig_hash": conv, "samples_ms": [0.51, 0.49, 0.5]},
            {"sig_hash": concat, "error": "MLModel prediction failed"},
        ],
    }
    path = tmp_path / "results.json"

    def attempt(results, device="phone", raw: str | None = None) -> tuple[int, str]:
        path.write_text(raw if raw is not None else json.dumps(results))
        return cli("latency", "import", "--device", device, path, "--db", db, capsys=capsys)

    first = good["results"][0]
    bad = [
        ({**good, "bundle_id": "b0000000000000000"}, "was not exported from"),
        ({**good, "device": "other"}, "bundle"),
        ({**good, "compute_unit": "ALL"}, "timed on 'ALL'"),
        ({**good, "results": [{**first, "sig_hash": "0123456789abcdef"}]}, "not a model"),
        ({**good, "results": [first, first]}, "appears twice"),
        ({**good, "results": [{**first, "error": "x"}]}, "either samples_ms or error"),
        ({**good, "results": [{**first, "samples_ms": [1.0, -2.0]}]}, "greater than 0"),
        ({**good, "results": [{**first, "samples_ms": []}]}, "at least 1"),
        ({**good, "results": [{**first, "samples_ms": ["1"]}]}, "valid number"),
        ({**good, "extra": 1}, "extra: Extra inputs are not permitted"),
    ]
    for results, message in bad:
        code, text = attempt(results)
        assert code == 2 and message in text, (results, text)
    code, text = attempt(None, raw=json.dumps(good).replace("0.49", "NaN"))
    assert code == 2 and "finite number" in text
    code, text = attempt(good, device="other")
    assert code == 2 and "--device is 'other'" in text
    with LatencyTable(db) as table:
        assert table.rows() == []  # nothing written by any of them

    code, text = attempt(good)
    assert code == 0 and "imported 1 result(s) for phone" in text and "1 failed" in text
    with LatencyTable(db) as table:
        (row,) = table.rows()
    assert (row.backend, row.compute_unit, row.precision) == ("coreml", "CPU_AND_NE", "fp16")
    assert row.source == "measured" and row.median_ms == 0.5 and row.signature.hash == conv
    assert row.versions["os"] == "iOS 17.5" and row.versions["bundle"] == manifest["bundle_id"]
    with JobStore(db) as store:
        jobs = {j.sig_hash: j for j in store.jobs("phone")}
    assert jobs[conv].state == "done" and jobs[conv].measurement_id == row_id(db)
    assert jobs[concat].state == "queued" and jobs[concat].attempts == 1
    assert "MLModel prediction failed" in jobs[concat].error

    code, text = attempt({**good, "results": [first]})  # importing again stores nothing new
    assert code == 0 and "imported 0 result(s)" in text and "1 already stored" in text
    with LatencyTable(db) as table:
        assert len(table.rows()) == 1

    # a table export still imports as before; --device is only for on-device results
    export = tmp_path / "export.json"
    with LatencyTable(db) as table:
        export.write_text(table.export_json())
    code, text = cli("latency", "import", export, "--db", tmp_path / "o.db", capsys=capsys)
    assert code == 0 and "imported 1 row(s)" in text
    code, text = cli("latency", "import", export, "--device", "x", "--db", db, capsys=capsys)
    assert code == 2 and "--device is for on-device results" in text

    # the concat job is still queued: a new bundle needs a new folder
    code, text = cli("latency", "bundle", "--device", "phone", out, "--db", db, capsys=capsys)
    assert code == 2 and "not an empty folder" in text
    shutil.rmtree(out)


def test_an_executorch_bundle_holds_pte_programs_a_runtime_times(tmp_path, capsys):
    db, out = tmp_path / "t.db", tmp_path / "bundle"
    sigs = {s.kind: s for s in (resnet_sig(), attention_sig())}
    with JobStore(db) as store:
        store.add_device("pixel", "pixel-8", "executorch", "xnnpack")
        store.enqueue("pixel", sigs.values())
    # --kind registers the device: here the same setting again, from the defaults
    code, text = cli(
        "latency", "bundle", "--device", "pixel", "--kind", "pixel-8", "--backend",
        "executorch", out, "--db", db, "--repeats", 3, "--warmup", 1, capsys=capsys,
    )  # fmt: skip
    assert code == 0, text

    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["backend"], manifest["compute_unit"], manifest["precision"]) == (
        "executorch",
        "xnnpack",
        "fp32",
    )
    runtime = {"delegate": "xnnpack", "attention": "classic (AttnProcessor)"}
    assert manifest["runtime"] == {"executorch": et.require(), **runtime}
    backend = get_backend("executorch")
    results = []
    for model in manifest["models"]:
        sig = sigs[model["signature"]["kind"]]
        path = out / model["path"]
        assert path.suffix == ".pte" and model["sig_hash"] == sig.hash
        assert path.read_bytes() == backend.program_path(sig).read_bytes()  # the cached program
        # inputs in the order the program takes them, named as the block names them
        assert [(i["name"], tuple(i["shape"])) for i in model["inputs"]] == list(sig.inputs)
        assert {i["dtype"] for i in model["inputs"]} == {"float32"}
        with torch.no_grad():
            want = sig.build()(*sig.example_inputs()).shape
        assert model["outputs"] == [{"name": "output", "shape": list(want), "dtype": "float32"}]
        # the phone's part, by this machine's ExecuTorch runtime: load the bundled program
        # alone (no sidecar beside it) and time it with inputs built from the manifest
        inputs = [torch.zeros(i["shape"]) for i in model["inputs"]]
        timing = manifest["timing"]
        samples = et.time_program(et.load(path), inputs, timing["warmup"], timing["repeats"])
        results.append({"sig_hash": model["sig_hash"], "samples_ms": samples})
    assert len(results) == 2

    path = tmp_path / "results.json"
    path.write_text(
        json.dumps(
            {
                "format": "diffnas-results",
                "version": 1,
                "bundle_id": manifest["bundle_id"],
                "device": "pixel",
                "environment": {"os": "Android 15", "runner": "executor_runner"},
                "results": results,
            }
        )
    )
    code, text = cli("latency", "import", "--device", "pixel", path, "--db", db, capsys=capsys)
    assert code == 0 and "imported 2 result(s) for pixel" in text, text
    with LatencyTable(db) as table:
        rows = table.rows("pixel")
    assert {r.signature.hash for r in rows} == {s.hash for s in sigs.values()}
    for row in rows:
        assert (row.backend, row.compute_unit, row.source) == ("executorch", "xnnpack", "measured")
        assert row.versions["attention"] == runtime["attention"] and row.versions["os"]
        assert row.versions["executorch"] == et.require() and len(row.samples) == 3
    with JobStore(db) as store:
        assert store.counts("pixel")["done"] == 2


def row_id(db) -> int:
    with LatencyTable(db) as table:
        return table.last_id()
