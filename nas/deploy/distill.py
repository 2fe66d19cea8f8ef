"""`diffnas distill RUN_DIR`: train the network a search found, as a student, from a teacher.

The student is the found architecture as a standalone network (`nas.deploy.standalone`): removed
blocks are gone, copies are real modules, all initialised from the supernet's weights at the
end of the search (RUN_DIR/final/). The teacher is frozen: by default the full network of the
same supernet, or a diffusers UNet folder of the space's base network (`teacher=`).

Training is the loop of robust training (`nas.training.robust.train`: the world's data, noise
schedule, timesteps, CFG dropout, AdamW, diffusers LR schedules, EMA, checkpoints, resume,
progress bar) with another objective, `Distillation` (BK-SDM, Kim et al. 2023):

    task        the denoising loss against the data, as robust training computes it
    output KD   MSE(student prediction, teacher prediction), same noisy input, timestep, text
    feature KD  sum over the UNet's down blocks, mid block and up blocks of
                MSE(student's output of that block, teacher's output of the same block)

Feature points are diffusers' top-level blocks, which every architecture of a space keeps:
a removal replaces a ResNet or attention inside a block, never the block itself (its
down/up-sampler stays). A block whose ResNets and attentions are all removed still has an
output, its input (resampled if it resamples), and it is matched to the teacher's output of
that block: the student is asked to produce there what the teacher's blocks produced, so the
blocks before it learn to stand in for the removed ones.

RUN_DIR/distilled/: unet/ (the student, a standalone folder), config.json, metrics.json
(written last: it marks a finished distillation), grid_distilled.png, before.json and train/
(the loop's checkpoint, for --resume).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers import UNet2DConditionModel

from nas.deploy.searched_unet import SearchedUNet2DConditionModel
from nas.deploy.standalone import to_standalone
from nas.distill_config import DistillConfig
from nas.search.evaluate import Evaluator, Protocol
from nas.supernet import ElasticUNet, check_weights_fit
from nas.training.robust import Objective, _loss, train
from search_spaces import Architecture, SearchSpace, UserError

DISTILLED_DIR = "distilled"
WORLD_ITEMS = 2**20  # training scenes, drawn when read (as `diffnas train`)
GRID = 16  # images in grid_distilled.png: the first of the search protocol, as grid_found.png


def feature_points(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose outputs feature KD compares: down blocks, mid block, up blocks."""
    unet = unet.unet if isinstance(unet, ElasticUNet) else unet
    mids = [unet.mid_block] if unet.mid_block is not None else []
    return [*unet.down_blocks, *mids, *unet.up_blocks]


@contextmanager
def _capture(modules: list[torch.nn.Module]):
    """Collect each module's output (a down block's hidden state, not its skips) in order."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class Distillation(Objective):
    """The distillation loss of one step (see the module docstring)."""

    name = "distillation"

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, config: DistillConfig):
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config
        self.student_points = feature_points(student)
        self.teacher_points = feature_points(teacher)
        if len(self.student_points) != len(self.teacher_points):
            raise UserError(
                f"the teacher has {len(self.teacher_points)} down/mid/up blocks and the student "
                f"{len(self.student_points)}: feature KD needs the same UNet topology"
            )

    def __call__(self, runner, noisy, t, cond, target, scheduler, config):
        c = self.config
        features = c.feature_weight > 0
        with _capture(self.student_points if features else []) as student_feats:
            pred = runner(noisy, t, encoder_hidden_states=cond).sample
        task = _loss(pred, target, t, scheduler, config)
        zero = task.new_zeros(())
        out_kd = feat_kd = zero
        if c.output_weight > 0 or features:  # task only: the teacher is not run at all
            with (
                torch.no_grad(),
                _capture(self.teacher_points if features else []) as teacher_feats,
            ):
                teacher_pred = self.teacher(noisy, t, encoder_hidden_states=cond).sample
            out_kd = F.mse_loss(pred.float(), teacher_pred.float())
            for s, te in zip(student_feats, teacher_feats, strict=True):
                feat_kd = feat_kd + F.mse_loss(s.float(), te.float())
        total = c.task_weight * task + c.output_weight * out_kd + c.feature_weight * feat_kd
        terms = {
            "task": task.detach(),
            "output_kd": out_kd.detach(),
            "feature_kd": feat_kd.detach(),
        }
        return total, terms


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
    from nas.search.run import held_out_prompts, search_prompts

    e = exp.evaluation
    common = {"cfg": e.cfg, "batch_size": e.batch_size, "seed": exp.seed, "precision": e.precision}
    out = {
        "search": Protocol(search_prompts(exp, world), e.seeds, e.steps, **common),
    }
    held_out = held_out_prompts(exp, world)  # after the search's: no prompt in common
    if held_out:
        out["held_out"] = Protocol(held_out, config.held_out_seeds, config.held_out_steps, **common)
    return out


def _clip(evaluators: dict[str, Evaluator], net: torch.nn.Module) -> dict[str, float]:
    return {name: float(ev.model_scores(net).mean()) for name, ev in evaluators.items()}


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
) -> dict:
    """Distil the found network of `run` (a finished search); return metrics.json's content.

    `config` default: the run's experiment file's `distill:` section. `teacher`: a diffusers
    UNet folder (default: the full network of the run's supernet). `arch`: another
    architecture of the space to distil from the same supernet instead (e.g. a hand design to
    compare with), written to `folder` (default RUN/distilled/)."""
    from nas.experiment import Experiment
    from nas.search.run import experiment_space, open_world

    run = Path(run)
    check_finished(run)
    exp = Experiment.model_validate(yaml.safe_load((run / "experiment.yaml").read_text()))
    config = config or exp.distill
    folder = Path(folder) if folder is not None else run / DISTILLED_DIR
    supernet = ElasticUNet.from_pretrained(run / "final")
    space = supernet.space
    arch = arch if arch is not None else Architecture.load(run / "final.arch.json")
    space.validate(arch)
    external = load_teacher(teacher, space) if teacher is not None else None  # before writing
    _prepare(folder, resume, force)
    t0 = time.perf_counter()

    world = open_world(exp, experiment_space(exp), progress)
    supernet.scheduler_config = world.scheduler_config
    supernet.set_architecture(space.original())
    supernet.eval().requires_grad_(False)
    teacher_net = external if external is not None else supernet
    student = to_standalone(supernet, arch)
    device = torch.device(config.device)
    evaluators = {
        name: Evaluator(supernet, world.clip, p, world.encode_text, world.uncond(), world.decode)
        for name, p in protocols(exp, world, config).items()
    }
    for module in (student, teacher_net, *evaluators.values()):
        module.to(device)

    before_file = folder / "before.json"
    if before_file.is_file():  # a resumed run scored these already
        before = json.loads(before_file.read_text())
    else:
        before = {"student": _clip(evaluators, student), "teacher": _clip(evaluators, teacher_net)}
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
    result = train(
        student,
        world.dataset(WORLD_ITEMS, seed),
        train_config,
        out_dir=folder / "train",
        resume=resume and (folder / "train" / "checkpoint").is_dir(),
        encode=world.encode_batch,
        progress=progress,
        uncond=world.uncond()[0],
        objective=Distillation(student, teacher_net, config),
    )
    if result.ema is not None:
        result.ema.copy_to(student.parameters())
    student.eval()
    after = _clip(evaluators, student)
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
    "distill",
    "feature_points",
    "load_distilled",
    "load_teacher",
]
