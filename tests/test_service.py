"""The latency service's HTTP API: auth, validation, the job life cycle, tables, predictions."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from test_service_support import (
    ADMIN,
    Clock,
    ThreadServer,
    cache_unet_parts,
    call,
    register,
    tiny_blocks,
    tiny_count,
    tiny_signatures,
)

from latency.auth import admin_token, read_token_file
from latency.jobs import in_call_order
from latency.predict import Predictor
from latency.signature import BlockSignature
from latency.table import LatencyTable
from search_spaces import UserError, load_space


@pytest.fixture(autouse=True)
def _parts(monkeypatch):
    cache_unet_parts(monkeypatch)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def server(tmp_path, clock):
    s = ThreadServer(tmp_path / "t.db", clock=clock, lease_seconds=60, max_attempts=2)
    yield s
    s.stop()


def lease(server, token, device="cpu-test"):
    status, out = server.call("POST", "/jobs/lease", {"agent": "a1", "device": device}, token)
    assert status == 200, out
    return out["job"]


def result(server, token, job, samples=(1.5, 1.7, 1.6)):
    body = {"lease_id": job["lease_id"], "samples_ms": list(samples)}
    return server.call("POST", f"/jobs/{job['id']}/result", body, token)


def rows(server) -> int:
    return len(server.store.table.rows())


def test_tokens_are_required_scoped_and_stored_hashed(server, tmp_path):
    agent = register(server)
    reader = server.call("POST", "/tokens", {"role": "reader"})[1]["token"]
    other = register(server, "cpu-other", tiny_signatures()[:2])

    # no token, a wrong one, or a malformed header: 401 before anything is read
    device = {"name": "x1", "kind": "k", "backend": "torch"}
    assert server.call("POST", "/devices", device, token=None)[0] == 401
    assert server.call("POST", "/devices", device, token="dnl_not-a-real-token")[0] == 401
    assert server.call("GET", "/devices", token=None)[0] == 401
    status, _ = server.call("GET", "/devices", token=None, headers={"Authorization": "Basic x"})
    assert status == 401
    assert server.call("GET", "/health", token=None)[0] == 200
    assert server.call("GET", "/openapi.json", token=None)[0] == 200

    # readers read; only the admin registers devices and issues tokens
    assert server.call("GET", "/devices", token=reader)[0] == 200
    for token in (reader, agent):
        assert server.call("POST", "/devices", device, token=token)[0] == 403
        assert server.call("POST", "/tokens", {"role": "reader"}, token=token)[0] == 403
    assert server.call("POST", "/jobs/lease", {"device": "cpu-test"}, token=reader)[0] == 403

    # an agent works for its own device only
    job = lease(server, agent)
    assert server.call("POST", "/jobs/lease", {"device": "cpu-test"}, other)[0] == 403
    assert result(server, other, job)[0] == 403
    body = {"lease_id": job["lease_id"], "error": "x"}
    assert server.call("POST", f"/jobs/{job['id']}/fail", body, other)[0] == 403

    # a revoked token stops working
    tokens = server.call("GET", "/tokens")[1]
    reader_id = next(t["id"] for t in tokens if t["role"] == "reader")
    assert server.call("DELETE", f"/tokens/{reader_id}")[0] == 200
    assert server.call("GET", "/devices", token=reader)[0] == 401

    assert [d["name"] for d in server.call("GET", "/devices")[1]] == ["cpu-other", "cpu-test"]
    assert rows(server) == 0
    assert server.store.job(job["id"]).state == "leased"
    server.stop()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("t.db"))
    assert agent.encode() not in raw and reader.encode() not in raw  # only hashes stored


def test_bad_input_is_rejected_and_nothing_written(server):
    agent = register(server)
    job = lease(server, agent)
    path = f"/jobs/{job['id']}/result"
    lid = job["lease_id"]

    def post(body=None, **kw):
        return server.call("POST", path, body, agent, **kw)[0]

    assert post(raw=b'{"lease_id": "' + lid.encode() + b'", "samples_ms": [1.0') == 422
    assert post(raw=b"[1, 2]") == 422
    assert post({"lease_id": lid, "samples_ms": ["1.0"]}) == 422  # wrong types
    assert post({"lease_id": lid, "samples_ms": 1.0}) == 422
    assert post({"lease_id": 5, "samples_ms": [1.0]}) == 422
    assert post({"lease_id": lid, "samples_ms": [1.0], "median_ms": 1.0}) == 422  # unknown
    assert post({"lease_id": lid, "samples_ms": []}) == 422
    for bad in (b"NaN", b"Infinity", b"-Infinity", b"-1.0", b"0", b"1e999"):
        raw = b'{"lease_id": "%s", "samples_ms": [1.0, %s]}' % (lid.encode(), bad)
        assert post(raw=raw) == 422, bad
    assert post({"lease_id": lid, "samples_ms": [1.0], "versions": {"nested": {"a": 1}}}) == 422
    assert post({"samples_ms": [1.0]}) == 422  # a result names the lease it was made under
    # JSON travels as UTF-8: another encoding is a malformed body like any other
    body = {"lease_id": lid, "samples_ms": [1.0], "versions": {"gpu": "Geförce"}}
    text = json.dumps(body, ensure_ascii=False)
    status, out = server.call("POST", path, token=agent, raw=text.encode("latin-1"))
    assert status == 422 and out["detail"][0]["msg"] == "not UTF-8 text", out
    assert post(raw=b"\xff\xfe{}") == 422

    big = {"lease_id": lid, "samples_ms": [1.0] * 300_000}  # over the 1 MiB cap
    assert post(big) == 413
    assert post(raw=json.dumps(big).encode(), chunked=True) == 413  # no Content-Length

    body = {"lease_id": lid, "samples_ms": [1.0]}
    assert server.call("POST", "/jobs/99999/result", body, agent)[0] == 404
    assert server.call("POST", "/jobs/99999/release", {"lease_id": lid}, agent)[0] == 404
    assert server.call("GET", "/jobs/99999")[0] == 404
    assert server.call("GET", "/devices/nope/table")[0] == 404

    device = {"name": "bad/name", "kind": "k", "backend": "torch"}
    assert server.call("POST", "/devices", device)[0] == 422
    device = {"name": "ok", "kind": "k", "backend": "torch", "compute_unit": "tpu"}
    assert server.call("POST", "/devices", device)[0] == 422
    device = {"name": "cpu-test", "kind": "k", "backend": "coreml"}
    assert server.call("POST", "/devices", device)[0] == 409  # exists, other setting
    queue = "/devices/cpu-test/jobs"
    assert server.call("POST", queue, {"space": "../../etc/passwd.yaml"})[0] == 422
    assert server.call("POST", queue, {"space": "tiny", "signatures": []})[0] == 422
    broken = {**tiny_signatures()[0], "kind": "resnet", "init": {"in_channels": "many"}}
    assert server.call("POST", queue, {"signatures": [broken]})[0] == 422
    bf16 = {**tiny_signatures()[0], "dtype": "bf16"}
    assert server.call("POST", queue, {"signatures": [bf16]})[0] == 422

    assert rows(server) == 0
    assert server.store.job(job["id"]).state == "leased"
    counts = {"queued": tiny_count() - 1, "leased": 1, "done": 0, "failed": 0}
    assert server.store.counts("cpu-test") == counts
    assert [d.name for d in server.store.devices()] == ["cpu-test"]
    assert result(server, agent, job)[0] == 201  # the agent can still finish its job


def test_job_life_cycle(server, clock):
    agent = register(server)
    # queueing again creates nothing: one job per missing signature
    status, out = server.call("POST", "/devices/cpu-test/jobs", {"space": "tiny"})
    assert status == 201 and out["created"] == [] and out["already_queued"] == tiny_count()

    job = lease(server, agent)
    assert job["attempts"] == 1 and job["state"] == "leased"
    # a result is stored once; posting it again (a retry after a lost answer) adds nothing
    status, out = result(server, agent, job)
    assert status == 201 and out["stored"] and out["job"]["state"] == "done"
    status, out = result(server, agent, job, samples=(9.0,))
    assert status == 200 and not out["stored"]
    assert rows(server) == 1 and server.store.table.rows()[0].median_ms == 1.6
    ref = {"lease_id": job["lease_id"]}
    assert server.call("POST", f"/jobs/{job['id']}/release", ref, agent)[0] == 409

    # an expired lease returns the job to the queue; the old lease is then worthless
    job = lease(server, agent)
    clock.advance(30)
    ref = {"lease_id": job["lease_id"]}
    assert server.call("POST", f"/jobs/{job['id']}/heartbeat", ref, agent)[0] == 200
    clock.advance(59)  # the heartbeat moved the end of the lease
    assert server.store.job(job["id"]).state == "leased"
    clock.advance(2)
    again = lease(server, agent)
    assert again["id"] == job["id"] and again["attempts"] == 2
    assert server.call("POST", f"/jobs/{job['id']}/heartbeat", ref, agent)[0] == 409
    # ... and it fails for good after max_attempts (2)
    body = {"lease_id": again["lease_id"], "error": "RuntimeError: out of memory"}
    status, out = server.call("POST", f"/jobs/{job['id']}/fail", body, agent)
    assert status == 200 and out["state"] == "failed" and "out of memory" in out["error"]

    # a failure with attempts left goes back to the queue; a release does not count
    job = lease(server, agent)
    body = {"lease_id": job["lease_id"], "error": "flaky"}
    assert server.call("POST", f"/jobs/{job['id']}/fail", body, agent)[1]["state"] == "queued"
    job = lease(server, agent)
    assert job["attempts"] == 2
    ref = {"lease_id": job["lease_id"]}
    out = server.call("POST", f"/jobs/{job['id']}/release", ref, agent)[1]
    assert out["state"] == "queued" and out["attempts"] == 1

    status, out = server.call("GET", "/devices/cpu-test/jobs?state=failed")
    assert status == 200 and [j["state"] for j in out["jobs"]] == ["failed"]
    queued = tiny_count() - 2
    assert out["counts"] == {"queued": queued, "leased": 0, "done": 1, "failed": 1}
    assert "lease_id" not in out["jobs"][0]  # only the holder sees its lease
    # a failed job can be queued again
    out = server.call("POST", "/devices/cpu-test/jobs", {"space": "tiny"})[1]
    assert len(out["created"]) == 1 and out["already_measured"] == 1


def test_a_result_needs_the_lease_the_job_is_held_under(server, clock):
    agent = register(server)
    job = lease(server, agent)
    made_up = "0123456789abcdef" * 2
    # a made-up lease stores nothing and leaves the holder's lease alone
    status, out = result(server, agent, {**job, "lease_id": made_up})
    assert status == 409 and "not held under this lease" in out["detail"]
    held = server.store.job(job["id"])
    assert held.state == "leased" and held.lease_id == job["lease_id"] and rows(server) == 0

    # a lease that expired (swept or not yet) is stale: the job may be someone else's now
    clock.advance(61)
    assert result(server, agent, job)[0] == 409
    again = lease(server, agent)
    assert again["id"] == job["id"]
    status, out = result(server, agent, job)
    assert status == 409 and "under another lease" in out["detail"]
    assert server.store.job(job["id"]).lease_id == again["lease_id"] and rows(server) == 0

    # the holder's result is stored; sending it again (a lost answer) is still fine
    assert result(server, agent, again)[0] == 201
    assert result(server, agent, again)[0] == 200
    assert result(server, agent, job)[0] == 200  # done: nothing to end, nothing stored
    assert rows(server) == 1


def test_docs_page_needs_no_other_host(server):
    status, page = server.call("GET", "/docs", token=None)
    assert status == 200 and "swagger-ui" in page
    assert re.findall(r"(?:https?:)?//[\w.-]+", page) == []  # nothing loads from elsewhere
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= set(assets)
    for path in [*assets, "/openapi.json", "/docs/oauth2-redirect"]:
        status, body = server.call("GET", path, token=None)
        assert status == 200 and body, path
    assert server.call("GET", "/docs/assets/../t.db", token=None)[0] == 404


def test_tables_and_predictions(server):
    agent = register(server)
    body = {"space": "tiny", "device": "cpu-test"}
    status, out = server.call("POST", "/predict", body)
    assert status == 409 and "no measurements" in out["detail"]
    job = lease(server, agent)
    result(server, agent, job)
    status, out = server.call("POST", "/predict", body)
    assert status == 409 and f"lacks {tiny_count() - 1} block(s)" in out["detail"]
    while (job := lease(server, agent)) is not None:
        assert result(server, agent, job, samples=(float(job["id"]),))[0] == 201

    status, table = server.call("GET", "/devices/cpu-test/table")
    assert status == 200 and len(table) == tiny_count()
    assert {r["source"] for r in table} == {"measured"}
    status, text = server.call("GET", "/devices/cpu-test/table?format=csv")
    assert status == 200 and text.startswith("device,backend")
    assert len(text.splitlines()) == tiny_count() + 1

    space = load_space("tiny")
    removals = [a for a in space.actions(space.original()) if a.kind == "remove"]
    arch = space.original().apply(removals[0]).apply(removals[-1])  # two blocks fewer
    body = {"space": "tiny", "device": "cpu-test", "architecture": arch.to_dict()}
    status, pred = server.call("POST", "/predict", body, agent)
    assert status == 200
    local = Predictor(space, server.store.table, "cpu-test").predict(arch)
    assert pred["total_ms"] == pytest.approx(local.total_ms)
    assert pred["per_stage"] == local.per_stage and pred["original_ms"] > pred["total_ms"]

    bad = {**body, "architecture": {"space": "tiny", "multiplicity": {"nope": 1}}}
    assert server.call("POST", "/predict", bad)[0] == 422
    assert server.call("POST", "/predict", {**body, "space": "sd15.yaml"})[0] == 422


def test_public_read(tmp_path):
    s = ThreadServer(tmp_path / "p.db", public_read=True)
    try:
        register(s)
        assert call(s.url, "GET", "/devices/cpu-test/table")[0] == 200
        assert call(s.url, "GET", "/devices")[0] == 200
        assert (
            call(s.url, "POST", "/devices", {"name": "a", "kind": "k", "backend": "torch"})[0]
            == 401
        )
        assert call(s.url, "POST", "/jobs/lease", {"device": "cpu-test"})[0] == 401
        assert call(s.url, "GET", "/devices", token="wrong-token-wrong-token")[0] == 401
    finally:
        s.stop()


def test_admin_token_made_once_private(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFNAS_ADMIN_TOKEN", raising=False)
    path = tmp_path / "t.db.admin-token"
    said: list[str] = []
    token = admin_token(path, said.append)
    assert len(said) == 1 and token in said[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert admin_token(path, said.append) == token and len(said) == 1  # not printed again
    os.chmod(path, 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        read_token_file(path)
    monkeypatch.setenv("DIFFNAS_ADMIN_TOKEN", ADMIN)
    assert admin_token(path, said.append) == ADMIN  # the environment wins


def test_table_export_reimports(server, tmp_path):
    agent = register(server, sigs=tiny_signatures()[:3])
    while (job := lease(server, agent)) is not None:
        result(server, agent, job)
    text = server.call("GET", "/devices/cpu-test/table")[1]
    (tmp_path / "export.json").write_text(json.dumps(text))
    with LatencyTable(tmp_path / "other.db") as t:
        assert t.import_file(tmp_path / "export.json") == 3


def test_signatures_read_back_from_a_table_are_queued_in_call_order(server):
    """Canonical JSON sorts input names; a job must still list them as forward takes them."""
    attention = next(s for s in tiny_blocks() if s.kind == "cross_attention")
    exported = json.loads(attention.to_json())  # as a table export holds it
    assert list(exported["inputs"]) == ["encoder_hidden_states", "hidden_states"]
    register(server, sigs=[exported])
    (job,) = server.call("GET", "/devices/cpu-test/jobs")[1]["jobs"]
    assert list(job["signature"]["inputs"]) == ["hidden_states", "encoder_hidden_states"]
    assert job["sig_hash"] == attention.hash
    assert in_call_order(BlockSignature.from_dict(exported)) == attention
