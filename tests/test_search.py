"""The search end to end on a miniature tiny world: run directory, resume, report, errors."""

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from pydantic import ValidationError

from nas.experiment import Experiment, load_experiment
from nas.search.evolve import RunDir
from nas.search.run import held_out_prompts, open_world, run_search, search_prompts
from nas.worlds import shapes
from nas.worlds.tiny import TinyWorldConfig
from search_spaces import Architecture, UserError, load_space

FIDELITY = Path(__file__).parents[1] / "experiments" / "benchmarks" / "search_fidelity.py"
SECTIONS = {
    "search": {"max_iterations": 2, "train_steps": 1, "batch_size": 4, "group_size": 2},
    "evaluation": {"prompts": 2, "steps": 2, "batch_size": 4},
}


@pytest.fixture(scope="module")
def experiment(mini_experiment) -> dict:
    return mini_experiment(**SECTIONS)


@pytest.fixture(scope="module")
def env(tmp_path_factory, experiment_env, experiment):
    with experiment_env(tmp_path_factory, "search", experiment) as (root, exp_file):
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
    # the first removal is the lowest-value one, unless a removal meets the target by itself
    by_value = sorted(first["actions"], key=lambda a: a["value"])
    if first["rules"][0] == "lowest value":
        assert first["applied"][0] == f"remove {by_value[0]['slot']}"
    else:
        assert first["rules"] == ["meets the target, least CLIP loss"]
        assert first["latency_after_ms"] <= first["target_ms"]
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


def test_world_config_names_another_tiny_world(env, uninterrupted, experiment):
    root, exp_file = env
    config = {**asdict(TinyWorldConfig.miniature()), "unet_steps": 3}
    (root / "world.json").write_text(json.dumps(config))
    world_file = str(root / "world.json")
    exp = load_experiment(exp_file, **{"world.miniature": False, "world.world_config": world_file})
    world = open_world(exp, load_space("tiny"), progress=False)
    assert world.config == TinyWorldConfig(**config)

    both = {**experiment, "world": {"kind": "tiny", "miniature": True, "world_config": "w.json"}}
    with pytest.raises(ValidationError, match="give miniature or world_config, not both"):
        Experiment.model_validate(both)
    sd = {"kind": "stable_diffusion", "pipeline": "p", "captions": "c", "clip_weights": "w"}
    with pytest.raises(ValidationError, match="world_config: only for kind tiny"):
        Experiment.model_validate({**experiment, "world": {**sd, "world_config": "w.json"}})


def test_too_many_evaluation_prompts_are_refused(env, uninterrupted):
    root, exp_file = env
    exp = load_experiment(exp_file, **{"evaluation.prompts": 71})  # the tiny world has 70
    with pytest.raises(UserError, match="has only 70 validation prompts; lower evaluation"):
        run_search(exp, runs=root / "runs", name="too-many", progress=False)
    assert not (root / "runs" / "too-many" / "history.jsonl").exists()


def test_held_out_prompts_share_no_scene_with_the_search_nor_training(env, uninterrupted):
    _, exp_file = env
    exp = load_experiment(exp_file, **{"evaluation.prompts": 32})
    world = open_world(exp, load_space("tiny"), progress=False)
    searched = {shapes.caption_key(p) for p in search_prompts(exp, world)}
    held = held_out_prompts(exp, world)
    assert len(searched) == 32 and len(held) == 70 - 32
    held_keys = {shapes.caption_key(p) for p in held}
    trained = {shapes.caption_key(p) for p in world.train_prompts}
    assert not held_keys & searched and not held_keys & trained
    assert held_out_prompts(exp, world, 10) == held[:10]
    with pytest.raises(UserError, match="at most 38 are held out"):
        held_out_prompts(exp, world, 39)


def test_search_fidelity_judges_on_both_weights(env, uninterrupted):
    _, exp_file = env
    spec = importlib.util.spec_from_file_location("search_fidelity", FIDELITY)
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(FIDELITY.parent))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(FIDELITY.parent))
    args = bench.parse_args(["--random", "2", "--prompts", "4", "--seeds", "1", "--steps", "2"])
    judged = bench.judge(load_experiment(exp_file), uninterrupted.run_dir, args)
    assert judged["protocol"]["prompts"] == 4 and judged["protocol"]["search_prompts"] == 2
    for weights in ("final", "world"):
        r = judged[weights]
        assert len(r["random_clips"]) == 2
        assert r["found_vs_full"] == pytest.approx(r["found_clip"] / r["full_clip"])
    # the run's final weights were fine-tuned by the search: they score differently
    assert judged["final"]["full_clip"] != judged["world"]["full_clip"]
