"""Device agents against a real server: a full table, 20 agents at once, the server away,
failing blocks, and the command line's checks."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter

import pytest
from test_service_support import (
    Clock,
    ThreadServer,
    cache_unet_parts,
    free_port,
    register,
    tiny_blocks,
    tiny_count,
    tiny_signatures,
)

from latency.agent import Agent
from latency.backends import get_backend
from latency.client import Backoff, Client
from latency.jobs import JobStore
from latency.predict import Predictor
from nas.cli import main
from search_spaces import load_space


@pytest.fixture(autouse=True)
def _parts(monkeypatch):
    cache_unet_parts(monkeypatch)


@pytest.fixture
def server(tmp_path):
    s = ThreadServer(tmp_path / "t.db")
    yield s
    s.stop()


class Counting:
    """The real torch backend, counting what it profiles (and able to fail on demand)."""

    def __init__(self, info: dict, calls: Counter, fail: set = frozenset()):
        self.inner = get_backend(
            info["backend"], compute_unit=info["compute_unit"], repeats=1, warmup=0, threads=1
        )
        self.calls, self.fail, self.lock = calls, fail, threading.Lock()

    def test_connection(self):
        self.inner.test_connection()

    def profile(self, sig):
        with self.lock:
            self.calls[sig.hash] += 1
        if sig.kind in self.fail:
            raise RuntimeError(f"cannot run {sig.kind} here")
        return self.inner.profile(sig)


def make_agent(url, token, calls, lines=None, **kw):
    kw.setdefault("poll", 0.05)
    kw.setdefault("exit_when_empty", True)
    fail = kw.pop("fail", frozenset())
    return Agent(
        Client(url, token),
        "cpu-test",
        lambda info: Counting(info, calls, fail),
        say=(lines.append if lines is not None else lambda s: None),
        **kw,
    )


def test_agent_fills_the_table(server):
    token = register(server)
    calls, lines = Counter(), []
    report = make_agent(server.url, token, calls, lines, name="a1").run()
    n = tiny_count()
    assert report.done == n and report.failed == 0 and not report.stopped
    assert server.store.counts("cpu-test")["done"] == n
    table = server.store.table
    assert len(table.rows("cpu-test")) == n
    assert all(m.versions["agent"] == "a1" and m.versions["threads"] == 1 for m in table.rows())
    assert any(line.startswith(f"[{n}/{n}] job ") for line in lines)  # progress per job
    Predictor(load_space("tiny"), table, "cpu-test").predict(load_space("tiny").original())


def test_twenty_agents_do_every_job_exactly_once(server):
    token = register(server)
    calls = Counter()
    agents = [make_agent(server.url, token, calls, name=f"a{i}") for i in range(20)]
    threads = [threading.Thread(target=a.run) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    sigs = {s["kind"] + str(i): s for i, s in enumerate(tiny_signatures())}
    assert len(calls) == len(sigs) and set(calls.values()) == {1}  # each block timed once
    n = tiny_count()
    assert sum(a.report.done for a in agents) == n
    rows = server.store.table.rows("cpu-test")
    assert len(rows) == n and len({m.signature.hash for m in rows}) == n
    jobs = server.store.jobs("cpu-test")
    assert {j.state for j in jobs} == {"done"} and {j.attempts for j in jobs} == {1}
    assert len({m.versions["agent"] for m in rows}) > 1  # the work was shared


def test_agent_waits_for_the_server_and_retries(tmp_path):
    db, port = tmp_path / "late.db", free_port()
    with JobStore(db) as store:  # the server's file is ready; the server is not up yet
        store.add_device("cpu-test", "test-cpu", "torch")
        store.enqueue("cpu-test", tiny_blocks()[:3])
        token = store.issue_token("agent", "cpu-test")[1]
    lines: list[str] = []
    agent = Agent(
        Client(f"http://127.0.0.1:{port}", token),
        "cpu-test",
        lambda info: Counting(info, Counter()),
        poll=0.05,
        exit_when_empty=True,
        say=lines.append,
        backoff=Backoff(initial=0.05, maximum=0.2),
    )
    box = {}
    thread = threading.Thread(target=lambda: box.update(report=agent.run()))
    thread.start()
    deadline = time.monotonic() + 10
    while not any("retrying" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.01)
    server = ThreadServer(db, port=port)
    try:
        thread.join(30)
        assert box["report"].done == 3
        assert any("unreachable" in line and "retrying in" in line for line in lines)
    finally:
        agent.stop()
        server.stop()


def test_a_failing_block_is_retried_then_failed(tmp_path):
    server = ThreadServer(tmp_path / "t.db", max_attempts=2)
    try:
        token = register(server, sigs=tiny_signatures()[:3])  # one of them a downsample
        calls, lines = Counter(), []
        report = make_agent(server.url, token, calls, lines, fail={"downsample"}).run()
        failed = server.store.jobs("cpu-test", state="failed")
        assert len(failed) == 1 and failed[0].signature.kind == "downsample"
        assert failed[0].attempts == 2 and "cannot run downsample here" in failed[0].error
        assert report.done == 2 and report.failed == 2
        assert len(server.store.table.rows()) == 2  # nothing stored for the failed block
    finally:
        server.stop()


def test_agent_command_line_checks(server, tmp_path, capsys, monkeypatch):
    token = register(server)
    monkeypatch.delenv("DIFFNAS_TOKEN", raising=False)
    base = ["latency", "agent", "--server", server.url, "--device", "cpu-test"]

    def run(*args) -> str:
        with pytest.raises(SystemExit) as e:
            main([*base, *args])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "--token-file" in run()
    monkeypatch.setenv("DIFFNAS_TOKEN", "dnl_wrong-token-wrong-token")
    assert "answered 401: unknown or revoked token" in run()
    path = tmp_path / "token"
    path.write_text(token)
    path.chmod(0o644)
    assert "chmod 600" in run("--token-file", str(path))
    path.chmod(0o600)
    assert "registered with backend torch" in run("--token-file", str(path), "--backend", "coreml")
    server.call("POST", "/devices", {"name": "cpu-other", "kind": "k", "backend": "torch"})
    err = run("--token-file", str(path), "--device", "cpu-other")
    assert "answered 403: this token is for device 'cpu-test'" in err

    server.call("POST", "/devices", {"name": "phone", "kind": "iphone", "backend": "coreml"})
    phone = server.call("POST", "/tokens", {"role": "agent", "device": "phone"})[1]["token"]
    monkeypatch.setenv("DIFFNAS_TOKEN", phone)
    assert "Core ML timing needs macOS" in run("--device", "phone")
    assert server.store.counts("cpu-test")["leased"] == 0  # nothing was taken


def test_a_result_after_the_lease_expired_is_timed_again(tmp_path):
    """The service refuses a result made under an expired lease (the job may be another
    agent's by then); the agent says so, does not count it as failed, and goes on."""
    clock = Clock()
    server = ThreadServer(tmp_path / "t.db", clock=clock, lease_seconds=60)

    class Slow(Counting):
        def profile(self, sig):
            if not self.calls:  # the first block outlives its lease
                clock.advance(61)
            return super().profile(sig)

    try:
        token = register(server, sigs=tiny_signatures()[:2])
        calls, lines = Counter(), []
        agent = make_agent(server.url, token, calls, lines)
        agent.make_backend = lambda info: Slow(info, calls)
        report = agent.run()
        assert any("result not stored" in line and "expired" in line for line in lines), lines
        assert report.done == 2 and report.failed == 0
        assert sum(calls.values()) == 3  # the first block twice
        assert len(server.store.table.rows()) == 2
    finally:
        server.stop()


@pytest.fixture
def self_signed(tmp_path) -> tuple:
    """A self-signed certificate for 127.0.0.1 and its key, as `serve --ssl-certfile` takes."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_agent_with_a_self_signed_service(tmp_path, self_signed, capsys, monkeypatch):
    cert, key = self_signed
    server = ThreadServer(tmp_path / "t.db", tls=self_signed)
    try:
        server.store.add_device("cpu-test", "test-cpu", "torch")
        server.store.enqueue("cpu-test", tiny_blocks()[:2])
        monkeypatch.setenv("DIFFNAS_TOKEN", server.store.issue_token("agent", "cpu-test")[1])
        base = ["latency", "agent", "--server", server.url, "--device", "cpu-test"]
        base += ["--exit-when-empty", "--repeats", "1", "--warmup", "0", "--threads", "1"]

        def run(*args) -> tuple[int, str]:
            with pytest.raises(SystemExit) as e:
                main([*base, *args])
            out = capsys.readouterr()
            return e.value.code, " ".join((out.out + out.err).split())

        # without --ca: one clear error, no retries (a retry would say "retrying")
        code, out = run("--give-up-after", "1")
        assert code == 2 and "certificate verification failed" in out and "--ca FILE" in out
        assert "retrying" not in out
        assert run("--ca", str(tmp_path / "nope.pem"))[0] == 2
        code, out = run("--ca", str(key))  # a key is not a certificate
        assert code == 2 and "not a PEM certificate" in out

        code, out = run("--ca", str(cert))
        assert code in (0, None) and "2 result(s) stored" in out, out
        assert len(server.store.table.rows()) == 2
    finally:
        server.stop()
