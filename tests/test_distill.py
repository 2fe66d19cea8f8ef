"""Distillation and export of a found network, on a miniature search (nas/deploy/distill.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from nas.cli import main
from nas.deploy.distill import DISTILLED_DIR, distill, load_distilled
from nas.deploy.standalone import to_standalone
from nas.distill_config import DistillConfig
from nas.experiment import load_experiment
from nas.search.run import run_search
from nas.supernet import ElasticUNet
from nas.training.distillation import Distillation, feature_points, matched_points
from search_spaces import Architecture, UserError, load_space

SECTIONS = {
    "search": {"max_iterations": 1, "train_steps": 1, "batch_size": 4},
    "evaluation": {"prompts": 2, "steps": 2, "batch_size": 40},
    # 68 held-out prompts (the world has 70, the search scores 2), one noise each, 2 steps
    "distill": {
        "steps": 3,
        "batch_size": 4,
        "checkpoint_every": 2,
        "held_out_seeds": 1,
        "held_out_steps": 2,
    },
}
DISTILL = SECTIONS["distill"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, experiment_env, mini_experiment):
    experiment = mini_experiment(**SECTIONS)
    with experiment_env(tmp_path_factory, "distill", experiment) as (root, exp_file):
        result = run_search(load_experiment(exp_file), runs=root / "runs", progress=False)
        distill(result.run_dir, progress=False)
        yield result.run_dir


def cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err


def test_distilled_folder_and_metrics(run):
    folder = run / DISTILLED_DIR
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["losses"]) == 3
    assert set(metrics["terms"]) == {"task", "output_kd", "feature_kd"}
    for values in metrics["terms"].values():
        assert len(values) == 3 and all(v > 0 for v in values)
    # the total is the weighted sum of the terms (the default weights)
    c = DistillConfig()
    weights = {"task": c.task_weight, "output_kd": c.output_weight, "feature_kd": c.feature_weight}
    total = [sum(weights[k] * v[i] for k, v in metrics["terms"].items()) for i in range(3)]
    assert metrics["losses"] == pytest.approx(total, rel=1e-5)
    clip = metrics["clip"]
    assert set(clip) == {"before", "after", "teacher"}
    for scores in clip.values():
        assert set(scores) == {"search", "held_out"}
    # before training the student is the found network, the default teacher the original: on
    # the search's protocol they score what the search reported (same prompts, same noises)
    result = json.loads((run / "result.json").read_text())
    assert clip["before"]["search"] == pytest.approx(result["clip"], abs=1e-3)
    assert clip["teacher"]["search"] == pytest.approx(result["original_clip"], abs=1e-3)
    assert metrics["params"]["student"] == result["params"]["found"]
    assert (folder / "grid_distilled.png").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["protocols"]["held_out"]["prompts"] == 68
    # each image's score too, whose means are the scores above
    images = metrics["clip_images"]
    assert len(images["after"]["held_out"]) == 68 and len(images["teacher"]["search"]) == 2
    for key in ("before", "after", "teacher"):
        for name, scores in images[key].items():
            assert sum(scores) / len(scores) == pytest.approx(clip[key][name], abs=1e-6)


def test_student_has_its_own_trained_weights(run):
    net, space, arch = load_distilled(run)
    found = to_standalone(ElasticUNet.from_pretrained(run / "final"), arch)
    theirs = found.state_dict()
    assert net.state_dict().keys() == theirs.keys()
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, theirs[k])]
    assert changed, "training changed no weight"
    assert sum(p.numel() for p in net.parameters()) == space.params(arch)


def test_resume_continues_to_more_steps_as_an_uninterrupted_run(run, tmp_path):
    first = json.loads((run / DISTILLED_DIR / "metrics.json").read_text())
    longer = distill(run, DistillConfig(**{**DISTILL, "steps": 5}), resume=True)
    assert longer["losses"][:3] == pytest.approx(first["losses"], rel=1e-6)
    # a teacher folder holding the same weights as the run's full network: the same run again
    teacher = tmp_path / "teacher"
    ElasticUNet.from_pretrained(run / "final").unet.save_pretrained(teacher)
    config = DistillConfig(**{**DISTILL, "steps": 5})
    again = distill(run, config, teacher=teacher, force=True, progress=False)
    assert again["losses"] == pytest.approx(longer["losses"], rel=1e-4)
    assert again["clip"]["teacher"] == pytest.approx(longer["clip"]["teacher"], abs=1e-3)


def test_two_ray_workers_resumed_from_a_ray_checkpoint_match_one_process(run, tmp_path):
    """`distill(workers=2)`: DDP on a local two-CPU Ray instance, each worker with half of
    every batch and its own frozen copy of the teacher; stopped after two steps and resumed
    from Ray Train's checkpoint, it trains as one process with the whole batch does (losses and
    each term to float32 reduction order; weights to 1e-3 of the training update, as
    tests/test_train_ray.py explains)."""
    import ray

    config = DistillConfig(**DISTILL)  # 3 steps of 4 samples, a checkpoint every 2
    one = distill(run, config, folder=tmp_path / "one", progress=False)
    two_dir = tmp_path / "two"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    try:
        first = distill(run, config.with_overrides(steps=2), folder=two_dir, workers=2)
        two = distill(run, config, folder=two_dir, workers=2, resume=True)
    finally:
        ray.shutdown()
    assert (two_dir / "train" / "checkpoint_00000002").is_dir()  # continued, not retrained
    assert two["losses"][:2] == first["losses"] and len(two["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=0)
    for name, values in one["terms"].items():  # each term of the whole batch, not a shard's
        assert two["terms"][name] == pytest.approx(values, rel=1e-5, abs=0)
    arch = Architecture.load(run / "final.arch.json")
    start = _flat(to_standalone(ElasticUNet.from_pretrained(run / "final"), arch))
    trained = [_flat(load_distilled_folder(tmp_path / name)) for name in ("one", "two")]
    assert float((trained[1] - trained[0]).norm() / (trained[0] - start).norm()) < 1e-3
    saved = json.loads((two_dir / "config.json").read_text())
    assert saved["workers"] == 2
    # a distillation trained in one process is resumed in one process only
    with pytest.raises(UserError, match="trained in one process"):
        longer = config.with_overrides(steps=4)
        distill(run, longer, folder=tmp_path / "one", workers=2, resume=True)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def load_distilled_folder(folder: Path) -> torch.nn.Module:
    from nas.searched_unet import SearchedUNet2DConditionModel

    return SearchedUNet2DConditionModel.from_pretrained(folder / "unet")


def test_ablation_task_only_does_not_run_the_teacher(run):
    config = DistillConfig(**{**DISTILL, "steps": 1})
    config = config.with_overrides(output_weight=0.0, feature_weight=0.0)
    metrics = distill(run, config, force=True, progress=False)
    assert metrics["terms"]["output_kd"] == [0.0] and metrics["terms"]["feature_kd"] == [0.0]
    assert metrics["losses"] == pytest.approx(metrics["terms"]["task"])


# -- the feature term ---------------------------------------------------------------------------

# the tiny space's down block 2 and mid block lose every ResNet and attention; down block 0
# loses its attention only
EMPTIED = {
    "down_blocks.0.attentions.0": 0,
    "down_blocks.2.resnets.0": 0,
    "mid_block.resnets.0": 0,
    "mid_block.attentions.0": 0,
    "mid_block.resnets.1": 0,
}


def _student_and_teacher():
    space = load_space("tiny")
    torch.manual_seed(0)
    supernet = ElasticUNet(space).eval()
    arch = Architecture(space.name, {**space.original().multiplicity, **EMPTIED})
    return space, supernet, arch, to_standalone(supernet, arch)


def test_feature_kd_leaves_out_the_blocks_the_student_computes_nothing_in():
    space, supernet, arch, student = _student_and_teacher()
    everything = list(feature_points(student))
    assert everything == [
        *(f"down_blocks.{i}" for i in range(3)),
        "mid_block",
        *(f"up_blocks.{i}" for i in range(3)),
    ]
    left_out = {"down_blocks.2", "mid_block"}
    assert matched_points(student) == [p for p in everything if p not in left_out]
    supernet.set_architecture(arch)  # an ElasticUNet running the same architecture agrees
    assert matched_points(supernet) == matched_points(student)
    supernet.set_architecture(space.original())
    assert matched_points(supernet) == everything  # the teacher: nothing removed
    objective = Distillation(student, supernet, DistillConfig())
    assert objective.points == matched_points(student)


def test_relative_feature_loss_is_scale_free_and_mse_is_bksdms_sum():
    _, supernet, _, student = _student_and_teacher()
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    t = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    relative = Distillation(student, supernet, DistillConfig(feature_loss="relative"))

    def relative_error(a, b):  # per sample, then the mean over the samples
        return (((a - b) ** 2).mean(dim=(1, 2, 3)) / (b**2).mean(dim=(1, 2, 3))).mean()

    expected = sum(relative_error(a, b) for a, b in zip(s, t, strict=True)) / 3
    assert relative.feature_kd(s, t) == pytest.approx(float(expected), rel=1e-5)
    scaled = relative.feature_kd([21 * a for a in s], [21 * b for b in t])
    assert scaled == pytest.approx(float(expected), rel=1e-5)  # a block's scale does not count
    mse = Distillation(student, supernet, DistillConfig(feature_loss="mse"))
    plain = sum(float(((a - b) ** 2).mean()) for a, b in zip(s, t, strict=True))
    assert mse.feature_kd(s, t) == pytest.approx(plain, rel=1e-5)
    assert relative.feature_kd([], []) is None  # no block left to match: no term


# -- export ------------------------------------------------------------------------------------


def test_export_diffusers_found_and_distilled(run, capsys):
    # the ablation above left a distillation of one step
    for extra, name in (([], "found"), (["--distilled"], "distilled")):
        code, err = cli(["export", str(run), *extra], capsys)
        assert code in (0, None), err
        folder = run / "export" / f"{name}-diffusers"
        info = json.loads((folder / "export.json").read_text())
        assert info["network"] == name and "config.json" in {p.name for p in folder.iterdir()}
    distilled, _, _ = load_distilled(run)
    from nas.searched_unet import SearchedUNet2DConditionModel

    exported_cls = (
        UNet2DConditionModel
        if info["form"] == "UNet2DConditionModel"
        else SearchedUNet2DConditionModel
    )
    again = exported_cls.from_pretrained(run / "export" / "distilled-diffusers")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 12, 16, 16, generator=g), torch.randn(2, 16, 128, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            again(x, torch.tensor([3, 900]), ctx).sample,
            distilled(x, torch.tensor([3, 900]), ctx).sample,
            atol=1e-5,
            rtol=0,
        )
    # an export never replaces a folder silently
    code, err = cli(["export", str(run)], capsys)
    assert code == 2 and "--force" in err


# -- bad input: one clear error each, exit 2, nothing in the run directory lost ---------------


def _listing(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def test_bad_input(run, tmp_path, capsys):
    before = _listing(run)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "experiment.yaml").write_text("name: x\n")
    cases = [
        (["distill", str(unfinished)], "no finished search"),
        (["distill", str(run), "--steps", "0"], "distill.steps"),
        (["distill", str(run), "--workers", "0"], "give at least 1 worker"),
        (["distill", str(run)], "--resume"),  # distilled/ exists
        (["distill", str(run), "--resume", "--force"], "not both"),
        (["export", str(unfinished)], "no finished search"),
        (["export", str(run), "--format", "onnx"], "diffusers, coreml"),
    ]
    bad_teacher = tmp_path / "teacher"
    config = {**dict(ElasticUNet.from_pretrained(run / "final").space.unet_config)}
    config["block_out_channels"] = [32, 32, 64]
    UNet2DConditionModel.from_config(config).save_pretrained(bad_teacher)
    cases.append((["distill", str(run), "--teacher", str(bad_teacher), "--force"], "does not fit"))
    for args, needle in cases:
        code, err = cli(args, capsys)
        assert code == 2, (args, err)
        assert needle in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) <= 2, err
    assert _listing(run) == before  # nothing written, nothing lost
    assert not (unfinished / DISTILLED_DIR).exists()


def test_export_format_not_installed(run, capsys, monkeypatch):
    import nas.deploy.export as export_cmd

    real = export_cmd.importlib.util.find_spec
    monkeypatch.setattr(
        export_cmd.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "coremltools" else real(name, *a),
    )
    code, err = cli(["export", str(run), "--format", "coreml"], capsys)
    assert code == 2 and "coremltools, which is not installed" in err
    assert not (run / "export" / "found-coreml").exists()

    import importlib.metadata

    import latency.executorch as et

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(et.importlib.metadata, "version", missing)
    code, err = cli(["export", str(run), "--format", "executorch"], capsys)
    assert code == 2 and "ExecuTorch is not installed" in err
    assert not (run / "export" / "found-executorch").exists()


def test_export_executorch_runs_as_the_network(run, capsys):
    pytest.importorskip("executorch")
    import latency.executorch as et
    from nas.deploy.export import network_inputs

    code, err = cli(["export", str(run), "--format", "executorch"], capsys)
    assert code in (0, None), err
    path = run / "export" / "found-executorch" / "unet.pte"
    supernet = ElasticUNet.from_pretrained(run / "final")
    net = to_standalone(supernet, Architecture.load(run / "final.arch.json"))
    inputs = network_inputs(supernet.space)
    with torch.no_grad():
        expected = net(*inputs, return_dict=False)[0]
    got = et.load(path).forward(list(inputs))[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_architecture_of_the_run_is_the_students(run):
    arch = Architecture.load(run / "final.arch.json")
    net, _, saved = load_distilled(run)
    assert saved == arch and net.multiplicity == dict(arch.multiplicity)


def test_report_shows_the_distilled_network(run):
    from PIL import Image

    from nas.search.report import write_report

    page = write_report(run).read_text()
    assert "<th>distilled</th>" in page and "CLIP, held-out prompts" in page
    assert "<img src=comparison.png>" in page
    image = Image.open(run / "comparison.png")
    # 2 prompts (the protocol's), 3 networks of 32x32 images at 4x, beside the prompt text
    assert image.height >= 2 * 128 and image.width >= 3 * 128 + 300
