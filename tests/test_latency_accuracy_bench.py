"""experiments/benchmarks/latency_accuracy.py at miniature sizes: --spaces picks the spaces,
a bad value is one clear error (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "experiments" / "benchmarks" / "latency_accuracy.py"


def run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=600
    )


def test_spaces_tiny_alone(tmp_path):
    out = tmp_path / "acc.json"
    flags = ["--spaces", "tiny", "--samples", "3", "--calibration-samples", "2"]
    flags += ["--net-repeats", "1", "--block-repeats", "1", "--warmup", "0", "--rounds", "2"]
    proc = run(*flags, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("latency_mape_tiny: ")
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"tiny"}
    assert len(results["tiny"]["measured_ms"]) == 3 + 1  # the samples and the original
    assert (tmp_path / "acc_tiny.png").is_file()
    written = json.loads(out.read_text())
    assert written["command"].startswith("python experiments/benchmarks/latency_accuracy.py ")
    assert written["settings"]["rounds"] == 2 and written["commit"]


def test_odd_rounds_are_refused(tmp_path):
    proc = run("--spaces", "tiny", "--rounds", "3", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "--rounds 3: give 1 or an even number" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_spaces_rejects_an_unknown_space(tmp_path):
    proc = run("--spaces", "tiny,sd14", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert "--spaces 'tiny,sd14': a comma list of sd15 and tiny" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_quick_keeps_the_spaces_it_is_given(tmp_path):
    # --quick alone means tiny; with --spaces the named spaces win (here: checked, then refused)
    proc = run("--quick", "--spaces", "tiny,sd14", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert "--spaces 'tiny,sd14'" in proc.stderr
