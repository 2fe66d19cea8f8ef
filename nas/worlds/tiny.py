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

import fcntl
import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor

from latency.coreml import cache_dir
from nas.supernet import ElasticUNet, SkipConfig
from nas.training.robust import TrainConfig, train
from nas.worlds import shapes
from nas.worlds.clip import ClipScorer, retrieval_top1, train_contrastive
from nas.worlds.generate import generate, initial_noise, step_noise_generator
from search_spaces import Architecture, SearchSpace, UserError, load_space

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
        _unet_train_config(self).check()


# Fields added to TinyWorldConfig after its FORMAT, with the value at which a build is what it
# was before the field existed. At that value a field stays out of the hash (and the cache's
# config.json), so that adding an option does not make every cached world stale.
_ADDED_FIELDS: dict[str, object] = {"unet_timestep_shift": 1.0, "unet_timestep_noisy_share": 0.0}


def _identity(config: TinyWorldConfig) -> dict:
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
        content |= {"config": _identity(config), "space": space.spec.model_dump(mode="json")}
        content["unet"] = dict(space.unet_config)
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _clip_model_cfg(config: TinyWorldConfig, context_length: int) -> dict:
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


def _load_space(name: str) -> SearchSpace:
    return SearchSpace.from_yaml(name) if name.endswith((".yaml", ".yml")) else load_space(name)


def _check_space(space: SearchSpace, config: TinyWorldConfig) -> None:
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
        return _unet_train_config(self.config, **{"skip_warmup_steps": 0, **overrides})

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


# -- building ------------------------------------------------------------------------------------


def _unet_train_config(config: TinyWorldConfig, **overrides) -> TrainConfig:
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


def lock_path(entry: Path) -> Path:
    """The lock file of a cache entry (a world or CLIP folder): held while the entry is
    built or opened."""
    return entry.with_name(f"{entry.name}.lock")


@contextmanager
def _locked(entry: Path):
    """One builder per cache entry at a time (another process waits, then finds it built)."""
    path = lock_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
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
    clip = ClipScorer.from_config(_clip_model_cfg(config, space.context[0]))
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
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_or_build_clip(config, space, root: Path, rebuild: bool, progress: bool):
    key = config_hash(config, space, clip_only=True)
    final = root / "tiny_clip" / key
    with _locked(final):
        if rebuild:
            shutil.rmtree(final, ignore_errors=True)
        if (final / "metrics.json").is_file():
            return ClipScorer.load(final), json.loads((final / "metrics.json").read_text()), final
        tmp = final.with_name(f"{key}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        clip, metrics = _build_clip(config, space, tmp, progress)
        _publish(tmp, final)
        return clip, {**metrics, "clip_built": True}, final


def _build_unet(config, space, clip: ClipScorer, work: Path, progress: bool):
    """Robustly train the space's base UNet; `work` keeps checkpoints (an interrupted build
    resumes). Returns the supernet and its metrics."""
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(config.seed)
    supernet = ElasticUNet(space, skip=SkipConfig(p=config.skip_p), seed=config.seed)
    world = TinyWorld(config, space, clip, supernet)
    data = world.dataset(config.unet_steps * config.unet_batch)
    train_config = _unet_train_config(config)
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
        "unet_params": space.base_params,
        "unet_losses_every_50": losses[::50],
    }
    return supernet, metrics


def _world_folder(config: TinyWorldConfig, space: SearchSpace) -> Path:
    return cache_dir() / "tiny_world" / config_hash(config, space)


def load_tiny_world(
    config: TinyWorldConfig | None = None, progress: bool = True, rebuild: bool = False
) -> TinyWorld:
    """The tiny world of `config` (default `TinyWorldConfig()`): loaded from the cache, or
    built (data + CLIP + supernet, a few minutes on two cores) and cached on first use.
    `rebuild=True` trains everything again."""
    config = config or TinyWorldConfig()
    config.check()
    space = _load_space(config.space)
    _check_space(space, config)
    root = cache_dir()
    final = _world_folder(config, space)
    key = final.name
    work = final.with_name(f"{key}.partial")  # checkpoints of an unfinished build
    with _locked(final):
        if rebuild:
            shutil.rmtree(final, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        if (final / "metrics.json").is_file():
            return _load(config, space, final)
        t0, c0 = time.perf_counter(), time.process_time()
        with _threads(BUILD_THREADS):
            clip, clip_metrics, clip_folder = _load_or_build_clip(
                config, space, root, rebuild, progress
            )
            supernet, unet_metrics = _build_unet(config, space, clip, work / "train", progress)
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
            json.dumps({"hash": key, "format": FORMAT, "config": _identity(config)}, indent=2)
            + "\n"
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _publish(tmp, final)
        shutil.rmtree(work, ignore_errors=True)
        world = _load(config, space, final)
        world.built = True
        return world


def _load(config: TinyWorldConfig, space: SearchSpace, folder: Path) -> TinyWorld:
    saved = json.loads((folder / "config.json").read_text())
    if saved.get("config") != json.loads(json.dumps(_identity(config))):
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
