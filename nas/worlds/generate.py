"""Sampling: DDIM (diffusers' `DDIMScheduler`) or DPM-Solver++ (`DPMSolverMultistepScheduler`)
with classifier-free guidance, batched.

The conditional and unconditional predictions of a step come from one UNet call on the
doubled batch (as SD pipelines do). By default sampling is deterministic (DDIM with eta = 0):
the same noise gives the same images, so architectures compared on the same `initial_noise`
differ only by what the architecture does. eta > 0 adds fresh noise at every step (eta = 1:
DDPM's ancestral sampling), drawn from a seeded generator so that it is reproducible too.

`sampler="dpm_solver"` samples with DPM-Solver++ (2M, deterministic) from the same noises, built
from the same scheduler config (schedule, prediction type, timestep spacing): one UNet call per
step as DDIM, but good images in fewer steps (docs/evaluation-cost.md).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch import Tensor
from tqdm.auto import tqdm

from nas.protocol_checks import check_steps
from nas.supernet import ElasticUNet
from search_spaces import SearchSpace, UserError

# Stable Diffusion v1.5's DDIM settings: the default for a model that says nothing else
SD15_SCHEDULER: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


# sampler name -> its diffusers scheduler (the steps each takes: nas.protocol_checks)
SAMPLERS: dict[str, type] = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}


def make_scheduler(scheduler_config: Mapping | None = None, sampler: str = "ddim"):
    """The sampler's diffusers scheduler from a (DDIM) scheduler config: the schedule, the
    prediction type and the timestep spacing carry over; keys only DDIM knows are ignored."""
    if sampler not in SAMPLERS:
        raise UserError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    config = dict(scheduler_config or SD15_SCHEDULER)
    try:
        return SAMPLERS[sampler].from_config(config)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise UserError(f"bad {sampler} scheduler config {config}: {e}") from None


def initial_noise(space: SearchSpace, n: int, seed: int) -> Tensor:
    """`n` starting latents of the space's shape, drawn on the CPU from `seed`: the same on
    every machine, so every architecture is scored from the same noises."""
    if n < 1:
        raise UserError(f"n={n}: ask for at least one noise sample")
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *space.latent), generator=g)


def check_eta(eta: float) -> None:
    """DDIM's eta scales the step noise to eta times DDPM's; above 1 the step's variance
    exceeds what the step has, and the update is undefined (NaN)."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta={eta}: DDIM's eta is in [0, 1] (0: deterministic, 1: ancestral)")


def step_noise_generator(seed: int) -> torch.Generator:
    """The CPU generator of the noise that eta > 0 adds at each step, for images of `seed`:
    a stream of its own, not a replay of `initial_noise(space, n, seed)`'s."""
    return torch.Generator().manual_seed(random.Random(f"ddim-eta-{seed}").getrandbits(63))


def _check_inputs(model: torch.nn.Module, context: Tensor, uncond: Tensor, noise: Tensor) -> None:
    config = getattr(model, "unet", model).config  # an ElasticUNet's UNet, or a plain UNet
    if noise.ndim != 4 or noise.shape[1] != config.in_channels:
        raise UserError(
            f"noise must be (B, {config.in_channels}, H, W) latents, not {tuple(noise.shape)}; "
            "make it with initial_noise(space, n, seed)"
        )
    dim = config.cross_attention_dim
    if context.ndim != 3 or context.shape[0] != noise.shape[0] or context.shape[2] != dim:
        raise UserError(
            f"context must be (B={noise.shape[0]}, tokens, {dim}) to match the noise, "
            f"not {tuple(context.shape)}"
        )
    if uncond.ndim != 3 or uncond.shape[0] not in (1, noise.shape[0]):
        raise UserError(
            f"uncond must be (1 or {noise.shape[0]}, tokens, {dim}), not {tuple(uncond.shape)}"
        )
    if uncond.shape[1:] != context.shape[1:]:
        raise UserError(
            f"uncond {tuple(uncond.shape)} and context {tuple(context.shape)} differ in "
            "(tokens, dim)"
        )


def guided_prediction(model, x: Tensor, t, context: Tensor, cfg: float, scale=None) -> Tensor:
    """The model's output at `x`, timestep `t`, guided: u + cfg (c - u), from one call on the
    doubled batch when `context` holds the conditional then the unconditional contexts
    (cfg != 1), else one call on `x`. `scale`: the scheduler's scale_model_input, if any."""
    guided = cfg != 1.0
    inp = torch.cat([x, x]) if guided else x
    if scale is not None:
        inp = scale(inp, t)
    pred = model(inp, t, encoder_hidden_states=context).sample
    if guided:
        cond, unc = pred.chunk(2)
        pred = unc + cfg * (cond - unc)
    return pred


@torch.no_grad()
def generate(
    model: ElasticUNet | torch.nn.Module,
    context: Tensor,
    uncond: Tensor,
    noise: Tensor,
    steps: int,
    cfg: float,
    scheduler_config: dict | None = None,
    progress: bool = False,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    sampler: str = "ddim",
) -> Tensor:
    """DDIM-sample latents (B, C, H, W) from `noise` with the model's current architecture
    (or with any diffusers UNet, e.g. a standalone network).

    `context` (B, tokens, dim) conditions sample i; `uncond` (1 or B, tokens, dim) is the
    unconditional context; `cfg` the guidance weight w (pred = u + w (c - u); w = 1: no
    guidance, one UNet call per step). `scheduler_config`: a `DDIMScheduler` config; default
    the model's `scheduler_config` attribute (the tiny world sets it on its supernet), else
    SD-v1.5's. `eta`: DDIM's stochasticity, 0 (deterministic) to 1 (ancestral); the noise it
    adds is drawn from `generator` (a CPU generator; None: torch's global one). Runs on the
    model's device, in eval mode (no block is skipped); returns the latents there.
    `sampler`: "ddim", or "dpm_solver" (DPM-Solver++ 2M from the same config; no eta).
    """
    check_eta(eta)
    if eta and sampler != "ddim":
        raise UserError(f"eta={eta}: eta is DDIM's; {sampler} samples deterministically")
    _check_inputs(model, context, uncond, noise)
    config = scheduler_config or getattr(model, "scheduler_config", None)
    scheduler = make_scheduler(config, sampler)
    check_steps(sampler, steps, scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(steps)
    device = next(model.parameters()).device
    x = noise.to(device, torch.float32) * scheduler.init_noise_sigma
    context = context.to(device, torch.float32)
    guided = cfg != 1.0
    if guided:
        uncond = uncond.to(device, torch.float32).expand(len(x), -1, -1)
        context = torch.cat([context, uncond])
    was_training = model.training
    model.eval()
    try:
        extra = {"eta": eta, "generator": generator} if sampler == "ddim" else {}
        for t in tqdm(scheduler.timesteps, disable=not progress, desc=sampler, unit="step"):
            pred = guided_prediction(model, x, t, context, cfg, scheduler.scale_model_input)
            x = scheduler.step(pred, t, x, **extra).prev_sample
    finally:
        model.train(was_training)
    return x
