"""Robust training of an ElasticUNet (paper Eq. 5): a standard latent-diffusion training loop
in which the supernet skips each removable block at random in every step.

The loop is the one Stable Diffusion is trained with: a DDPM noise schedule, noise added at a
random timestep, an epsilon (or v) target, MSE loss (optionally Min-SNR weighted), AdamW with a
diffusers learning-rate schedule, gradient clipping, optional EMA and mixed precision, and
classifier-free-guidance dropout of the text condition. The skipping
itself happens inside `ElasticUNet.forward` (its `skip_generator`); this loop only counts it.

Everything random is drawn from a seeded stream, so a run is a function of its config:
the data order is a permutation per epoch (a pure function of the seed and the step), noise
and timesteps come from their own generator, CFG dropout from another, skips from the model's.
A checkpoint saves all of them, so a resumed run ends with the same weights and losses as an
uninterrupted one.

The same loop runs data-parallel (`nas.training.ray`, one `Parallel` per worker): every worker
draws the whole batch's indices, noise, timesteps, CFG drops and block skips from the same
streams and keeps its own slice of the samples, so all workers run one architecture per step
and the averaged gradients are the ones of the whole batch in one process.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from nas.supernet import ElasticUNet
from nas.training.checkpoints import load_checkpoint, save_checkpoint, save_ema
from nas.training.config import (
    CHECKPOINT_DIR,
    EMA_DIR,
    STATE_NAME,
    Parallel,
    TrainConfig,
    TrainResult,
)
from nas.training.data import (
    CFG,
    NOISE,
    SKIP,
    LatentEncoder,
    batches,
    check_batch,
    stream_seed,
)
from search_spaces import UserError

log = logging.getLogger(__name__)


class Objective:
    """What a training step minimises, given the noisy batch: here the denoising loss of robust
    training. A subclass (`nas.training.distillation.Distillation`) computes other terms from
    the same inputs and returns them by name beside the total, which the loop records.
    """

    name = "robust training"  # the progress bar's label

    def __call__(
        self,
        runner: torch.nn.Module,
        noisy: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        target: torch.Tensor,
        scheduler: DDPMScheduler,
        config: TrainConfig,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, {term: its value}) of one step; `runner` is the model as trained
        (DDP-wrapped on a data-parallel worker)."""
        pred = runner(noisy, t, encoder_hidden_states=cond).sample
        return _loss(pred, target, t, scheduler, config), {}


# -- the loop ----------------------------------------------------------------------------------


def _device(config: TrainConfig) -> torch.device:
    try:
        device = torch.device(config.device)
    except RuntimeError as e:
        raise UserError(f"device {config.device!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {config.device!r} asked for, but CUDA is not available")
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError(
            f"mixed_precision='fp16' needs a CUDA device, but device is {config.device!r}; "
            "use mixed_precision='no' here (or train with device='cuda')"
        )
    if config.mixed_precision == "bf16" and device.type != "cuda":
        log.warning("mixed_precision='bf16' is only used on CUDA; training in float32")
    return device


def make_ema(model: ElasticUNet, decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=decay, foreach=True)


def train(
    model: ElasticUNet | torch.nn.Module,
    data,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    encode: Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: bool = True,
    uncond: torch.Tensor | None = None,
    parallel: Parallel | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train `model` robustly on `data` (items (latent, context), or raw items for `encode`).

    `out_dir` receives `checkpoint/` (every `checkpoint_every` steps and at the end) and, with
    EMA, `ema/` (the model with its EMA weights). `resume=True` continues from
    `out_dir/checkpoint/` up to `config.steps` (a folder instead of True: from that checkpoint
    folder). `uncond` is the unconditional context for CFG dropout; default:
    `encode.unconditional()` if the encoder has one, else zeros. `parallel` makes this call one
    worker of a data-parallel run: checkpoints then go through `parallel.checkpoint`.

    `model` is an ElasticUNet (robust training: its blocks skipped at random), or any diffusers
    UNet with `save_pretrained` / `from_pretrained` (a standalone network: nothing skipped).
    `objective` is what a step minimises (default: the denoising loss).
    """
    objective = objective or Objective()
    elastic = isinstance(model, ElasticUNet)
    config = config or TrainConfig()
    config.check()
    device = _device(config)
    t0 = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else None
    ckpt_dir = out_dir / CHECKPOINT_DIR if out_dir is not None else None
    resume_dir = ckpt_dir if resume is True else Path(resume) if resume else None
    if resume and (resume_dir is None or not (resume_dir / STATE_NAME).is_file()):
        raise UserError(
            f"resume={resume!r}, but there is no checkpoint to resume from "
            f"({resume_dir / STATE_NAME if resume_dir else 'no out_dir given'}); "
            "run once without resume, or pass the out_dir of an earlier run"
        )
    shard = slice(None)  # the samples of each batch this process trains on: all of them
    if parallel is not None:
        if config.batch_size % parallel.world_size:
            raise UserError(
                f"batch_size={config.batch_size} cannot be split evenly over "
                f"{parallel.world_size} workers; give a multiple of {parallel.world_size}"
            )
        shard = parallel.shard(config.batch_size)

    state = load_checkpoint(model, resume_dir, config) if resume_dir else None
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    fp16 = config.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    ema = make_ema(model, config.ema_decay) if config.ema_decay else None
    cfg_gen = torch.Generator().manual_seed(stream_seed(config.seed, CFG))
    noise_gen = torch.Generator().manual_seed(stream_seed(config.seed, NOISE))
    losses: list[float] = []
    terms: dict[str, list[float]] = {}
    skips: Counter[tuple[str, int]] = Counter()
    start = 0
    if state is None:
        torch.manual_seed(config.seed)  # any randomness inside the model (dropout) is seeded too
        if elastic:
            model.skip_generator.manual_seed(stream_seed(config.seed, SKIP))
    else:
        start, losses = state["step"], list(state["losses"])
        terms = {k: list(v) for k, v in state.get("terms", {}).items()}
        skips.update({(s, i): n for s, i, n in state["skip_counts"]})
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # this run's lr / decay win over the saved ones
            group.update(lr=config.lr, initial_lr=config.lr, weight_decay=config.weight_decay)
        if fp16 and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if state["ema"] is None:
                raise UserError(
                    f"ema_decay={config.ema_decay}, but the checkpoint in {ckpt_dir} was "
                    "trained without EMA; resume with ema_decay=None or start a new run"
                )
            ema.load_state_dict(state["ema"])
            ema.decay = config.ema_decay
            ema.to(device)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        cfg_gen.set_state(rng["cfg"])
        noise_gen.set_state(rng["noise"])
        if elastic:
            model.skip_generator.set_state(rng["skip"])

    # the schedule is a function of the step: a resumed run picks it up at `start`
    lr_schedule = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.steps,
        last_epoch=start - 1,
    )
    if hasattr(encode, "to"):
        encode.to(device)
    if uncond is None and hasattr(encode, "unconditional"):
        uncond = encode.unconditional()
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
    )
    autocast = torch.autocast(
        device_type=device.type,
        dtype=torch.float16 if fp16 else torch.bfloat16,
        enabled=device.type == "cuda" and config.mixed_precision != "no",
    )

    def save(step: int) -> Path | None:
        def write(folder: Path) -> Path:
            return save_checkpoint(
                folder,
                model,
                config,
                step=step,
                losses=losses,
                terms=terms,
                skips=skips,
                optimizer=optimizer,
                scaler=scaler if fp16 else None,
                ema=ema,
                rng={"cfg": cfg_gen.get_state(), "noise": noise_gen.get_state()},
            )

        if parallel is not None:
            return parallel.checkpoint(step, {"step": step, "loss": losses[-1]}, write)
        return write(ckpt_dir)

    was_training = model.training
    model.train()
    # a data-parallel worker runs the model through DDP, which averages the gradients
    runner = parallel.wrap(model) if parallel is not None else model
    params = [p for p in model.parameters() if p.requires_grad]
    checkpoints = parallel is not None or ckpt_dir is not None
    checkpoint = resume_dir
    saved_at = start if resume_dir else None  # the step the latest checkpoint holds
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not progress or (parallel is not None and parallel.rank != 0),
        desc=objective.name,
        unit="step",
    )
    step = start
    try:
        for step, (x, cond) in enumerate(batches(data, config, start, shard), start + 1):
            if encode is not None:
                x, cond = encode(x, cond)
            check_batch(model, x, cond, encode is not None)
            x = x.to(device, torch.float32)
            cond = cond.to(device, torch.float32)
            batch = config.batch_size
            cond = _cfg_dropout(cond, uncond, config.cfg_dropout, cfg_gen, batch, shard)

            # drawn on the CPU from a seeded generator: the same run on any device; drawn for
            # the whole batch, so a data-parallel worker's shard gets what one process would
            noise = torch.randn((batch, *x.shape[1:]), generator=noise_gen)[shard].to(device)
            t = _timesteps(config, batch, noise_gen)
            t = t[shard].to(device)
            noisy = scheduler.add_noise(x, noise, t)
            target = (
                noise
                if config.prediction_type == "epsilon"
                else scheduler.get_velocity(x, noise, t)
            )
            if elastic:
                model.robust = step > config.skip_warmup_steps
            with autocast:
                loss, parts = objective(runner, noisy, t, cond, target, scheduler, config)
            batch_loss = loss.detach()
            skipped = model.last_skipped if elastic else []
            if parallel is not None and parallel.world_size > 1:
                # the mean of equal shards' means: the whole batch's loss (and terms)
                batch_loss = _batch_loss_over_workers(batch_loss, skipped)
                parts = _mean_over_workers(parts)

            optimizer.zero_grad(set_to_none=True)  # skipped blocks get no grad, no update
            scaler.scale(loss).backward()
            if config.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            lr_schedule.step()
            if ema is not None:
                ema.step(model.parameters())

            losses.append(batch_loss.item())
            for name, value in parts.items():
                terms.setdefault(name, []).append(float(value))
            skips.update(skipped)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", skipped=len(skipped), refresh=False)
            bar.update(1)
            every = config.checkpoint_every
            if checkpoints and every and step % every == 0:
                checkpoint, saved_at = save(step), step
        if checkpoints and saved_at != step:
            checkpoint = save(step)
        if ema is not None and out_dir is not None:
            save_ema(model, ema, out_dir / EMA_DIR)
    finally:
        bar.close()
        model.train(was_training)
        if elastic:
            model.robust = True

    return TrainResult(
        losses=losses,
        steps=max(step, start),
        skip_counts=dict(sorted(skips.items())),
        seconds=time.perf_counter() - t0,
        checkpoint=checkpoint,
        ema=ema,
        config=config,
        terms=terms,
    )


def _timesteps(config: TrainConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Training timesteps: uniform, or with `timestep_shift` s > 1 noisier ones: a uniform u in
    [0, 1) becomes s u / (1 + (s - 1) u), so that with s = 3 half of them lie at t >= 3T/4 (a
    quarter when uniform). Near pure noise only the prompt says where and what to draw. Then
    a `timestep_noisy_share` of them is replaced by timesteps drawn from the noisiest ones: a
    shift takes its noisy steps mostly from the low-noise ones (s = 3: t < T/4 falls from a
    quarter to a tenth); this takes them from every timestep alike."""
    n = config.num_train_timesteps
    if config.timestep_shift == 1.0:  # randint, as before the shift: the same runs, bit for bit
        t = torch.randint(0, n, (batch,), generator=gen)
    else:
        u = torch.rand(batch, generator=gen)
        s = config.timestep_shift
        t = (s * u / (1 + (s - 1) * u) * n).long().clamp(max=n - 1)
    if config.timestep_noisy_share > 0:  # no draws at 0: runs from before keep their stream
        noisy = torch.randint(int(config.timestep_noisy_from * n), n, (batch,), generator=gen)
        t = torch.where(torch.rand(batch, generator=gen) < config.timestep_noisy_share, noisy, t)
    return t


def _loss(pred, target, t, scheduler: DDPMScheduler, config: TrainConfig) -> torch.Tensor:
    """MSE, or with `snr_gamma` the Min-SNR-weighted MSE (Hang et al. 2023, as diffusers'
    training scripts): easy low-noise steps stop dominating the loss. (In the tiny world, a
    v-prediction model trained for minutes, it trained worse than plain MSE.)"""
    if config.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    snr = compute_snr(scheduler, t)
    weight = snr.clamp(max=config.snr_gamma)
    # the weight of an epsilon (or v) loss that makes it min(SNR, gamma) times the x0 loss
    weight = weight / snr if config.prediction_type == "epsilon" else weight / (snr + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


def _mean_over_workers(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each term of the objective averaged over the workers (their shards are equal)."""
    if not parts:
        return parts
    values = torch.stack([torch.as_tensor(v).detach().double().cpu() for v in parts.values()])
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        values = values.cuda()
    dist.all_reduce(values)
    return dict(zip(parts, (values / dist.get_world_size()).cpu(), strict=True))


def _batch_loss_over_workers(loss: torch.Tensor, skipped: list[tuple[str, int]]) -> torch.Tensor:
    """The mean of the workers' losses, after checking that every worker skipped the same
    blocks in this step: DDP must see one architecture, or it would average the gradients of
    different networks (and a block skipped on one worker only would get half its gradient)."""
    fingerprint = zlib.crc32(repr(skipped).encode())  # < 2**32: exact in float64
    mine = torch.stack([loss.double(), loss.new_tensor(fingerprint, dtype=torch.float64)])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    every = torch.stack(gathered)
    if not bool((every[:, 1] == fingerprint).all()):
        raise RuntimeError(
            "the workers skipped different blocks in one step; their skip generators must be "
            "seeded alike (train() seeds them from config.seed, never from the rank)"
        )
    return every[:, 0].mean()


def _cfg_dropout(
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    p: float,
    generator: torch.Generator,
    batch_size: int | None = None,
    shard: slice = slice(None),
) -> torch.Tensor:
    """Replace each sample's condition by the unconditional one with probability p.

    The draw is made even when p is 0 or 1, so the stream advances the same in every run. It
    is made for the whole batch (`batch_size`, default: cond's) and cut to this worker's
    `shard` of it.
    """
    n = cond.shape[0] if batch_size is None else batch_size
    drop = (torch.rand(n, generator=generator) < p)[shard].to(cond.device)
    if uncond is None:
        uncond = torch.zeros_like(cond[0])
    uncond = uncond.to(cond.device, cond.dtype)
    if uncond.ndim == 3 and uncond.shape[0] == 1:
        uncond = uncond[0]
    if tuple(uncond.shape) != tuple(cond.shape[1:]):
        raise UserError(
            f"the unconditional context has shape {tuple(uncond.shape)}, but the conditions "
            f"are {tuple(cond.shape[1:])}; give uncond as one (tokens, dim) context"
        )
    return torch.where(drop[:, None, None], uncond, cond)


__all__ = ["LatentEncoder", "Objective", "Parallel", "TrainConfig", "TrainResult", "train"]
