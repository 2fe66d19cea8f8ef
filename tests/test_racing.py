"""Racing (nas.search.racing): same values as plain evaluation where it scores every image; fewer
images spent, all of them on the actions near the cut."""

import pytest
import torch

from latency.backends import get_backend
from latency.predict import Predictor
from latency.profile import build_table
from latency.table import LatencyTable
from nas.experiment import Experiment
from nas.search.evaluate import Evaluator, Protocol
from nas.search.evolve import RunDir
from nas.search.racing import race
from nas.search.run import run_search
from nas.worlds.tiny import TinyWorldConfig, load_tiny_world
from search_spaces import UserError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("racing")
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFNAS_CACHE", str(root / "cache"))
    world = load_tiny_world(TinyWorldConfig.miniature(), progress=False)
    space = world.space
    table = LatencyTable(root / "t.db")
    # measured once per block: values need latencies, not precise ones
    build_table(space, table, get_backend("torch", repeats=1, warmup=0), "cpu-test", progress=False)
    predictor = Predictor(space, table, "cpu-test")
    prompts = world.val_prompts[:8]
    evaluator = Evaluator(
        world.supernet,
        world.clip,
        Protocol(prompts, steps=2, batch_size=4),
        world.encode_text,
        world.uncond(),
        world.decode,
    )
    yield world, evaluator, predictor
    table.close()
    mp.undo()


def test_sliced_scores_equal_the_whole(setup):
    world, evaluator, _ = setup
    arch = world.space.original()
    whole = evaluator.scores(arch)
    parts = torch.cat([evaluator.scores(arch, 0, 3), evaluator.scores(arch, 3, 8)])
    torch.testing.assert_close(parts, whole)


def test_racing_everything_at_once_is_plain_evaluation(setup):
    world, evaluator, predictor = setup
    arch = world.space.original()
    plain = evaluator.evaluate(arch, predictor)
    raced = race(evaluator, arch, predictor, keep=2, first=len(evaluator.prompts))
    assert [v.action for v in raced.values] == [v.action for v in plain]
    for a, b in zip(raced.values, plain, strict=True):
        assert a.delta_clip == pytest.approx(b.delta_clip, abs=1e-4)
        assert a.delta_ms == pytest.approx(b.delta_ms)
    assert raced.cost == raced.full_cost


def test_racing_spends_images_near_the_cut(setup):
    world, evaluator, predictor = setup
    arch = world.space.original()
    raced = race(evaluator, arch, predictor, keep=1, first=2, growth=2)
    n = len(evaluator.prompts)
    assert raced.cost < raced.full_cost
    full = [a for a, k in raced.images.items() if k == n]
    assert 1 <= len(full) <= 2  # only the 2 * keep survivors reach every image
    assert all(k >= 2 for k in raced.images.values())
    # a survivor's value is the plain protocol's value of that action
    plain = {v.action: v for v in evaluator.evaluate(arch, predictor)}
    by_action = {v.action: v for v in raced.values}
    for action in full:
        assert by_action[action].delta_clip == pytest.approx(plain[action].delta_clip, abs=1e-4)


def test_a_search_with_racing_records_the_images_of_each_action(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path / "cache"))
    exp = Experiment.model_validate(
        {
            "name": "raced",
            "space": "tiny",
            "world": {"kind": "tiny", "miniature": True},
            "latency": {"device": "cpu-test", "repeats": 1, "db": str(tmp_path / "t.db")},
            "target": {"ratio": 0.8},
            "search": {"max_iterations": 1, "train_steps": 0, "group_size": 1},
            "evaluation": {"prompts": 8, "steps": 2, "batch_size": 4, "racing": 2},
        }
    )
    run_search(exp, runs=tmp_path / "runs", progress=False)
    (record,) = RunDir(tmp_path / "runs" / "raced").history()
    images = record["images"]
    assert set(images) == {a["action"] for a in record["actions"]}
    assert sorted(images.values())[0] == 2 and max(images.values()) == 8
    assert sum(k == 8 for k in images.values()) == 2  # 2 * group_size raced to the end


def test_racing_on_ray_workers_is_refused_before_anything_starts(tmp_path):
    exp = Experiment.model_validate(
        {
            "name": "r",
            "space": "tiny",
            "target": {"ratio": 0.5},
            "evaluation": {"racing": 2},
            "ray": {"workers": 2},
        }
    )
    with pytest.raises(UserError, match="evaluation.racing scores actions in this process"):
        run_search(exp, runs=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()
