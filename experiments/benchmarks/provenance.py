"""What every benchmark result records about how it was made: the exact command line, every
setting, the code's commit, the machine and the time, so that a number in the README can be
traced back to a run and re-run."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(args: argparse.Namespace | dict) -> dict:
    """The `command`, `settings`, `commit`, `machine` and `created` fields of a result."""
    import torch

    settings = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return {
        "command": shlex.join(["python", str(script), *sys.argv[1:]]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "commit": _commit(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_1min": os.getloadavg()[0],
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
