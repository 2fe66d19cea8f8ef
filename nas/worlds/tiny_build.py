"""Building a tiny world: the tiny CLIP trained contrastively on the shapes, the base UNet
robustly trained against it, one builder per cache entry at a time (a file lock) and every
finished build moved into place in one rename."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from nas.training.robust import train
from nas.worlds import shapes
from nas.worlds.clip import ClipScorer, retrieval_top1, train_contrastive
from nas.worlds.tiny_config import TinyWorldConfig, clip_model_cfg, config_hash, unet_train_config
from search_spaces import SearchSpace

log = logging.getLogger(__name__)


def lock_path(entry: Path) -> Path:
    """The lock file of a cache entry (a world or CLIP folder): held while the entry is
    built or opened."""
    return entry.with_name(f"{entry.name}.lock")


@contextmanager
def locked(entry: Path):
    """One builder per cache entry at a time (another process waits, then finds it built)."""
    path = lock_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place in one rename: a reader never sees half of one."""
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _clip_batches(config: TinyWorldConfig):
    train_keys, _ = shapes.split_keys(config.split_seed)
    size = config.clip_batch

    def batch(step: int) -> tuple[Tensor, list[str], list[str]]:
        scenes = [
            shapes.sample_scene(shapes.item_rng(config.seed, "train", step * size + i), train_keys)
            for i in range(size)
        ]
        return shapes.render_batch(scenes), [s.caption for s in scenes], [s.key for s in scenes]

    return batch


def clip_retrieval(clip: ClipScorer, split_seed: int, rounds: int = 4) -> float:
    """Zero-shot text -> image top-1 over the validation prompts (held-out scenes), averaged
    over `rounds` independently drawn image sets."""
    prompts = shapes.val_prompts(split_seed)
    accuracies = []
    for r in range(rounds):
        scenes = shapes.scenes_for_prompts(prompts, seed=1000 + r)
        images = shapes.render_batch(scenes)
        accuracies.append(retrieval_top1(clip, images, prompts, [s.key for s in scenes]))
    return sum(accuracies) / len(accuracies)


def _build_clip(config: TinyWorldConfig, space: SearchSpace, folder: Path, progress: bool):
    """Train the tiny CLIP into `folder` (open_clip's local-dir layout + metrics.json)."""
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(config.seed)
    clip = ClipScorer.from_config(clip_model_cfg(config, space.context[0]))
    losses = train_contrastive(
        clip, _clip_batches(config), config.clip_steps, lr=config.clip_lr, progress=progress
    )
    top1 = clip_retrieval(clip, config.split_seed, config.clip_eval_rounds)
    metrics = {
        "clip_seconds": time.perf_counter() - t0,
        "clip_cpu_seconds": time.process_time() - c0,
        "clip_final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "clip_val_retrieval_top1": top1,
        "clip_params": sum(p.numel() for p in clip.model.parameters()),
    }
    clip.save(folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("tiny CLIP: retrieval top-1 %.3f on validation prompts", top1)
    return clip, metrics


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_or_build_clip(config, space, root: Path, rebuild: bool, progress: bool):
    key = config_hash(config, space, clip_only=True)
    final = root / "tiny_clip" / key
    with locked(final):
        if rebuild:
            shutil.rmtree(final, ignore_errors=True)
        if (final / "metrics.json").is_file():
            return ClipScorer.load(final), json.loads((final / "metrics.json").read_text()), final
        tmp = final.with_name(f"{key}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        clip, metrics = _build_clip(config, space, tmp, progress)
        publish(tmp, final)
        return clip, {**metrics, "clip_built": True}, final


def train_unet(world, work: Path, progress: bool) -> dict:
    """Robustly train a new world's base UNet (`world.supernet`, freshly initialised) in place;
    `work` keeps checkpoints (an interrupted build resumes). Returns its metrics."""
    t0, c0 = time.perf_counter(), time.process_time()
    config, supernet = world.config, world.supernet
    data = world.dataset(config.unet_steps * config.unet_batch)
    train_config = unet_train_config(config)
    # checkpoints let an interrupted build resume; a build shorter than one interval has none
    checkpoints = config.unet_steps > train_config.checkpoint_every
    resume = checkpoints and (work / "checkpoint" / "state.pt").is_file()
    result = train(
        supernet,
        data,
        train_config,
        out_dir=work if checkpoints else None,
        resume=resume,
        encode=world.encode_batch,
        progress=progress,
        uncond=world.uncond()[0],
    )
    if result.ema is not None:
        result.ema.copy_to(supernet.parameters())
    losses = result.losses
    metrics = {
        "unet_seconds": time.perf_counter() - t0,  # this run only, if it resumed
        "unet_cpu_seconds": time.process_time() - c0,
        "unet_resumed": resume,
        "unet_final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "unet_params": world.space.base_params,
        "unet_losses_every_50": losses[::50],
    }
    return metrics
