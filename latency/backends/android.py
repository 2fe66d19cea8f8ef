"""ExecuTorch on an Android phone over adb: blocks lowered here, timed by `executor_runner` there.

The `.pte` files are the ones the `executorch` backend builds (same cache, same delegate and
attention processor); ExecuTorch's `executor_runner` (built with the Android NDK, XNNPACK and the
event tracer on: docs/executorch.md) runs them on the phone. Each timed run is one invocation
with `--num_executions 1`, whose own line "Model executed successfully 1 time(s) in X ms."
is the sample: the process start and the program load are outside it, as on the host.
"""

from __future__ import annotations

import re
from pathlib import Path

from search_spaces import UserError

from ..adb import Adb
from ..signature import BlockSignature
from .base import Timing
from .executorch_backend import ExecuTorchBackend

REMOTE_DIR = "/data/local/tmp/diffnas"
TIMING = re.compile(r"Model executed successfully (\d+) time\(s\) in ([0-9.eE+-]+) ms")


def android_backend(
    backend: str, serial: str, runner: str | Path | None, adb: str = "adb", **settings
) -> AndroidExecuTorchBackend:
    """The backend `--adb SERIAL --runner PATH` asks for, or a UserError saying why not."""
    if backend != "executorch":
        raise UserError(f"--adb times ExecuTorch programs on a phone; this setting is {backend!r}")
    if runner is None:
        raise UserError("--adb needs --runner: ExecuTorch's executor_runner built for the phone")
    return AndroidExecuTorchBackend(Adb(serial, adb), runner, **settings)


class AndroidExecuTorchBackend(ExecuTorchBackend):
    """The `executorch` backend (same table setting), timed on a phone instead of here."""

    def __init__(self, adb: Adb, runner: str | Path, etdump: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.adb, self.runner = adb, Path(runner)
        self.etdump = etdump  # also pull each block's ETDump (needs a runner with the tracer)
        self.pushed: set[str] = set()  # programs already on the phone

    def test_connection(self) -> None:
        self.check_lowering()
        if not self.runner.is_file():
            raise UserError(
                f"executor_runner {self.runner} does not exist: build it for Android "
                "(docs/executorch.md) and give its path with --runner"
            )
        self.adb.check()
        self.adb.shell("mkdir", "-p", REMOTE_DIR)
        self.adb.push(self.runner, f"{REMOTE_DIR}/executor_runner")
        chmod = self.adb.shell("chmod", "+x", f"{REMOTE_DIR}/executor_runner")
        if chmod.returncode != 0:
            raise UserError(
                f"cannot make the runner executable on {self.adb.serial}: {chmod.stderr}"
            )
        self.thread_count = self.threads

    def profile(self, signature: BlockSignature) -> Timing:
        if not hasattr(self, "thread_count"):
            self.test_connection()
        path = self.convert_model(signature)
        remote = f"{REMOTE_DIR}/{path.name}"
        if path.name not in self.pushed:
            self.adb.push(path, remote)
            self.pushed.add(path.name)
        samples = []
        for i in range(self.warmup + self.repeats):
            ms = self.run_once(remote, etdump=self.etdump and i == self.warmup + self.repeats - 1)
            if i >= self.warmup:
                samples.append(ms)
        versions = {**self.versions(), "device_serial": self.adb.serial, "runner": self.runner.name}
        return Timing(samples, versions)

    def run_once(self, remote: str, etdump: bool = False) -> float:
        """Milliseconds of one execution of the program `remote`, as the runner reports it."""
        args = [f"{REMOTE_DIR}/executor_runner", "--model_path", remote, "--num_executions", "1"]
        if self.threads is not None:
            args += ["--cpu_threads", str(self.threads)]
        if etdump:
            args += ["--etdump_path", f"{remote}.etdump"]
        done = self.adb.shell(*args)
        output = (done.stdout or "") + (done.stderr or "")
        if done.returncode != 0:
            raise UserError(
                f"executor_runner failed on {self.adb.serial} (exit {done.returncode}) for "
                f"{Path(remote).name}: {output.strip()[-800:]}"
            )
        found = TIMING.search(output)
        if found is None:
            raise UserError(
                f"executor_runner on {self.adb.serial} printed no timing for {Path(remote).name} "
                f"(expected 'Model executed successfully N time(s) in X ms.'): "
                f"{output.strip()[-800:] or 'no output'}"
            )
        ms = float(found.group(2)) / int(found.group(1))
        if not ms > 0:
            raise UserError(f"executor_runner on {self.adb.serial} reported {ms} ms: not a timing")
        if etdump:
            self.adb.pull(f"{remote}.etdump", self.program_path_local(remote))
        return ms

    def program_path_local(self, remote: str) -> Path:
        """Where a pulled ETDump lands: beside the block's cached program."""
        return self.program_path_by_name(Path(remote).name).with_suffix(".etdump")

    def program_path_by_name(self, name: str) -> Path:
        from .. import executorch as et

        return et.cache_dir() / "executorch" / et.require() / name
