"""The Stable Diffusion world: a local SD-v1.5 pipeline, MS-COCO captions and open_clip.

This is the world of the paper's protocol (Sec. 3.1, `experiments/snapfusion_sd15.yaml`):
the supernet is the pipeline's UNet wrapped as the space's `ElasticUNet`; text conditions come
from the pipeline's CLIP text encoder and images from its VAE decoder; DDIM is built from the
pipeline's scheduler config; the CLIP score is open_clip's (ViT-g-14 in the paper); the
validation prompts are MS-COCO 2014 val captions. The search sees the same interface as in the
tiny world (`nas.worlds.tiny.TinyWorld`): `space`, `supernet`, `clip`, `val_prompts`, `encode_text`,
`uncond`, `decode`, `dataset`, `encode_batch`, `train_config`.

Nothing is downloaded. The files and their keys under `world:` in the experiment file
(relative paths are read from `data_dir`):

    pipeline        a diffusers pipeline folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/
    captions        MS-COCO annotations/captions_val2014.json
    clip_weights    the open_clip weights file of `clip_model` (open_clip_pytorch_model.bin)
    train_images    optional: a folder of training images, e.g. MS-COCO train2014/
    train_captions  optional: their captions in MS-COCO format, e.g. captions_train2014.json

`world_space` checks all of them before anything costly starts (the latency table, loading
860M parameters) and names every missing file, its key and where to get it in one error.

Validation prompts: one caption per image of `captions` (the one with the lowest annotation
id), images in increasing image id, whitespace collapsed, a caption repeated by another image
kept once. `evaluation.prompts` takes the first N (the paper: 2K). The order depends on the
file alone, so every run on every machine scores the same prompts.

Robust training needs image-caption data. Without `train_images` the search cannot train, so
`search.train_steps` must then be 0 (the pretrained UNet is scored as it is); any other value
is an error that says so. With them, training batches are every (image, caption) pair of
`train_captions`, images resized and centre-cropped to `resolution` (as diffusers'
text-to-image training script does), encoded by the pipeline's VAE.

Resolution: `resolution` is the image side in pixels; the latent side is resolution / the
VAE's downsampling factor (8 for SD). The space is searched at that latent size, so the latency
table is measured at it too (SD-v1.5 at 512 px: 64x64 latents, as the sd15 space says).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextConfig

from nas.experiment import Experiment
from nas.supernet import ElasticUNet, SkipConfig
from nas.training.robust import LatentEncoder, TrainConfig
from nas.worlds.clip import ClipScorer
from nas.worlds.coco import CocoCaptions, read_val_prompts
from search_spaces import SearchSpace, UserError

log = logging.getLogger(__name__)

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TEXT_BATCH = 64  # prompts through the text encoder at once: 2K prompts in one go need GBs
DECODE_BATCH = 8  # latents through the VAE decoder at once: at 512 px it is memory-hungry

# where each file comes from: the error for a missing one says it
WHERE = {
    "pipeline": (
        "a local copy of Stable Diffusion v1.5 in diffusers' layout (unet/ vae/ text_encoder/ "
        "tokenizer/ scheduler/), e.g. `huggingface-cli download "
        "stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR` on a machine with internet"
    ),
    "captions": (
        "annotations/captions_val2014.json of MS-COCO (annotations_trainval2014.zip from "
        "https://cocodataset.org/#download)"
    ),
    "clip_weights": (
        "open_clip_pytorch_model.bin of the CLIP model's Hugging Face repo (ViT-g-14: "
        "laion/CLIP-ViT-g-14-laion2B-s12B-b42K)"
    ),
    "train_images": (
        "a folder of training images, e.g. MS-COCO's train2014/ (train2014.zip from "
        "https://cocodataset.org/#download)"
    ),
    "train_captions": (
        "the training images' captions in MS-COCO format, e.g. annotations/captions_train2014.json "
        "of annotations_trainval2014.zip"
    ),
}
FOLDERS = ("pipeline", "train_images")


# -- files and configs: checked before anything costly starts ----------------------------------


def world_paths(exp: Experiment) -> dict[str, Path]:
    """The absolute path of every file the world names (keys of `WHERE` that are set)."""
    root = Path(exp.world.data_dir).expanduser()
    paths = {}
    for key in WHERE:
        value = getattr(exp.world, key)
        if value is not None:  # an absolute path stays as it is under `root /`
            paths[key] = (root / Path(value).expanduser()).absolute()
    return paths


def check_files(exp: Experiment) -> dict[str, Path]:
    """`world_paths`, after checking that each exists; one UserError names all that do not."""
    w = exp.world
    if exp.search.train_steps and w.train_images is None:
        raise UserError(
            f"search.train_steps={exp.search.train_steps}: robust training needs image-caption "
            "data, and this stable_diffusion world has none. Set world.train_images (a folder "
            "of images, e.g. MS-COCO train2014/) and world.train_captions (their captions in "
            "MS-COCO format, e.g. captions_train2014.json), or set search.train_steps: 0 to "
            "score the pretrained UNet without training it"
        )
    paths = world_paths(exp)
    problems = []
    for key, path in paths.items():
        if key in FOLDERS and not path.is_dir():
            problems.append(f"world.{key}: no folder {path}; put there {WHERE[key]}")
        elif key not in FOLDERS and not path.is_file():
            problems.append(f"world.{key}: no file {path}; put there {WHERE[key]}")
        elif key == "pipeline":
            lacking = [p + "/" for p in PIPELINE_PARTS if not (path / p).is_dir()]
            if lacking:
                problems.append(
                    f"world.pipeline: {path} has no {', '.join(lacking)}; it must be "
                    f"{WHERE['pipeline']}"
                )
    if problems:
        root = Path(w.data_dir).expanduser().absolute()
        raise UserError(
            f"the stable_diffusion world lacks {len(problems)} of its files (nothing is "
            f"downloaded; relative paths are read from world.data_dir = {root}):\n  - "
            + "\n  - ".join(problems)
            + "\nPut each one there, or point its key in the experiment file at where it is."
        )
    return paths


def _unet_init_args(config: dict) -> dict:
    """Every constructor argument of a UNet config, defaults filled in (JSON-normalised)."""
    given, _, _ = UNet2DConditionModel.extract_init_dict(dict(config))
    params = inspect.signature(UNet2DConditionModel.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return json.loads(json.dumps({**defaults, **given}, default=str))


def _check_unet_config(space: SearchSpace, config: dict, folder: Path) -> None:
    want, got = _unet_init_args(space.unet_config), _unet_init_args(config)
    # sample_size is a default generation size, not part of the network
    differ = [k for k in want if k != "sample_size" and want[k] != got.get(k)]
    if differ:
        details = "; ".join(f"{k} is {got.get(k)!r}, the space's {want[k]!r}" for k in differ[:4])
        raise UserError(
            f"the UNet in {folder / 'unet'} is not the base network of space {space.name!r}: "
            f"{details}. Give the pipeline of that UNet in world.pipeline, or search a space "
            f"whose base is this UNet (`base: {{pretrained: {folder}}}` in a space file)"
        )


def _prepare(exp: Experiment, space: SearchSpace) -> tuple[SearchSpace, dict[str, Path]]:
    paths = check_files(exp)
    w = exp.world
    if w.clip_model not in open_clip.list_models():
        raise UserError(
            f"world.clip_model: open_clip has no model {w.clip_model!r}; the paper's is "
            f"ViT-g-14 (all names: python -c 'import open_clip; print(open_clip.list_models())')"
        )
    pipeline = paths["pipeline"]
    try:
        unet_config = UNet2DConditionModel.load_config(
            pipeline, subfolder="unet", local_files_only=True
        )
        vae_config = AutoencoderKL.load_config(pipeline, subfolder="vae", local_files_only=True)
        text_config = CLIPTextConfig.from_pretrained(
            pipeline, subfolder="text_encoder", local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise UserError(f"world.pipeline: cannot read the configs in {pipeline}: {e}") from None
    _check_unet_config(space, unet_config, pipeline)
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if w.resolution % factor:
        raise UserError(
            f"world.resolution={w.resolution} is not a multiple of the VAE's downsampling "
            f"factor {factor}; use e.g. {max(factor, w.resolution // factor * factor)}"
        )
    side = w.resolution // factor
    latent = (vae_config["latent_channels"], side, side)
    if latent[0] != space.latent[0]:
        raise UserError(
            f"the VAE in {pipeline / 'vae'} makes {latent[0]}-channel latents, but space "
            f"{space.name!r} takes {space.latent[0]}"
        )
    if text_config.hidden_size != space.context[1]:
        raise UserError(
            f"the text encoder in {pipeline / 'text_encoder'} gives {text_config.hidden_size}-d "
            f"features, but space {space.name!r} cross-attends to {space.context[1]}-d ones"
        )
    if latent != tuple(space.latent):
        space = space.with_inputs(latent=latent)
    return space, paths


def world_space(exp: Experiment, space: SearchSpace) -> SearchSpace:
    """`space` at the latent size of the experiment's world, after checking every file and
    config the world needs (configs only: no weights are read)."""
    return _prepare(exp, space)[0]


# -- the world ------------------------------------------------------------------------------


class StableDiffusionWorld:
    """A loaded SD world: its space (at the world's latent size), supernet, CLIP, encoders,
    validation prompts and (optional) training data."""

    def __init__(
        self,
        space: SearchSpace,
        supernet: ElasticUNet,
        clip: ClipScorer,
        encoder: LatentEncoder,
        val_prompts: list[str],
        scheduler_config: dict,
        train_data: CocoCaptions | None,
        device: torch.device,
    ):
        self.space = space
        self.supernet = supernet
        self.clip = clip
        self.encoder = encoder  # the pipeline's VAE, text encoder and tokenizer
        self.val_prompts = val_prompts
        self.scheduler_config = scheduler_config  # DDIM, from the pipeline's scheduler config
        supernet.scheduler_config = scheduler_config  # generate()'s default for it
        self.train_data = train_data
        self.device = device
        self._uncond: Tensor | None = None

    # -- text and images -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """The UNet context of each prompt: (B, 77, 768) text-encoder hidden states for SD."""
        if not prompts:
            raise UserError("the prompt list is empty: give at least one prompt")
        prompts = list(prompts)
        chunks = [
            self.encoder.encode_text(prompts[i : i + TEXT_BATCH])
            for i in range(0, len(prompts), TEXT_BATCH)
        ]
        return torch.cat(chunks)

    def uncond(self) -> Tensor:
        """The unconditional context (1, 77, 768): the empty prompt's, as SD's CFG uses."""
        if self._uncond is None:
            self._uncond = self.encode_text([""])
        return self._uncond

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1] through the VAE decoder."""
        vae = self.encoder.vae
        if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
            raise UserError(
                f"latents must be (B, {vae.config.latent_channels}, H, W), not "
                f"{tuple(latents.shape)}"
            )
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD-1/2 VAEs have none
        dtype = next(vae.parameters()).dtype
        images = []
        for i in range(0, len(latents), DECODE_BATCH):
            z = latents[i : i + DECODE_BATCH].to(self.encoder.device, dtype)
            x = vae.decode(z / vae.config.scaling_factor + shift).sample
            images.append(((x.float() + 1) / 2).clamp(0, 1))
        return torch.cat(images)

    def encode_batch(self, images: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(images in [-1, 1], captions) -> (latents, contexts): the `encode` of `train`."""
        return self.encoder(images, list(captions))

    # -- robust training -------------------------------------------------------------------------

    def dataset(self, length: int, seed: int | None = None) -> CocoCaptions:
        """The training pairs. Real data is used whole: `train` draws its batches from it in
        a seeded order, so `length` and `seed` (which size and seed a generated world's data)
        are not needed here."""
        if self.train_data is None:
            raise UserError(
                "this stable_diffusion world has no training data: set world.train_images and "
                "world.train_captions, or search.train_steps: 0"
            )
        return self.train_data

    def train_config(self, **overrides) -> TrainConfig:
        """Training as the pipeline was trained: its noise schedule and prediction type."""
        s = self.scheduler_config
        return TrainConfig(
            **{
                "prediction_type": s["prediction_type"],
                "num_train_timesteps": s["num_train_timesteps"],
                "beta_schedule": s["beta_schedule"],
                "beta_start": s["beta_start"],
                "beta_end": s["beta_end"],
                "device": str(self.device),
                **overrides,
            }
        )


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"world.device: {name!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"world.device is {name!r}, but torch sees no CUDA GPU here; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"world.device is {name!r}, but MPS is not available here; use cpu")
    return device


def load_sd_world(
    exp: Experiment, space: SearchSpace, progress: bool = True
) -> StableDiffusionWorld:
    """The experiment's SD world, loaded from its local files (`check_files` first). Its
    `space` is `space` at the world's latent size (`world_space`)."""
    space, paths = _prepare(exp, space)
    w = exp.world
    device = _device(w.device)
    prompts = read_val_prompts(paths["captions"])
    if len(prompts) < exp.evaluation.prompts:
        raise UserError(
            f"evaluation.prompts={exp.evaluation.prompts}, but {paths['captions']} has only "
            f"{len(prompts)} distinct captions (one per image); lower evaluation.prompts"
        )
    pipeline = paths["pipeline"]
    if progress:
        log.info("loading the Stable Diffusion world from %s", pipeline)
    encoder = LatentEncoder.from_pretrained(pipeline).to(device)
    if encoder.max_length != space.context[0]:
        raise UserError(
            f"the tokenizer in {pipeline / 'tokenizer'} gives {encoder.max_length} tokens per "
            f"prompt, but space {space.name!r} takes a context of {space.context[0]}"
        )
    supernet = ElasticUNet.from_diffusers(space, pipeline, skip=SkipConfig(), seed=exp.seed)
    supernet.to(device).eval()
    try:
        ddim = DDIMScheduler.from_config(
            DDIMScheduler.load_config(pipeline, subfolder="scheduler", local_files_only=True)
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the scheduler config in {pipeline}: {e}") from None
    clip = ClipScorer.from_open_clip(w.clip_model, paths["clip_weights"], device=device)
    train_data = None
    if "train_images" in paths:
        train_data = CocoCaptions(paths["train_images"], paths["train_captions"], w.resolution)
    return StableDiffusionWorld(
        space, supernet, clip, encoder, prompts, dict(ddim.config), train_data, device
    )


__all__ = [
    "CocoCaptions",
    "StableDiffusionWorld",
    "check_files",
    "load_sd_world",
    "read_val_prompts",
    "world_paths",
    "world_space",
]
