"""Phones: profiling jobs as a folder of models, and their results brought back.

A phone runs no Python and no agent. `export_bundle` writes the device's queued jobs as
models in the device's format (Core ML devices: `.mlpackage`s; ExecuTorch devices: `.pte`
programs, lowered to the device's delegate) plus a `manifest.json` saying, for each model,
its signature hash and its inputs (names, shapes, types) and the compute unit to time it on.
An app on the phone (or ExecuTorch's `executor_runner`) times each model and writes
`results.json`; `import_results` checks it against the manifest (kept in the database when
the bundle is made) and stores it: all of it, or nothing.
Both formats are documented in docs/latency-service.md.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationError

from search_spaces import UserError

from .api_bodies import Body, Latency, Scalar
from .backends import Backend, Timing, get_backend
from .jobs import JobStore
from .profile import progress_bar
from .signature import BlockSignature

BUNDLE_FORMAT, RESULTS_FORMAT, VERSION = "diffnas-bundle", "diffnas-results", 1


def package_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a saved package as the app must feed and read them: the names
    are Core ML's (they may differ from the signature's, e.g. `input_tensor`)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    names = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name

    def describe(features) -> list[dict]:
        return [
            {
                "name": f.name,
                "shape": [int(s) for s in f.type.multiArrayType.shape],
                "dtype": names(f.type.multiArrayType.dataType).lower(),
            }
            for f in features
        ]

    return describe(spec.description.input), describe(spec.description.output)


# ExecuTorch's scalar type codes (c10::ScalarType) as the manifest names them (numpy's names,
# as for Core ML)
_PTE_DTYPES = {3: "int32", 4: "int64", 5: "float16", 6: "float32", 11: "bool", 15: "bfloat16"}


def program_io(path: Path, signature: BlockSignature) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a `.pte` as the runtime sees them (its `forward`'s tensor
    metadata); a program takes its inputs by position, named here as the block names them."""
    from . import executorch as et

    meta = et.load(path).method_meta("forward")

    def describe(info, name: str) -> dict:
        dtype = _PTE_DTYPES.get(info.dtype(), f"scalar type {info.dtype()}")
        return {"name": name, "shape": list(info.sizes()), "dtype": dtype}

    names = [name for name, _ in signature.inputs]
    inputs = [describe(meta.input_tensor_meta(i), names[i]) for i in range(meta.num_inputs())]
    outputs = [
        describe(meta.output_tensor_meta(i), "output" if i == 0 else f"output_{i}")
        for i in range(meta.num_outputs())
    ]
    return inputs, outputs


# how each backend's models travel: the file suffix, and how to read their inputs and outputs
FORMATS = {
    "coreml": (".mlpackage", lambda path, signature: package_io(path)),
    "executorch": (".pte", program_io),
}


def export_bundle(
    store: JobStore,
    device: str,
    out: Path,
    warmup: int = 3,
    repeats: int = 10,
    backend: Backend | None = None,
    progress: bool = True,
) -> dict:
    """Write the device's queued jobs to `out` (a new or empty folder); returns the manifest.

    The manifest is written last, so a folder without one is an interrupted export."""
    d = store.device(device)
    if d.backend not in FORMATS:
        raise UserError(
            f"device {device!r} is registered with backend {d.backend}; bundles are for phones "
            "(Core ML or ExecuTorch devices). Run `diffnas latency agent` next to this device "
            "instead"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; give a new folder")
    jobs = store.jobs(device, state="queued", limit=100_000)
    if not jobs:
        raise UserError(
            f"device {device!r} has no queued jobs; queue some with --space NAME "
            f"(or POST /devices/{device}/jobs)"
        )
    suffix, read_io = FORMATS[d.backend]
    # the device's backend converts (once, then from its cache): .mlpackage or .pte
    backend = backend or get_backend(d.backend, compute_unit=d.compute_unit, precision=d.precision)
    (out / "models").mkdir(parents=True, exist_ok=True)
    models = []
    with progress_bar() as bar:
        task = bar.add_task(f"converting for {device}", total=len(jobs), visible=progress)
        for job in jobs:
            sig = job.signature
            bar.update(task, description=f"{sig.describe():<48}")
            target = out / "models" / f"{sig.hash}{suffix}"
            model = backend.convert_model(sig)
            (shutil.copytree if model.is_dir() else shutil.copy2)(model, target)
            inputs, outputs = read_io(target, sig)
            models.append(
                {
                    "job_id": job.id,
                    "sig_hash": sig.hash,
                    "description": sig.describe(),
                    "path": f"models/{target.name}",
                    "inputs": inputs,
                    "outputs": outputs,
                    "signature": sig.to_dict(),
                }
            )
            bar.advance(task)
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": VERSION,
        "bundle_id": "b" + secrets.token_hex(8),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": d.name,
        "device_kind": d.kind,
        "backend": d.backend,
        "compute_unit": d.compute_unit,
        "precision": d.precision,
        "timing": {"warmup": warmup, "repeats": repeats},
        "models": models,
    }
    if d.backend == "executorch":  # a .pte runs only on the runtime version that wrote it
        made_with = backend.versions()
        manifest["runtime"] = {k: made_with[k] for k in ("executorch", "delegate", "attention")}
    store.add_bundle(manifest["bundle_id"], device, manifest)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / "manifest.json")
    return manifest


# -- results ----------------------------------------------------------------------------------


class ResultEntry(Body):
    sig_hash: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
    samples_ms: list[Latency] | None = Field(None, min_length=1, max_length=100_000)
    error: Annotated[str, StringConstraints(min_length=1, max_length=20_000)] | None = None


class ResultsFile(Body):
    format: Literal["diffnas-results"]
    version: Literal[1]
    bundle_id: str
    device: str
    compute_unit: str | None = None
    environment: dict[Annotated[str, StringConstraints(max_length=100)], Scalar] = Field(
        default_factory=dict, max_length=64
    )
    results: list[ResultEntry] = Field(max_length=100_000)


@dataclass
class ImportReport:
    stored: list[str] = field(default_factory=list)  # signature hashes newly in the table
    already: list[str] = field(default_factory=list)  # their jobs were done before
    failed: list[str] = field(default_factory=list)  # the app reported an error
    missing: list[str] = field(default_factory=list)  # in the manifest, not in the results


def is_results_file(path: Path) -> bool:
    """Whether `path` holds on-device results (not a table export)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == RESULTS_FORMAT


def parse_results(path: Path) -> ResultsFile:
    try:
        return ResultsFile.model_validate_json(path.read_text())
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'file'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise UserError(f"{path}: not valid results ({problems}); nothing was imported") from None


def import_results(store: JobStore, device: str, path: Path) -> ImportReport:
    """Check `path` against its bundle's manifest and store its measurements (all or none)."""
    results = parse_results(path)

    def bad(problem: str) -> UserError:
        return UserError(f"{path}: {problem}; nothing was imported")

    manifest = store.bundle(results.bundle_id)
    if manifest is None:
        raise bad(
            f"bundle {results.bundle_id!r} was not exported from {store.path}; import into the "
            "table the bundle was made from"
        )
    for who, name in (("--device", device), ("the results' device", results.device)):
        if name != manifest["device"]:
            raise bad(
                f"{who} is {name!r} but bundle {results.bundle_id} is for {manifest['device']!r}"
            )
    if results.compute_unit not in (None, manifest["compute_unit"]):
        raise bad(
            f"results were timed on {results.compute_unit!r}; the bundle asks for "
            f"{manifest['compute_unit']!r}"
        )
    models = {m["sig_hash"]: m for m in manifest["models"]}
    seen: set[str] = set()
    for i, r in enumerate(results.results):
        if r.sig_hash not in models:
            raise bad(f"results[{i}]: {r.sig_hash} is not a model of bundle {results.bundle_id}")
        if r.sig_hash in seen:
            raise bad(f"results[{i}]: {r.sig_hash} appears twice")
        if (r.samples_ms is None) == (r.error is None):
            raise bad(f"results[{i}]: give either samples_ms or error")
        seen.add(r.sig_hash)

    # what the models were made for (ExecuTorch: its version, delegate, attention processor)
    made_for = manifest.get("runtime", {})
    versions: dict[str, Any] = {**made_for, **results.environment, "bundle": results.bundle_id}
    timed = [r for r in results.results if r.samples_ms is not None]
    done = store.complete_many(
        [(models[r.sig_hash]["job_id"], Timing(r.samples_ms, versions)) for r in timed], None
    )
    report = ImportReport(missing=[h for h in models if h not in seen])
    for r in timed:
        stored = models[r.sig_hash]["job_id"] in done
        (report.stored if stored else report.already).append(r.sig_hash)
    for r in results.results:
        if r.error is not None:
            job = store.job(models[r.sig_hash]["job_id"])
            if job.state == "queued":  # a job done or given up meanwhile keeps its state
                store.fail(job.id, None, f"on device: {r.error}", None)
            report.failed.append(r.sig_hash)
    return report
