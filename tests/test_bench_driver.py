"""`make bench`'s driver (experiments/benchmarks/run_all.py): it runs each script of a profile,
collects their last `name: value` lines into a summary per profile, and with --only keeps
the other rows of that profile's last summary."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).parents[1] / "experiments" / "benchmarks" / "run_all.py"


@pytest.fixture
def driver(tmp_path, monkeypatch):
    """run_all with two profiles of tiny scripts in a private repository layout."""
    spec = importlib.util.spec_from_file_location("run_all_under_test", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bench = tmp_path / "experiments" / "benchmarks"
    bench.mkdir(parents=True)
    for name, value in (("alpha", "1.5"), ("beta", "7")):
        # each prints its flags, then its metric as the last line
        (bench / f"{name}.py").write_text(
            f"import sys\nprint('flags', sys.argv[1:])\nprint('{name}_metric: {value}')\n"
        )
    (bench / "broken.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(module, "HERE", bench)
    monkeypatch.setattr(module, "RESULTS", bench / "results")
    monkeypatch.setattr(
        module,
        "PROFILES",
        {"quick": {"alpha": ["--fast"], "beta": []}, "full": {"alpha": [], "broken": []}},
    )
    monkeypatch.setattr(module, "GPU_ONLY", set())
    return module


def run(driver, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["run_all.py", *args])
    driver.main()


def test_quick_profile_collects_every_last_line(driver, monkeypatch, capsys):
    run(driver, monkeypatch)
    summary = json.loads((driver.RESULTS / "summary.json").read_text())
    assert summary["profile"] == "quick"
    rows = {r["benchmark"]: r for r in summary["benchmarks"]}
    assert rows["alpha"]["metric"] == "alpha_metric" and rows["alpha"]["value"] == "1.5"
    assert rows["alpha"]["command"].endswith("alpha.py --fast")
    assert rows["beta"]["value"] == "7" and all(r["ok"] for r in rows.values())
    table = (driver.RESULTS / "summary.md").read_text()
    assert "| alpha | alpha_metric | 1.5 |" in table
    assert "flags ['--fast']" in capsys.readouterr().out  # the script got the profile's flags


def test_only_reruns_some_and_keeps_the_other_rows(driver, monkeypatch):
    run(driver, monkeypatch)
    before = json.loads((driver.RESULTS / "summary.json").read_text())["benchmarks"]
    (driver.HERE / "beta.py").write_text("print('beta_metric: 8')\n")
    run(driver, monkeypatch, "--only", "beta")
    after = json.loads((driver.RESULTS / "summary.json").read_text())["benchmarks"]
    assert [r["benchmark"] for r in after] == ["alpha", "beta"]
    assert after[0] == before[0]  # kept as it was, with its own time
    assert after[1]["value"] == "8"


def test_full_profile_keeps_its_own_summary_and_reports_failures(driver, monkeypatch):
    run(driver, monkeypatch)
    quick = (driver.RESULTS / "summary.json").read_text()
    with pytest.raises(SystemExit, match="failed: broken"):
        run(driver, monkeypatch, "--profile", "full")
    assert (driver.RESULTS / "summary.json").read_text() == quick  # untouched
    full = json.loads((driver.RESULTS / "full" / "summary.json").read_text())
    rows = {r["benchmark"]: r for r in full["benchmarks"]}
    assert rows["alpha"]["ok"] and not rows["broken"]["ok"]
    assert rows["broken"]["returncode"] == 3 and rows["broken"]["value"] is None
    assert "FAILED (exit 3)" in (driver.RESULTS / "full" / "summary.md").read_text()
    # its scripts were told to write into the profile's own folder
    assert rows["alpha"]["command"].endswith(
        "alpha.py --out experiments/benchmarks/results/full/alpha.json"
    )


def test_unknown_benchmark_is_one_clear_error(driver, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run(driver, monkeypatch, "--only", "gamma")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown benchmark(s) gamma in profile quick; choose from alpha, beta" in err
    assert not driver.RESULTS.exists()
