"""The latency service: an HTTP API over one SQLite file (LatencyTable + JobStore).

Researchers register devices and queue profiling jobs; agents next to the devices lease the
jobs, time the blocks and post the results; everyone reads the same tables and predictions.
The HTTP API is documented in docs/latency-service.md and served as OpenAPI at /docs.

Security model: every request but /health and the API schema needs a bearer token (reads
too, unless the server runs with --public-read). The admin token registers devices, queues
jobs and issues tokens; an agent token leases and posts only for its own device; a reader
token reads. Requests are authenticated before their body is read, bodies are capped, and
every field is validated (pydantic, strict types, finite positive latencies).
"""

from __future__ import annotations

import math
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from search_spaces import Architecture, SearchSpace, UserError, list_spaces, load_space

from .api_bodies import DeviceIn, FailIn, JobsIn, LeaseIn, LeaseRef, PredictIn, ResultIn, TokenIn
from .api_docs import add_docs
from .auth import hash_token
from .backends import Timing
from .gate import Admin, Agent, Caller, Gate
from .jobs import JobStore
from .predict import MissingSignaturesError, Predictor
from .registry import Conflict, Forbidden, NotFound, Principal
from .signature import BlockSignature, signatures
from .table import LatencyTable

MAX_BODY = 1 << 20  # 1 MiB: a queue of a few hundred signatures; raise it with --max-body

# -- spaces and predictors, cached: loading a space and reading its UNet takes seconds --------


@lru_cache(maxsize=16)
def known_space(name: str) -> SearchSpace:
    """A space by registered name only: a path sent by a client must not open server files."""
    names = [e.name for e in list_spaces()]
    if name not in names:
        raise UserError(
            f"unknown space {name!r}; this server knows {', '.join(names)} "
            "(for another space, post its signatures instead)"
        )
    return load_space(name)


@lru_cache(maxsize=64)
def space_signatures(name: str, dtype: str) -> tuple[BlockSignature, ...]:
    return tuple(signatures(known_space(name), dtype))


class _Readers(threading.local):
    """One read connection per server thread (SQLite WAL: reads never wait for writes)."""

    table: LatencyTable | None = None


# -- the app ----------------------------------------------------------------------------------


def create_app(
    db: str | Path,
    admin_token: str,
    public_read: bool = False,
    lease_seconds: float = 300.0,
    max_attempts: int = 3,
    max_body: int = MAX_BODY,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    store = JobStore(db, lease_seconds=lease_seconds, max_attempts=max_attempts, clock=clock)
    admin_hash = hash_token(admin_token)
    readers, opened = _Readers(), []
    predictors: OrderedDict[tuple, Predictor] = OrderedDict()
    predictors_lock = threading.Lock()

    def identify(token: str) -> Principal | None:
        if secrets.compare_digest(hash_token(token), admin_hash):
            return Principal("admin", label="admin")
        return store.principal(token)

    def reader() -> LatencyTable:
        if readers.table is None:
            readers.table = LatencyTable(store.path)
            opened.append(readers.table)
        return readers.table

    async def lifespan(app: FastAPI):
        yield
        store.close()
        for t in opened:
            t.close()

    app = FastAPI(
        title="diffnas latency service",
        version="1",
        description="Devices, profiling jobs and latency tables. See docs/latency-service.md.",
        lifespan=lifespan,
        docs_url=None,  # served by add_docs, from local files
        redoc_url=None,  # ReDoc has no packaged copy: it would load from a CDN
    )
    add_docs(app)
    app.state.store = store
    app.add_middleware(Gate, identify=identify, public_read=public_read, cap=max_body)

    for exc, status in [
        (NotFound, 404),
        (Forbidden, 403),
        (Conflict, 409),
        (MissingSignaturesError, 409),
        (UserError, 422),
    ]:
        app.add_exception_handler(exc, _handler(status))
    app.add_exception_handler(RequestValidationError, _invalid)

    @app.get("/health", tags=["service"])
    def health() -> dict:
        return {"ok": True, "service": "diffnas-latency", "api": 1}

    # -- devices ------------------------------------------------------------------------------

    @app.post("/devices", tags=["devices"], status_code=201)
    def add_device(body: DeviceIn, response: Response, _: Admin) -> dict:
        device, created = store.add_device(**body.model_dump())
        if not created:
            response.status_code = 200
        return device.to_dict()

    @app.get("/devices", tags=["devices"])
    def list_devices(_: Caller) -> list[dict]:
        return [device_info(d.name) for d in store.devices()]

    @app.get("/devices/{name}", tags=["devices"])
    def get_device(name: str, _: Caller) -> dict:
        return device_info(name)

    def device_info(name: str) -> dict:
        d = store.device(name)
        rows = [
            r
            for r in reader().devices()
            if (r["device"], r["backend"], r["compute_unit"], r["precision"])
            == (d.name, d.backend, d.compute_unit, d.precision)
        ]
        return {
            **d.to_dict(),
            "jobs": store.counts(name),
            "table": {"signatures": rows[0]["signatures"] if rows else 0},
        }

    # -- jobs ---------------------------------------------------------------------------------

    @app.post("/devices/{name}/jobs", tags=["jobs"], status_code=201)
    def queue_jobs(name: str, body: JobsIn, _: Admin) -> dict:
        d = store.device(name)
        if body.space is not None:
            sigs = space_signatures(body.space, d.precision)
        else:
            sigs = [BlockSignature.from_dict(s) for s in body.signatures]
            for i, sig in enumerate(sigs):
                try:  # on the meta device: checks the arguments without allocating weights
                    sig.build("meta")
                    sig.describe()
                except Exception as e:
                    raise UserError(
                        f"signature {i} ({sig.kind}) cannot be built: {type(e).__name__}: {e}"
                    ) from None
        out = store.enqueue(name, sigs, body.max_attempts)
        return {**out, "created": [j.to_dict() for j in out["created"]]}

    @app.get("/devices/{name}/jobs", tags=["jobs"])
    def list_jobs(
        name: str,
        _: Caller,
        state: Literal["queued", "leased", "done", "failed"] | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> dict:
        jobs = store.jobs(name, state, limit)
        return {"counts": store.counts(name), "jobs": [j.to_dict() for j in jobs]}

    @app.get("/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: int, _: Caller) -> dict:
        return store.job(job_id).to_dict()

    @app.post("/jobs/lease", tags=["jobs"])
    def lease(body: LeaseIn, p: Agent) -> dict:
        if p.role == "agent" and body.device not in (None, p.device):
            raise Forbidden(f"this token is for device {p.device!r}, not {body.device!r}")
        device = body.device or p.device
        if device is None:
            raise UserError("with the admin token, say which device to lease for ('device')")
        job = store.lease(device, body.agent)
        return {
            "job": job.to_dict(lease=True) if job else None,
            "lease_seconds": store.lease_seconds,
            "device": store.device(device).to_dict(),
            "queue": store.counts(device),
        }

    @app.post("/jobs/{job_id}/heartbeat", tags=["jobs"])
    def heartbeat(job_id: int, body: LeaseRef, p: Agent) -> dict:
        return store.heartbeat(job_id, body.lease_id, p.scope).to_dict(lease=True)

    @app.post("/jobs/{job_id}/release", tags=["jobs"])
    def release(job_id: int, body: LeaseRef, p: Agent) -> dict:
        return store.release(job_id, body.lease_id, p.scope).to_dict()

    @app.post("/jobs/{job_id}/fail", tags=["jobs"])
    def fail(job_id: int, body: FailIn, p: Agent) -> dict:
        return store.fail(job_id, body.lease_id, body.error, p.scope).to_dict()

    @app.post("/jobs/{job_id}/result", tags=["jobs"], status_code=201)
    def result(job_id: int, body: ResultIn, response: Response, p: Agent) -> dict:
        timing = Timing(body.samples_ms, dict(body.versions))
        if not math.isfinite(timing.median_ms + timing.iqr_ms):  # sums of huge finite values
            raise UserError("latencies must be finite numbers of milliseconds")
        job, stored = store.complete(job_id, timing, p.scope, body.lease_id)
        if not stored:
            response.status_code = 200  # the same result again, or a late one: nothing added
        return {"stored": stored, "job": job.to_dict()}

    # -- tables and predictions ---------------------------------------------------------------

    @app.get("/devices/{name}/table", tags=["tables"])
    def table(name: str, _: Caller, format: Literal["json", "csv"] = "json") -> Response:
        t = reader()
        if not any(d.name == name for d in store.devices()) and not t.last_id(name):
            raise NotFound(f"no device {name!r} is registered or has rows in the table")
        if format == "csv":
            return Response(t.export_csv(name), media_type="text/csv")
        return Response(t.export_json(name), media_type="application/json")

    @app.post("/predict", tags=["tables"])
    def predict(body: PredictIn, _: Caller) -> dict:
        space = known_space(body.space)
        arch = space.original()
        if body.architecture is not None:
            arch = Architecture.from_dict(body.architecture, "architecture")
            space.check_fits(arch, "architecture")
        predictor = cached_predictor(space, body)
        pred = predictor.predict(arch)
        return {
            **pred.to_dict(),
            "original_ms": predictor.predict(space.original()).total_ms,
            "device": body.device,
            "setting": predictor.setting,
        }

    def cached_predictor(space: SearchSpace, body: PredictIn) -> Predictor:
        t = reader()
        if not t.last_id(body.device):
            raise Conflict(f"device {body.device!r} has no measurements yet")
        calibration = t.calibration(body.device, space.name) if body.calibrate else None
        # the newest row id changes with every row added: a stale predictor is never used
        key = (
            space.name,
            body.device,
            body.backend,
            body.compute_unit,
            body.precision,
            t.last_id(body.device),
            calibration and calibration["id"],
        )
        with predictors_lock:
            found = predictors.get(key)
        if found is None:
            found = Predictor(
                space,
                t,
                body.device,
                backend=body.backend,
                compute_unit=body.compute_unit,
                precision=body.precision,
                calibrate=body.calibrate,
            )
            with predictors_lock:
                predictors[key] = found
                while len(predictors) > 32:
                    predictors.popitem(last=False)
        return found

    # -- tokens -------------------------------------------------------------------------------

    @app.post("/tokens", tags=["tokens"], status_code=201)
    def issue_token(body: TokenIn, _: Admin) -> dict:
        token_id, token = store.issue_token(body.role, body.device, body.label)
        return {"id": token_id, "token": token, **body.model_dump()}

    @app.get("/tokens", tags=["tokens"])
    def list_tokens(_: Admin) -> list[dict]:
        return store.tokens()

    @app.delete("/tokens/{token_id}", tags=["tokens"])
    def revoke_token(token_id: int, _: Admin) -> dict:
        store.revoke_token(token_id)
        return {"revoked": token_id}

    return app


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # where and what, without echoing the input: it may be huge, or NaN (not valid JSON)
    errors = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def _handler(status: int):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handle


# -- running it -------------------------------------------------------------------------------


def loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so callers know the port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
        ) from None
    sock.listen(512)
    return sock


def serve(app: FastAPI, sock: socket.socket, log_level: str = "warning", **ssl) -> None:
    """Run uvicorn on a bound socket until SIGINT/SIGTERM."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=5, access_log=False, **ssl
    )
    uvicorn.Server(config).run(sockets=[sock])
