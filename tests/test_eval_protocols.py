"""Evaluation protocol options (nas.search.evaluate, docs/evaluation-cost.md): the samplers, the
one-call x0 metrics, racing over them, the compute each records, and the experiment file's
checks of them (one error when the file is read, exit 2, before anything is built)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from latency.backends import get_backend
from latency.predict import Predictor
from latency.profile import build_table
from latency.table import LatencyTable
from nas.cli import main
from nas.experiment import Experiment, load_experiment
from nas.search.evaluate import Cost, Evaluator, Protocol
from nas.search.evolve import RunDir
from nas.search.plan import Timing, iteration_cost
from nas.search.proxy import DenoisingProxy, action_scorer
from nas.search.racing import race, raced_images
from nas.search.run import run_search
from nas.worlds.generate import generate, initial_noise
from nas.worlds.tiny import TinyWorldConfig, load_tiny_world
from search_spaces import UserError

BASE = {
    "name": "mini",
    "space": "tiny",
    "world": {"kind": "tiny", "miniature": True},
    "latency": {"device": "cpu-test", "repeats": 1},
    "target": {"ratio": 0.8},
    "search": {"max_iterations": 2, "train_steps": 1, "batch_size": 4, "group_size": 1},
    "evaluation": {"prompts": 4, "steps": 2, "batch_size": 4},
}


def write(tmp_path, **evaluation):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**BASE, "evaluation": {**BASE["evaluation"], **evaluation}}))
    return path


@pytest.mark.parametrize(
    "evaluation, expected",
    [
        ({"samplr": "ddim"}, "evaluation.samplr: unknown option; the options here are: prompts"),
        ({"sampler": "euler"}, "evaluation.sampler: Input should be 'ddim' or 'dpm_solver'"),
        ({"metric": "fid"}, "evaluation.metric: Input should be 'sample_clip'"),
        ({"sampler": "dpm_solver", "steps": 1}, "dpm_solver (DPM-Solver++ 2M"),
        ({"steps": 1001}, "steps=1001: more than the 1000 timesteps of the training schedule"),
        ({"metric": "x0_clip", "timesteps": [500, 1000]}, "timesteps [1000]: outside"),
        ({"metric": "x0_distance", "timesteps": [-1]}, "timesteps [-1]: outside"),
        ({"metric": "x0_clip", "timesteps": []}, "give at least one"),
        ({"timesteps": [500]}, "timesteps are for metric x0_clip or x0_distance"),
        ({"racing": 5}, "racing=5: more than the 4 images an action is scored on"),
    ],
)
def test_bad_protocol_is_one_error_when_the_file_is_read(tmp_path, evaluation, expected):
    path = write(tmp_path, **evaluation)
    with pytest.raises(UserError) as e:
        load_experiment(path)
    message = str(e.value)
    assert expected in message and message.count("\n") == 0
    assert message.startswith(f"{path}: evaluation")


def test_bad_protocol_exits_2_before_anything_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, sampler="dpm_solver", steps=1)
    for argv in (["search", str(path), "--runs", str(tmp_path / "runs")], ["plan", str(path)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "use sampler ddim" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_racing_up_to_every_image_is_accepted(tmp_path):
    assert load_experiment(write(tmp_path, racing=4, seeds=1)).evaluation.racing == 4
    assert load_experiment(write(tmp_path, racing=8, seeds=2)).evaluation.racing == 8


def test_new_options_at_their_defaults_keep_the_experiment_hash():
    plain = Experiment.model_validate(BASE)
    explicit = Experiment.model_validate(
        {**BASE, "evaluation": {**BASE["evaluation"], "sampler": "ddim", "metric": "sample_clip"}}
    )
    assert plain.content_hash() == explicit.content_hash()
    other = Experiment.model_validate(
        {**BASE, "evaluation": {**BASE["evaluation"], "sampler": "dpm_solver"}}
    )
    assert other.content_hash() != plain.content_hash()


# -- in a miniature world ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFNAS_CACHE", str(root / "cache"))
    world = load_tiny_world(TinyWorldConfig.miniature(), progress=False)
    table = LatencyTable(root / "t.db")
    build_table(
        world.space, table, get_backend("torch", repeats=1, warmup=0), "cpu-test", progress=False
    )
    yield world, Predictor(world.space, table, "cpu-test")
    table.close()
    mp.undo()


def evaluator(world, **kw) -> Evaluator:
    protocol = Protocol(world.val_prompts[:6], steps=3, batch_size=4, **kw)
    return Evaluator(
        world.supernet, world.clip, protocol, world.encode_text, world.uncond(), world.decode
    )


class CountCalls:
    """UNet forward passes of one latent, counted where they happen."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, out):
        self.n += args[0].shape[0]

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


@pytest.mark.parametrize(
    "sampler, metric",
    [
        ("ddim", "sample_clip"),
        ("dpm_solver", "sample_clip"),
        ("ddim", "x0_clip"),
        ("dpm_solver", "x0_distance"),
    ],
)
def test_recorded_compute_is_what_runs(world, sampler, metric):
    world, _ = world
    ev = evaluator(world, sampler=sampler, metric=metric)
    scorer = action_scorer(ev)
    assert isinstance(scorer, DenoisingProxy) == (metric != "sample_clip")
    arch = world.space.original()
    after = arch.apply(next(a for a in world.space.actions(arch) if a.kind == "remove"))
    count = CountCalls(world.supernet)
    try:
        scorer.prepare(arch)
        base = scorer.scores(arch)
        assert count.take() == ev.protocol.reference_cost(6).unet_calls
        whole = scorer.scores(after)
        assert count.take() == ev.protocol.score_cost(6).unet_calls
        part = scorer.scores(after, 2, 5)  # racing scores slices: the same per-image scores
        assert count.take() == ev.protocol.score_cost(3).unet_calls
    finally:
        count.handle.remove()
    torch.testing.assert_close(part, whole[2:5], atol=1e-4, rtol=0)
    assert base.shape == whole.shape == (6,) and torch.isfinite(whole).all()
    if metric == "x0_distance":  # the current network is at distance 0 from itself
        assert torch.equal(base, torch.zeros(6)) and (whole <= 0).all() and whole.sum() < 0
    if metric == "x0_clip":
        assert ev.protocol.score_cost(6).images == 6 * 3  # every prediction decoded and scored


def test_dpm_solver_samples_from_the_same_noises(world):
    world, _ = world
    net = world.supernet
    noise = initial_noise(world.space, 3, seed=0)
    context, uncond = world.encode_text(world.val_prompts[:3]), world.uncond()
    a = generate(net, context, uncond, noise, 4, 3.0, sampler="dpm_solver")
    b = generate(net, context, uncond, noise, 4, 3.0, sampler="dpm_solver")
    ddim = generate(net, context, uncond, noise, 4, 3.0)
    assert torch.equal(a, b) and torch.isfinite(a).all() and not torch.equal(a, ddim)
    with pytest.raises(UserError, match="eta is DDIM's"):
        generate(net, context, uncond, noise, 4, 3.0, sampler="dpm_solver", eta=0.5)


@pytest.mark.parametrize("metric", ["sample_clip", "x0_distance"])
def test_racing_combines_with_any_metric(world, metric):
    world, predictor = world
    scorer = action_scorer(evaluator(world, sampler="dpm_solver", metric=metric))
    arch = world.space.original()
    scorer.prepare(arch)
    plain = scorer.evaluate(arch, predictor)
    everything = race(scorer, arch, predictor, keep=1, first=6)
    for a, b in zip(everything.values, plain, strict=True):
        assert a.action == b.action and a.delta_clip == pytest.approx(b.delta_clip, abs=1e-5)
        assert (a.unet_calls, a.images) == (b.unet_calls, b.images)
    raced = race(scorer, arch, predictor, keep=1, first=2, growth=2)
    n_actions = len(plain)
    assert raced.cost - 6 == raced_images(n_actions, 6, keep=1, first=2)  # known beforehand
    assert (
        sum(v.unet_calls for v in raced.values)
        == scorer.protocol.score_cost(raced_images(n_actions, 6, keep=1, first=2)).unet_calls
    )


def test_a_search_records_its_compute(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, sampler="dpm_solver", metric="x0_distance", racing=2, timesteps=[600])
    data = yaml.safe_load(path.read_text())
    data["latency"]["db"] = str(tmp_path / "lat.db")
    path.write_text(yaml.safe_dump(data))
    exp = load_experiment(path)
    result = run_search(exp, runs=tmp_path / "runs", progress=False)
    history = RunDir(result.run_dir).history()
    protocol = Protocol(
        ["p"] * 4, steps=2, sampler="dpm_solver", metric="x0_distance", timesteps=(600,)
    )
    for h in history:
        assert h["metric"] == "x0_distance" and h["score"] == 0.0 and h["clip"] > 0
        n = len(h["actions"])
        expected = protocol.reference_cost(4) + protocol.score_cost(raced_images(n, 4, 1, 2))
        assert (h["compute"]["unet_calls"], h["compute"]["images"]) == (
            expected.unet_calls,
            expected.images,
        )
        # what `diffnas plan` projects for an iteration of that many actions
        assert iteration_cost(protocol, n, racing=2, keep=1) == expected
    summary = json.loads((result.run_dir / "result.json").read_text())["evaluation_compute"]
    assert summary["unet_calls"] == sum(h["compute"]["unet_calls"] for h in history)
    assert summary["iterations"] == len(history)
    assert "evaluation compute" in (result.run_dir / "report.html").read_text()


def test_plan_prints_actions_iterations_and_compute(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, metric="x0_clip", racing=2)
    out = tmp_path / "plan.json"
    for extra in (["--json", str(out)], ["--seconds-per-call", "0.01"]):
        with pytest.raises(SystemExit) as e:
            main(["plan", str(path), "--db", str(tmp_path / "lat.db"), *extra])
        assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "iterations to the target" in printed and "typical" in printed
    assert "device-hours" in printed
    plan = json.loads(out.read_text())
    protocol = Protocol(["p"] * 4, steps=2, metric="x0_clip")
    for path_plan in plan["paths"].values():
        assert path_plan["iterations"] == len(path_plan["actions"]) >= 1
        expected = sum(
            (iteration_cost(protocol, a, 2, 1) for a in path_plan["actions"]), start=Cost()
        )
        assert (path_plan["unet_calls"], path_plan["images"]) == (
            expected.unet_calls,
            expected.images,
        )
    fewest, most = plan["paths"]["fewest"], plan["paths"]["most"]
    assert fewest["iterations"] <= plan["paths"]["typical"]["iterations"] <= most["iterations"]
    assert plan["per_action"] == {"unet_calls": 4 * 3 * 2, "images": 4 * 3}


def test_timing_from_the_action_benchmark():
    results = Path(__file__).parents[1] / "experiments" / "benchmarks" / "results"
    t = Timing.from_action_benchmark(results / "sd15_action_cuda.json", "fp16")
    data = json.loads((results / "sd15_action_cuda.json").read_text())["results"]["fp16"]
    # a guided DDIM step of 16 images is 32 calls; an image is 50 steps, decoding and CLIP
    assert t.per_call_s == pytest.approx(data["ms_per_unet_step_in_ddim"] / 1000 / 32)
    per_image = 50 * 2 * t.per_call_s + t.per_image_s
    assert per_image == pytest.approx(data["seconds_per_image"], rel=0.05)
    with pytest.raises(UserError, match="not an sd15_action.py result"):
        Timing.from_action_benchmark(results / "search_fidelity.json")
