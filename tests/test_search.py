"""The search end to end on a miniature tiny world: run directory, resume, report, errors."""

import json
from dataclasses import asdict

import pytest
from pydantic import ValidationError

from nas.evolve import RunDir
from nas.experiment import Experiment, load_experiment
from nas.search import open_world, run_search
from nas.world import TinyWorldConfig
from search_spaces import Architecture, UserError, load_space

EXPERIMENT = {
    "name": "mini",
    "space": "tiny",
    "world": {"kind": "tiny", "miniature": True},
    "latency": {"device": "cpu-test", "repeats": 1},
    "target": {"ratio": 0.8},
    "search": {"max_iterations": 2, "train_steps": 1, "batch_size": 4, "group_size": 2},
    "evaluation": {"prompts": 2, "steps": 2, "batch_size": 4},
    "seed": 0,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory, experiment_env):
    with experiment_env(tmp_path_factory, "search", EXPERIMENT) as (root, exp_file):
        yield root, exp_file


@pytest.fixture(scope="module")
def uninterrupted(env):
    root, exp_file = env
    result = run_search(load_experiment(exp_file), runs=root / "runs", progress=False)
    return result


def test_run_directory_has_everything(uninterrupted):
    run = uninterrupted.run_dir
    for name in [
        "experiment.yaml",
        "space.json",
        "table.json",
        "history.jsonl",
        "checkpoint",
        "final.arch.json",
        "final",
        "result.json",
        "report.html",
        "progress.png",
        "architecture.png",
        "values.png",
        "stages.png",
        "grid_original.png",
        "grid_found.png",
    ]:
        assert (run / name).exists(), name
    history = RunDir(run).history()
    assert [h["iteration"] for h in history] == [0, 1]
    first = history[0]
    assert first["actions"] and all(a["kind"] == "remove" for a in first["actions"])
    for a in first["actions"]:
        assert a["delta_ms"] > 0  # removing a block saves its table latency
        assert a["value"] == pytest.approx(a["delta_clip"] / a["delta_ms"])
    # the latency is above the target at first, so the lowest-value blocks are removed
    assert first["latency_ms"] > first["target_ms"] and first["decision"] == "remove"
    lowest = sorted(first["actions"], key=lambda a: a["value"])[0]["slot"]
    assert f"remove {lowest}" in first["applied"]
    assert history[1]["arch"] == first["arch_after"]
    final = Architecture.load(run / "final.arch.json")
    assert final.to_dict() == history[-1]["arch_after"]
    rows = json.loads((run / "table.json").read_text())
    assert rows and all(r["device"] == "cpu-test" for r in rows)
    assert "<img src=progress.png>" in (run / "report.html").read_text()


def test_resume_after_a_kill_ends_with_the_same_architecture(env, uninterrupted, monkeypatch):
    root, exp_file = env
    real = RunDir.save_iteration

    def killed_after_first(self, record, model):
        real(self, record, model)
        if record["iteration"] == 0:
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(RunDir, "save_iteration", killed_after_first)
    exp = load_experiment(exp_file)
    with pytest.raises(KeyboardInterrupt):
        run_search(exp, runs=root / "runs", name="killed", progress=False)
    monkeypatch.setattr(RunDir, "save_iteration", real)
    assert len(RunDir(root / "runs" / "killed").history()) == 1
    resumed = run_search(exp, resume=root / "runs" / "killed", progress=False)
    assert resumed.arch == uninterrupted.arch
    a = RunDir(uninterrupted.run_dir).history()
    b = RunDir(resumed.run_dir).history()
    assert [h["applied"] for h in a] == [h["applied"] for h in b]
    assert [h["clip"] for h in a] == pytest.approx([h["clip"] for h in b], abs=1e-4)


def test_bad_input_is_refused_and_nothing_is_overwritten(env, uninterrupted):
    root, exp_file = env
    run = uninterrupted.run_dir
    before = (run / "history.jsonl").read_text()
    with pytest.raises(UserError, match="exists; resume it with --resume"):
        run_search(load_experiment(exp_file), runs=root / "runs", progress=False)
    other = load_experiment(exp_file, **{"target.ratio": 0.9})
    with pytest.raises(UserError, match="holds another experiment"):
        run_search(other, resume=run, progress=False)
    assert (run / "history.jsonl").read_text() == before
    too_far = load_experiment(exp_file, **{"target.ratio": 0.01})
    with pytest.raises(UserError, match="smallest reachable latency is about"):
        run_search(too_far, runs=root / "runs", name="too-far", progress=False)
    unknown = load_experiment(exp_file, **{"latency.device": "nowhere"})
    unknown.latency.build = False
    with pytest.raises(UserError, match="diffnas latency build"):
        run_search(unknown, runs=root / "runs", name="unknown", progress=False)


def test_world_config_names_another_tiny_world(env, uninterrupted):
    root, exp_file = env
    config = {**asdict(TinyWorldConfig.miniature()), "unet_steps": 3}
    (root / "world.json").write_text(json.dumps(config))
    world_file = str(root / "world.json")
    exp = load_experiment(exp_file, **{"world.miniature": False, "world.world_config": world_file})
    world = open_world(exp, load_space("tiny"), progress=False)
    assert world.config == TinyWorldConfig(**config)

    both = {**EXPERIMENT, "world": {"kind": "tiny", "miniature": True, "world_config": "w.json"}}
    with pytest.raises(ValidationError, match="give miniature or world_config, not both"):
        Experiment.model_validate(both)
    sd = {"kind": "stable_diffusion", "pipeline": "p", "captions": "c", "clip_weights": "w"}
    with pytest.raises(ValidationError, match="world_config: only for kind tiny"):
        Experiment.model_validate({**EXPERIMENT, "world": {**sd, "world_config": "w.json"}})
