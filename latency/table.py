"""LatencyTable: block latencies per device, in SQLite.

One row per measurement set (device, backend, compute unit, precision, signature), append
only: measuring again adds a row and lookups take the newest, so nothing stored is ever
overwritten or lost. Several devices live in one file. WAL mode lets a service read while
an agent writes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from search_spaces import UserError

from .measurement import Measurement, check_device_name
from .signature import BlockSignature

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    backend TEXT NOT NULL,
    compute_unit TEXT NOT NULL,
    precision TEXT NOT NULL,
    sig_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    samples TEXT NOT NULL,
    median_ms REAL NOT NULL,
    iqr_ms REAL NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    versions TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS measurements_key
    ON measurements (device, backend, compute_unit, precision, sig_hash);
CREATE TABLE IF NOT EXISTS calibrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    backend TEXT NOT NULL,
    compute_unit TEXT NOT NULL,
    precision TEXT NOT NULL,
    space TEXT NOT NULL,
    slope REAL NOT NULL,
    intercept REAL NOT NULL,
    samples INTEGER NOT NULL,
    mape_before REAL NOT NULL,
    mape_after REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    backend TEXT NOT NULL,
    compute_unit TEXT NOT NULL,
    precision TEXT NOT NULL,
    space TEXT NOT NULL,
    reference TEXT NOT NULL,
    reference_ms TEXT NOT NULL,
    spread REAL NOT NULL,
    max_spread REAL NOT NULL,
    stored INTEGER NOT NULL,
    blocks INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


_INSERT = (
    "INSERT INTO measurements (device, backend, compute_unit, precision, sig_hash,"
    " signature, samples, median_ms, iqr_ms, source, created, versions)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _values(m: Measurement) -> tuple:
    return (
        m.device,
        m.backend,
        m.compute_unit,
        m.precision,
        m.signature.hash,
        m.signature.to_json(),
        json.dumps(m.samples),
        m.median_ms,
        m.iqr_ms,
        m.source,
        m.created,
        json.dumps(m.versions, sort_keys=True),
    )


class LatencyTable:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise UserError(f"latency table {self.path} is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            self._db.commit()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise UserError(
                f"{self.path} is not a diffnas latency table ({e}); give a new file name "
                "or the path of an existing table"
            ) from None

    def _migrate(self) -> None:
        """Schema 1 kept calibrations per device only; they now belong to a device setting.
        Old calibrations keep their rows, with an empty setting that no prediction uses."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(calibrations)")}
        for column in ("backend", "compute_unit", "precision"):
            if column not in columns:
                self._db.execute(
                    f"ALTER TABLE calibrations ADD COLUMN {column} TEXT NOT NULL DEFAULT ''"
                )
        self._db.execute(
            "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writing ------------------------------------------------------------------------------

    def add(self, measurements: Measurement | Iterable[Measurement]) -> int:
        """Append measurements (all checked first: a bad one stores none). Returns the count."""
        items = [measurements] if isinstance(measurements, Measurement) else list(measurements)
        for m in items:
            m.check()
        with self._db:
            self._db.executemany(_INSERT, [_values(m) for m in items])
        return len(items)

    # -- reading ------------------------------------------------------------------------------

    def devices(self) -> list[dict]:
        rows = self._db.execute(
            "SELECT device, backend, compute_unit, precision, COUNT(*) AS rows,"
            " COUNT(DISTINCT sig_hash) AS signatures, MAX(created) AS updated"
            " FROM measurements GROUP BY device, backend, compute_unit, precision ORDER BY device"
        )
        return [dict(r) for r in rows]

    def setting(self, device: str, backend=None, compute_unit=None, precision=None) -> dict:
        """The one (backend, compute unit, precision) of `device` matching the filters."""
        check_device_name(device)
        found = [
            d
            for d in self.devices()
            if d["device"] == device
            and backend in (None, d["backend"])
            and compute_unit in (None, d["compute_unit"])
            and precision in (None, d["precision"])
        ]
        if not found:
            known = sorted({d["device"] for d in self.devices()}) or ["none yet"]
            raise UserError(
                f"no measurements for device {device!r} in {self.path} (with the given backend/"
                f"compute unit/precision); devices here: {', '.join(known)}. Measure it with "
                f"`diffnas latency build SPACE --device {device} --db {self.path}`"
            )
        if len(found) > 1:
            options = ", ".join(
                f"{d['backend']}/{d['compute_unit']}/{d['precision']}" for d in found
            )
            raise UserError(
                f"device {device!r} has several settings ({options}); choose one with "
                "--backend, --compute-unit or --precision"
            )
        return found[0]

    def lookup(self, device: str, signatures: Iterable[BlockSignature], **setting) -> dict:
        """Newest measurement per signature hash of `device` ({hash: Measurement}); missing
        signatures are simply absent."""
        s = self.setting(device, **setting)
        hashes = list(dict.fromkeys(sig.hash for sig in signatures))
        out: dict[str, Measurement] = {}
        for i in range(0, len(hashes), 500):
            chunk = hashes[i : i + 500]
            rows = self._db.execute(
                "SELECT * FROM measurements WHERE device=? AND backend=? AND compute_unit=?"
                f" AND precision=? AND sig_hash IN ({','.join('?' * len(chunk))})"
                " ORDER BY created, id",
                (device, s["backend"], s["compute_unit"], s["precision"], *chunk),
            )
            for row in rows:
                out[row["sig_hash"]] = Measurement.from_dict(dict(row))  # newest wins
        return out

    def measured_hashes(self, device: str, backend: str, compute_unit: str, precision: str) -> set:
        rows = self._db.execute(
            "SELECT DISTINCT sig_hash FROM measurements WHERE device=? AND backend=?"
            " AND compute_unit=? AND precision=?",
            (device, backend, compute_unit, precision),
        )
        return {r[0] for r in rows}

    def rows(self, device: str | None = None) -> list[Measurement]:
        query, args = "SELECT * FROM measurements", ()
        if device is not None:
            query, args = query + " WHERE device=?", (check_device_name(device),)
        return [
            Measurement.from_dict(dict(r)) for r in self._db.execute(query + " ORDER BY id", args)
        ]

    # -- for the latency service and few-shot transfer -----------------------------------------

    def add_atomic(
        self,
        measurements: Iterable[Measurement],
        also: Callable[[sqlite3.Connection, list[int]], None],
    ) -> list[int]:
        """`add`, then `also(connection, row_ids)` in the same transaction: the service marks
        its jobs done together with the rows that answer them, so a crash keeps both or
        neither. If `also` raises, nothing is stored and the exception propagates."""
        items = list(measurements)
        for m in items:
            m.check()
        with self._db:
            ids = [self._db.execute(_INSERT, _values(m)).lastrowid for m in items]
            also(self._db, ids)
        return ids

    def hashes(
        self, device: str, backend: str, compute_unit: str, precision: str, source: str
    ) -> set[str]:
        """Signature hashes of one setting that have rows of `source` (measured | predicted)."""
        rows = self._db.execute(
            "SELECT DISTINCT sig_hash FROM measurements WHERE device=? AND backend=?"
            " AND compute_unit=? AND precision=? AND source=?",
            (device, backend, compute_unit, precision, source),
        )
        return {r[0] for r in rows}

    def last_id(self, device: str | None = None) -> int:
        """Id of the newest row (of `device`), 0 if none: changes whenever rows are added."""
        query, args = "SELECT MAX(id) FROM measurements", ()
        if device is not None:
            query, args = query + " WHERE device=?", (device,)
        return self._db.execute(query, args).fetchone()[0] or 0

    # -- calibration --------------------------------------------------------------------------

    def add_calibration(
        self,
        device: str,
        space: str,
        slope: float,
        intercept: float,
        samples: int,
        mape_before: float,
        mape_after: float,
        **setting,
    ) -> None:
        """Store a fit measured ≈ slope × predicted + intercept for one device setting
        (`backend`, `compute_unit`, `precision`; may be omitted when the device has one)."""
        if not all(math.isfinite(v) for v in (slope, intercept)) or slope <= 0:
            raise UserError(f"calibration slope {slope} / intercept {intercept} is not usable")
        s = self.setting(check_device_name(device), **setting)
        with self._db:
            self._db.execute(
                "INSERT INTO calibrations (device, backend, compute_unit, precision, space, slope,"
                " intercept, samples, mape_before, mape_after, created)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    device,
                    s["backend"],
                    s["compute_unit"],
                    s["precision"],
                    space,
                    slope,
                    intercept,
                    samples,
                    mape_before,
                    mape_after,
                    time.time(),
                ),
            )

    def calibration(self, device: str, space: str, **setting) -> dict | None:
        """The newest calibration of `space` on this device setting, if any."""
        known = {d["device"] for d in self.devices()}
        if device not in known:
            return None
        s = self.setting(device, **setting)
        row = self._db.execute(
            "SELECT * FROM calibrations WHERE device=? AND backend=? AND compute_unit=?"
            " AND precision=? AND space=? ORDER BY id DESC LIMIT 1",
            (device, s["backend"], s["compute_unit"], s["precision"], space),
        ).fetchone()
        return dict(row) if row else None

    # -- the noise guard of each build (latency.profile.NoiseGuard) -----------------------------

    def add_build(
        self, device, backend, compute_unit, precision, space, guard, stored: bool, blocks: int
    ) -> None:
        """Record a build's reference timings and their spread (whether or not it stored)."""
        with self._db:
            self._db.execute(
                "INSERT INTO builds (device, backend, compute_unit, precision, space, reference,"
                " reference_ms, spread, max_spread, stored, blocks, created)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    device,
                    backend,
                    compute_unit,
                    precision,
                    space,
                    f"{guard.reference} {guard.label}",
                    json.dumps(guard.medians_ms),
                    guard.spread,
                    guard.max_spread,
                    int(stored),
                    blocks,
                    time.time(),
                ),
            )

    def builds(self, device: str | None = None) -> list[dict]:
        """Every recorded build (newest last), with its reference timings and spread."""
        query, args = "SELECT * FROM builds", ()
        if device is not None:
            query, args = query + " WHERE device=?", (device,)
        rows = [dict(r) for r in self._db.execute(query + " ORDER BY id", args)]
        for r in rows:
            r["reference_ms"] = json.loads(r["reference_ms"])
            r["stored"] = bool(r["stored"])
        return rows

    # -- import / export ----------------------------------------------------------------------

    def export_json(self, device: str | None = None) -> str:
        return json.dumps([m.to_dict() for m in self.rows(device)], indent=1) + "\n"

    def export_csv(self, device: str | None = None) -> str:
        buf = io.StringIO()
        fields = [
            "device",
            "backend",
            "compute_unit",
            "precision",
            "sig_hash",
            "signature",
            "samples",
            "median_ms",
            "iqr_ms",
            "source",
            "created",
            "versions",
        ]
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for m in self.rows(device):
            d = m.to_dict()
            d["signature"] = m.signature.to_json()
            d["samples"] = json.dumps(m.samples)
            d["versions"] = json.dumps(m.versions, sort_keys=True)
            writer.writerow(d)
        return buf.getvalue()

    def import_file(self, path: str | Path) -> int:
        """Add the rows of a JSON or CSV export (validated first: all or nothing)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        text = path.read_text()
        if path.suffix.lower() == ".csv":
            records = list(csv.DictReader(io.StringIO(text)))
        else:
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
            if not isinstance(records, list):
                raise UserError(f"{path}: expected a JSON list of measurements")
        measurements = []
        for i, r in enumerate(records):
            try:
                m = Measurement.from_dict(r)
                if "sig_hash" in r and r["sig_hash"] != m.signature.hash:
                    raise UserError("sig_hash does not match the signature")
                m.check()
            except UserError as e:
                raise UserError(f"{path}: record {i}: {e}; nothing was imported") from None
            measurements.append(m)
        return self.add(measurements)
