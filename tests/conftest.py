"""Shared fixtures."""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # two threads on a 2-core machine that also runs pytest's own work is several times
    # slower than one, and timing-free tests gain nothing from the second thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MINI_EXPERIMENT = {  # the miniature tiny world, its test latency table, a target of 0.8x
    "name": "mini",
    "space": "tiny",
    "world": {"kind": "tiny", "miniature": True},
    "latency": {"device": "cpu-test", "repeats": 1},
    "target": {"ratio": 0.8},
    "seed": 0,
}


@pytest.fixture(scope="session")
def mini_experiment() -> Callable[..., dict]:
    """`mini_experiment(search={...}, evaluation={...}, ...)`: an experiment (a dict, as an
    experiment file holds it) on the miniature tiny world; each keyword replaces that whole
    section of `MINI_EXPERIMENT`."""

    def make(**sections) -> dict:
        return {**copy.deepcopy(MINI_EXPERIMENT), **copy.deepcopy(sections)}

    return make


@pytest.fixture(scope="session")
def experiment_env():
    """`with experiment_env(tmp_path_factory, name, experiment) as (root, exp_file)`: a
    fresh folder with its own DIFFNAS_CACHE, the experiment written to root/mini.yaml with
    its latency table at root/lat.db (for module-scoped fixtures, which cannot use
    monkeypatch)."""

    @contextmanager
    def env(factory, name: str, experiment: dict) -> Iterator[tuple[Path, Path]]:
        root = factory.mktemp(name)
        mp = pytest.MonkeyPatch()
        mp.setenv("DIFFNAS_CACHE", str(root / "cache"))
        exp_file = root / "mini.yaml"
        latency = {**experiment["latency"], "db": str(root / "lat.db")}
        exp_file.write_text(yaml.safe_dump({**experiment, "latency": latency}))
        try:
            yield root, exp_file
        finally:
            mp.undo()

    return env


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """`run_cli(*args)`: `diffnas ARGS` in this process; (exit code, stdout, stderr)."""
    from nas.cli import main

    def run(*args) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[..., Path]:
    """Write a (dedented) YAML text under tmp_path and return its path."""

    def write(text: str, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


def line_of(path: Path, needle: str) -> int:
    """1-based number of the first line of `path` that contains `needle`."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} is not in {path}")


@pytest.fixture
def find_line() -> Callable[[Path, str], int]:
    return line_of
