"""Checkpoints of a training run: the model, the optimizer, learning-rate schedule, EMA and every
random stream, so that a resumed run ends with the weights and losses of an uninterrupted one."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from nas.supernet import ElasticUNet
from nas.training.config import STATE_NAME, TrainConfig
from search_spaces import UserError

log = logging.getLogger(__name__)


# -- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(
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


def load_checkpoint(model: torch.nn.Module, folder: Path, config: TrainConfig) -> dict:
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


def save_ema(model: ElasticUNet, ema, folder: Path) -> None:
    """Save the model with its EMA weights, leaving the trained weights in `model`."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        model.save_pretrained(folder)
    finally:
        ema.restore(model.parameters())
