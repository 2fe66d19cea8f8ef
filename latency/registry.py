"""The latency service's registry: its devices, and the tokens that act for them.

Kept in the latency table's file, beside the measurements (`LatencyTable`) and the profiling
jobs (`JobStore`, which builds on this class). A device is one setting of a table (backend,
compute unit, precision) under a name; an agent token may lease and post only for its device.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

from search_spaces import UserError

from .auth import hash_token, new_token
from .backends import backend_class
from .measurement import check_device_name
from .table import LatencyTable

ROLES = ("admin", "agent", "reader")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    backend TEXT NOT NULL,
    compute_unit TEXT NOT NULL,
    precision TEXT NOT NULL,
    notes TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    device TEXT,
    label TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL
);
"""


class NotFound(UserError):
    """No such device, job or token (HTTP 404)."""


class Forbidden(UserError):
    """The caller may not act on this device (HTTP 403)."""


class Conflict(UserError):
    """The request does not fit the current state, e.g. a lease that expired (HTTP 409)."""


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # e.g. iphone-14-pro, xeon-2core
    backend: str  # torch | coreml
    compute_unit: str
    precision: str
    notes: str
    created: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin, an agent (for one device) or a reader."""

    role: str
    device: str | None = None  # agents only
    token_id: int | None = None  # None for the admin token, which lives outside the database
    label: str = ""

    @property
    def scope(self) -> str | None:
        """The one device this caller may lease and post for; None: any (the admin)."""
        return self.device if self.role == "agent" else None


class Registry:
    """Devices and tokens next to a LatencyTable, safe to share between threads."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self.table = LatencyTable(path)  # creates the file, its measurements and WAL mode
        self.path = self.table.path
        self.clock = clock
        # autocommit, with explicit BEGIN IMMEDIATE around every read-modify-write
        self._db = sqlite3.connect(
            self.path, timeout=30, check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)
        # One lock for both connections: SQLite has one writer anyway, and a shared
        # connection must not interleave two threads' transactions.
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self.table.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._sweep(self.clock())
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _sweep(self, now: float) -> None:
        """Run at the start of every write: what has expired by `now` (JobStore: leases)."""

    # -- devices ------------------------------------------------------------------------------

    def add_device(
        self,
        name: str,
        kind: str,
        backend: str,
        compute_unit: str | None = None,
        precision: str = "fp32",
        notes: str = "",
    ) -> tuple[Device, bool]:
        """Register a device; registering the same settings again is a no-op (created False)."""
        check_device_name(name)
        cls = backend_class(backend)
        compute_unit = compute_unit or cls.compute_units[0]
        cls.check_setting(compute_unit, precision)
        new = Device(name, kind, backend, compute_unit, precision, notes, self.clock())
        with self._write() as db:
            row = db.execute("SELECT * FROM devices WHERE name=?", (name,)).fetchone()
            if row is not None:
                old = Device(**dict(row))
                if (old.kind, old.backend, old.compute_unit, old.precision) != (
                    kind,
                    backend,
                    compute_unit,
                    precision,
                ):
                    raise Conflict(
                        f"device {name!r} exists as {old.kind}, {old.backend}/"
                        f"{old.compute_unit}/{old.precision}; a table holds one setting per "
                        "device name, so register the new setting under another name"
                    )
                return old, False
            db.execute("INSERT INTO devices VALUES (?,?,?,?,?,?,?)", tuple(asdict(new).values()))
        return new, True

    def device(self, name: str) -> Device:
        with self._lock:
            row = self._db.execute("SELECT * FROM devices WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(
                f"no device {name!r} is registered; register it with POST /devices "
                "(admin token) and queue its jobs with POST /devices/{name}/jobs"
            )
        return Device(**dict(row))

    def devices(self) -> list[Device]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM devices ORDER BY name").fetchall()
        return [Device(**dict(r)) for r in rows]

    # -- tokens -------------------------------------------------------------------------------

    def issue_token(self, role: str, device: str | None = None, label: str = "") -> tuple[int, str]:
        """A new token (returned once, stored hashed). Agents are bound to one device."""
        if role not in ("agent", "reader"):
            raise UserError("a token's role is 'agent' or 'reader' (the admin token is not issued)")
        if (role == "agent") != (device is not None):
            raise UserError("an agent token needs a device; a reader token takes none")
        if device is not None:
            self.device(device)
        token = new_token()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO tokens (token_hash, role, device, label, created) VALUES (?,?,?,?,?)",
                (hash_token(token), role, device, label, self.clock()),
            )
        return cur.lastrowid, token

    def principal(self, token: str) -> Principal | None:
        """The holder of a stored token, or None (unknown or revoked)."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM tokens WHERE token_hash=? AND revoked IS NULL", (hash_token(token),)
            ).fetchone()
        if row is None:
            return None
        return Principal(row["role"], row["device"], row["id"], row["label"])

    def tokens(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, role, device, label, created, revoked FROM tokens ORDER BY id"
            ).fetchall()
        return [dict(r) for r in rows]

    def revoke_token(self, token_id: int) -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked=? WHERE id=? AND revoked IS NULL",
                (self.clock(), token_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no active token with id {token_id}")
