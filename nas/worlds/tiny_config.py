"""What a tiny world is built from: `TinyWorldConfig` (a field per knob, with its comment), the
hash that names a built world in the cache, and the training config of its UNet."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nas.training.robust import TrainConfig
from nas.worlds import shapes
from search_spaces import SearchSpace, UserError, load_space

log = logging.getLogger(__name__)


FORMAT = 2  # bump when the build's code changes what a config produces: old caches go stale
# The build's torch threads, whatever the caller's: float sums split over another number of
# threads round differently, and over thousands of steps those bits grow into another world
# (held-out CLIP 48.6 vs 55.8 for one config built at 1 and at 2 threads). With the count
# fixed, a config gives the same world on any machine of the same CPU kind.
BUILD_THREADS = 2
DEFAULT_STEPS = 20  # DDIM steps of generation and evaluation
DEFAULT_CFG = 3.0  # classifier-free guidance weight


@dataclass
class TinyWorldConfig:
    """Everything a tiny world is built from. Its content hash keys the cache."""

    seed: int = 0  # model initialisation, data order, noise, skips: the whole build
    split_seed: int = 0  # which scene keys are held out as validation prompts
    # -- the tiny CLIP (open_clip `CLIP`) --
    clip_embed_dim: int = 128  # joint embedding size
    clip_width: int = 128  # vision and text transformer width; text width = UNet context dim
    clip_layers: int = 3  # transformer layers of each tower
    clip_text_heads: int = 4  # text attention heads (vision: width / 32 heads)
    clip_patch: int = 4  # ViT patch side: 32x32 images -> 8x8 patches
    clip_steps: int = 300  # contrastive training steps
    clip_batch: int = 96  # pairs per step (the negatives of each pair)
    clip_lr: float = 2e-3  # AdamW peak learning rate (warm-up, then cosine decay)
    clip_eval_rounds: int = 4  # image sets drawn for the validation retrieval accuracy
    # -- the UNet (the space's base network, trained robustly) --
    space: str = "tiny"  # search space whose base UNet is trained (built-in name or YAML path)
    # robust-training steps: 2000 took the held-out CLIP from 60 (800 steps, blob shapes) to 80
    # with recognisable triangles and squares, in about 6.5 of the build's 10 minutes
    unet_steps: int = 2000
    unet_batch: int = 24  # images per step
    unet_lr: float = 1e-3  # AdamW peak learning rate
    # diffusers schedule name (constant, cosine, ...); cosine from 2e-3 after 40 warm-up steps
    # scored 52 on held-out prompts where constant 1e-3 scored 60 (800 steps each)
    unet_lr_scheduler: str = "constant"
    unet_warmup_steps: int = 0  # linear warm-up steps of that schedule
    # Min-SNR loss weighting (None: plain MSE on v). gamma=5 halved the held-out CLIP here: it
    # down-weights the noisy steps, where the prompt decides what is drawn and where
    unet_snr_gamma: float | None = None
    skip_p: float = 0.1  # robust training: probability each removable block is skipped
    # first UNet steps without skipping (the full network learns to draw before it learns to
    # lose blocks). 1000 of the 2000 made the full network better (held-out CLIP 81.5 vs 80.4)
    # but the supernet less tolerant of missing blocks: a search on it kept 49% of the full
    # CLIP (88% without), below random networks of its latency. So off by default
    # (experiments/ablations/skip_warmup.yaml)
    unet_skip_warmup_steps: int = 0
    # > 1 trains more on noisy timesteps (TrainConfig.timestep_shift). 3 placed shapes where the
    # prompt says (held-out CLIP 84.3 vs 80.4) but drew blunter ones (circle vs triangle told
    # apart 0.58 vs 0.90), and a search removing two blocks per iteration kept 55% of its full
    # CLIP (one per iteration: 89%). So uniform (experiments/ablations/timestep_shift.yaml)
    unet_timestep_shift: float = 1.0
    # share of the UNet's timesteps drawn from the noisiest 15% instead (TrainConfig.
    # timestep_noisy_share). 0.3 placed and counted shapes as asked (held-out CLIP 82.8 vs 80.4)
    # but drew blobs (circle vs triangle told apart 0.60 vs 0.90), and its search kept 85% of
    # the full CLIP (98.6% uniform): experiments/ablations/noisy_share.yaml
    unet_timestep_noisy_share: float = 0.0
    cfg_dropout: float = 0.1  # probability a caption is replaced by the empty one (for CFG)
    prediction_type: str = "v_prediction"  # v stays well-posed at the pure-noise end
    beta_schedule: str = "squaredcos_cap_v2"  # cosine: reaches pure noise, unlike SD's schedule
    ema_decay: float | None = 0.999  # EMA of the UNet weights (None: the last weights)

    @classmethod
    def miniature(cls) -> TinyWorldConfig:
        """A world that builds in seconds (a few steps, one CLIP layer): for tests. Its
        models are barely trained: it exercises the code paths, not the quality."""
        return cls(
            clip_layers=1,
            clip_steps=2,
            clip_batch=8,
            clip_eval_rounds=1,
            unet_steps=2,
            unet_batch=4,
            ema_decay=None,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> TinyWorldConfig:
        """A config from a JSON object of some of its fields (the rest keep their defaults)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"tiny-world config file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            unknown = sorted(set(data) - names) if isinstance(data, dict) else []
            raise UserError(
                f"{path}: a tiny-world config is a JSON object of TinyWorldConfig fields"
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                + f"; known: {', '.join(sorted(names))}"
            )
        return cls(**data)

    def clip_fields(self) -> dict:
        """What the CLIP stage depends on (a UNet-only change reuses a trained CLIP)."""
        names = ("seed", "split_seed") + tuple(f.name for f in fields(self) if "clip" in f.name)
        return {n: getattr(self, n) for n in names}

    def check(self) -> None:
        positive = ["clip_embed_dim", "clip_width", "clip_layers", "clip_text_heads"]
        positive += ["clip_patch", "clip_steps", "clip_batch", "clip_lr", "clip_eval_rounds"]
        positive += ["unet_steps", "unet_batch", "unet_lr"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"TinyWorldConfig.{name}={getattr(self, name)} must be positive")
        if shapes.SIZE % self.clip_patch:
            raise UserError(f"clip_patch={self.clip_patch} must divide the image size 32")
        if self.clip_width % self.clip_text_heads or self.clip_width % 32:
            raise UserError(
                f"clip_width={self.clip_width} must be a multiple of 32 and of clip_text_heads"
            )
        if self.clip_batch < 2:
            raise UserError("clip_batch must be at least 2: contrastive training needs negatives")
        # the UNet's training fields (schedule, Min-SNR, ...) fail here, before any CLIP is built
        unet_train_config(self).check()


# Fields added to TinyWorldConfig after its FORMAT, with the value at which a build is what it
# was before the field existed. At that value a field stays out of the hash (and the cache's
# config.json), so that adding an option does not make every cached world stale.
_ADDED_FIELDS: dict[str, object] = {"unet_timestep_shift": 1.0, "unet_timestep_noisy_share": 0.0}


def identity(config: TinyWorldConfig) -> dict:
    """The config's fields that name its world: all but added fields at their neutral value."""
    return {
        k: v
        for k, v in asdict(config).items()
        if not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])
    }


def config_hash(config: TinyWorldConfig, space: SearchSpace, clip_only: bool = False) -> str:
    """Content hash of what a build depends on: the config, the space (its UNet config and
    rules), and the build format."""
    content = {"format": FORMAT, "clip": config.clip_fields()}
    if not clip_only:
        content |= {"config": identity(config), "space": space.spec.model_dump(mode="json")}
        content["unet"] = dict(space.unet_config)
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def clip_model_cfg(config: TinyWorldConfig, context_length: int) -> dict:
    return {
        "embed_dim": config.clip_embed_dim,
        "vision_cfg": {
            "image_size": shapes.SIZE,
            "patch_size": config.clip_patch,
            "width": config.clip_width,
            "layers": config.clip_layers,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,  # open_clip's tokenizer vocabulary
            "width": config.clip_width,
            "heads": config.clip_text_heads,
            "layers": config.clip_layers,
        },
    }


def load_space_named(name: str) -> SearchSpace:
    return SearchSpace.from_yaml(name) if name.endswith((".yaml", ".yml")) else load_space(name)


def check_space(space: SearchSpace, config: TinyWorldConfig) -> None:
    latent, context = tuple(space.latent), tuple(space.context)
    if latent != (12, 16, 16):
        raise UserError(
            f"space {space.name!r} takes latents {latent}; the tiny world gives 12x16x16 "
            "(pixel_unshuffle of a 32x32 RGB image)"
        )
    if context[1] != config.clip_width:
        raise UserError(
            f"space {space.name!r} takes a context of width {context[1]}, but the tiny CLIP's "
            f"text width is clip_width={config.clip_width}; make them equal"
        )


def unet_train_config(config: TinyWorldConfig, **overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "steps": config.unet_steps,
            "batch_size": config.unet_batch,
            "lr": config.unet_lr,
            "lr_scheduler": config.unet_lr_scheduler,
            "lr_warmup_steps": config.unet_warmup_steps,
            "snr_gamma": config.unet_snr_gamma,
            "timestep_shift": config.unet_timestep_shift,
            "timestep_noisy_share": config.unet_timestep_noisy_share,
            "skip_warmup_steps": config.unet_skip_warmup_steps,
            "prediction_type": config.prediction_type,
            "beta_schedule": config.beta_schedule,
            "cfg_dropout": config.cfg_dropout,
            "ema_decay": config.ema_decay,
            "checkpoint_every": 200,  # an interrupted build resumes from here
            "seed": config.seed,
            **overrides,
        }
    )
