"""Data-parallel robust training on Ray Train (nas.training.ray): two CPU workers on loopback.

What makes two workers equal one process with the combined batch: every worker draws the same
data order, noise, timesteps, CFG drops and skips and trains on its half of the batch; DDP
averages the two half-batch mean gradients, which is the whole batch's mean gradient. The
per-sample parts of the network (GroupNorm, attention) do not see the split, so what differs
is the order of float reductions: losses agree to a few float32 ulps (rtol 1e-5). Adam turns
a near-zero gradient's rounding into a full-size step of either sign, so weights are compared
by the norm of their difference relative to the norm of the training update (1e-3).
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from nas.cli import main
from nas.supernet import ElasticUNet, SkipConfig
from nas.training.ray import latest_checkpoint, train_ray
from nas.training.robust import TrainConfig
from search_spaces import UserError, load_space

LATENT = (12, 16, 16)
CONTEXT = (16, 128)
# four steps of four samples, two per worker; a checkpoint after two steps to resume from
CONFIG = TrainConfig(steps=4, batch_size=4, lr=1e-3, checkpoint_every=2, ema_decay=0.9)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module: two CPUs, loopback only, stopped at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(16, *LATENT, generator=g), torch.randn(16, *CONTEXT, generator=g)
    )


def make_model(space) -> ElasticUNet:
    torch.manual_seed(0)
    return ElasticUNet(space, skip=SkipConfig(p=0.3))


def cli(argv: list[str]) -> int:
    """Run `diffnas ARGV` in-process; its exit code."""
    try:
        main(argv)
    except SystemExit as e:
        return 0 if e.code is None else e.code
    return 0


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def relative_difference(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> float:
    """|a - b| relative to how far training moved a from its start."""
    return float((a - b).norm() / (a - start).norm())


def write_world_config(tmp_path) -> Path:
    """A miniature tiny world (builds in seconds) whose supernet skips ~5 of its 15 removable
    blocks a step and keeps an EMA: the parts of a step that data parallelism must not change."""
    from nas.worlds.tiny import TinyWorldConfig

    config = asdict(TinyWorldConfig.miniature()) | {"skip_p": 0.3, "ema_decay": 0.9}
    path = tmp_path / "world.json"
    path.write_text(json.dumps(config))
    return path


def world_supernet(world_config: Path) -> ElasticUNet:
    from nas.worlds.tiny import TinyWorldConfig, load_tiny_world

    return load_tiny_world(TinyWorldConfig.from_json(world_config), progress=False).supernet


def test_two_workers_resumed_from_a_ray_checkpoint_match_one_process(ray_local, tmp_path, capsys):
    world = write_world_config(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", "--world", "tiny", "--world-config", str(world), "--batch-size", "4"]
    args += ["--checkpoint-every", "2"]
    assert cli([*args, "--steps", "4", "--out", str(one)]) == 0  # one process, batch 4

    # two workers of two samples each, stopped after two steps, then resumed by a new driver
    assert cli([*args, "--steps", "2", "--workers", "2", "--out", str(two)]) == 0
    first = json.loads((two / "train.json").read_text())
    checkpoint = two / "train" / "checkpoint_00000002" / "state.pt"
    written = checkpoint.stat().st_mtime_ns
    assert cli([*args, "--steps", "4", "--workers", "2", "--out", str(two), "--resume"]) == 0
    assert "trained 4 steps (2 worker(s), batch 4)" in capsys.readouterr().out
    resumed = json.loads((two / "train.json").read_text())
    reference = json.loads((one / "train.json").read_text())

    # it continued from Ray Train's checkpoint of step 2 instead of training those steps again
    assert checkpoint.stat().st_mtime_ns == written
    assert latest_checkpoint(two / "train").name == "checkpoint_00000004"
    assert resumed["losses"][:2] == first["losses"]
    # the loss curve of one process with the combined batch, and the same skips in each step
    assert resumed["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=0)
    assert len(resumed["losses"]) == 4
    assert resumed["skipped"] == reference["skipped"] and sum(resumed["skipped"].values()) > 0
    assert resumed["workers"] == 2 and resumed["weights"] == "ema"

    # the same network: the trained weights (in the checkpoints) and the saved EMA supernets
    start = flat(world_supernet(world))
    trained_one = ElasticUNet.from_pretrained(one / "train" / "checkpoint" / "model")
    trained_two = ElasticUNet.from_pretrained(two / "train" / "checkpoint_00000004" / "model")
    assert relative_difference(flat(trained_two), flat(trained_one), start) < 1e-3
    ema_one, ema_two = ElasticUNet.from_pretrained(one), ElasticUNet.from_pretrained(two)
    assert relative_difference(flat(ema_two), flat(ema_one), start) < 1e-3
    assert torch.equal(flat(ElasticUNet.from_pretrained(two / "train" / "ema")), flat(ema_two))


def write_experiment(tmp_path, batch_size: int = 4):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: mini\nspace: tiny\nworld: {kind: tiny, miniature: true}\n"
        f"target: {{ratio: 0.5}}\nsearch: {{batch_size: {batch_size}, lr: 1.0e-3}}\nseed: 3\n"
    )
    return path


def test_cli_resumes_and_never_overwrites(tmp_path, capsys):
    experiment = write_experiment(tmp_path)
    out = tmp_path / "out"
    args = ["train", str(experiment), "--out", str(out), "--checkpoint-every", "1"]
    args += ["--lr-scheduler", "cosine", "--lr-warmup-steps", "1", "--snr-gamma", "5"]
    assert cli([*args, "--steps", "2"]) == 0
    first = json.loads((out / "train.json").read_text())
    schedule = {k: first["config"][k] for k in ("lr_scheduler", "lr_warmup_steps", "snr_gamma")}
    assert schedule == {"lr_scheduler": "cosine", "lr_warmup_steps": 1, "snr_gamma": 5.0}

    assert cli([*args, "--steps", "3"]) == 2  # the same --out again, without --resume
    assert "--resume" in capsys.readouterr().err
    assert json.loads((out / "train.json").read_text()) == first

    assert cli([*args, "--steps", "3", "--resume"]) == 0
    resumed = json.loads((out / "train.json").read_text())
    assert resumed["steps"] == 3 and resumed["losses"][:2] == first["losses"]

    # trained in one process: resumed the same way only
    assert cli([*args, "--steps", "4", "--resume", "--workers", "2"]) == 2
    assert "trained in one process" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "--workers 0: give at least 1"),
        (["--ray-address", f"127.0.0.1:{free_port()}"], "cannot reach a Ray cluster"),
        (["--ray-address", "headnode"], "HOST:PORT"),
        (["--gpus"] if not torch.cuda.is_available() else ["--workers", "99", "--gpus"], "GPU"),
        (["--steps", "0"], "--steps and --batch-size must be at least 1"),
        (["--lr-scheduler", "step"], "unknown lr_scheduler 'step'; use one of"),
        (["--snr-gamma", "0"], "snr_gamma=0.0 must be positive"),
        (["--lr-warmup-steps", "-1"], "lr_warmup_steps=-1 must not be negative"),
        ([], "give an experiment file or --world tiny"),
    ],
)
def test_cli_bad_flags_fail_before_anything_loads(flags, message, tmp_path, capsys):
    args = ["train", "--steps", "2", "--out", str(tmp_path / "out")]
    if flags:
        args = [*args, "--world", "tiny", *flags]
    assert cli(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_ray_bad_input(ray_local, space, data, tmp_path):
    model = make_model(space)
    with pytest.raises(UserError, match="split evenly over 3 workers"):
        train_ray(model, data, CONFIG, tmp_path / "a", workers=3)
    with pytest.raises(UserError, match="GPUs asked for: 2 worker"):
        train_ray(model, data, CONFIG, tmp_path / "b", workers=2, use_gpu=True)
    with pytest.raises(UserError, match="the Ray cluster has 2 CPU"):
        train_ray(model, data, replace(CONFIG, batch_size=6), tmp_path / "c", workers=3)
    with pytest.raises(UserError, match="holds no Ray Train checkpoint"):
        train_ray(model, data, CONFIG, tmp_path / "d", workers=2, resume=True)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="nothing stored is overwritten"):
        train_ray(model, data, CONFIG, tmp_path / "e", workers=2)
    assert (tmp_path / "e" / "notes.txt").read_text() == "keep me"
    # another cluster's address while this process is connected to one: refused, not ignored
    joined = ray_local.get_runtime_context().gcs_address
    with pytest.raises(UserError, match=f"already connected to the Ray cluster at {joined}"):
        train_ray(model, data, CONFIG, tmp_path / "f", workers=2, ray_address="127.0.0.1:1")
    assert not (tmp_path / "f").exists()
