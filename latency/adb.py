"""Every call to Android's `adb` that diffnas makes, in one place.

Kept small on purpose: the Android backend (latency/backends/android.py) speaks to the phone
only through `Adb`, so a stand-in `adb` (tests/standin_adb.py) can replace the real one.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from search_spaces import UserError


@dataclass
class Adb:
    serial: str  # the phone, as `adb devices` lists it
    executable: str = "adb"  # adb on PATH, or a path to it
    timeout: float = 600.0  # seconds any one call may take (a large block on a slow phone)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.executable, "-s", self.serial, *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError:
            raise UserError(
                f"adb not found ({self.executable!r}): install Android's platform tools and put "
                "adb on PATH, or give its path"
            ) from None
        except subprocess.TimeoutExpired:
            raise UserError(
                f"adb {' '.join(args[:2])} on {self.serial} took over {self.timeout:g} s"
            ) from None
        if check and done.returncode != 0:
            raise UserError(
                f"adb {' '.join(args[:2])} on {self.serial} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}"
            )
        return done

    def check(self) -> None:
        """A UserError unless adb runs and the phone `serial` is connected and authorised."""
        if shutil.which(self.executable) is None:
            raise UserError(
                f"adb not found ({self.executable!r}): install Android's platform tools and put "
                "adb on PATH, or give its path"
            )
        state = self._run("get-state", check=False)
        if state.returncode != 0 or state.stdout.strip() != "device":
            listed = subprocess.run(
                [self.executable, "devices"], capture_output=True, text=True, timeout=60
            ).stdout.strip()
            listed = "; ".join(" ".join(line.split()) for line in listed.splitlines())
            said = (state.stderr or state.stdout).strip()
            raise UserError(
                f"Android device {self.serial!r} is not connected ({said}); "
                f"adb devices says: {listed or 'nothing'}"
            )

    def push(self, local: str | Path, remote: str) -> None:
        self._run("push", str(local), remote)

    def pull(self, remote: str, local: str | Path) -> None:
        self._run("pull", remote, str(local))

    def shell(self, *words: str) -> subprocess.CompletedProcess:
        """Run a command on the phone; the result is returned whatever its exit status."""
        return self._run("shell", " ".join(shlex.quote(w) for w in words), check=False)
