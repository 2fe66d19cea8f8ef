"""The batches of a training run: drawn from seeded streams so that a step's batch is a pure
function of the seed and the step (exact resume, identical shards on every data-parallel
worker), and the encoder that turns real (Stable Diffusion) images and captions into latents and
text contexts."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import default_collate as _collate

from nas.supernet import ElasticUNet
from nas.training.config import TrainConfig
from search_spaces import UserError

log = logging.getLogger(__name__)


# -- the text/image encoder for real (Stable Diffusion) data ----------------------------------


class LatentEncoder:
    """Turns (images, captions) into (latents, text contexts) as Stable Diffusion does.

    Holds the pipeline's VAE and CLIP text encoder, loaded from a local pipeline folder
    (`vae/`, `text_encoder/`, `tokenizer/`); nothing is downloaded. Images are (B, 3, H, W)
    in [-1, 1]; captions a list of strings (a tensor of contexts passes through unchanged).
    """

    def __init__(self, vae, text_encoder, tokenizer, max_length: int | None = None):
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # the tokenizer's own limit may be unset (a huge sentinel): the encoder's positions cap it
        positions = text_encoder.config.max_position_embeddings
        self.max_length = max_length or min(tokenizer.model_max_length, positions)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32):
        """Load from a local diffusers pipeline folder (the one holding vae/, text_encoder/,
        tokenizer/); raises a UserError naming what is missing."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder).expanduser()
        missing = [s for s in ("vae", "text_encoder", "tokenizer") if not (folder / s).is_dir()]
        if missing:
            raise UserError(
                f"{folder} is not a Stable Diffusion pipeline folder: it has no "
                f"{', '.join(s + '/' for s in missing)}; give the folder that holds vae/, "
                "text_encoder/ and tokenizer/ (e.g. a local copy of stable-diffusion-v1-5)"
            )
        try:
            vae = AutoencoderKL.from_pretrained(
                folder, subfolder="vae", local_files_only=True, torch_dtype=dtype
            )
            text_encoder = CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", local_files_only=True
            )
            tokenizer = CLIPTokenizer.from_pretrained(
                folder, subfolder="tokenizer", local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the VAE / text encoder in {folder}: {e}") from None
        return cls(vae, text_encoder.to(dtype), tokenizer)

    def to(self, device: str | torch.device) -> LatentEncoder:
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.numel() and (images.min() < -1.001 or images.max() > 1.001):
            raise UserError(
                f"images must be scaled to [-1, 1] (got values in [{images.min():.3g}, "
                f"{images.max():.3g}]); map [0, 1] images with x * 2 - 1"
            )
        vae = self.vae
        images = images.to(self.device, next(vae.parameters()).dtype)
        latents = vae.encode(images).latent_dist.sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD-1/2 VAEs have none
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device)).last_hidden_state

    def unconditional(self) -> torch.Tensor:
        """The empty caption's context (tokens, dim): SD's unconditional condition for CFG."""
        return self.encode_text([""])[0]

    def __call__(self, images: torch.Tensor, captions) -> tuple[torch.Tensor, torch.Tensor]:
        context = captions if torch.is_tensor(captions) else self.encode_text(captions)
        return self.encode_images(images), context


# -- data --------------------------------------------------------------------------------------


def stream_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for one random stream of a run (SeedSequence mixes well)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


# the random streams of a run
DATA, CFG, NOISE, SKIP = range(4)


class _StepBatches:
    """Indices of the batches of steps [start, stop): each epoch is a seeded permutation.

    The batch of a step depends only on (seed, step), so resuming needs no sampler state, and
    DataLoader workers prefetching ahead cannot shift it. A data-parallel worker reads only its
    `shard` of each batch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int, stop: int, shard: slice = slice(None)
    ):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.shard = start, stop, shard
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = None, None
        for step in range(self.start, self.stop):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(stream_seed(self.seed, e))
                epoch, perm = e, torch.randperm(self.n, generator=g).tolist()
            yield perm[k * self.batch_size : (k + 1) * self.batch_size][self.shard]


def batches(data, config: TrainConfig, start: int, shard: slice = slice(None)) -> Iterable:
    """Collated batches (this worker's `shard` of each) for steps start..config.steps-1."""
    map_style = hasattr(data, "__len__") and hasattr(data, "__getitem__")
    if map_style and not isinstance(data, IterableDataset):
        if len(data) < config.batch_size:
            raise UserError(
                f"the dataset has {len(data)} samples, fewer than batch_size="
                f"{config.batch_size}; lower batch_size or give more data"
            )
        sampler = _StepBatches(
            len(data), config.batch_size, config.seed, start, config.steps, shard
        )
        return DataLoader(
            data, batch_sampler=sampler, num_workers=config.num_workers, collate_fn=_collate
        )
    if config.num_workers:
        log.warning("num_workers is ignored for an iterable dataset: it is read in-process")
    return _iterable_batches(data, config.batch_size, start, config.steps, shard)


def _iterable_batches(
    data, batch_size: int, start: int, stop: int, shard: slice = slice(None)
) -> Iterator:
    """Batches of an iterable, restarted when it ends. A resumed run skips the items already
    used, so it is reproducible when iterating `data` is."""

    def items():
        total = 0
        while True:
            n = 0
            for item in data:
                n += 1
                yield item
            if n == 0:
                raise UserError(
                    f"the data ran out after {total} items; pass a torch Dataset or an "
                    "iterable that can be iterated again (not a one-shot generator)"
                )
            total += n

    it = items()
    for _ in islice(it, start * batch_size):
        pass
    for _ in range(start, stop):
        # every worker reads the whole batch (an iterable cannot seek), then keeps its shard
        yield _collate([next(it) for _ in range(batch_size)][shard])


def check_batch(model: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor, encoded: bool):
    """Clear errors for data that does not fit the UNet (an image instead of a latent, ...)."""
    config = unet_of(model).config
    space = getattr(model, "space", None)
    latent = (config.in_channels, *space.latent[1:]) if space else f"({config.in_channels}, H, W)"
    hint = (
        "check the encoder's output"
        if encoded
        else "give latents, or pass encode=LatentEncoder.from_pretrained(folder) to encode images"
    )
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != config.in_channels:
        shape = tuple(x.shape[1:]) if torch.is_tensor(x) else type(x).__name__
        raise UserError(
            f"the data gives x of shape {shape}, but the UNet takes latents of "
            f"{config.in_channels} channels (the space's latent is {latent}); {hint}"
        )
    dim = config.cross_attention_dim
    if not torch.is_tensor(cond) or cond.ndim != 3 or cond.shape[-1] != dim:
        shape = tuple(cond.shape[1:]) if torch.is_tensor(cond) else type(cond).__name__
        raise UserError(
            f"the data gives a condition of shape {shape}, but the UNet takes a text context "
            f"(tokens, {dim}); {hint}"
        )


def unet_of(model: torch.nn.Module):
    """The diffusers UNet a model runs: an ElasticUNet's, or the model itself."""
    return model.unet if isinstance(model, ElasticUNet) else model
