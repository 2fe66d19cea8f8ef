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

import json
import math
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from search_spaces import Architecture, SearchSpace, UserError, list_spaces, load_space

from .api_docs import DOCS_ASSETS, add_docs
from .auth import hash_token
from .backends import Timing
from .jobs import Conflict, Forbidden, JobStore, NotFound, Principal
from .predict import MissingSignaturesError, Predictor
from .signature import BlockSignature, signatures
from .table import DEVICE_NAME, LatencyTable

MAX_BODY = 1 << 20  # 1 MiB: a queue of a few hundred signatures; raise it with --max-body
# needing no token: liveness and the API's own description
PUBLIC_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}

# -- request bodies ---------------------------------------------------------------------------

DeviceName = Annotated[str, StringConstraints(pattern=DEVICE_NAME.pattern)]
Label = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
LeaseId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Latency = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # ms: finite and positive
Scalar = str | int | Annotated[float, Field(allow_inf_nan=False)] | bool | None


class Body(BaseModel):
    # strict: "12" is not a number and 1.0 is not an integer; unknown fields are mistakes
    model_config = ConfigDict(extra="forbid", strict=True)


class DeviceIn(Body):
    name: DeviceName
    kind: Annotated[Label, StringConstraints(min_length=1, max_length=64)] = Field(
        description="what the device is, e.g. iphone-14-pro or xeon-2core"
    )
    backend: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")] = Field(
        description="a profiling backend: torch or coreml"
    )
    compute_unit: str | None = Field(
        None, description="torch: cpu|cuda|mps; coreml: ALL|CPU_ONLY|CPU_AND_GPU|CPU_AND_NE"
    )
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    notes: Annotated[str, StringConstraints(max_length=2000)] = ""


class JobsIn(Body):
    space: str | None = Field(None, description="a search space the server knows, e.g. tiny")
    signatures: list[dict[str, Any]] | None = Field(
        None, max_length=10_000, description="block signatures, as in a table export"
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> JobsIn:
        if (self.space is None) == (self.signatures is None):
            raise ValueError("give either 'space' or 'signatures'")
        return self


class LeaseIn(Body):
    agent: Label = "agent"
    device: DeviceName | None = Field(None, description="required with the admin token")


class LeaseRef(Body):
    lease_id: LeaseId


class FailIn(Body):
    lease_id: LeaseId
    error: Annotated[str, StringConstraints(min_length=1, max_length=20_000)]


class ResultIn(Body):
    lease_id: LeaseId = Field(description="the lease the job is held under (from /jobs/lease)")
    samples_ms: list[Latency] = Field(min_length=1, max_length=100_000)
    versions: dict[Annotated[str, StringConstraints(max_length=100)], Scalar] = Field(
        default_factory=dict, max_length=64
    )


class PredictIn(Body):
    space: str
    device: DeviceName
    architecture: dict[str, Any] | None = Field(None, description="default: the original")
    backend: str | None = None
    compute_unit: str | None = None
    precision: str | None = None
    calibrate: bool = True


class TokenIn(Body):
    role: Literal["agent", "reader"]
    device: DeviceName | None = None
    label: Label = ""


# -- authentication and body cap, before any body is parsed ----------------------------------


class Gate:
    """ASGI middleware: who is calling (401 for a bad or missing token), and a body cap (413).

    Runs before routing, so a stranger's body is never read, and a too large body is refused
    from its Content-Length or, when streamed, as soon as it passes the cap."""

    def __init__(self, app, identify: Callable[[str], Principal | None], public_read: bool, cap):
        self.app, self.identify, self.public_read, self.cap = app, identify, public_read, cap

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path, method = scope["path"], scope["method"]
        principal = None
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return await _reply(send, 401, "the Authorization header must be 'Bearer TOKEN'")
            principal = self.identify(token.strip())
            if principal is None:
                return await _reply(send, 401, "unknown or revoked token")
        elif not _is_public(path) and not (self.public_read and _is_read(method, path)):
            return await _reply(
                send, 401, "this needs a token: send the header 'Authorization: Bearer TOKEN'"
            )
        scope["diffnas.principal"] = principal

        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cap):
            return await _reply(send, 413, f"request body over the {self.cap}-byte cap")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.cap:
                return await _reply(send, 413, f"request body over the {self.cap}-byte cap")
        # Bodies are JSON, which travels as UTF-8 (RFC 8259, 8.1). Checked here because the
        # framework's own parser reports other encodings as a generic 400, not as malformed.
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            invalid = [{"loc": ["body", e.start], "msg": "not UTF-8 text", "type": "json_invalid"}]
            return await _reply(send, 422, invalid)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(DOCS_ASSETS + "/")


def _is_read(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") or (method == "POST" and path == "/predict")


async def _reply(send, status: int, detail: str | list[dict]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_bearer = HTTPBearer(auto_error=False)  # only to show the scheme in the OpenAPI schema


def caller(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal | None:
    return request.scope.get("diffnas.principal")


Caller = Annotated[Principal | None, Depends(caller)]


def admin(p: Caller) -> Principal:
    if p is None or p.role != "admin":
        raise HTTPException(403, "this needs the admin token")
    return p


def agent(p: Caller) -> Principal:
    if p is None or p.role not in ("admin", "agent"):
        raise HTTPException(403, "this needs an agent token (or the admin token)")
    return p


Admin = Annotated[Principal, Depends(admin)]
Agent = Annotated[Principal, Depends(agent)]


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
