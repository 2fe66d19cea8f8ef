"""Helpers for the latency service tests: real uvicorn servers on loopback, a raw HTTP call.

Servers run either in a thread of the test process (fast, and the test can read the store),
or in a forked child process that can be SIGKILLed. Forking (not spawning) matters here: the
child starts with torch and diffusers already imported, in milliseconds instead of seconds.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import uvicorn

from latency.auth import default_admin_file, read_token_file
from latency.service import bind, create_app
from latency.signature import BlockSignature, signatures, unet_parts
from search_spaces import load_space

ADMIN = "admin-token-for-the-tests-0123456789"


def tiny_count() -> int:
    """How many distinct blocks the tiny space has (what a full table of it holds)."""
    return len(_tiny_space())


def tiny_signatures(batch: int = 2) -> list[dict]:
    """The tiny space's block signatures, as JSON; another batch size gives other blocks."""
    return [s.to_dict() for s in tiny_blocks(batch)]


def tiny_blocks(batch: int = 2) -> list[BlockSignature]:
    return [
        BlockSignature.make(s.kind, dict(s.init), {k: (batch, *v[1:]) for k, v in s.inputs})
        for s in _tiny_space()
    ]


@lru_cache(maxsize=1)
def _tiny_space() -> list[BlockSignature]:  # reading the UNet's blocks takes seconds: once
    return signatures(load_space("tiny"))


class Clock:
    """A clock the test moves by hand: lease expiry without sleeping."""

    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def call(url, method, path, body=None, token=None, raw=None, headers=None, chunked=False):
    """One HTTP request, no retries: (status, decoded JSON, text, or bytes for images)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is not None:
        h.setdefault("Content-Type", "application/json")
    try:
        if chunked:
            conn.putrequest(method, path)
            for k, v in {**h, "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            for i in range(0, len(data), 65536):
                piece = data[i : i + 65536]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, data, h)
        r = conn.getresponse()
        data, kind = r.read(), r.getheader("content-type", "")
        if "json" in kind and data:
            return r.status, json.loads(data)
        binary = kind.startswith(("image/", "application/octet-stream"))
        return r.status, data if binary else data.decode()
    finally:
        conn.close()


class ThreadServer:
    """`create_app` served by uvicorn in a thread of this process (over HTTPS with `tls`, a
    (certificate, key) pair; `call` speaks plain HTTP only, so use `store` there)."""

    def __init__(self, db: Path, port: int = 0, tls: tuple[Path, Path] | None = None, **options):
        self.app = create_app(db, ADMIN, **options)
        self.store = self.app.state.store
        sock = bind("127.0.0.1", port)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
        files = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", **files))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def call(self, method, path, body=None, token=ADMIN, **kw):
        return call(self.url, method, path, body, token, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _cli_child(argv: list[str], log: str, env: dict) -> None:
    """In a forked child: run `diffnas ARGV` with its output in `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    for key, value in env.items():  # None: unset
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    from nas.cli import main

    try:
        main(argv)
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)


class Child:
    """`diffnas ARGV` in a forked process (a real server or agent that can be killed)."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.log = log
        ctx = multiprocessing.get_context("fork")
        self.process = ctx.Process(target=_cli_child, args=(argv, str(log), env or {}))
        self.process.start()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while text not in self.output():
            if not self.process.is_alive() or time.monotonic() > end:
                raise AssertionError(f"{text!r} never appeared; output:\n{self.output()}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        if self.process.is_alive():
            self.signal(signal.SIGKILL)
        self.process.join(10)

    def exitcode(self, timeout: float = 15.0) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode


def free_port() -> int:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


class ServeChild(Child):
    """`diffnas latency serve` in a forked process, on a fixed port so it can be restarted.

    With `admin_env` False the server finds or makes its admin token file itself."""

    def __init__(self, db: Path, port: int, log: Path, *options: str, admin_env: bool = True):
        argv = ["latency", "serve", "--db", str(db), "--port", str(port), *options]
        super().__init__(argv, log, {"DIFFNAS_ADMIN_TOKEN": ADMIN if admin_env else None})
        self.url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 30
        while True:  # up once /health answers
            try:
                if call(self.url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if not self.process.is_alive() or time.monotonic() > end:
                raise AssertionError(f"server did not start:\n{self.output()}")
            time.sleep(0.02)
        self.admin = ADMIN if admin_env else read_token_file(default_admin_file(db))

    def call(self, method, path, body=None, token=None, **kw):
        return call(self.url, method, path, body, token or self.admin, **kw)


def register(server, device: str = "cpu-test", sigs: list[dict] | None = None) -> str:
    """Register a torch CPU device, queue `sigs` (default: tiny's) and return an agent token."""
    status, _ = server.call(
        "POST", "/devices", {"name": device, "kind": "test-cpu", "backend": "torch"}
    )
    assert status in (200, 201)
    status, out = server.call(
        "POST", f"/devices/{device}/jobs", {"signatures": sigs or tiny_signatures()}
    )
    assert status == 201, out
    status, out = server.call("POST", "/tokens", {"role": "agent", "device": device})
    assert status == 201, out
    return out["token"]


def cache_unet_parts(monkeypatch) -> None:
    """Read each space's UNet once per test session (seconds each time otherwise): the
    server and the test then share the same parts, as two processes would compute them."""
    import latency.predict
    import latency.signature

    monkeypatch.setattr(latency.signature, "unet_parts", _cached_parts)
    monkeypatch.setattr(latency.predict, "unet_parts", _cached_parts)


@lru_cache(maxsize=16)
def _cached_parts(space, dtype="fp32"):
    return unet_parts(space, dtype)


def cli(*argv, capsys) -> tuple[int, str]:
    """`diffnas ARGV` in this process: (exit code, stdout + stderr with lines re-joined)."""
    from nas.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())  # rich wraps long lines
