"""The latency service's profiling jobs, kept in the latency table's file beside its devices
and tokens (latency/registry.py).

Results are not stored here: a finished job points at the `measurements` row (LatencyTable)
that answers it, and the two are written in one SQLite transaction, so the table stays the
one source of truth and a crash keeps both or neither.

A job's life:

    queued --lease--> leased --result--> done          (a second result changes nothing)
                      leased --fail / lease expiry--> queued, or failed after max_attempts
                      leased --release--> queued       (a graceful stop: no attempt counted)

Expired leases are swept lazily, at the start of every write, so the store needs no timer
thread and a restarted server picks up where the old one stopped.
"""

from __future__ import annotations

import inspect
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from search_spaces import UserError

from .backends import Timing
from .measurement import Measurement
from .registry import Conflict, Forbidden, NotFound, Registry
from .signature import BlockSignature

STATES = ("queued", "leased", "done", "failed")
MAX_ERROR_CHARS = 4000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    sig_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lease_id TEXT,
    leased_by TEXT,
    lease_expires REAL,
    error TEXT,
    measurement_id INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
-- at most one open job per (device, signature), even with concurrent enqueues
CREATE UNIQUE INDEX IF NOT EXISTS jobs_open ON jobs (device, sig_hash)
    WHERE state IN ('queued', 'leased');
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (device, state, id);
CREATE TABLE IF NOT EXISTS bundles (
    id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    manifest TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class _AlreadyDone(Exception):
    pass


@lru_cache(maxsize=4096)  # building even on the meta device takes milliseconds
def in_call_order(sig: BlockSignature) -> BlockSignature:
    """The signature with its inputs in the order the block's forward takes them.

    A signature's canonical JSON (what the table stores and hashes) sorts the input names,
    so one read back from a table export can list `encoder_hidden_states` before
    `hidden_states`, and building and calling it would pass them swapped. The hash does not
    depend on the order, so reordering changes nothing else."""
    names = list(inspect.signature(sig.build("meta").forward).parameters)
    inputs = dict(sig.inputs)
    if not set(inputs) <= set(names):  # a forward that names them otherwise: keep as given
        return sig
    ordered = {k: inputs[k] for k in sorted(inputs, key=names.index)}
    return BlockSignature.make(sig.kind, dict(sig.init), ordered, sig.dtype)


@dataclass
class Job:
    id: int
    device: str
    sig_hash: str
    signature: BlockSignature
    state: str
    attempts: int
    max_attempts: int
    lease_id: str | None
    leased_by: str | None
    lease_expires: float | None
    error: str | None
    measurement_id: int | None
    created: float
    updated: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["signature"] = BlockSignature.from_dict(json.loads(d["signature"]))
        return cls(**d)

    def to_dict(self, lease: bool = False) -> dict:
        """The job as the API shows it; the lease id only to the agent that holds it."""
        d = asdict(self)
        d["signature"] = self.signature.to_dict()
        d["description"] = self.signature.describe()
        if not lease:
            d.pop("lease_id")
        return d


class JobStore(Registry):
    """Devices, tokens (Registry) and jobs next to a LatencyTable, safe to share between
    threads."""

    def __init__(
        self,
        path: str | Path,
        lease_seconds: float = 300.0,
        max_attempts: int = 3,
        clock: Callable[[], float] = time.time,
    ):
        if lease_seconds <= 0 or max_attempts < 1:
            raise UserError("lease seconds must be > 0 and max attempts >= 1")
        super().__init__(path, clock)
        self.lease_seconds, self.max_attempts = lease_seconds, max_attempts
        self._db.executescript(_SCHEMA)

    # -- queueing -----------------------------------------------------------------------------

    def enqueue(
        self, device: str, signatures: Iterable[BlockSignature], max_attempts: int | None = None
    ) -> dict:
        """One job per signature the device's table has no measurement of and no open job for.

        Predicted rows (few-shot transfer) do not count as measured: queueing replaces them.
        """
        d = self.device(device)
        sigs = [in_call_order(s) for s in dict.fromkeys(signatures)]
        wrong = [s for s in sigs if s.dtype != d.precision]
        if wrong:
            raise UserError(
                f"device {device!r} measures in {d.precision}, but {len(wrong)} signature(s) are "
                f"in {wrong[0].dtype} (e.g. {wrong[0].describe()}); give {d.precision} ones"
            )
        attempts = max_attempts or self.max_attempts
        now = self.clock()
        created, measured = [], 0
        with self._write() as db:
            done = self.table.hashes(d.name, d.backend, d.compute_unit, d.precision, "measured")
            for sig in sigs:
                if sig.hash in done:
                    measured += 1
                    continue
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs (device, sig_hash, signature, state, attempts,"
                    " max_attempts, created, updated) VALUES (?,?,?,'queued',0,?,?,?)",
                    # to_dict, not the canonical to_json: it keeps the inputs' call order
                    (d.name, sig.hash, json.dumps(sig.to_dict()), attempts, now, now),
                )
                if cur.rowcount:
                    created.append(cur.lastrowid)
        return {
            "created": [self.job(i) for i in created],
            "already_measured": measured,
            "already_queued": len(sigs) - measured - len(created),
        }

    # -- leasing ------------------------------------------------------------------------------

    def lease(self, device: str, agent: str) -> Job | None:
        """The oldest queued job of `device`, leased to `agent`; None if the queue is empty."""
        self.device(device)
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE device=? AND state='queued' ORDER BY id LIMIT 1",
                (device,),
            ).fetchone()
            if row is None:
                return None
            now = self.clock()
            db.execute(
                "UPDATE jobs SET state='leased', lease_id=?, leased_by=?, lease_expires=?,"
                " attempts=attempts+1, updated=? WHERE id=?",
                (secrets.token_hex(16), agent, now + self.lease_seconds, now, row["id"]),
            )
            return self._job(db, row["id"])

    def heartbeat(self, job_id: int, lease_id: str, scope: str | None) -> Job:
        """Extend a lease that is still held (agents call this while a long block runs)."""
        with self._write() as db:
            self._held(db, job_id, lease_id, scope)
            now = self.clock()
            db.execute(
                "UPDATE jobs SET lease_expires=?, updated=? WHERE id=?",
                (now + self.lease_seconds, now, job_id),
            )
            return self._job(db, job_id)

    def release(self, job_id: int, lease_id: str, scope: str | None) -> Job:
        """Give a leased job back to the queue; the attempt does not count."""
        with self._write() as db:
            self._held(db, job_id, lease_id, scope)
            db.execute(
                "UPDATE jobs SET state='queued', lease_id=NULL, leased_by=NULL,"
                " lease_expires=NULL, attempts=attempts-1, updated=? WHERE id=?",
                (self.clock(), job_id),
            )
            return self._job(db, job_id)

    def fail(self, job_id: int, lease_id: str | None, error: str, scope: str | None) -> Job:
        """Record a failed attempt: back to the queue, or `failed` once attempts run out.

        `lease_id` None is for jobs that are not leased (bundles run on phones)."""
        with self._write() as db:
            if lease_id is None:
                job = self._scoped(db, job_id, scope)
                if job.state != "queued":
                    raise Conflict(f"job {job_id} is {job.state}, not queued; nothing recorded")
            else:
                self._held(db, job_id, lease_id, scope)
            self._attempt_failed(db, job_id, error[:MAX_ERROR_CHARS], count=lease_id is None)
            return self._job(db, job_id)

    def complete(
        self,
        job_id: int,
        timing: Timing,
        scope: str | None,
        lease_id: str,
        agent: str | None = None,
    ) -> tuple[Job, bool]:
        """Store the result of a leased job, made under its current lease `lease_id`.

        Idempotent: if the job is done already, nothing is stored and `(job, False)` comes
        back (a retry after a lost answer). Otherwise the lease must be the one the job is
        held under now: a made-up or stale lease (expired, or the job leased again since)
        raises Conflict and changes nothing, so it cannot end another agent's lease."""
        stored = self.complete_many([(job_id, timing)], scope, agent, lease_id=lease_id)
        return self.job(job_id), bool(stored)

    def complete_many(
        self,
        results: list[tuple[int, Timing]],
        scope: str | None,
        agent: str | None = None,
        lease_id: str | None = None,
    ) -> list[int]:
        """Store several results at once, all or nothing; jobs already done are skipped.
        Returns the ids of the jobs whose results were stored.

        `lease_id`: every job not done yet must be held under this lease (results posted by
        an agent); None for jobs run without a lease (bundles run on phones)."""
        with self._lock:
            todo, measurements = [], []
            for job_id, timing in results:
                job = self._scoped(self._db, job_id, scope)
                if job.state == "done":
                    continue
                if lease_id is not None:
                    self._check_lease(job, lease_id)
                d = self.device(job.device)
                versions = {**timing.versions, "job": job.id}
                if agent or job.leased_by:
                    versions["agent"] = agent or job.leased_by
                todo.append(job.id)
                measurements.append(
                    Measurement(
                        device=d.name,
                        backend=d.backend,
                        compute_unit=d.compute_unit,
                        precision=d.precision,
                        signature=job.signature,
                        samples=list(timing.samples),
                        median_ms=timing.median_ms,
                        iqr_ms=timing.iqr_ms,
                        versions=versions,
                    )
                )
            if not todo:
                return []
            now = self.clock()

            # with a lease, the job must still be held under it when it is marked done
            held = "" if lease_id is None else " AND state='leased' AND lease_id=?"

            def mark_done(db: sqlite3.Connection, ids: list[int]) -> None:
                for job_id, row_id in zip(todo, ids, strict=True):
                    cur = db.execute(
                        "UPDATE jobs SET state='done', measurement_id=?, lease_id=NULL,"
                        " lease_expires=NULL, error=NULL, updated=? WHERE id=? AND state!='done'"
                        + held,
                        (row_id, now, job_id) + (() if lease_id is None else (lease_id,)),
                    )
                    if cur.rowcount != 1:  # another process finished or leased it meanwhile
                        raise _AlreadyDone

            try:
                self.table.add_atomic(measurements, mark_done)
            except _AlreadyDone:
                raise Conflict(
                    "a job was finished or leased again by another process meanwhile; nothing "
                    "was stored, send the results again (jobs done by then are skipped)"
                ) from None
            return todo

    # -- reading ------------------------------------------------------------------------------

    def job(self, job_id: int) -> Job:
        with self._lock:
            return self._job(self._db, job_id)

    def jobs(self, device: str, state: str | None = None, limit: int = 1000) -> list[Job]:
        self.device(device)
        if state is not None and state not in STATES:
            raise UserError(f"state must be one of {', '.join(STATES)}, not {state!r}")
        with self._write() as db:  # a write: sweeps expired leases first
            query, args = "SELECT * FROM jobs WHERE device=?", [device]
            if state is not None:
                query, args = query + " AND state=?", [*args, state]
            rows = db.execute(query + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self, device: str) -> dict[str, int]:
        with self._write() as db:
            rows = db.execute(
                "SELECT state, COUNT(*) FROM jobs WHERE device=? GROUP BY state", (device,)
            ).fetchall()
        return {s: 0 for s in STATES} | {r[0]: r[1] for r in rows}

    # -- bundles (phones run jobs from an exported bundle instead of leasing them) -----------

    def add_bundle(self, bundle_id: str, device: str, manifest: dict) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO bundles VALUES (?,?,?,?)",
                (bundle_id, device, json.dumps(manifest), self.clock()),
            )

    def bundle(self, bundle_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT manifest FROM bundles WHERE id=?", (bundle_id,)
            ).fetchone()
        return json.loads(row[0]) if row else None

    # -- internals ----------------------------------------------------------------------------

    def _job(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}")
        return Job.from_row(row)

    def _scoped(self, db: sqlite3.Connection, job_id: int, scope: str | None) -> Job:
        job = self._job(db, job_id)
        if scope is not None and job.device != scope:
            raise Forbidden(
                f"job {job_id} belongs to device {job.device!r}; this token is for {scope!r}"
            )
        return job

    def _held(self, db: sqlite3.Connection, job_id: int, lease_id: str, scope: str | None) -> Job:
        job = self._scoped(db, job_id, scope)
        self._check_lease(job, lease_id)
        return job

    def _check_lease(self, job: Job, lease_id: str) -> None:
        """Conflict unless `job` is leased under `lease_id` and the lease has not expired
        (expired leases are swept at the next write; until then they count as gone)."""
        held = job.state == "leased" and secrets.compare_digest(job.lease_id or "", lease_id)
        if held and job.lease_expires is not None and job.lease_expires <= self.clock():
            raise Conflict(f"job {job.id}: this lease expired; lease a new job")
        if not held:
            raise Conflict(
                f"job {job.id} is not held under this lease (it is {job.state}"
                + (", under another lease" if job.state == "leased" else "")
                + "); lease a new job"
            )

    def _attempt_failed(self, db: sqlite3.Connection, job_id: int, error: str, count: bool) -> None:
        """After a failed attempt (`count`: one not counted at lease time, as for bundles)."""
        db.execute(
            "UPDATE jobs SET attempts=attempts+?, lease_id=NULL, lease_expires=NULL, error=?,"
            " updated=?, state=CASE WHEN attempts+? >= max_attempts THEN 'failed'"
            " ELSE 'queued' END WHERE id=?",
            (int(count), error, self.clock(), int(count), job_id),
        )

    def _sweep(self, now: float) -> None:
        """Leases past their time: the agent is gone (killed, cut off); the attempt counts."""
        rows = self._db.execute(
            "SELECT id, leased_by FROM jobs WHERE state='leased' AND lease_expires <= ?", (now,)
        ).fetchall()
        for row in rows:
            self._attempt_failed(
                self._db,
                row["id"],
                f"lease of agent {row['leased_by']!r} expired (agent stopped, or cut off)",
                count=False,
            )
