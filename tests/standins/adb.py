"""A stand-in for Android's `adb`, for tests: the "phone" is a folder on this machine.

`STANDIN_ADB_ROOT` is the phone's file system, `STANDIN_ADB_SERIAL` the one connected serial.
`push`/`pull` copy files, `shell` runs the command there (paths under /data/ mapped into the
folder); a pushed `executor_runner` stand-in runs the `.pte` with this machine's ExecuTorch.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(os.environ["STANDIN_ADB_ROOT"])
SERIAL = os.environ.get("STANDIN_ADB_SERIAL", "emulator-5554")


def on_phone(path: str) -> str:
    return str(ROOT / path.lstrip("/")) if path.startswith("/data/") else path


def main(argv: list[str]) -> int:
    if argv[:1] == ["devices"]:
        print(f"List of devices attached\n{SERIAL}\tdevice")
        return 0
    if argv[:1] != ["-s"] or len(argv) < 3:
        print(f"adb stand-in: unsupported {argv}", file=sys.stderr)
        return 1
    serial, cmd, args = argv[1], argv[2], argv[3:]
    if serial != SERIAL:
        print(f"error: device '{serial}' not found", file=sys.stderr)
        return 1
    if cmd == "get-state":
        print("device")
    elif cmd == "push":
        target = Path(on_phone(args[1]))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args[0], target)
        print(f"{args[0]}: 1 file pushed")
    elif cmd == "pull":
        shutil.copyfile(on_phone(args[0]), args[1])
    elif cmd == "shell":
        words = [on_phone(w) for w in shlex.split(" ".join(args))]
        if words[0] == "mkdir":
            Path(words[-1]).mkdir(parents=True, exist_ok=True)
        elif words[0] == "chmod":
            os.chmod(words[-1], 0o755)
        else:
            done = subprocess.run(words, capture_output=True, text=True)
            sys.stdout.write(done.stdout)
            sys.stderr.write(done.stderr)
            return done.returncode
    else:
        print(f"adb stand-in: unsupported command {cmd}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
