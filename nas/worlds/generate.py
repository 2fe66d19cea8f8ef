"""Sampling: DDIM (diffusers' `DDIMScheduler`) with classifier-free guidance, batched.

The conditional and unconditional predictions of a step come from one UNet call on the
doubled batch (as SD pipelines do). By default sampling is deterministic (DDIM with eta = 0):
the same noise gives the same images, so architectures compared on the same `initial_noise`
differ only by what the architecture does. eta > 0 adds fresh noise at every step (eta = 1:
DDPM's ancestral sampling), drawn from a seeded generator so that it is reproducible too.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch
from diffusers import DDIMScheduler
from torch import Tensor
from tqdm.auto import tqdm

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


def make_scheduler(scheduler_config: Mapping | None = None) -> DDIMScheduler:
    try:
        return DDIMScheduler.from_config(dict(scheduler_config or SD15_SCHEDULER))
    except (TypeError, ValueError, NotImplementedError) as e:
        raise UserError(f"bad DDIM scheduler config {dict(scheduler_config)}: {e}") from None


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
    """
    if steps < 1:
        raise UserError(f"steps={steps}: DDIM needs at least one step")
    check_eta(eta)
    _check_inputs(model, context, uncond, noise)
    scheduler = make_scheduler(scheduler_config or getattr(model, "scheduler_config", None))
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
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="DDIM", unit="step"):
            inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            pred = model(inp, t, encoder_hidden_states=context).sample
            if guided:
                cond, unc = pred.chunk(2)
                pred = unc + cfg * (cond - unc)
            x = scheduler.step(pred, t, x, eta=eta, generator=generator).prev_sample
    finally:
        model.train(was_training)
    return x
