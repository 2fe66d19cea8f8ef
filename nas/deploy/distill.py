"""`diffnas distill RUN_DIR`: train the network a search found, as a student, from a teacher.

The student is the found architecture as a standalone network (`nas.deploy.standalone`): removed
blocks are gone, copies are real modules, all initialised from the supernet's weights at the
end of the search (RUN_DIR/final/). The teacher is frozen: by default the full network of the
same supernet, or a diffusers UNet folder of the space's base network (`teacher=`).

Training is the loop of robust training (`nas.training.robust.train`: the world's data, noise
schedule, timesteps, CFG dropout, AdamW, diffusers LR schedules, EMA, checkpoints, resume,
progress bar) with another objective, `Distillation` (after BK-SDM, Kim et al. 2023):

    task        the denoising loss against the data, as robust training computes it
    output KD   MSE(student prediction, teacher prediction), same noisy input, timestep, text
    feature KD  over the matched blocks (below), by default the mean of each block's relative
                error: per sample, MSE(student's output, teacher's output) / mean(teacher's
                output^2), averaged over the samples; `feature_loss: mse` sums the plain MSEs
                instead, as BK-SDM does

Feature points are diffusers' top-level blocks (down blocks, mid block, up blocks), which every
architecture of a space keeps: a removal replaces a ResNet or attention inside a block, never
the block itself (its down/up-sampler stays). A block whose ResNets and attentions are all
removed is not matched: its output is its input (resampled, if it resamples), a tensor the
previous block already produced, and matching it to the teacher's output of the removed blocks
would ask one tensor to equal two different teacher tensors (BK-SDM likewise leaves the stages
it removes out of its feature loss). Why relative errors: a block's output is not on the scale
of the loss (on the tiny world the last up block's teacher output has a mean square of 21, the
denoising target's is 1), so plain MSEs let the one or two largest blocks outweigh the task;
the relative error is scale-free, and its mean does not grow with the number of blocks.

With `workers` > 1 or a Ray address the same loop runs data-parallel on Ray Train
(`nas.training.ray`, DDP, as `diffnas train`): each worker gets the student and the teacher as
their configs and weights (`DistillationJob`) and trains on its share of every batch.

RUN_DIR/distilled/: unet/ (the student, a standalone folder), config.json, metrics.json
(written last: it marks a finished distillation), grid_distilled.png, before.json and train/
(the loop's checkpoint, or Ray Train's checkpoint_<step>/ folders, for --resume).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel

from nas.deploy.standalone import to_standalone
from nas.distill_config import DistillConfig
from nas.search.evaluate import Evaluator, Protocol
from nas.searched_unet import SearchedUNet2DConditionModel
from nas.supernet import ElasticUNet, check_weights_fit
from nas.training.distillation import Distillation, DistillationJob, feature_points, matched_points
from nas.training.robust import train
from search_spaces import Architecture, SearchSpace, UserError

DISTILLED_DIR = "distilled"
WORLD_ITEMS = 2**20  # training scenes, drawn when read (as `diffnas train`)
GRID = 16  # images in grid_distilled.png: the first of the search protocol, as grid_found.png


# -- teacher, run directory ----------------------------------------------------------------------


def load_teacher(path: str | Path, space: SearchSpace) -> UNet2DConditionModel:
    """A diffusers UNet folder (`config.json` + weights, or a pipeline root holding `unet/`)
    whose network is the space's base network; a UserError naming the mismatch otherwise."""
    path = Path(path).expanduser()
    sub = "unet" if (path / "unet" / "config.json").is_file() else None
    if not (path / (sub or "") / "config.json").is_file():
        raise UserError(
            f"--teacher {path}: not a diffusers UNet folder (no config.json, no unet/config.json)"
        )
    config = json.loads((path / (sub or "") / "config.json").read_text())
    if config.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise UserError(
            f"--teacher {path} holds a {config['_class_name']}; give a UNet2DConditionModel folder"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=sub, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"--teacher {path}: cannot load the UNet: {e}") from None
    try:
        check_weights_fit(space, unet)
    except UserError as e:
        raise UserError(f"--teacher {path} does not fit the run's space: {e}") from None
    return unet.eval()


def check_finished(run: Path) -> None:
    needed = ["final.arch.json", "final/elastic.json", "result.json", "experiment.yaml"]
    missing = [n for n in needed if not (run / n).is_file()]
    if missing:
        raise UserError(
            f"{run} holds no finished search (missing {', '.join(missing)}); run "
            "`diffnas search` to the end first (or --resume it)"
        )


def load_distilled(
    run: str | Path,
) -> tuple[SearchedUNet2DConditionModel, SearchSpace, Architecture]:
    run = Path(run)
    space = ElasticUNet.from_pretrained(run / "final").space
    net = SearchedUNet2DConditionModel.from_pretrained(run / DISTILLED_DIR / "unet")
    return net, space, Architecture.load(run / "final.arch.json")


def _prepare(folder: Path, resume: bool, force: bool) -> None:
    """Never overwrite a distillation silently: refuse, continue it, or (force) start over."""
    if resume and force:
        raise UserError("give --resume or --force, not both")
    if folder.exists() and any(folder.iterdir()):
        if force:
            shutil.rmtree(folder)
        elif not resume:
            state = "a finished" if (folder / "metrics.json").is_file() else "an unfinished"
            raise UserError(
                f"{folder} holds {state} distillation; continue it with --resume, or start "
                "over with --force (which deletes it)"
            )
    elif resume:
        raise UserError(f"--resume, but {folder} holds no distillation to continue")
    folder.mkdir(parents=True, exist_ok=True)


# -- scoring -------------------------------------------------------------------------------------


def protocols(exp, world, config: DistillConfig) -> dict[str, Protocol]:
    """The search's protocol, and a held-out one on the validation prompts it did not use."""
    from nas.search.run import evaluation_protocol, held_out_prompts

    out = {"search": evaluation_protocol(exp, world)}
    held_out = held_out_prompts(exp, world)  # after the search's: no prompt in common
    if held_out:
        out["held_out"] = evaluation_protocol(
            exp, world, held_out, config.held_out_seeds, config.held_out_steps
        )
    return out


def _scores(evaluators: dict[str, Evaluator], net: torch.nn.Module) -> dict[str, list[float]]:
    """CLIP of each image, per protocol (same prompts and noises for every network)."""
    return {name: ev.model_scores(net).tolist() for name, ev in evaluators.items()}


def _means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.fmean(v) for name, v in scores.items()}


def measure_ms(nets: dict[str, torch.nn.Module], space: SearchSpace, repeats: int = 20) -> dict:
    """Median wall ms of one forward of each network at the space's input shapes, timed in
    turns (one forward of each, again and again), so that a busy machine slows all alike."""
    device = next(next(iter(nets.values())).parameters()).device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(space.batch, *space.latent, generator=g).to(device)
    ctx = torch.randn(space.batch, *space.context, generator=g).to(device)
    t = torch.full((space.batch,), 500, device=device)
    times: dict[str, list[float]] = {name: [] for name in nets}
    with torch.no_grad():
        for i in range(repeats + 3):
            for name, net in nets.items():
                start = time.perf_counter()
                net(x, t, encoder_hidden_states=ctx)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 3:  # warm-up rounds are not timed
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in times.items()}


# -- distill -------------------------------------------------------------------------------------


def distill(
    run: str | Path,
    config: DistillConfig | None = None,
    teacher: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    arch: Architecture | None = None,
    folder: str | Path | None = None,
    workers: int = 1,
    ray_address: str | None = None,
    use_gpu: bool | None = None,
) -> dict:
    """Distil the found network of `run` (a finished search); return metrics.json's content.

    `config` default: the run's experiment file's `distill:` section. `teacher`: a diffusers
    UNet folder (default: the full network of the run's supernet). `arch`: another
    architecture of the space to distil from the same supernet instead (e.g. a hand design to
    compare with), written to `folder` (default RUN/distilled/). `workers` > 1 or a
    `ray_address` trains data-parallel on Ray Train (`nas.training.ray`, DDP; `use_gpu` as
    `diffnas train --gpus`); scoring stays in this process, on `config.device`."""
    from nas.experiment import Experiment
    from nas.search.run import experiment_space, make_evaluator, open_world
    from nas.training.ray import check_resume, check_train_args

    run = Path(run)
    check_finished(run)
    check_train_args(workers, ray_address, use_gpu)
    on_ray = workers > 1 or ray_address is not None
    exp = Experiment.model_validate(yaml.safe_load((run / "experiment.yaml").read_text()))
    if on_ray and exp.world.kind != "tiny":
        raise UserError(
            f"distillation on Ray Train ships the tiny world's text encoder to its workers; "
            f"this run's world is {exp.world.kind!r}: distil it in one process (--workers 1, "
            "--device cuda on a GPU)"
        )
    config = config or exp.distill
    folder = Path(folder) if folder is not None else run / DISTILLED_DIR
    supernet = ElasticUNet.from_pretrained(run / "final")
    space = supernet.space
    arch = arch if arch is not None else Architecture.load(run / "final.arch.json")
    space.validate(arch)
    external = load_teacher(teacher, space) if teacher is not None else None  # before writing
    _prepare(folder, resume, force)
    # a checkpoint to continue (a run stopped while scoring has none: it starts at step 0)
    resume_training = resume and check_resume(
        folder / "train", on_ray, folder, "start over with --force"
    )
    t0 = time.perf_counter()

    world = open_world(exp, experiment_space(exp), progress)
    supernet.scheduler_config = world.scheduler_config
    supernet.set_architecture(space.original())
    supernet.eval().requires_grad_(False)
    teacher_net = external if external is not None else supernet
    student = to_standalone(supernet, arch)
    device = torch.device(config.device)
    evaluators = {
        name: make_evaluator(exp, world, p, supernet)
        for name, p in protocols(exp, world, config).items()
    }
    for module in (student, teacher_net, *evaluators.values()):
        module.to(device)

    before_file = folder / "before.json"
    before = json.loads(before_file.read_text()) if before_file.is_file() else None
    # a resumed run scored these already (a run from before each image's score was kept: again)
    if before is None or "images" not in before:
        images = {
            "student": _scores(evaluators, student),
            "teacher": _scores(evaluators, teacher_net),
        }
        before = {k: _means(v) for k, v in images.items()} | {"images": images}
        before_file.write_text(json.dumps(before, indent=2) + "\n")

    seed = exp.seed if config.seed is None else config.seed
    train_config = world.train_config(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps,
        ema_decay=config.ema_decay,
        checkpoint_every=config.checkpoint_every,
        seed=seed,
        device=config.device,
    )
    data = world.dataset(WORLD_ITEMS, seed)
    if on_ray:
        from nas.training.ray import _pack, train_ray

        result = train_ray(
            student,
            data,
            train_config,
            folder / "train",
            workers=workers,
            resume=resume_training,
            encode=world.picklable_encoder(),  # Ray ships it to every worker
            uncond=world.uncond()[0],
            ray_address=ray_address,
            use_gpu=use_gpu,
            objective=DistillationJob(_pack(teacher_net), config),
        )
    else:
        result = train(
            student,
            data,
            train_config,
            out_dir=folder / "train",
            resume=resume_training,
            encode=world.encode_batch,
            progress=progress,
            uncond=world.uncond()[0],
            objective=Distillation(student, teacher_net, config),
        )
    if result.ema is not None:
        result.ema.copy_to(student.parameters())
    student.eval()
    after_images = _scores(evaluators, student)
    after = _means(after_images)
    student.save_pretrained(folder / "unet")
    from nas.search.evolve import save_grid

    search = evaluators["search"]
    save_grid(search.model_images(student, GRID), folder / "grid_distilled.png")
    if external is not None:
        save_grid(search.model_images(external, GRID), folder / "grid_teacher.png")

    (folder / "config.json").write_text(
        json.dumps(
            {
                "distill": config.to_dict(),
                "teacher": str(teacher) if teacher is not None else "supernet (full network)",
                "architecture_hash": arch.hash,
                "architecture": arch.to_dict(),
                "train": result.config.__dict__,
                "workers": workers,
                "ray_address": ray_address,
                "protocols": {
                    n: {k: v for k, v in e.protocol.__dict__.items() if k != "prompts"}
                    | {"prompts": len(e.protocol.prompts)}
                    for n, e in evaluators.items()
                },
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    metrics = {
        "steps": result.steps,
        "seconds": time.perf_counter() - t0,  # this call (a resumed run: since resuming)
        "train_seconds": result.seconds,
        "losses": result.losses,
        "terms": result.terms,
        "clip": {"before": before["student"], "after": after, "teacher": before["teacher"]},
        # each image's CLIP, per protocol (the same prompts and noises for all three): paired
        # differences, hence standard errors of the ratios to the teacher
        "clip_images": {
            "before": before.get("images", {}).get("student"),
            "after": after_images,
            "teacher": before.get("images", {}).get("teacher"),
        },
        "params": {
            "student": sum(p.numel() for p in student.parameters()),
            "teacher": sum(p.numel() for p in teacher_net.parameters()),
        },
        # torch on this machine, the space's input shapes (the latency table's)
        "measured_ms": {
            "device": str(device),
            **measure_ms({"student": student, "teacher": teacher_net}, space),
        },
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


__all__ = [
    "DISTILLED_DIR",
    "Distillation",
    "DistillationJob",
    "distill",
    "feature_points",
    "load_distilled",
    "load_teacher",
    "matched_points",
]
