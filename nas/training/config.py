"""What a robust-training run is given (`TrainConfig`, a field per knob with its comment) and
what it returns (`TrainResult`); `Parallel` is one worker's share of a data-parallel run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from search_spaces import UserError

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
    """One worker of a data-parallel run of `train` (`nas.training.ray` makes one per Ray Train
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
