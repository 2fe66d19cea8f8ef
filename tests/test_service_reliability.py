"""The server SIGKILLed during a burst of results and restarted on the same file."""

from __future__ import annotations

import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_service_support import (
    ServeChild,
    cache_unet_parts,
    call,
    free_port,
    register,
    tiny_count,
)
from test_service_support import tiny_signatures as sigs

from latency.auth import default_admin_file
from latency.table import LatencyTable


@pytest.fixture(autouse=True)
def _parts(monkeypatch):
    cache_unet_parts(monkeypatch)


def test_every_acknowledged_result_survives_a_server_kill(tmp_path):
    db, port = tmp_path / "t.db", free_port()
    server = ServeChild(db, port, tmp_path / "first.log", admin_env=False)
    # the first start made the admin token: printed once, in a file only its owner reads
    assert server.admin in server.output()
    assert stat.S_IMODE(default_admin_file(db).stat().st_mode) == 0o600
    try:
        token = register(server, sigs=sigs(2) + sigs(1))  # two batch sizes: twice tiny's
        n = 2 * tiny_count()
        jobs = []
        while (job := server.call("POST", "/jobs/lease", {}, token)[1]["job"]) is not None:
            jobs.append(job)
        assert len(jobs) == n

        acked, refused, lock = set(), [], threading.Lock()

        def post(job) -> None:
            body = {"lease_id": job["lease_id"], "samples_ms": [1.0 + job["id"]]}
            try:
                status, _ = call(server.url, "POST", f"/jobs/{job['id']}/result", body, token)
            except OSError:  # refused, reset or cut mid-answer: not acknowledged
                return
            with lock:
                (acked.add(job["id"]) if status in (200, 201) else refused.append(status))

        with ThreadPoolExecutor(8) as pool:
            for job in jobs:
                pool.submit(post, job)
            while len(acked) < 3:
                time.sleep(0.001)
            server.kill()  # SIGKILL, in the middle of the burst
        assert not refused  # no 5xx or 4xx, only answers or a dead connection
        assert 3 <= len(acked) < n, len(acked)
    finally:
        server.kill()

    server = ServeChild(db, port, tmp_path / "second.log", admin_env=False)
    assert "admin token" not in server.output()  # found in its file, not printed again
    try:
        hashes = {j["id"]: j["sig_hash"] for j in jobs}
        with LatencyTable(db) as table:
            stored = [m.signature.hash for m in table.rows()]
        assert {hashes[i] for i in acked} <= set(stored)  # every 2xx is in the table
        assert len(stored) == len(set(stored))
        for i in acked:
            assert server.call("GET", f"/jobs/{i}")[1]["state"] == "done"

        # agents retry what got no answer; results already stored are not stored twice: a
        # stored one (every acknowledged one, and those stored just before the kill without
        # an answer) answers 200, a new one 201
        before = set(stored)
        for job in jobs:
            body = {"lease_id": job["lease_id"], "samples_ms": [1.0 + job["id"]]}
            status, out = server.call("POST", f"/jobs/{job['id']}/result", body, token)
            assert status == (200 if job["sig_hash"] in before else 201), (job["id"], status)
        with LatencyTable(db) as table:
            stored = [m.signature.hash for m in table.rows()]
        assert len(stored) == n and len(set(stored)) == n
    finally:
        server.kill()
