"""The noise guard of table builds (latency/profile.py NoiseGuard): a reference block timed
before, during and after every build; the spread is stored with the table and shown.

The machine's load is what the guard detects, and a test cannot order a busy machine: a
backend whose timings follow a script stands in for it (as in test_latency's rounds test),
while the table, the build loop and the CLI are the real ones.
"""

from __future__ import annotations

import pytest

import latency.cli
from latency.backends import Timing
from latency.backends.torch_backend import TorchBackend
from latency.profile import NoiseGuard, build_table, reference_signature
from latency.signature import signatures
from latency.table import LatencyTable
from search_spaces import UserError, load_space

DEVICE = "cpu-guard"


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


def scripted(load: list[float]):
    """A backend whose every block takes 1 ms times the machine's load at that moment:
    `load[i]` from the i-th timing of the reference block on. The reference is one of the
    space's blocks (timed as such early in the round), so a build times it 4 times: before,
    as a block, in the middle of the round, after."""
    calls = {"ref": 0}

    class Scripted(TorchBackend):
        def __init__(self, space):
            super().__init__("cpu")
            self.ref = reference_signature(signatures(space))
            self.now = load[0]

        def test_connection(self):
            pass

        def profile(self, signature):
            if signature == self.ref:
                self.now = load[min(calls["ref"], len(load) - 1)]
                calls["ref"] += 1
            return Timing([self.now], {"threads": 1})

    return Scripted


def test_a_quiet_build_records_its_spread(tmp_path, space):
    backend = scripted([1.0, 1.0, 1.1, 1.0])(space)
    with LatencyTable(tmp_path / "t.db") as table:
        report = build_table(space, table, backend, DEVICE, progress=False)
        builds = table.builds(DEVICE)
        rows = table.rows(DEVICE)
    assert report.guard.ok and report.guard.spread == pytest.approx(1.1)
    assert report.guard.medians_ms == [1.0, 1.1, 1.0]  # before, middle of the round, after
    assert len(builds) == 1 and builds[0]["stored"] and builds[0]["spread"] == pytest.approx(1.1)
    assert builds[0]["reference"].startswith(backend.ref.hash)
    assert len(rows) == len(signatures(space))


def test_a_busy_build_warns_and_stores(tmp_path, space, caplog):
    backend = scripted([1.0, 1.0, 3.0, 1.0])(space)  # the machine got busy mid-build
    with LatencyTable(tmp_path / "t.db") as table:
        report = build_table(space, table, backend, DEVICE, progress=False)
        assert not report.guard.ok and report.guard.spread == pytest.approx(3.0)
        assert table.rows(DEVICE) and table.builds(DEVICE)[0]["stored"]
    assert "noise guard" in caplog.text and "spread 3.00" in caplog.text


def test_a_busy_strict_build_stores_nothing(tmp_path, space):
    backend = scripted([1.0, 1.0, 1.0, 2.0])(space)
    with LatencyTable(tmp_path / "t.db") as table:
        with pytest.raises(UserError, match=r"spread 2\.00 .*nothing was stored \(--strict\)"):
            build_table(
                space, table, backend, DEVICE, progress=False, guard=NoiseGuard(strict=True)
            )
        assert table.rows(DEVICE) == []
        assert [b["stored"] for b in table.builds(DEVICE)] == [False]  # the refusal is recorded


def test_a_quiet_strict_build_stores_every_block(tmp_path, space):
    backend = scripted([1.0, 1.0, 1.05, 1.0])(space)
    with LatencyTable(tmp_path / "t.db") as table:
        build_table(space, table, backend, DEVICE, progress=False, guard=NoiseGuard(strict=True))
        assert len(table.rows(DEVICE)) == len(signatures(space))


def test_nothing_to_measure_times_no_reference(tmp_path, space):
    backend = scripted([1.0])(space)
    with LatencyTable(tmp_path / "t.db") as table:
        build_table(space, table, backend, DEVICE, progress=False)
        report = build_table(space, table, backend, DEVICE, progress=False)  # all in the table
        assert report.guard is None and len(table.builds(DEVICE)) == 1


def test_cli_strict_refusal_exits_2_and_show_reports_the_spread(
    tmp_path, space, run_cli, monkeypatch
):
    db = tmp_path / "t.db"
    loads = iter([[1.0, 1.0, 4.0, 1.0], [1.0, 1.0, 1.02, 1.0]])
    real = latency.cli.get_backend
    monkeypatch.setattr(latency.cli, "get_backend", lambda *a, **kw: scripted(next(loads))(space))
    build = ["latency", "build", "tiny", "--device", DEVICE, "--db", db]
    code, out, err = run_cli(*build, "--strict")
    assert code == 2 and "nothing was stored (--strict)" in err and "Traceback" not in err
    code, out, err = run_cli(*build)
    assert code == 0 and "noise guard: reference" in out
    monkeypatch.setattr(latency.cli, "get_backend", real)

    code, out, _ = run_cli("latency", "show", "--db", db)
    assert code == 0 and "1.02" in out  # the newest build's spread, beside the setting
    code, out, _ = run_cli("latency", "show", "--device", DEVICE, "--db", db)
    out = " ".join(out.split())  # rich wraps long lines at the terminal's width
    assert "noise guard spread 4.00" in out and "refused: nothing stored" in out
    assert "noise guard spread 1.02" in out
    code, out, err = run_cli(*build, "--max-spread", "0.5")
    assert code == 2 and "--max-spread" in err
