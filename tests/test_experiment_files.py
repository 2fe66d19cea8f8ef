"""The experiment files the repository ships (experiments/**/*.yaml) are valid, and so are
the tiny-world configs they name: a user running one gets a run, not a validation error."""

from pathlib import Path

import pytest

from nas.experiment import load_experiment
from nas.worlds.tiny import TinyWorldConfig

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments").rglob("*.yaml"))


def test_there_are_experiment_files():
    assert {"tiny.yaml", "snapfusion_sd15.yaml"} <= {f.name for f in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_experiment_is_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # world_config paths are relative to the repository root
    exp = load_experiment(path)
    if exp.world.world_config is not None:
        TinyWorldConfig.from_json(exp.world.world_config).check()
