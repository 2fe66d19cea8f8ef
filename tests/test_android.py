"""ExecuTorch on an Android phone over adb (latency/adb.py, latency/backends/android.py).

No phone exists here: a stand-in `adb` (tests/standins/adb.py) keeps the phone's files in a
folder and runs its commands on this machine, and a stand-in `executor_runner`
(tests/standins/executor_runner.py) runs the pushed `.pte` with this machine's ExecuTorch and
prints the real runner's timing line. The backend's whole flow (push the runner, push the
program, run it per repeat, parse the timing, pull the ETDump) runs unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from small_blocks import resnet_sig

from latency.adb import Adb
from latency.backends.android import REMOTE_DIR, AndroidExecuTorchBackend, android_backend
from latency.table import LatencyTable
from nas.cli import main
from search_spaces import UserError

STANDINS = Path(__file__).parent / "standins"
SERIAL = "emulator-5554"


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def phone(tmp_path_factory):
    """(phone root, folder with the stand-in adb, module-wide program cache)."""
    root = tmp_path_factory.mktemp("phone")
    bin_dir = tmp_path_factory.mktemp("bin")
    script(bin_dir / "adb", f'exec {sys.executable} {STANDINS / "adb.py"} "$@"')
    return root, bin_dir, tmp_path_factory.mktemp("cache")


@pytest.fixture
def env(phone, monkeypatch):
    root, bin_dir, cache = phone
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_ADB_ROOT", str(root))
    monkeypatch.setenv("STANDIN_ADB_SERIAL", SERIAL)
    monkeypatch.setenv("DIFFNAS_CACHE", str(cache))
    return root


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runner")
    return script(
        folder / "executor_runner",
        f'exec {sys.executable} {STANDINS / "executor_runner.py"} "$@"',
    )


def backend(runner, serial=SERIAL, **kw) -> AndroidExecuTorchBackend:
    settings = {"repeats": 3, "warmup": 1, "threads": 1, **kw}
    return android_backend("executorch", serial, runner, **settings)


def test_a_block_is_timed_on_the_phone_by_its_runner(env, runner):
    b = backend(runner, etdump=True)
    timing = b.profile(resnet_sig())
    assert len(timing.samples) == 3 and min(timing.samples) > 0
    assert timing.versions["device_serial"] == SERIAL and timing.versions["delegate"] == "xnnpack"
    on_phone = env / REMOTE_DIR.lstrip("/")
    program = b.program_path(resnet_sig())
    assert (on_phone / "executor_runner").is_file()
    assert (on_phone / program.name).read_bytes() == program.read_bytes()  # the host's .pte
    assert program.with_suffix(".etdump").stat().st_size > 0  # the last run's trace, pulled


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('echo "E executor_runner: Error 0x12 loading method" >&2; exit 3', r"failed on .*exit 3"),
        ("echo hello", "printed no timing"),
        ('echo "Model executed successfully 1 time(s) in 0.000 ms."', "reported 0.0 ms"),
    ],
)
def test_a_runner_that_fails_or_prints_no_timing_is_one_clear_error(env, tmp_path, body, message):
    bad = script(tmp_path / "executor_runner", body)
    with pytest.raises(UserError, match=message):
        backend(bad).profile(resnet_sig())


def test_adb_missing_or_phone_not_connected(env, runner, monkeypatch, tmp_path):
    with pytest.raises(
        UserError, match=r"'pixel-9' is not connected .*attached; emulator-5554 device"
    ):
        backend(runner, serial="pixel-9").test_connection()
    with pytest.raises(UserError, match="executor_runner .* does not exist"):
        backend(tmp_path / "nothing").test_connection()
    monkeypatch.setenv("PATH", str(tmp_path))  # no adb anywhere
    with pytest.raises(UserError, match="adb not found"):
        Adb(SERIAL).check()
    with pytest.raises(UserError, match="--adb times ExecuTorch programs"):
        android_backend("torch", SERIAL, runner)


def test_cli_build_on_a_phone_that_is_not_connected_exits_2(env, runner, tmp_path, capsys):
    db = tmp_path / "t.db"
    with pytest.raises(SystemExit) as e:
        main(
            ["latency", "build", "tiny", "--device", "pixel", "--db", str(db),
             "--backend", "executorch", "--adb", "pixel-9", "--runner", str(runner)]
        )  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'pixel-9' is not connected" in err and "Traceback" not in err
    with LatencyTable(db) as table:
        assert table.rows() == []


def test_the_agent_times_its_jobs_on_the_phone(env, runner, tmp_path, capsys, monkeypatch):
    from test_service_support import ThreadServer

    server = ThreadServer(tmp_path / "service.db")
    try:
        device = {"name": "pixel", "kind": "pixel-8", "backend": "executorch"}
        assert server.call("POST", "/devices", {**device, "compute_unit": "xnnpack"})[0] == 201
        status, out = server.call(
            "POST", "/devices/pixel/jobs", {"signatures": [resnet_sig().to_dict()]}
        )
        assert status == 201, out
        token = server.call("POST", "/tokens", {"role": "agent", "device": "pixel"})[1]["token"]
        monkeypatch.setenv("DIFFNAS_TOKEN", token)
        agent = ["latency", "agent", "--server", server.url, "--device", "pixel",
                 "--exit-when-empty", "--repeats", "2", "--warmup", "0", "--threads", "1",
                 "--adb", SERIAL]  # fmt: skip
        try:
            main([*agent, "--runner", str(runner)])
        except SystemExit as e:
            assert not e.code, capsys.readouterr()
        rows = server.store.table.rows("pixel")
        assert len(rows) == 1 and rows[0].versions["device_serial"] == SERIAL
        assert rows[0].versions["delegate"] == "xnnpack" and len(rows[0].samples) == 2
    finally:
        server.stop()
