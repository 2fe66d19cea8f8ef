"""The tiny world: a dataset, a CLIP and a UNet small enough to train on two CPU cores.

It is the embedded default of diffnas (DESIGN.md, "The tiny world"): the whole method — robust
training, ΔCLIP evaluation, evolution — runs in it in minutes, and ΔCLIP means something
because the UNet really follows its prompts.

- data: `nas.worlds.shapes`, captioned 32x32 images of coloured shapes;
- CLIP: open_clip's `CLIP` at a small config, trained contrastively here; its score is the
  world's metric (`nas.worlds.clip`, 100 * max(cos, 0));
- UNet: the `tiny` space's base network as an `ElasticUNet`, robustly trained
  (`nas.training.robust`) in pixel space: the 12x16x16 "latent" is
  `pixel_unshuffle(2 * image - 1, 2)`, an exact, free, invertible encoder; conditioned on the
  tiny CLIP's per-token text features (16 x 128).

`load_tiny_world()` builds it on first use and caches it under
`$DIFFNAS_CACHE/tiny_world/<config hash>/`; a later call with the same config loads it in a
second. The build is a function of the config (seeded), so the hash names what is inside.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor

from latency.coreml import cache_dir
from nas.supernet import ElasticUNet, SkipConfig
from nas.training.robust import TrainConfig
from nas.worlds import shapes
from nas.worlds.clip import ClipScorer
from nas.worlds.generate import generate, initial_noise, step_noise_generator
from nas.worlds.tiny_build import load_or_build_clip, locked, publish, threads, train_unet
from nas.worlds.tiny_config import (
    BUILD_THREADS,
    DEFAULT_CFG,
    DEFAULT_STEPS,
    FORMAT,
    TinyWorldConfig,
    check_space,
    config_hash,
    identity,
    load_space_named,
    unet_train_config,
)
from search_spaces import Architecture, SearchSpace, UserError

log = logging.getLogger(__name__)

# -- the world -----------------------------------------------------------------------------------


@dataclass
class TinyEncoder:
    """(images, captions) -> (latents, contexts), as `TinyWorld.encode_batch` computes them."""

    clip: ClipScorer  # the world's CLIP: its text token features condition the UNet

    def __call__(self, images: Tensor, captions) -> tuple[Tensor, Tensor]:
        return TinyWorld.to_latent(images), self.clip.token_features(list(captions))


class TinyWorld:
    """A built tiny world: its space, CLIP scorer, supernet and prompts."""

    def __init__(
        self,
        config: TinyWorldConfig,
        space: SearchSpace,
        clip: ClipScorer,
        supernet: ElasticUNet,
        folder: Path | None = None,
        metrics: dict | None = None,
        built: bool = False,
    ):
        self.config = config
        self.space = space
        self.clip = clip
        self.supernet = supernet
        self.folder = folder  # the cache folder it was loaded from
        self.metrics = metrics or {}  # build times, losses, retrieval accuracy
        self.built = built  # True if this load trained it (False: read from the cache)
        self.train_prompts = shapes.train_prompts(config.split_seed)
        self.val_prompts = shapes.val_prompts(config.split_seed)
        self.scheduler_config = {
            "num_train_timesteps": 1000,
            "beta_schedule": config.beta_schedule,
            "prediction_type": config.prediction_type,
            # No x0 clipping: diffusers' DDIM step pairs the clipped x0 with the noise estimate
            # of the unclipped one, an error that grows with the steps (held-out CLIP at 20
            # steps 55.8 -> 61.2, at 50 steps 40.5 -> 61.0 on the default world).
            "clip_sample": False,
            "set_alpha_to_one": True,
            "timestep_spacing": "trailing",  # start at t = 999, where training saw pure noise
        }
        supernet.scheduler_config = self.scheduler_config  # generate()'s default for it
        self._uncond: Tensor | None = None

    # -- text and images -------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> Tensor:
        """The UNet context of each prompt: (B, 16, 128) tiny-CLIP token features."""
        return self.clip.token_features(prompts)

    def uncond(self) -> Tensor:
        """The unconditional context (1, 16, 128): the empty prompt's token features."""
        if self._uncond is None:
            self._uncond = self.clip.token_features([""])
        return self._uncond

    @staticmethod
    def to_latent(images: Tensor) -> Tensor:
        """Images (B, 3, 32, 32) in [0, 1] -> latents (B, 12, 16, 16) in [-1, 1]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, shapes.SIZE, shapes.SIZE):
            raise UserError(f"images must be (B, 3, 32, 32), not {tuple(images.shape)}")
        return F.pixel_unshuffle(images * 2 - 1, 2)

    @staticmethod
    def decode(latents: Tensor) -> Tensor:
        """Latents (B, 12, 16, 16) -> images (B, 3, 32, 32) in [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != 12:
            raise UserError(f"latents must be (B, 12, H, W), not {tuple(latents.shape)}")
        return ((F.pixel_shuffle(latents, 2) + 1) / 2).clamp(0, 1)

    def encode_batch(self, images: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(images, captions) -> (latents, contexts): the `encode` of robust training."""
        return self.to_latent(images), self.encode_text(list(captions))

    def picklable_encoder(self) -> TinyEncoder:
        """`encode_batch` in a form Ray can ship to training workers (the world holds its
        supernet, which does not pickle)."""
        return TinyEncoder(self.clip)

    def dataset(self, length: int, seed: int | None = None) -> shapes.ShapesDataset:
        """Training items (image, caption) of this world (seed default: the build's)."""
        seed = self.config.seed if seed is None else seed
        return shapes.ShapesDataset(length, seed, "train", self.config.split_seed)

    def train_config(self, **overrides) -> TrainConfig:
        """The `TrainConfig` the supernet was trained with, to continue training it: robust from
        the first step (the build's full-network warm-up is behind it)."""
        return unet_train_config(self.config, **{"skip_warmup_steps": 0, **overrides})

    # -- generation and scoring ------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        noise: Tensor | None = None,
        seed: int = 0,
        steps: int = DEFAULT_STEPS,
        cfg: float = DEFAULT_CFG,
        arch: Architecture | None = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> Tensor:
        """Images (B, 3, 32, 32) in [0, 1] for `prompts`, from `noise` (default:
        `initial_noise(space, B, seed)`), with `arch` (default: the supernet's current one).
        `eta` > 0: stochastic DDIM, its step noise drawn from `step_noise_generator(seed)`."""
        if not prompts:
            raise UserError("the prompt list is empty: give at least one prompt")
        if noise is None:
            noise = initial_noise(self.space, len(prompts), seed)
        context = self.encode_text(prompts)
        previous = self.supernet.architecture
        if arch is not None:
            self.supernet.set_architecture(arch)
        try:
            latents = generate(
                self.supernet,
                context,
                self.uncond(),
                noise,
                steps,
                cfg,
                progress=progress,
                eta=eta,
                generator=step_noise_generator(seed) if eta else None,
            )
        finally:
            self.supernet.set_architecture(previous)
        return self.decode(latents.cpu())

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """CLIP score (100 * max(cos, 0)) of image i against prompt i."""
        return self.clip.score(images, prompts)


def world_folder(config: TinyWorldConfig, space: SearchSpace) -> Path:
    return cache_dir() / "tiny_world" / config_hash(config, space)


def load_tiny_world(
    config: TinyWorldConfig | None = None, progress: bool = True, rebuild: bool = False
) -> TinyWorld:
    """The tiny world of `config` (default `TinyWorldConfig()`): loaded from the cache, or
    built (data + CLIP + supernet, a few minutes on two cores) and cached on first use.
    `rebuild=True` trains everything again."""
    config = config or TinyWorldConfig()
    config.check()
    space = load_space_named(config.space)
    check_space(space, config)
    root = cache_dir()
    final = world_folder(config, space)
    key = final.name
    work = final.with_name(f"{key}.partial")  # checkpoints of an unfinished build
    with locked(final):
        if rebuild:
            shutil.rmtree(final, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        if (final / "metrics.json").is_file():
            return _load(config, space, final)
        t0, c0 = time.perf_counter(), time.process_time()
        with threads(BUILD_THREADS):
            clip, clip_metrics, clip_folder = load_or_build_clip(
                config, space, root, rebuild, progress
            )
            torch.manual_seed(config.seed)
            supernet = ElasticUNet(space, skip=SkipConfig(p=config.skip_p), seed=config.seed)
            world = TinyWorld(config, space, clip, supernet)
            unet_metrics = train_unet(world, work / "train", progress)
        tmp = final.with_name(f"{key}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copytree(clip_folder, tmp / "clip")
        supernet.save_pretrained(tmp / "supernet")
        metrics = {
            **clip_metrics,
            **unet_metrics,
            "build_seconds": time.perf_counter() - t0,
            "build_cpu_seconds": time.process_time() - c0,
            "torch_threads": BUILD_THREADS,
            "config_hash": key,
        }
        (tmp / "config.json").write_text(
            json.dumps({"hash": key, "format": FORMAT, "config": identity(config)}, indent=2) + "\n"
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        publish(tmp, final)
        shutil.rmtree(work, ignore_errors=True)
        world = _load(config, space, final)
        world.built = True
        return world


def _load(config: TinyWorldConfig, space: SearchSpace, folder: Path) -> TinyWorld:
    saved = json.loads((folder / "config.json").read_text())
    if saved.get("config") != json.loads(json.dumps(identity(config))):
        raise UserError(
            f"the cached tiny world in {folder} was built from another config; delete the "
            "folder (or run `diffnas world build --rebuild`)"
        )
    clip = ClipScorer.load(folder / "clip")
    unet = UNet2DConditionModel.from_pretrained(
        folder / "supernet", subfolder="unet", low_cpu_mem_usage=False
    )
    supernet = ElasticUNet(space, unet, skip=SkipConfig(p=config.skip_p), seed=config.seed)
    supernet.eval()
    metrics = json.loads((folder / "metrics.json").read_text())
    return TinyWorld(config, space, clip, supernet, folder=folder, metrics=metrics)


def write_grid(images: Tensor, path: str | Path, nrow: int, scale: int = 4) -> Path:
    """Save images (B, 3, H, W) in [0, 1] as one PNG, `nrow` per row, upscaled `scale` times
    (nearest neighbour: 32x32 pixels stay crisp)."""
    from torchvision.utils import save_image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {path}: give a .png file")
    path.parent.mkdir(parents=True, exist_ok=True)
    big = F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")
    save_image(big, path, nrow=nrow, padding=2, pad_value=0.5)
    return path


__all__ = [
    "DEFAULT_CFG",
    "DEFAULT_STEPS",
    "TinyWorld",
    "TinyWorldConfig",
    "config_hash",
    "load_tiny_world",
    "write_grid",
]
