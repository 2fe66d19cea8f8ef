"""The latency package: signatures, the table, backends, the predictor and validation.

Arithmetic is checked on synthetic measurements with known latencies; real profiling is
kept to a few tiny blocks so the module stays fast on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sqlite3
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from latency import coreml as coreml_mod
from latency.backends import Timing, get_backend
from latency.backends.coreml import CoreMLBackend
from latency.coreml import input_spec
from latency.predict import MissingSignaturesError, Predictor, predict
from latency.signature import (
    FIXED,
    SEARCHABLE,
    BlockSignature,
    _attention_init,
    _resnet_init,
    signatures,
    unet_parts,
)
from latency.table import LatencyTable, Measurement
from latency.validate import accuracy, random_archs, scatter_plot, validate
from search_spaces import Architecture, ArchitectureError, UserError, load_space
from search_spaces.unet import build_unet

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACOS_ONLY = "Core ML timing needs macOS: run the agent on a Mac, or use --backend torch"
DEVICE = "synthetic-dev"


# -- shared fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread (on a busy two-core machine two are many times slower than one);
    the previous count is given back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


@pytest.fixture(scope="module")
def parts(space):
    return unet_parts(space)


@pytest.fixture(scope="module")
def part(parts):
    return {p.name: p for p in parts}


@pytest.fixture(scope="module")
def sigs(space):
    return signatures(space)


@pytest.fixture(scope="module")
def latency_of(sigs) -> dict[str, float]:
    """A distinct, exactly representable latency per signature hash."""
    return {s.hash: float(3 * i + 1) for i, s in enumerate(sigs)}


def measurement(sig, median=1.0, device=DEVICE, samples=None, **kw) -> Measurement:
    kw.setdefault("backend", "torch")
    kw.setdefault("compute_unit", "cpu")
    kw.setdefault("precision", sig.dtype)
    kw.setdefault("iqr_ms", 0.0)
    return Measurement(
        device=device,
        signature=sig,
        samples=[median] if samples is None else samples,
        median_ms=median,
        **kw,
    )


def row_count(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]


@pytest.fixture
def synthetic_table(tmp_path, sigs, latency_of):
    """A table holding every signature of `tiny` on DEVICE with known latencies."""
    table = LatencyTable(tmp_path / "synthetic.db")
    table.add([measurement(s, latency_of[s.hash]) for s in sigs])
    yield table
    table.close()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, sigs, latency_of, space):
    path = tmp_path_factory.mktemp("predictor") / "table.db"
    with LatencyTable(path) as table:
        table.add([measurement(s, latency_of[s.hash]) for s in sigs])
        yield Predictor(space, table, DEVICE)


@pytest.fixture
def concat_sig():
    return BlockSignature.make("concat", {}, {"hidden": (2, 4, 8, 8), "skip": (2, 4, 8, 8)})


# -- signatures ----------------------------------------------------------------------------------


def test_every_slot_and_fixed_part_has_a_signature(space, parts, sigs):
    slot_parts = [p for p in parts if p.stage != "fixed"]
    assert [p.name for p in slot_parts] == list(space.slots)
    for p in slot_parts:
        slot = space.slots[p.name]
        assert p.stage == slot.stage
        assert p.signature.kind == slot.kind
        assert p.signature.kind in SEARCHABLE
    for p in parts:
        assert isinstance(p.signature, BlockSignature)
        if p.stage == "fixed":
            assert p.signature.kind in FIXED
    assert set(sigs) == {p.signature for p in parts}
    assert len(set(sigs)) == len(sigs)


def test_fixed_parts_cover_the_unet(space, parts):
    fixed = {p.name: p.signature.kind for p in parts if p.stage == "fixed"}
    modules = dict(build_unet(space.unet_config, device="meta").named_modules())
    downs = {n for n in modules if n.endswith(".downsamplers.0")}
    ups = {n for n in modules if n.endswith(".upsamplers.0")}
    concats = {f"{path}.concat" for path, s in space.slots.items() if s.block.skip_channels}
    assert downs and ups and concats
    assert {"conv_in", "time_embedding", "conv_out"} <= set(fixed)
    expected = {"conv_in", "time_embedding", "conv_out"} | downs | ups | concats
    assert set(fixed) == expected
    assert fixed["conv_in"] == "conv_in"
    assert fixed["time_embedding"] == "time_embedding"
    assert fixed["conv_out"] == "conv_out"
    assert all(fixed[n] == "downsample" for n in downs)
    assert all(fixed[n] == "upsample" for n in ups)
    assert all(fixed[n] == "concat" for n in concats)
    # every decoder ResNet (it consumes a skip) has its concatenation, and only those
    decoder = [p for p, s in space.slots.items() if s.kind == "resnet" and s.block.skip_channels]
    assert len(concats) == len(decoder) == 6


def test_equal_signatures_deduplicate(part, sigs, parts, concat_sig):
    a, b = part["mid_block.resnets.0"].signature, part["mid_block.resnets.1"].signature
    assert a is not b and a == b and hash(a) == hash(b) and a.hash == b.hash
    assert len({a, b}) == 1
    assert sum(1 for s in sigs if s == a) == 1
    assert len(sigs) < len(parts)
    again = BlockSignature.make("concat", {}, {"hidden": [2, 4, 8, 8], "skip": [2, 4, 8, 8]})
    assert again == concat_sig and len({again, concat_sig}) == 1
    # different shapes, dtypes or kinds are different signatures
    other = BlockSignature.make("concat", {}, {"hidden": (2, 4, 8, 8), "skip": (2, 8, 8, 8)})
    assert other != concat_sig and other.hash != concat_sig.hash
    assert concat_sig.with_dtype("fp16") != concat_sig


def test_hash_is_stable_and_canonical(sigs, concat_sig):
    # pinned: the hash must not depend on the process, the Python hash seed or dict order
    assert concat_sig.to_json() == (
        '{"dtype":"fp32","init":{},"inputs":{"hidden":[2,4,8,8],"skip":[2,4,8,8]},"kind":"concat"}'
    )
    assert concat_sig.hash == "3f1266b17327a9f5"
    for sig in sigs:
        assert sig.hash == hashlib.sha256(sig.to_json().encode()).hexdigest()[:16]
        back = BlockSignature.from_dict(sig.to_dict())
        assert back == sig and back.hash == sig.hash and back.to_json() == sig.to_json()
        via_json = BlockSignature.from_dict(json.loads(sig.to_json()))
        assert via_json.hash == sig.hash
        reordered = BlockSignature.make(
            sig.kind, dict(reversed(sig.to_dict()["init"].items())), dict(sig.inputs), sig.dtype
        )
        assert reordered.hash == sig.hash
        assert sig.with_dtype("fp16").hash != sig.hash
        assert sig.with_dtype("fp16").with_dtype("fp32").hash == sig.hash


def test_signature_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="unknown block kind"):
        BlockSignature.make("conv3d", {}, {"x": (1,)})
    with pytest.raises(UserError, match="unknown dtype"):
        BlockSignature.make("concat", {}, {"x": (1,)}, dtype="fp8")
    with pytest.raises(UserError, match="not a block signature"):
        BlockSignature.from_dict({"kind": "concat"})


def _unet_shapes(space) -> dict[str, tuple[int, ...]]:
    """Output shape of every part, as the UNet itself produces it (meta forward)."""
    unet = build_unet(space.unet_config, device="meta")
    modules = dict(unet.named_modules())
    out: dict[str, tuple[int, ...]] = {}
    handles = []

    def first_tensor(x):
        if torch.is_tensor(x):
            return x
        if hasattr(x, "sample"):
            return x.sample
        return x[0]

    def on_output(name):
        def hook(module, args, output):
            out.setdefault(name, tuple(first_tensor(output).shape))

        return hook

    def on_input(name):  # a decoder ResNet's input is the concatenation's output
        def hook(module, args, kwargs):
            out.setdefault(f"{name}.concat", tuple(args[0].shape))

        return hook

    names = [*space.slots, "conv_in", "time_embedding", "conv_out"]
    names += [n for n in modules if n.endswith((".downsamplers.0", ".upsamplers.0"))]
    for name in names:
        handles.append(modules[name].register_forward_hook(on_output(name)))
    for path, slot in space.slots.items():
        if slot.block.skip_channels:
            handles.append(
                modules[path].register_forward_pre_hook(on_input(path), with_kwargs=True)
            )
    try:
        unet(
            torch.zeros(space.batch, *space.latent, device="meta"),
            torch.zeros((), device="meta"),
            encoder_hidden_states=torch.zeros(space.batch, *space.context, device="meta"),
        )
    finally:
        for h in handles:
            h.remove()
    return out


def test_every_signature_builds_and_runs_with_the_unets_shapes(space, parts, sigs):
    expected = _unet_shapes(space)
    assert set(expected) == {p.name for p in parts}
    shape_of = {}
    with torch.inference_mode():
        for sig in sigs:
            module = sig.build()
            inputs = sig.example_inputs()
            assert [tuple(x.shape) for x in inputs] == [s for _, s in sig.inputs]
            y = module(*inputs)
            assert torch.is_tensor(y) and torch.isfinite(y).all()
            shape_of[sig] = tuple(y.shape)
    for p in parts:
        assert shape_of[p.signature] == expected[p.name], p.name
        if p.stage != "fixed":
            b = space.slots[p.name].block
            channels = b.out_channels if b.kind == "resnet" else b.in_channels
            assert shape_of[p.signature] == (space.batch, channels, b.height, b.width), p.name


def test_copies_share_the_originals_signature(space, part):
    from nas.supernet import ElasticUNet

    model = ElasticUNet(space).eval()
    copyable = [p for p, s in space.slots.items() if s.max_copies >= 1]
    assert any(space.slots[p].kind == "resnet" for p in copyable)
    assert any(space.slots[p].kind == "cross_attention" for p in copyable)
    arch = space.original()
    for p in copyable:
        arch = arch.with_multiplicity(p, 2)
    model.set_architecture(arch)
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = []
    for p in copyable:
        copy = model.instances(p)[1]
        assert copy is not model.unet.get_submodule(p)

        def record(module, args, kwargs, p=p):
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [v for v in kwargs.values() if torch.is_tensor(v)]
            seen[p] = [tuple(t.shape) for t in tensors]

        handles.append(copy.register_forward_pre_hook(record, with_kwargs=True))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model(
            torch.randn(space.batch, *space.latent, generator=g),
            torch.full((space.batch,), 10),
            torch.randn(space.batch, *space.context, generator=g),
        )
    for h in handles:
        h.remove()
    assert set(seen) == set(copyable)
    for p in copyable:
        original = part[p].signature
        copy = model.instances(p)[1]
        init = _resnet_init(copy) if space.slots[p].kind == "resnet" else _attention_init(copy)
        names = [name for name, _ in original.inputs]
        sig = BlockSignature.make(original.kind, init, dict(zip(names, seen[p], strict=True)))
        assert sig == original and sig.hash == original.hash, p


# -- the table -----------------------------------------------------------------------------------


def test_table_uses_wal(tmp_path):
    path = tmp_path / "t.db"
    LatencyTable(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


def test_add_and_lookup(tmp_path, concat_sig, sigs):
    with LatencyTable(tmp_path / "t.db") as table:
        assert table.add(measurement(concat_sig, 2.5, samples=[2.0, 2.5, 3.0], iqr_ms=0.5)) == 1
        found = table.lookup(DEVICE, [concat_sig, sigs[0]])
        assert set(found) == {concat_sig.hash}  # a missing signature is simply absent
        m = found[concat_sig.hash]
        assert m.signature == concat_sig
        assert (m.median_ms, m.iqr_ms, m.samples) == (2.5, 0.5, [2.0, 2.5, 3.0])
        assert (m.device, m.backend, m.compute_unit, m.precision) == (
            DEVICE,
            "torch",
            "cpu",
            "fp32",
        )
        [d] = table.devices()
        assert (d["device"], d["signatures"], d["rows"]) == (DEVICE, 1, 1)


def test_several_devices_in_one_file(tmp_path, concat_sig):
    path = tmp_path / "t.db"
    with LatencyTable(path) as table:
        table.add(measurement(concat_sig, 1.0, device="phone-a"))
        table.add(
            measurement(concat_sig, 7.0, device="phone-b", backend="coreml", compute_unit="ALL")
        )
    with LatencyTable(path) as table:  # reopened: it was stored
        assert [d["device"] for d in table.devices()] == ["phone-a", "phone-b"]
        assert table.lookup("phone-a", [concat_sig])[concat_sig.hash].median_ms == 1.0
        assert table.lookup("phone-b", [concat_sig])[concat_sig.hash].median_ms == 7.0
        assert table.setting("phone-b")["backend"] == "coreml"
        assert [m.device for m in table.rows("phone-a")] == ["phone-a"]
        with pytest.raises(UserError, match="phone-c"):
            table.setting("phone-c")


def test_measuring_again_appends_and_lookup_takes_the_newest(tmp_path, concat_sig):
    with LatencyTable(tmp_path / "t.db") as table:
        table.add(measurement(concat_sig, 5.0, created=1000.0))
        table.add(measurement(concat_sig, 3.0, created=2000.0))
        assert [m.median_ms for m in table.rows()] == [5.0, 3.0]  # nothing overwritten
        assert table.lookup(DEVICE, [concat_sig])[concat_sig.hash].median_ms == 3.0
        # a row added later but measured earlier (e.g. imported) does not win
        table.add(measurement(concat_sig, 9.0, created=1500.0))
        assert len(table.rows()) == 3
        assert table.lookup(DEVICE, [concat_sig])[concat_sig.hash].median_ms == 3.0
        assert table.devices()[0]["signatures"] == 1


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_export_then_import_gives_the_same_lookups(tmp_path, sigs, latency_of, fmt):
    src = LatencyTable(tmp_path / "src.db")
    src.add([measurement(s, latency_of[s.hash], samples=[1.0, latency_of[s.hash]]) for s in sigs])
    src.add(measurement(sigs[0], 0.25, device="other-dev", versions={"torch": "x", "threads": 2}))
    out = tmp_path / f"export.{fmt}"
    out.write_text(src.export_json() if fmt == "json" else src.export_csv())
    dst = LatencyTable(tmp_path / "dst.db")
    assert dst.import_file(out) == len(sigs) + 1
    for device in (DEVICE, "other-dev"):
        a, b = src.lookup(device, sigs), dst.lookup(device, sigs)
        assert set(a) == set(b) and a
        for h in a:
            assert b[h].to_dict() == a[h].to_dict()
    # only one device exported
    only = tmp_path / f"only.{fmt}"
    only.write_text(src.export_json("other-dev") if fmt == "json" else src.export_csv("other-dev"))
    third = LatencyTable(tmp_path / "third.db")
    assert third.import_file(only) == 1
    assert [d["device"] for d in third.devices()] == ["other-dev"]
    for t in (src, dst, third):
        t.close()


def test_calibration_is_stored_and_returned(tmp_path, sigs):
    path = tmp_path / "t.db"
    with LatencyTable(path) as table:
        assert table.calibration(DEVICE, "tiny") is None
        with pytest.raises(UserError, match="no measurements for device"):
            table.add_calibration(DEVICE, "tiny", 1.1, 0.5, 12, 8.0, 2.0)  # of no setting yet
        table.add(measurement(sigs[0]))
        table.add_calibration(DEVICE, "tiny", 1.1, 0.5, 12, 8.0, 2.0)
        table.add_calibration(DEVICE, "tiny", 1.25, -0.75, 20, 7.0, 1.5)
        with pytest.raises(UserError):
            table.add_calibration(DEVICE, "tiny", -1.0, 0.0, 2, 1.0, 1.0)
        with pytest.raises(UserError):
            table.add_calibration(DEVICE, "tiny", math.nan, 0.0, 2, 1.0, 1.0)
        with pytest.raises(UserError):
            table.add_calibration("a/b", "tiny", 1.0, 0.0, 2, 1.0, 1.0)
    with LatencyTable(path) as table:
        c = table.calibration(DEVICE, "tiny")
        assert (c["slope"], c["intercept"], c["samples"]) == (1.25, -0.75, 20)
        assert (c["mape_before"], c["mape_after"]) == (7.0, 1.5)
        assert table.calibration(DEVICE, "sd15") is None
        assert table.calibration("other", "tiny") is None


BAD_MEASUREMENTS = {
    "nan median": {"median": math.nan},
    "inf median": {"median": math.inf},
    "negative median": {"median": -1.0, "samples": [1.0]},
    "zero median": {"median": 0.0, "samples": [1.0]},
    "nan sample": {"median": 1.0, "samples": [1.0, math.nan]},
    "inf sample": {"median": 1.0, "samples": [math.inf]},
    "negative sample": {"median": 1.0, "samples": [1.0, -2.0]},
    "zero sample": {"median": 1.0, "samples": [0.0, 1.0]},
    "empty samples": {"median": 1.0, "samples": []},
    "nan iqr": {"median": 1.0, "iqr_ms": math.nan},
    "negative iqr": {"median": 1.0, "iqr_ms": -0.1},
    "bad source": {"median": 1.0, "source": "guessed"},
}


@pytest.mark.parametrize("case", list(BAD_MEASUREMENTS))
def test_bad_measurement_stores_nothing(tmp_path, concat_sig, sigs, case):
    path = tmp_path / "t.db"
    with LatencyTable(path) as table:
        table.add(measurement(concat_sig, 1.0))
        before = row_count(path)
        bad = measurement(concat_sig, **BAD_MEASUREMENTS[case])
        with pytest.raises(UserError):
            table.add(bad)
        assert row_count(path) == before
        # one bad row in a batch of good ones: none of the batch is stored
        good = [measurement(s, 2.0) for s in sigs[:3]]
        with pytest.raises(UserError):
            table.add([*good[:2], bad, good[2]])
        assert row_count(path) == before
        assert len(table.rows()) == before


@pytest.mark.parametrize("name", ["../x", "a/b", "a b", "", "x" * 65, "a\\b", ".hidden"])
def test_device_names_with_path_characters_are_refused(tmp_path, concat_sig, name):
    path = tmp_path / "t.db"
    with LatencyTable(path) as table:
        with pytest.raises(UserError, match="invalid device name"):
            table.add(measurement(concat_sig, device=name))
        assert row_count(path) == 0
        with pytest.raises(UserError, match="invalid device name"):
            table.lookup(name, [concat_sig])
        with pytest.raises(UserError, match="invalid device name"):
            table.rows(name)


def test_a_file_that_is_not_sqlite_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "notes.db"
    data = bytes(range(256)) * 16 + b"not a database"
    path.write_bytes(data)
    with pytest.raises(UserError, match="not a diffnas latency table"):
        LatencyTable(path)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]  # no -wal / -shm left
    with pytest.raises(UserError, match="is not a file"):
        LatencyTable(tmp_path)


def _export_records(tmp_path, sigs) -> list[dict]:
    with LatencyTable(tmp_path / "src.db") as src:
        src.add([measurement(s, 2.0) for s in sigs[:3]])
        return json.loads(src.export_json())


@pytest.mark.parametrize(
    "change",
    [
        {"median_ms": -1.0},
        {"samples": []},
        {"device": "a/b"},
        {"signature": {"kind": "resnet"}},
        {"source": "guess"},
        {"unknown_field": 1},
    ],
)
def test_import_with_a_bad_record_imports_nothing(tmp_path, sigs, change):
    records = _export_records(tmp_path, sigs)
    records[1].update(change)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    path = tmp_path / "dst.db"
    with LatencyTable(path) as dst:
        with pytest.raises(UserError, match=r"record 1: .*nothing was imported"):
            dst.import_file(bad)
        assert row_count(path) == 0


def test_import_with_a_tampered_hash_is_refused(tmp_path, sigs):
    records = _export_records(tmp_path, sigs)
    records[2]["sig_hash"] = "0" * 16
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(records))
    # the same in CSV: the hash column no longer matches the signature column
    with LatencyTable(tmp_path / "src.db") as src:
        csv_text = src.export_csv()
    h = sigs[1].hash
    assert h in csv_text
    bad_csv = tmp_path / "tampered.csv"
    bad_csv.write_text(csv_text.replace(h, "f" * 16, 1))
    path = tmp_path / "dst.db"
    with LatencyTable(path) as dst:
        with pytest.raises(UserError, match="sig_hash"):
            dst.import_file(bad)
        with pytest.raises(UserError, match="sig_hash"):
            dst.import_file(bad_csv)
        assert row_count(path) == 0


def test_import_of_a_missing_or_malformed_file(tmp_path):
    with LatencyTable(tmp_path / "t.db") as table:
        with pytest.raises(UserError, match="does not exist"):
            table.import_file(tmp_path / "nope.json")
        broken = tmp_path / "broken.json"
        broken.write_text("[{")
        with pytest.raises(UserError, match="not valid JSON"):
            table.import_file(broken)
        obj = tmp_path / "obj.json"
        obj.write_text("{}")
        with pytest.raises(UserError, match="JSON list"):
            table.import_file(obj)


@pytest.mark.parametrize(
    "change",
    [{"median_ms": None}, {"median_ms": "fast"}, {"samples": ["x"]}, {"created": "yesterday"}],
)
def test_import_with_a_non_numeric_field_is_a_user_error(tmp_path, sigs, change):
    records = _export_records(tmp_path, sigs)
    records[1].update(change)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    path = tmp_path / "dst.db"
    with LatencyTable(path) as dst:
        with pytest.raises(UserError, match="record 1"):
            dst.import_file(bad)
        assert row_count(path) == 0


# -- backends ------------------------------------------------------------------------------------


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(UserError, match="unknown backend 'tensorrt'") as e:
        get_backend("tensorrt")
    assert "coreml" in str(e.value) and "torch" in str(e.value)


@pytest.mark.parametrize(
    ("backend", "unit", "allowed"),
    [
        ("torch", "tpu", ["cpu", "cuda", "mps"]),
        ("coreml", "GPU", ["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"]),
    ],
)
def test_unknown_compute_unit_names_the_allowed_ones(backend, unit, allowed):
    with pytest.raises(UserError, match=f"no compute unit '{unit}'") as e:
        get_backend(backend, compute_unit=unit)
    assert all(a in str(e.value) for a in allowed)


@pytest.mark.parametrize(
    ("backend", "precision", "allowed"),
    [("torch", "fp8", ["fp32", "fp16", "bf16"]), ("coreml", "bf16", ["fp32", "fp16"])],
)
def test_unknown_precision_names_the_allowed_ones(backend, precision, allowed):
    with pytest.raises(UserError, match=f"no precision '{precision}'") as e:
        get_backend(backend, precision=precision)
    assert all(a in str(e.value) for a in allowed)


def test_backend_defaults_and_bad_repeats():
    assert get_backend("torch").compute_unit == "cpu"
    assert get_backend("coreml").compute_unit == "ALL"
    with pytest.raises(UserError, match="repeats"):
        get_backend("torch", repeats=0)
    with pytest.raises(UserError, match="warmup"):
        get_backend("torch", warmup=-1)
    with pytest.raises(UserError, match="fp16 on the CPU"):
        get_backend("torch", precision="fp16").test_connection()


def test_timing_statistics():
    t = Timing([4.0, 1.0, 100.0, 3.0, 2.0])
    assert t.median_ms == 3.0
    assert t.iqr_ms == 2.0
    assert Timing([5.0]).iqr_ms == 0.0


def test_torch_backend_profiles_a_small_block(part):
    sig = part["up_blocks.0.resnets.0.concat"].signature
    backend = get_backend("torch", repeats=3, warmup=1, threads=1)
    backend.test_connection()
    timing = backend.profile(sig)
    assert len(timing.samples) == 3
    assert all(s > 0 for s in timing.samples)
    assert timing.median_ms > 0 and timing.iqr_ms >= 0
    assert timing.versions["torch"] == torch.__version__
    assert timing.versions["threads"] == 1


def test_torch_backend_warns_of_passive_openmp_threads(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    try:
        with pytest.warns(UserWarning, match="OMP_WAIT_POLICY=PASSIVE"):
            get_backend("torch", threads=2).test_connection()
        backend = get_backend("torch", threads=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one thread waits for no other
            backend.test_connection()
        assert backend.versions()["omp_wait_policy"] == "passive"  # recorded with each row
    finally:
        torch.set_num_threads(threads)


# a fresh process (the setting is process-wide): page faults of writing a 64 MB tensor, 12
# times over, with glibc's defaults or after the torch backend's test_connection
_FAULTS = """
import resource, sys, torch
from latency.backends import get_backend
if sys.argv[1] == "backend":
    get_backend("torch", threads=1).test_connection()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    x.sum()
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults() for _ in range(12)])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_torch_backend_times_cpu_without_page_faults_on_fresh_memory():
    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        return [int(n) for n in out.stdout.split()[-3:]]  # the steady state: the last 3

    assert min(faults("default")) > 10_000  # 64 MB freshly mapped: one fault per 4 KB page
    # the first few land between Python's small objects; then the heap serves them again
    assert sum(faults("backend")) < 1_000
    backend = get_backend("torch", threads=1)
    backend.test_connection()
    assert backend.versions()["malloc"] == "heap kept"


@pytest.fixture(scope="module")
def coreml_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("diffnas-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFNAS_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def small_sig(part):
    """A small block whose Core ML conversion is fast."""
    return part["down_blocks.1.downsamplers.0"].signature


def test_coreml_converts_once_into_the_cache(coreml_cache, small_sig, monkeypatch):
    backend = get_backend("coreml", compute_unit="CPU_ONLY")
    path = backend.convert_model(small_sig)
    assert path.is_dir() and path.suffix == ".mlpackage"
    assert path.is_relative_to(coreml_cache)
    assert small_sig.hash in path.name and "fp32" in path.name
    stamps = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    assert any(p.name == "Manifest.json" for p in stamps)

    def no_conversion(*a, **k):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(coreml_mod, "convert", no_conversion)
    assert get_backend("coreml", compute_unit="CPU_ONLY").convert_model(small_sig) == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == stamps


def _expected_spec(sig: BlockSignature) -> dict[str, list[int]]:
    return {name: list(shape) for name, shape in sig.inputs}


def test_coreml_package_inputs_match_the_signature(coreml_cache, small_sig):
    path = get_backend("coreml", compute_unit="CPU_ONLY").convert_model(small_sig)
    assert input_spec(path) == _expected_spec(small_sig)


@pytest.mark.parametrize("name", ["conv_in", "up_blocks.1.resnets.1"])
def test_coreml_package_inputs_match_the_signature_for_every_kind(coreml_cache, part, name):
    sig = part[name].signature
    path = get_backend("coreml", compute_unit="CPU_ONLY").convert_model(sig)
    assert input_spec(path) == _expected_spec(sig)


def test_coreml_profile_on_linux_says_it_needs_macos(tmp_path, monkeypatch, small_sig):
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path))
    monkeypatch.setattr("latency.backends.coreml.platform.system", lambda: "Linux")
    backend = get_backend("coreml")
    with pytest.raises(UserError) as e:
        backend.profile(small_sig)
    assert str(e.value) == MACOS_ONLY
    with pytest.raises(UserError) as e:
        backend.test_connection()
    assert str(e.value) == MACOS_ONLY
    assert not (tmp_path / "coreml").exists()  # it stopped before converting anything


class FakeModel:
    def __init__(self, path):
        self.path = path
        self.feeds: list[dict] = []

    def predict(self, feeds):
        self.feeds.append(feeds)
        return {"output": None}


def test_coreml_profile_on_a_mac_times_predict(coreml_cache, small_sig, monkeypatch):
    monkeypatch.setattr("latency.backends.coreml.platform.system", lambda: "Darwin")
    models: list[FakeModel] = []

    def load(self, path):
        models.append(FakeModel(path))
        return models[-1]

    monkeypatch.setattr(CoreMLBackend, "load", load)
    backend = get_backend("coreml", compute_unit="CPU_ONLY", repeats=4, warmup=2)
    timing = backend.profile(small_sig)
    assert len(timing.samples) == 4 and all(s >= 0 for s in timing.samples)
    [model] = models
    assert model.path == backend.package_path(small_sig) and Path(model.path).exists()
    assert len(model.feeds) == 2 + 4
    names = [name for name, _ in small_sig.inputs]
    for feeds in model.feeds:
        assert list(feeds) == names
        assert {k: list(v.shape) for k, v in feeds.items()} == _expected_spec(small_sig)
        assert all(v.dtype.name == "float32" for v in feeds.values())
    # and they are what the package itself expects
    assert {k: list(v.shape) for k, v in model.feeds[0].items()} == input_spec(model.path)
    assert "coremltools" in timing.versions


# -- the predictor -------------------------------------------------------------------------------


def test_prediction_of_the_original_is_the_sum_of_all_parts(
    predictor, space, parts, part, latency_of
):
    pred = predictor.predict(space.original())
    total = sum(latency_of[p.signature.hash] for p in parts)
    fixed = sum(latency_of[p.signature.hash] for p in parts if p.stage == "fixed")
    assert pred.raw_ms == pred.total_ms == total
    assert pred.fixed_ms == fixed
    assert pred.blocks_ms == total - fixed
    assert not pred.calibrated
    for path in space.slots:
        ms = latency_of[part[path].signature.hash]
        assert pred.per_slot[path] == predictor.block_ms(path) == ms


def test_per_stage_and_per_slot_sum_to_blocks(predictor, space, part, latency_of):
    for arch in [space.original(), space.random(1), space.random(2)]:
        pred = predictor.predict(arch)
        assert set(pred.per_stage) == set(space.stages)
        assert sum(v for kinds in pred.per_stage.values() for v in kinds.values()) == pytest.approx(
            pred.blocks_ms
        )
        assert sum(pred.per_slot.values()) == pytest.approx(pred.blocks_ms)
        for stage, paths in space.stages.items():
            for kind in ("cross_attention", "resnet"):
                want = sum(
                    arch[p] * latency_of[part[p].signature.hash]
                    for p in paths
                    if space.slots[p].kind == kind
                )
                assert pred.per_stage[stage][kind] == pytest.approx(want)


def test_removing_and_copying_change_the_total_by_the_block(predictor, space, part, latency_of):
    original = predictor.predict(space.original())
    removable = [p for p, s in space.slots.items() if s.removable]
    copyable = [p for p, s in space.slots.items() if s.max_copies >= 1]
    assert removable and copyable
    for path in removable:
        arch = space.original().with_multiplicity(path, 0)
        if space.violations(arch):
            continue
        ms = latency_of[part[path].signature.hash]
        pred = predictor.predict(arch)
        assert original.total_ms - pred.total_ms == ms, path
        assert pred.per_slot[path] == 0
        assert predictor.delta_ms(space.original(), path, "remove") == -ms
    for path in copyable:
        ms = latency_of[part[path].signature.hash]
        pred = predictor.predict(space.original().with_multiplicity(path, 2))
        assert pred.total_ms - original.total_ms == ms, path
        assert pred.per_slot[path] == 2 * ms
        assert predictor.delta_ms(space.original(), path, "copy") == ms
    # several changes add up
    a, b = "down_blocks.0.attentions.0", "mid_block.attentions.0"
    arch = space.original().with_multiplicity(a, 0).with_multiplicity(b, 2)
    want = (
        original.total_ms - latency_of[part[a].signature.hash] + latency_of[part[b].signature.hash]
    )
    assert predictor.predict(arch).total_ms == want


def test_predict_function_matches_the_predictor(synthetic_table, predictor, space):
    arch = space.random(3)
    assert predict(space, arch, synthetic_table, DEVICE).to_dict() == (
        predictor.predict(arch).to_dict()
    )


def test_calibration_is_applied(synthetic_table, space):
    synthetic_table.add_calibration(DEVICE, "tiny", 1.5, 2.25, 10, 5.0, 1.0)
    calibrated = Predictor(space, synthetic_table, DEVICE)
    raw = Predictor(space, synthetic_table, DEVICE, calibrate=False)
    for arch in [space.original(), space.random(4)]:
        c, r = calibrated.predict(arch), raw.predict(arch)
        assert c.calibrated and not r.calibrated
        assert c.raw_ms == r.raw_ms == r.total_ms
        assert c.total_ms == pytest.approx(1.5 * c.raw_ms + 2.25)
        assert c.blocks_ms == r.blocks_ms and c.fixed_ms == r.fixed_ms
    path = "down_blocks.0.attentions.0"
    assert calibrated.delta_ms(space.original(), path, "remove") == pytest.approx(
        -1.5 * raw.block_ms(path)
    )


def test_calibration_belongs_to_one_setting(tmp_path, sigs, latency_of, space):
    with LatencyTable(tmp_path / "t.db") as table:
        table.add([measurement(s, latency_of[s.hash]) for s in sigs])  # torch / cpu / fp32
        table.add_calibration(DEVICE, "tiny", 3.0, 0.0, 10, 5.0, 1.0)  # fitted on that setting
        bf16 = [s.with_dtype("bf16") for s in sigs]
        table.add([measurement(s, latency_of[s.with_dtype("fp32").hash]) for s in bf16])
        pred = Predictor(space, table, DEVICE, precision="bf16").predict(space.original())
        assert not pred.calibrated


def test_a_table_missing_signatures(tmp_path, sigs, latency_of, space, part):
    lacking = {part["conv_out"].signature.hash, part["mid_block.attentions.0"].signature.hash}
    path = tmp_path / "partial.db"
    with LatencyTable(path) as table:
        table.add([measurement(s, latency_of[s.hash]) for s in sigs if s.hash not in lacking])
        with pytest.raises(MissingSignaturesError) as e:
            Predictor(space, table, DEVICE)
    err = e.value
    assert isinstance(err, UserError)
    assert {s.hash for s in err.missing} == lacking
    message = str(err)
    assert all(h in message for h in lacking)
    assert "lacks 2 block(s)" in message
    assert f"diffnas latency build tiny --device {DEVICE} --db {path}" in message


def test_missing_signatures_hint_builds_a_space_file_by_its_path(tmp_path, sigs, latency_of):
    """`latency build NAME` cannot find a space that lives in a file: the hint gives the path."""
    text = (REPO / "search_spaces" / "builtin" / "tiny.yaml").read_text()
    yaml_file = tmp_path / "my space.yaml"
    yaml_file.write_text(text.replace("name: tiny", "name: mine"))
    mine = load_space(yaml_file)
    assert mine.ref == str(yaml_file) and load_space("tiny").ref == "tiny"
    path = tmp_path / "partial.db"
    with LatencyTable(path) as table:
        table.add([measurement(s, latency_of[s.hash]) for s in sigs[1:]])
        with pytest.raises(MissingSignaturesError) as e:
            Predictor(mine, table, DEVICE)
    assert f"diffnas latency build '{yaml_file}' --device {DEVICE} --db {path}" in str(e.value)


def test_a_device_the_table_lacks(synthetic_table, space):
    with pytest.raises(UserError, match="no measurements for device 'iphone'") as e:
        Predictor(space, synthetic_table, "iphone")
    assert DEVICE in str(e.value) and "diffnas latency build" in str(e.value)


def test_an_architecture_of_another_space(predictor, space):
    other = Architecture.load(REPO / "experiments" / "snapfusion_sd15.arch.json")
    with pytest.raises(ArchitectureError, match="sd15"):
        predictor.predict(other)
    illegal = space.original().with_multiplicity("down_blocks.1.resnets.0", 0)
    with pytest.raises(ArchitectureError, match="not removable"):
        predictor.predict(illegal)


# -- validation ----------------------------------------------------------------------------------


def test_accuracy_on_known_numbers():
    a = accuracy([100, 200], [110, 200])
    assert a["mape"] == pytest.approx(100 * (10 / 110) / 2)
    assert a["mape"] == pytest.approx(4.545454, abs=1e-5)
    assert a["within_5"] == 0.5
    assert a["within_10"] == 1.0
    assert a["kendall_tau"] == pytest.approx(1.0)
    b = accuracy([1, 2, 3], [3, 2, 1])
    assert b["kendall_tau"] == pytest.approx(-1.0)
    assert b["mape"] == pytest.approx(100 * (2 / 3 + 0 + 2) / 3)
    assert b["within_5"] == pytest.approx(1 / 3)
    assert math.isnan(accuracy([1.0], [1.0])["kendall_tau"])


def test_validate_with_a_fake_measurement(predictor, space, tmp_path):
    calls = []

    def measure(arch):
        calls.append(arch)
        return predictor.predict(arch).raw_ms * 1.02

    report = validate(space, predictor, measure, samples=4, seed=0, progress=False)
    assert len(report.archs) == 5 == len(calls) == len(set(report.archs))
    assert report.archs[0] == space.original().hash
    assert report.space == "tiny" and report.device == DEVICE
    assert report.measured_ms == pytest.approx([1.02 * p for p in report.predicted_ms])
    assert report.mape == pytest.approx(100 * 0.02 / 1.02)
    assert report.within_5 == 1.0 and report.within_10 == 1.0
    assert report.kendall_tau == pytest.approx(1.0)
    assert report.calibration["slope"] == pytest.approx(1.02)
    assert report.calibration["intercept"] == pytest.approx(0.0, abs=1e-6)
    assert report.calibration["mape_after"] == pytest.approx(0.0, abs=1e-6)
    json.dumps(report.to_dict())  # serialisable as the CLI writes it

    png = tmp_path / "scatter.png"
    scatter_plot(report, png)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_validate_in_rounds_keeps_each_networks_fastest_and_reports_the_noise(predictor, space):
    # the machine slows down during round 1 (networks 4 and 5 +30%), then runs clean: the
    # judged half (rounds 1 and 3) keeps each network's fastest, so the table is not blamed
    calls = []

    def measure(arch):
        calls.append(arch.hash)
        slow = 1.3 if 3 < len(calls) <= 5 else 1.0
        return predictor.predict(arch).raw_ms * slow

    report = validate(space, predictor, measure, samples=4, seed=0, progress=False, rounds=4)
    assert len(calls) == 20 and all(
        sorted(calls[:5]) == sorted(calls[i : i + 5]) for i in (5, 10, 15)
    )
    assert calls[:5] == report.archs and calls[5:10] != calls[:5]  # later rounds in new orders
    assert report.measured_ms == pytest.approx(report.predicted_ms)
    assert report.mape == pytest.approx(0.0, abs=1e-9)
    assert report.repeat["mape"] == pytest.approx(0.0, abs=1e-9)  # rounds 2 and 4 are clean
    one = validate(space, predictor, measure, samples=4, seed=0, progress=False)
    assert one.repeat == {}
    with pytest.raises(ValueError, match="rounds=0"):
        validate(space, predictor, measure, samples=4, progress=False, rounds=0)
    with pytest.raises(ValueError, match="rounds=3: give 1, or an even number"):
        validate(space, predictor, measure, samples=4, progress=False, rounds=3)


def test_the_noise_ceiling_is_computed_like_the_result(predictor, space):
    # a perfect table on a machine that slows down during round 1: with two rounds the table
    # is judged against round 1 and the ceiling is round 2 against round 1, so both see the
    # same slow networks and the table cannot look better than the machine repeats itself
    calls = []

    def measure(arch):
        calls.append(arch.hash)
        slow = 1.3 if 3 < len(calls) <= 5 else 1.0
        return predictor.predict(arch).raw_ms * slow

    report = validate(space, predictor, measure, samples=4, seed=0, progress=False, rounds=2)
    assert report.mape == pytest.approx(100 * 2 * (0.3 / 1.3) / 5)
    assert report.repeat["mape"] == pytest.approx(report.mape)
    assert report.repeat["within_10"] == pytest.approx(report.within_10) == pytest.approx(3 / 5)


def test_predictor_signatures_of_a_network_and_fresh_latencies(predictor, space, parts):
    original = space.original()
    every = {p.signature.hash for p in parts}
    assert {s.hash for s in predictor.signatures(original)} == every
    # a removed block whose signature no other part shares leaves the network's signatures
    counts = Counter(p.signature.hash for p in parts)
    slot = next(
        p
        for p in parts
        if p.name in space.slots
        and counts[p.signature.hash] == 1
        and not space.violations(original.with_multiplicity(p.name, 0))
    )
    cut = original.with_multiplicity(slot.name, 0)
    assert {s.hash for s in predictor.signatures(cut)} == every - {slot.signature.hash}
    # fresh latencies replace the table's for those signatures only, fixed parts included
    fixed = next(p for p in parts if p.stage == "fixed")
    fresh = predictor.with_latencies({slot.signature.hash: 100.0, fixed.signature.hash: 50.0})
    n_fixed = sum(p.signature.hash == fixed.signature.hash for p in parts if p.stage == "fixed")
    grow = original[slot.name] * (100.0 - predictor.block_ms(slot.name))
    grow += n_fixed * (50.0 - predictor.ms[fixed.name])
    before = predictor.predict(original).raw_ms
    assert fresh.predict(original).raw_ms == pytest.approx(before + grow)
    assert predictor.block_ms(slot.name) != 100.0  # the original predictor is unchanged


def test_paired_validation_predicts_from_blocks_timed_beside_each_network(predictor, space):
    # the machine got 1.5x slower since the table was built: the separate protocol blames the
    # table for it; the paired one times the blocks in the same state and finds the model exact
    profiled = []

    def profile(sig):
        profiled.append(sig.hash)
        return 1.5 * predictor.ms[next(p.name for p in predictor.parts if p.signature == sig)]

    def measure(arch):
        return 1.5 * predictor.predict(arch).raw_ms

    separate = validate(space, predictor, measure, samples=4, seed=0, progress=False)
    assert separate.protocol == "separate" and separate.mape == pytest.approx(100 / 3)
    paired = validate(
        space, predictor, measure, 4, seed=0, progress=False, protocol="paired", profile=profile
    )
    assert paired.protocol == "paired" and paired.archs == separate.archs
    assert paired.mape == pytest.approx(0.0, abs=1e-9)
    assert paired.predicted_ms == pytest.approx(paired.measured_ms)
    # each network's own blocks only, once per network
    archs = random_archs(space, 4, seed=0)
    assert [a.hash for a in archs] == paired.archs
    wanted = [s.hash for a in archs for s in predictor.signatures(a)]
    assert sorted(profiled) == sorted(wanted)
    with pytest.raises(ValueError, match="pass profile"):
        validate(space, predictor, measure, 4, progress=False, protocol="paired")
    with pytest.raises(ValueError, match="unknown protocol 'both'"):
        validate(space, predictor, measure, 4, progress=False, protocol="both")


def test_build_in_rounds_stores_each_blocks_fastest_round(tmp_path, space):
    # the machine is slow for the first three blocks of round 1: one round would store their
    # slow spell in the table; the fastest of two rounds does not
    from latency.backends.torch_backend import TorchBackend
    from latency.profile import build_table

    sigs = signatures(space)
    ranks = sorted(s.hash for s in sigs)  # block i takes i + 1 ms on a quiet machine
    calls = []

    class Scripted(TorchBackend):
        def profile(self, signature):
            calls.append(signature.hash)
            slow = 1.5 if len(calls) <= 3 else 1.0
            return Timing([slow * (1 + ranks.index(signature.hash))])

    with LatencyTable(tmp_path / "t.db") as table:
        report = build_table(
            space, table, Scripted("cpu"), DEVICE, progress=False, rounds=2, guard=None
        )
        rows = table.rows(DEVICE)
    n = len(sigs)
    assert len(report.measured) == n and len(calls) == 2 * n
    assert sorted(calls[:n]) == sorted(calls[n:]) and calls[:n] != calls[n:]  # reshuffled
    assert len(rows) == n  # one row per block: its fastest round
    assert {m.signature.hash: m.median_ms for m in rows} == {
        h: pytest.approx(1 + ranks.index(h)) for h in ranks
    }
    with LatencyTable(tmp_path / "u.db") as table, pytest.raises(ValueError, match="rounds=0"):
        build_table(space, table, Scripted("cpu"), DEVICE, rounds=0)
