"""`diffnas train`: more robust training of a world's supernet, in this process or on Ray Train.

The world hands over what training needs (its data, supernet, unconditional context and an
encoder); training knows no world beyond that.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nas.training.config import TrainConfig, TrainResult
from nas.training.ray import check_resume, check_train_args, train_ray
from nas.training.robust import train
from search_spaces import UserError

TRAIN_DIR = "train"  # out/train/: checkpoints (in-process: checkpoint/; Ray: checkpoint_<step>/)
SUMMARY_NAME = "train.json"  # out/train.json: what was trained, how, and its losses
# scenes drawn for training; they are drawn when read, so the size costs nothing, and a fixed
# size keeps a step's batch independent of --steps (a run extended with --resume --steps M
# trains as a run of M steps)
WORLD_ITEMS = 2**20


def train_supernet(
    world,
    config: TrainConfig,
    out: str | Path,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    use_gpu: bool | None = None,
    resume: bool = False,
    source: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """`diffnas train`: robust training of `world`'s supernet, from its current weights, with
    `config`. One worker and no `ray_address` trains in this process (`nas.training.robust.train`),
    otherwise on Ray Train (`train_ray`).

    `out` receives the trained supernet (`ElasticUNet.from_pretrained(out)`; its EMA weights
    when the config keeps an EMA, as the world build does), `train/` (the checkpoints that
    `resume=True` continues) and `train.json` (`source`, the config, workers, losses).
    """
    check_train_args(workers, ray_address, use_gpu)
    out = Path(out).expanduser()
    state_dir = out / TRAIN_DIR
    on_ray = workers > 1 or ray_address is not None
    if resume:
        if not check_resume(state_dir, on_ray, out, "start a new --out"):
            raise UserError(
                f"--resume, but {out} holds no checkpoint to resume from (in {state_dir}); "
                "start without --resume"
            )
    elif out.exists() and any(out.iterdir()):
        raise UserError(
            f"{out} exists and is not empty; continue its training with --resume, or give "
            "another --out (nothing stored is overwritten)"
        )

    data = world.dataset(max(WORLD_ITEMS, config.batch_size), config.seed)
    model, uncond = world.supernet, world.uncond()[0]
    if on_ray:
        result = train_ray(
            model,
            data,
            config,
            state_dir,
            workers=workers,
            resume=resume,
            encode=world.picklable_encoder(),  # Ray ships it to every worker
            uncond=uncond,
            ray_address=ray_address,
            use_gpu=use_gpu,
        )
    else:
        if use_gpu or (use_gpu is None and torch.cuda.is_available()):
            config = replace(config, device="cuda")
        result = train(
            model,
            data,
            config,
            out_dir=state_dir,
            resume=resume,
            encode=world.encode_batch,
            progress=progress,
            uncond=uncond,
        )
    if result.ema is not None:
        result.ema.copy_to(model.parameters())
    model.save_pretrained(out)
    summary = {
        "source": source or {},
        "config": asdict(config),
        "workers": workers,
        "ray_address": ray_address,
        "steps": result.steps,
        "weights": "ema" if result.ema is not None else "trained",
        "seconds": result.seconds,  # this call only, when it resumed
        "losses": result.losses,
        # steps in which each block instance was skipped: "slot[instance]" -> steps
        "skipped": {f"{slot}[{i}]": n for (slot, i), n in result.skip_counts.items()},
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return result


__all__ = ["SUMMARY_NAME", "TRAIN_DIR", "train_supernet"]
