"""Agents that die or are stopped mid-job, against a real `diffnas latency serve` process."""

from __future__ import annotations

import signal
import time

import pytest
from test_service_support import (
    Child,
    ServeChild,
    cache_unet_parts,
    free_port,
    register,
    tiny_count,
)

from latency.agent import Agent
from latency.backends import get_backend
from latency.client import Client
from latency.table import LatencyTable


@pytest.fixture(autouse=True)
def _parts(monkeypatch):
    cache_unet_parts(monkeypatch)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    s = ServeChild(tmp / "t.db", free_port(), tmp / "server.log", "--lease-seconds", "1")
    s.db = tmp / "t.db"
    yield s
    s.kill()


def slow_agent(server, device: str, token: str, tmp_path) -> Child:
    """`diffnas latency agent` in a child process, so slow on each block that it is
    always mid-job when the test strikes."""
    path = tmp_path / "token"
    path.write_text(token)
    path.chmod(0o600)
    argv = ["latency", "agent", "--server", server.url, "--device", device]
    argv += ["--token-file", str(path), "--repeats", "1000000", "--warmup", "0"]
    argv += ["--threads", "1", "--name", "doomed"]
    return Child(argv, tmp_path / "agent.log")


def leased_job(server, device: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        jobs = server.call("GET", f"/devices/{device}/jobs?state=leased")[1]["jobs"]
        if jobs:
            return jobs[0]
        time.sleep(0.02)
    raise AssertionError("the agent never leased a job")


def test_killed_agent_job_is_leased_again(server, tmp_path):
    token = register(server, "cpu-kill")
    doomed = slow_agent(server, "cpu-kill", token, tmp_path)
    job = leased_job(server, "cpu-kill")
    time.sleep(0.5)  # mid-block, heartbeats flowing
    doomed.kill()  # SIGKILL: no release, no goodbye
    assert doomed.process.exitcode == -signal.SIGKILL

    # another agent takes the whole queue; the dead agent's job once its lease has expired
    def backend(info):
        return get_backend("torch", compute_unit="cpu", repeats=1, warmup=0, threads=1)

    client = Client(server.url, token)
    agent = Agent(client, "cpu-kill", backend, poll=0.05, exit_when_empty=True, say=print)
    report = agent.run()
    n = tiny_count()
    assert report.done == n
    again = server.call("GET", f"/jobs/{job['id']}")[1]
    assert again["state"] == "done" and again["attempts"] == 2
    with LatencyTable(server.db) as table:
        rows = table.rows("cpu-kill")
    assert len(rows) == n and len({m.signature.hash for m in rows}) == n  # no duplicates
    assert all(m.versions["agent"] != "doomed" for m in rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopped_agent_releases_its_job(server, tmp_path, sig):
    device = f"cpu-stop-{sig.name.lower()}"
    token = register(server, device)
    agent = slow_agent(server, device, token, tmp_path)
    job = leased_job(server, device)
    time.sleep(0.3)
    agent.signal(sig)
    assert agent.exitcode() == 0
    out = agent.output()
    assert f"released job {job['id']}" in out, out
    back = server.call("GET", f"/jobs/{job['id']}")[1]
    assert back["state"] == "queued" and back["attempts"] == 0  # free for the next agent
    counts = server.call("GET", f"/devices/{device}")[1]["jobs"]
    assert counts == {"queued": tiny_count(), "leased": 0, "done": 0, "failed": 0}
