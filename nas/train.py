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

The same loop runs data-parallel (`nas.train_ray`, one `Parallel` per worker): every worker
draws the whole batch's indices, noise, timesteps, CFG drops and block skips from the same
streams and keeps its own slice of the samples, so all workers run one architecture per step
and the averaged gradients are the ones of the whole batch in one process.
"""

from __future__ import annotations

import logging
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import default_collate as _collate
from tqdm.auto import tqdm

from search_spaces import UserError

from .supernet import ElasticUNet

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"  # out_dir/checkpoint/: the latest checkpoint only
EMA_DIR = "ema"  # out_dir/ema/: the model with its EMA weights, written at the end
STATE_NAME = "state.pt"  # optimizer, EMA, RNG states, step, losses (next to model/)
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MIXED_PRECISION = ("no", "fp16", "bf16")
# diffusers' schedules that need nothing beyond warm-up and total steps (its restarts and
# piecewise schedules take more arguments)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "polynomial")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 32  # samples per step; the last incomplete batch of an epoch is dropped
    lr: float = 1e-4  # AdamW peak learning rate
    lr_scheduler: str = "constant"  # diffusers schedule name: constant, cosine, linear, ...
    lr_warmup_steps: int = 0  # steps of linear warm-up to `lr` (schedules with a warm-up)
    snr_gamma: float | None = None  # Min-SNR loss weighting min(SNR, gamma); None = plain MSE
    # steps at the start that train the full network, no block skipped: a model trained from
    # scratch first learns to draw, then robust training makes it tolerate missing blocks
    skip_warmup_steps: int = 0
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    grad_clip: float | None = 1.0  # max global gradient norm; None or 0 = no clipping
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" or "v_prediction"
    num_train_timesteps: int = 1000  # DDPM timesteps, as Stable Diffusion
    # > 1 draws noisier timesteps (SD3's shift: uniform u -> s u / (1 + (s - 1) u), t = u T)
    timestep_shift: float = 1.0
    # share of timesteps drawn instead from the noisiest ones, t >= timestep_noisy_from * T:
    # more training where only the prompt says what goes where, with every other timestep
    # drawn (1 - share) as often, where a shift cuts most from the low-noise ones
    timestep_noisy_share: float = 0.0
    timestep_noisy_from: float = 0.85  # where "the noisiest" begins, as a fraction of T
    beta_schedule: str = "scaled_linear"  # DDPM beta schedule; SD uses "scaled_linear"
    beta_start: float = 0.00085  # first beta (SD's value)
    beta_end: float = 0.012  # last beta (SD's value)
    ema_decay: float | None = None  # EMA of the weights with this decay; None = no EMA
    mixed_precision: str = "no"  # "no", "fp16" (with a GradScaler) or "bf16"; CUDA only
    cfg_dropout: float = 0.1  # probability a sample's text condition becomes the unconditional
    checkpoint_every: int = 500  # write out_dir/checkpoint/ every this many steps; 0 = at end
    seed: int = 0  # determines data order, noise, timesteps, CFG dropout and block skips
    device: str = "cpu"  # torch device to train on ("cpu", "cuda", "cuda:1", ...)
    num_workers: int = 0  # DataLoader worker processes for a map-style dataset

    def check(self) -> None:
        """Raise a UserError naming the first bad field and what it may be."""
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(
                f"unknown prediction_type {self.prediction_type!r}; use one of "
                f"{', '.join(map(repr, PREDICTION_TYPES))}"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UserError(
                f"unknown beta_schedule {self.beta_schedule!r}; use one of "
                f"{', '.join(map(repr, BETA_SCHEDULES))}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(
                f"unknown mixed_precision {self.mixed_precision!r}; use one of "
                f"{', '.join(map(repr, MIXED_PRECISION))}"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(
                f"unknown lr_scheduler {self.lr_scheduler!r}; use one of "
                f"{', '.join(map(repr, LR_SCHEDULERS))}"
            )
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(
                f"snr_gamma={self.snr_gamma} must be positive (5 is the usual value), or None"
            )
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr}
        positive["num_train_timesteps"] = self.num_train_timesteps
        positive["timestep_shift"] = self.timestep_shift
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"{name}={value} must be positive")
        for name, value in [
            ("weight_decay", self.weight_decay),
            ("checkpoint_every", self.checkpoint_every),
            ("num_workers", self.num_workers),
            ("lr_warmup_steps", self.lr_warmup_steps),
            ("skip_warmup_steps", self.skip_warmup_steps),
            ("grad_clip", self.grad_clip or 0),
        ]:
            if value < 0:
                raise UserError(f"{name}={value} must not be negative")
        if not 0.0 <= self.timestep_noisy_share <= 1.0:
            raise UserError(
                f"timestep_noisy_share={self.timestep_noisy_share} must be a share in [0, 1]"
            )
        if not 0.0 <= self.timestep_noisy_from < 1.0:
            raise UserError(
                f"timestep_noisy_from={self.timestep_noisy_from} must be a fraction of the "
                "timesteps in [0, 1)"
            )
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise UserError(f"cfg_dropout={self.cfg_dropout} must be a probability in [0, 1]")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UserError(
                f"ema_decay={self.ema_decay} must be in (0, 1) (e.g. 0.9999), or None for no EMA"
            )


class Objective:
    """What a training step minimises, given the noisy batch: here the denoising loss of robust
    training. A subclass (distillation: `nas.distill.Distillation`) computes other terms from
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


@dataclass
class TrainResult:
    losses: list[float]  # loss of every step from step 0 (a resumed run includes the earlier)
    steps: int  # steps done in total
    skip_counts: dict[tuple[str, int], int]  # (slot, instance) -> steps in which it was skipped
    seconds: float  # wall time of this call
    checkpoint: Path | None = None  # the checkpoint folder written last, if any
    ema: Any = None  # the EMAModel when config.ema_decay is set (ema.copy_to(model.parameters()))
    config: TrainConfig = field(default_factory=TrainConfig)
    terms: dict[str, list[float]] = field(default_factory=dict)  # the objective's terms per step


@dataclass
class Parallel:
    """One worker of a data-parallel run of `train` (`nas.train_ray` makes one per Ray Train
    worker, inside an initialised `torch.distributed` process group).

    Each worker takes samples [rank * n, (rank + 1) * n) of every batch, n = batch_size /
    world_size; `wrap` (DDP) averages the gradients, so the update is the whole batch's.
    """

    rank: int  # this worker's index in [0, world_size); rank 0 shows the progress bar
    world_size: int  # workers in the run; batch_size must be a multiple of it
    wrap: Callable[[torch.nn.Module], torch.nn.Module]  # the model as trained, e.g. DDP
    # called by every worker at each checkpoint step with (step, metrics, write): write(folder)
    # saves the checkpoint into folder; the hook decides which worker writes and where it goes
    checkpoint: Callable[[int, dict[str, float], Callable[[Path], Path]], Path | None]

    def shard(self, batch_size: int) -> slice:
        n = batch_size // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)


# -- the text/image encoder for real (Stable Diffusion) data ----------------------------------


class LatentEncoder:
    """Turns (images, captions) into (latents, text contexts) as Stable Diffusion does.

    Holds the pipeline's VAE and CLIP text encoder, loaded from a local pipeline folder
    (`vae/`, `text_encoder/`, `tokenizer/`); nothing is downloaded. Images are (B, 3, H, W)
    in [-1, 1]; captions a list of strings (a tensor of contexts passes through unchanged).
    """

    def __init__(self, vae, text_encoder, tokenizer, max_length: int | None = None):
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # the tokenizer's own limit may be unset (a huge sentinel): the encoder's positions cap it
        positions = text_encoder.config.max_position_embeddings
        self.max_length = max_length or min(tokenizer.model_max_length, positions)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32):
        """Load from a local diffusers pipeline folder (the one holding vae/, text_encoder/,
        tokenizer/); raises a UserError naming what is missing."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder).expanduser()
        missing = [s for s in ("vae", "text_encoder", "tokenizer") if not (folder / s).is_dir()]
        if missing:
            raise UserError(
                f"{folder} is not a Stable Diffusion pipeline folder: it has no "
                f"{', '.join(s + '/' for s in missing)}; give the folder that holds vae/, "
                "text_encoder/ and tokenizer/ (e.g. a local copy of stable-diffusion-v1-5)"
            )
        try:
            vae = AutoencoderKL.from_pretrained(
                folder, subfolder="vae", local_files_only=True, torch_dtype=dtype
            )
            text_encoder = CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", local_files_only=True
            )
            tokenizer = CLIPTokenizer.from_pretrained(
                folder, subfolder="tokenizer", local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the VAE / text encoder in {folder}: {e}") from None
        return cls(vae, text_encoder.to(dtype), tokenizer)

    def to(self, device: str | torch.device) -> LatentEncoder:
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise UserError(
                f"images must be scaled to [-1, 1] (got values in [{images.min():.3g}, "
                f"{images.max():.3g}]); map [0, 1] images with x * 2 - 1"
            )
        vae = self.vae
        images = images.to(self.device, next(vae.parameters()).dtype)
        latents = vae.encode(images).latent_dist.sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD-1/2 VAEs have none
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device)).last_hidden_state

    def unconditional(self) -> torch.Tensor:
        """The empty caption's context (tokens, dim): SD's unconditional condition for CFG."""
        return self.encode_text([""])[0]

    def __call__(self, images: torch.Tensor, captions) -> tuple[torch.Tensor, torch.Tensor]:
        context = captions if torch.is_tensor(captions) else self.encode_text(captions)
        return self.encode_images(images), context


# -- data --------------------------------------------------------------------------------------


def _seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for one random stream of a run (SeedSequence mixes well)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


# the random streams of a run
DATA, CFG, NOISE, SKIP = range(4)


class _StepBatches:
    """Indices of the batches of steps [start, stop): each epoch is a seeded permutation.

    The batch of a step depends only on (seed, step), so resuming needs no sampler state, and
    DataLoader workers prefetching ahead cannot shift it. A data-parallel worker reads only its
    `shard` of each batch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int, stop: int, shard: slice = slice(None)
    ):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.shard = start, stop, shard
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = None, None
        for step in range(self.start, self.stop):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(_seed(self.seed, e))
                epoch, perm = e, torch.randperm(self.n, generator=g).tolist()
            yield perm[k * self.batch_size : (k + 1) * self.batch_size][self.shard]


def _batches(data, config: TrainConfig, start: int, shard: slice = slice(None)) -> Iterable:
    """Collated batches (this worker's `shard` of each) for steps start..config.steps-1."""
    map_style = hasattr(data, "__len__") and hasattr(data, "__getitem__")
    if map_style and not isinstance(data, IterableDataset):
        if len(data) < config.batch_size:
            raise UserError(
                f"the dataset has {len(data)} samples, fewer than batch_size="
                f"{config.batch_size}; lower batch_size or give more data"
            )
        sampler = _StepBatches(
            len(data), config.batch_size, config.seed, start, config.steps, shard
        )
        return DataLoader(
            data, batch_sampler=sampler, num_workers=config.num_workers, collate_fn=_collate
        )
    if config.num_workers:
        log.warning("num_workers is ignored for an iterable dataset: it is read in-process")
    return _iterable_batches(data, config.batch_size, start, config.steps, shard)


def _iterable_batches(
    data, batch_size: int, start: int, stop: int, shard: slice = slice(None)
) -> Iterator:
    """Batches of an iterable, restarted when it ends. A resumed run skips the items already
    used, so it is reproducible when iterating `data` is."""

    def items():
        total = 0
        while True:
            n = 0
            for item in data:
                n += 1
                yield item
            if n == 0:
                raise UserError(
                    f"the data ran out after {total} items; pass a torch Dataset or an "
                    "iterable that can be iterated again (not a one-shot generator)"
                )
            total += n

    it = items()
    for _ in islice(it, start * batch_size):
        pass
    for _ in range(start, stop):
        # every worker reads the whole batch (an iterable cannot seek), then keeps its shard
        yield _collate([next(it) for _ in range(batch_size)][shard])


def _check_batch(model: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor, encoded: bool):
    """Clear errors for data that does not fit the UNet (an image instead of a latent, ...)."""
    config = _unet(model).config
    space = getattr(model, "space", None)
    latent = (config.in_channels, *space.latent[1:]) if space else f"({config.in_channels}, H, W)"
    hint = (
        "check the encoder's output"
        if encoded
        else "give latents, or pass encode=LatentEncoder.from_pretrained(folder) to encode images"
    )
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != config.in_channels:
        shape = tuple(x.shape[1:]) if torch.is_tensor(x) else type(x).__name__
        raise UserError(
            f"the data gives x of shape {shape}, but the UNet takes latents of "
            f"{config.in_channels} channels (the space's latent is {latent}); {hint}"
        )
    dim = config.cross_attention_dim
    if not torch.is_tensor(cond) or cond.ndim != 3 or cond.shape[-1] != dim:
        shape = tuple(cond.shape[1:]) if torch.is_tensor(cond) else type(cond).__name__
        raise UserError(
            f"the data gives a condition of shape {shape}, but the UNet takes a text context "
            f"(tokens, {dim}); {hint}"
        )


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


def _make_ema(model: ElasticUNet, decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=decay, foreach=True)


def _unet(model: torch.nn.Module):
    """The diffusers UNet a model runs: an ElasticUNet's, or the model itself."""
    return model.unet if isinstance(model, ElasticUNet) else model


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

    state = _load_checkpoint(model, resume_dir, config) if resume_dir else None
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    fp16 = config.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    ema = _make_ema(model, config.ema_decay) if config.ema_decay else None
    cfg_gen = torch.Generator().manual_seed(_seed(config.seed, CFG))
    noise_gen = torch.Generator().manual_seed(_seed(config.seed, NOISE))
    losses: list[float] = []
    terms: dict[str, list[float]] = {}
    skips: Counter[tuple[str, int]] = Counter()
    start = 0
    if state is None:
        torch.manual_seed(config.seed)  # any randomness inside the model (dropout) is seeded too
        if elastic:
            model.skip_generator.manual_seed(_seed(config.seed, SKIP))
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
            return _save_checkpoint(
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
        for step, (x, cond) in enumerate(_batches(data, config, start, shard), start + 1):
            if encode is not None:
                x, cond = encode(x, cond)
            _check_batch(model, x, cond, encode is not None)
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
            _save_ema(model, ema, out_dir / EMA_DIR)
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


# -- checkpoints -------------------------------------------------------------------------------


def _save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    config: TrainConfig,
    *,
    step: int,
    losses: list[float],
    terms: dict[str, list[float]],
    skips: Counter,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    ema,
    rng: dict[str, torch.Tensor],
) -> Path:
    """Write the checkpoint next to the old one, then swap: a crash never leaves a torn one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    state = {
        "format": 1,
        "step": step,
        "losses": list(losses),
        "terms": {k: list(v) for k, v in terms.items()},
        "skip_counts": [[s, i, n] for (s, i), n in sorted(skips.items())],
        "config": asdict(config),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "skip": model.skip_generator.get_state() if isinstance(model, ElasticUNet) else None,
            # the data order is a function of (seed, step): this is all of its state
            "data": {"seed": config.seed, "step": step},
            **rng,
        },
    }
    torch.save(state, tmp / STATE_NAME)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


# fields whose change makes a resumed run differ from an uninterrupted one
_RUN_FIELDS = (
    "batch_size",
    "seed",
    "prediction_type",
    "num_train_timesteps",
    "timestep_shift",
    "timestep_noisy_share",
    "timestep_noisy_from",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "cfg_dropout",
)


def _load_checkpoint(model: torch.nn.Module, folder: Path, config: TrainConfig) -> dict:
    """Load the checkpoint's weights into `model` (same parameters, in the same order, as the
    optimizer state expects) and return the rest of the state."""
    state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
    changed = [
        f"{k}: {state['config'].get(k)!r} -> {getattr(config, k)!r}"
        for k in _RUN_FIELDS
        if state["config"].get(k) != getattr(config, k)
    ]
    if changed:
        log.warning("resuming with a changed config (%s)", "; ".join(changed))
    if isinstance(model, ElasticUNet):
        saved = ElasticUNet.from_pretrained(folder / "model")
        model.set_architecture(saved.architecture)
    else:  # a standalone network saves and loads itself (e.g. SearchedUNet2DConditionModel)
        saved = type(model).from_pretrained(folder / "model")
    ours, theirs = model.state_dict(), saved.state_dict()
    if ours.keys() != theirs.keys():
        diff = sorted(set(ours) ^ set(theirs))
        raise UserError(
            f"the checkpoint in {folder} holds other parameters than the model given "
            f"(e.g. {', '.join(diff[:3])}); resume with the model of that run, e.g. "
            f"ElasticUNet.from_pretrained('{folder / 'model'}')"
        )
    model.load_state_dict(theirs)
    return state


def _save_ema(model: ElasticUNet, ema, folder: Path) -> None:
    """Save the model with its EMA weights, leaving the trained weights in `model`."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        model.save_pretrained(folder)
    finally:
        ema.restore(model.parameters())


__all__ = ["LatentEncoder", "Objective", "Parallel", "TrainConfig", "TrainResult", "train"]
