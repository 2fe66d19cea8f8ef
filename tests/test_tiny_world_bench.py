"""experiments/benchmarks/tiny_world.py's arguments (the full benchmark runs in `make bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "experiments" / "benchmarks" / "tiny_world.py"


def test_miniature_and_world_config_are_one_or_the_other(tmp_path):
    config = tmp_path / "world.json"
    config.write_text('{"unet_steps": 3}')
    out = tmp_path / "x.json"
    flags = ["--miniature", "--world-config", str(config), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "--world-config: not allowed with argument --miniature" in proc.stderr
    assert not out.exists()
