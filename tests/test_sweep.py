"""`diffnas sweep` on a miniature tiny world: Ray Tune trials, an interrupted sweep resumed,
the results table and Pareto plot, and bad input."""

import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nas.cli import main
from nas.experiment import load_experiment
from nas.search.front import pareto_front, trial_name
from nas.search.run import experiment_space, open_world
from nas.search.sweep import COLUMNS, parse_targets, run_sweep
from nas.worlds.tiny_build import lock_path
from search_spaces import UserError

EXPERIMENT = {
    "name": "mini",
    "space": "tiny",
    "world": {"kind": "tiny", "miniature": True},
    "latency": {"device": "cpu-test", "repeats": 1},
    "target": {"ratio": 0.5},  # replaced by each trial's
    "search": {"max_iterations": 1, "train_steps": 0, "batch_size": 2, "group_size": 3},
    "evaluation": {"prompts": 1, "steps": 1, "batch_size": 4},
    "seed": 0,
}
TARGETS = [0.9, 0.8]


@pytest.fixture(scope="module")
def env(tmp_path_factory, experiment_env):
    with experiment_env(tmp_path_factory, "sweep", EXPERIMENT) as (root, exp_file):
        yield root, exp_file


def _wait_for(predicate, proc, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited early ({proc.returncode})")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the sweep did not finish a trial in time")


def _world_lock(exp_file: Path) -> Path:
    """The lock file every process takes to open the experiment's tiny world (building the
    world here, before the sweep starts, so that the sweep only loads it)."""
    exp = load_experiment(exp_file)
    return lock_path(open_world(exp, experiment_space(exp), progress=False).folder)


@pytest.fixture(scope="module")
def interrupted_then_resumed(env):
    """A sweep started on the command line, stopped with Ctrl-C (SIGINT) once Tune has
    recorded one finished trial, then resumed in process.

    The second trial must still be running when Ctrl-C comes: Tune lets a running trial
    finish for up to ~10 s before it kills it, and a miniature trial takes ~2 s. So once the
    first trial has opened the world (its run directory exists), the test holds the world's
    lock: the second trial waits on it until Tune kills it."""
    root, exp_file = env
    path = root / "runs" / "s"
    lock_path = _world_lock(exp_file)
    args = ["sweep", str(exp_file), "--targets", "0.9,0.8", "--name", "s"]
    args += ["--runs", str(root / "runs"), "--workers", "1"]
    with open(root / "cli.log", "w") as log, open(lock_path, "w") as lock:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nas.cli", *args], stdout=log, stderr=subprocess.STDOUT
        )

        def a_trial_opened_the_world():
            return any((path / trial_name(t, 0) / "experiment.hash").is_file() for t in TARGETS)

        def tune_recorded_a_trial():
            return any(
                (path / "tune" / trial_name(t, 0) / "result.json").is_file()
                and (path / "tune" / trial_name(t, 0) / "result.json").read_text().strip()
                for t in TARGETS
            )

        _wait_for(a_trial_opened_the_world, proc, 400)
        fcntl.flock(lock, fcntl.LOCK_EX)
        _wait_for(tune_recorded_a_trial, proc, 400)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=180)
    # closing the lock file released the lock: the resumed trial can open the world
    output = (root / "cli.log").read_text()
    finished = [t for t in TARGETS if (path / trial_name(t, 0) / "result.json").is_file()]
    stamps = {
        t: {
            f: os.stat(path / trial_name(t, 0) / f).st_mtime_ns
            for f in ("result.json", "history.jsonl")
        }
        for t in finished
    }
    resumed = run_sweep(load_experiment(exp_file), None, None, resume=path, progress=False)
    return resumed, code, output, finished, stamps


def test_interrupted_sweep_resumes_only_the_unfinished_trial(interrupted_then_resumed):
    result, code, output, finished, stamps = interrupted_then_resumed
    assert code == 2 and "unfinished trial(s)" in output and "--resume" in output
    assert len(finished) == 1  # the other trial was cut short
    for t, files in stamps.items():  # the finished trial was not run again
        run = result.path / trial_name(t, 0)
        for f, mtime in files.items():
            assert os.stat(run / f).st_mtime_ns == mtime
        reported = (result.path / "tune" / trial_name(t, 0) / "result.json").read_text()
        assert len(reported.strip().splitlines()) == 1  # Tune reported it once, before Ctrl-C
    for t in TARGETS:  # both trials have a complete evolution run directory
        run = result.path / trial_name(t, 0)
        assert (run / "result.json").is_file() and (run / "final.arch.json").is_file()
        checkpoint = result.path / "tune" / trial_name(t, 0)
        pointers = list(checkpoint.glob("checkpoint_*/run.json"))
        assert pointers and json.loads(pointers[0].read_text())["run_dir"] == str(run)


def test_results_table_and_pareto_plot(interrupted_then_resumed):
    result = interrupted_then_resumed[0]
    assert [r["trial"] for r in result.rows] == [trial_name(t, 0) for t in TARGETS]
    for row, target in zip(result.rows, TARGETS, strict=True):
        stored = json.loads((result.path / row["trial"] / "result.json").read_text())
        assert row["target_ratio"] == target and row["seed"] == 0
        assert row["target_ms"] == pytest.approx(target * stored["original_ms"])
        assert row["latency_ms"] == stored["latency_ms"] and row["clip"] == stored["clip"]
        assert row["params"] == stored["params"]["found"]
    summary = json.loads((result.path / "sweep.json").read_text())
    assert summary["targets"] == TARGETS and summary["seeds"] == [0]
    assert summary["pareto_front"] == result.pareto and result.pareto
    with open(result.path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*COLUMNS, "pareto"] and len(rows) == 2
    png = (result.path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_pareto_front():
    points = [(10.0, 5.0), (8.0, 5.0), (12.0, 7.0), (9.0, 4.0), (8.0, 3.0)]
    # (10, 5) is beaten by (8, 5); (9, 4) by (8, 5); (8, 3) by (8, 5)
    assert pareto_front(points) == [1, 2]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "--targets is empty"),
        (" , ", "--targets is empty"),
        ("0.5,abc", "not a list of numbers"),
        ("0.5,1.5", "1.5 out of range"),
        ("0", "0.0 out of range"),
        ("0.5,1", "1.0 out of range"),
        ("0.5,0.5", "repeated"),
    ],
)
def test_bad_targets(text, message):
    with pytest.raises(UserError, match=message):
        parse_targets(text)


def test_targets_are_sorted():
    assert parse_targets("0.3, 0.7,0.5") == [0.7, 0.5, 0.3]


def test_bad_input_is_refused_and_nothing_is_overwritten(env, interrupted_then_resumed, capsys):
    root, exp_file = env
    result = interrupted_then_resumed[0]
    before = (result.path / "sweep.json").read_text()
    exp = load_experiment(exp_file)
    with pytest.raises(UserError, match="exists; resume it with --resume"):
        run_sweep(exp, TARGETS, 1, runs=root / "runs", name="s", progress=False)
    other = load_experiment(exp_file, **{"evaluation.steps": 2})
    with pytest.raises(UserError, match="sweep of another experiment"):
        run_sweep(other, None, None, resume=result.path, progress=False)
    with pytest.raises(UserError, match="sweeps targets"):
        run_sweep(exp, [0.5], None, resume=result.path, progress=False)
    with pytest.raises(UserError, match="not a diffnas sweep directory"):
        run_sweep(exp, None, None, resume=root / "runs" / "s" / trial_name(0.9, 0))
    with pytest.raises(UserError, match="--seeds 0"):
        run_sweep(exp, TARGETS, 0, runs=root / "runs", name="zero")
    with pytest.raises(UserError, match="smallest reachable latency is about"):
        run_sweep(exp, [0.9, 0.01], 1, runs=root / "runs", name="far", progress=False)
    assert not (root / "runs" / "far").exists()  # refused before anything was written
    assert (result.path / "sweep.json").read_text() == before
    for argv, message in [
        (["--targets", ""], "--targets is empty"),
        (["--targets", "0.5,2"], "2.0 out of range"),
        (["--workers", "0", "--targets", "0.5"], "--workers 0"),
        ([], "--targets is required"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["sweep", str(exp_file), "--runs", str(root / "cli-runs"), *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err
