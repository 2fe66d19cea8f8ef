"""CLIP score with open_clip: the metric of the search (the paper's ΔCLIP).

`ClipScorer` wraps an open_clip model, its tokenizer and the model's image preprocessing
written as tensor ops (resize, centre crop, normalise), so generated images are scored in a
batch without going through PIL.

CLIP score, here and everywhere in diffnas, is torchmetrics' definition:
    score(image, prompt) = 100 * max(cos(image_features, text_features), 0)
per pair (a batch gives one score per pair; average them for a set).

The same class serves SD's ViT-g-14 (`from_open_clip` with a local weights file; nothing is
downloaded) and the tiny world's CLIP (an open_clip `CLIP` built from a small config and
trained here, `train_contrastive`, saved in open_clip's `local-dir:` folder layout).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from search_spaces import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"  # open_clip's local-dir layout: config + weights
WEIGHTS_FILE = "open_clip_model.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=4)
def _simple_tokenizer(context_length: int) -> open_clip.SimpleTokenizer:
    """open_clip's BPE tokenizer, shared: reading its vocabulary takes most of a second."""
    return open_clip.SimpleTokenizer(context_length=context_length)


def clip_score(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """100 * max(cos, 0) per pair of (normalised) features: torchmetrics' CLIP score."""
    return 100.0 * (image_feats * text_feats).sum(-1).clamp(min=0)


class ClipScorer:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        preprocess_cfg: dict,
        device: str | torch.device = "cpu",
    ):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        size = preprocess_cfg.get("size", 224)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(preprocess_cfg.get("mean", OPENAI_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess_cfg.get("std", OPENAI_STD)).view(1, 3, 1, 1)
        self.interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.preprocess_cfg = dict(preprocess_cfg)
        self.model_cfg: dict | None = None  # open_clip's config of the model, when known

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_open_clip(
        cls,
        model_name: str,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> ClipScorer:
        """An open_clip model (e.g. "ViT-g-14") with weights from a local file, or a folder
        in open_clip's layout ("local-dir:PATH", weights inside; `weights` not used)."""
        if model_name.startswith("local-dir:"):
            folder = Path(model_name.removeprefix("local-dir:")).expanduser()
            if not (folder / CONFIG_FILE).is_file():
                raise UserError(
                    f"{folder} is not an open_clip model folder: it has no {CONFIG_FILE} "
                    f"(a folder written by ClipScorer.save, or open_clip's local-dir layout)"
                )
            model_name, pretrained = f"local-dir:{folder}", None
            model_cfg = json.loads((folder / CONFIG_FILE).read_text()).get("model_cfg")
        else:
            if model_name not in open_clip.list_models():
                raise UserError(
                    f"unknown open_clip model {model_name!r}; known models include "
                    f"{', '.join(open_clip.list_models()[:8])}, ... (open_clip.list_models())"
                )
            if weights is None:
                raise UserError(
                    f"give the weights file of {model_name}: nothing is downloaded at run time"
                )
            path = Path(weights).expanduser()
            if not path.is_file():
                raise UserError(
                    f"CLIP weights for {model_name} not found at {path}. Nothing is downloaded "
                    f"at run time: fetch the open_clip checkpoint once (e.g. "
                    f"open_clip_pytorch_model.bin from the model's Hugging Face repo, such as "
                    f"laion/CLIP-ViT-g-14-laion2B-s12B-b42K for ViT-g-14) and put it at {path}"
                )
            pretrained = str(path)
            model_cfg = open_clip.get_model_config(model_name)
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
            text_cfg = (model_cfg or {}).get("text_cfg", {})
            if "hf_tokenizer_name" in text_cfg or "tokenizer_kwargs" in text_cfg:
                tokenizer = open_clip.get_tokenizer(model_name)
            else:  # open_clip's own BPE tokenizer, as get_tokenizer would choose
                tokenizer = _simple_tokenizer(text_cfg.get("context_length", 77))
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"cannot load open_clip model {model_name}: {e}") from None
        scorer = cls(model, tokenizer, open_clip.get_model_preprocess_cfg(model), device)
        scorer.model_cfg = model_cfg
        return scorer

    @classmethod
    def from_config(
        cls, model_cfg: dict, preprocess_cfg: dict | None = None, device="cpu"
    ) -> ClipScorer:
        """A randomly initialised open_clip `CLIP` of `model_cfg` (to be trained)."""
        model = open_clip.model.CLIP(**model_cfg)
        context = model_cfg["text_cfg"]["context_length"]
        size = model_cfg["vision_cfg"]["image_size"]
        pre = {"size": size, "mean": OPENAI_MEAN, "std": OPENAI_STD, **(preprocess_cfg or {})}
        scorer = cls(model, _simple_tokenizer(context), pre, device)
        scorer.model_cfg = model_cfg
        return scorer

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> ClipScorer:
        """A model saved by `save` (open_clip's local-dir layout)."""
        return cls.from_open_clip(f"local-dir:{folder}", device=device)

    def save(self, folder: str | Path) -> None:
        """Config and weights in open_clip's layout: `open_clip.create_model("local-dir:...")`
        loads it too."""
        model_cfg = self.model_cfg
        if model_cfg is None:
            raise UserError("this CLIP's open_clip config is unknown, so it cannot be saved")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pre = {
            "size": list(self.image_size),
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "interpolation": self.interpolation,
        }
        config = {"model_cfg": model_cfg, "preprocess_cfg": pre}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> ClipScorer:
        self.model.to(device)
        return self

    # -- inputs ----------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
            raise UserError(f"prompts must be a list of strings, not {type(prompts).__name__}")
        if not prompts:
            raise UserError("the prompt list is empty: give at least one prompt")
        return self.tokenizer(list(prompts)).to(self.device)

    def preprocess(self, images: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] -> the model's input: the shorter side resized to
        the model's size, centre-cropped, normalised (open_clip's own transform, as tensor ops)."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise UserError(f"images must be a (N, 3, H, W) tensor, not {shape}")
        if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise UserError(
                f"images must be in [0, 1] (got [{images.min():.3g}, {images.max():.3g}]); "
                "map [-1, 1] images with (x + 1) / 2"
            )
        x = images.to(self.device, torch.float32)
        h, w = self.image_size
        if tuple(x.shape[-2:]) != (h, w):
            scale = max(h / x.shape[-2], w / x.shape[-1])
            size = (max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale)))
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
            top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
            x = x[..., top : top + h, left : left + w].clamp(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    # -- features (with gradients: used by training) --------------------------------------------

    def _image_features(self, images: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)

    def _text_features(self, prompts: list[str]) -> Tensor:
        return F.normalize(self.model.encode_text(self.tokenize(prompts)), dim=-1)

    # -- features and scores --------------------------------------------------------------------

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        """Normalised text embeddings (N, D)."""
        return self._text_features(prompts)

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        """Normalised image embeddings (N, D) of images (N, 3, H, W) in [0, 1]."""
        return self._image_features(images)

    @torch.no_grad()
    def token_features(self, prompts: list[str]) -> Tensor:
        """Per-token text features (N, context_length, width): the text transformer's output
        after its final LayerNorm, before pooling — what a UNet cross-attends to (as SD uses
        CLIP's last_hidden_state)."""
        m = self.model
        if not all(hasattr(m, a) for a in ("token_embedding", "transformer", "ln_final")):
            raise UserError(
                f"{type(m).__name__} has no built-in text transformer to read tokens from"
            )
        tokens = self.tokenize(prompts)
        x = m.token_embedding(tokens) + m.positional_embedding
        x = m.transformer(x, attn_mask=m.attn_mask)
        return m.ln_final(x)

    def score_features(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """CLIP score per pair (N,) of normalised features: 100 * max(cos, 0)."""
        if image_feats.shape != text_feats.shape:
            raise UserError(
                f"image features {tuple(image_feats.shape)} and text features "
                f"{tuple(text_feats.shape)} must pair up one to one"
            )
        return clip_score(image_feats, text_feats)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """CLIP score (N,) of image i against prompt i."""
        if len(prompts) != len(images):
            raise UserError(f"{len(images)} images but {len(prompts)} prompts: give one each")
        return self.score_features(self.image_features(images), self.text_features(prompts))


# -- training and evaluation (the tiny world's CLIP) ---------------------------------------------


def train_contrastive(
    scorer: ClipScorer,
    batch: Callable[[int], tuple[Tensor, list[str], list[str]]],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int = 50,
    progress: bool = True,
) -> list[float]:
    """Train `scorer.model` contrastively (CLIP's symmetric InfoNCE) and return the losses.

    `batch(step)` gives (images in [0, 1], captions, scene keys). Pairs with the same key are
    all positives (soft targets): two images of "a red circle on the left" in one batch are
    not negatives of each other. AdamW with linear warm-up then cosine decay.
    """
    model = scorer.model
    model.train().requires_grad_(True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    losses: list[float] = []
    bar = tqdm(range(steps), disable=not progress, desc="tiny CLIP", unit="step")
    try:
        for step in bar:
            images, captions, keys = batch(step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            img = scorer._image_features(images)
            txt = scorer._text_features(captions)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
            ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
            key_ids = torch.tensor([ids[k] for k in keys], device=logits.device)
            same = (key_ids[:, None] == key_ids[None, :]).float()
            target = same / same.sum(1, keepdim=True)
            loss = (
                F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)
            ) / 2  # `same` is symmetric: target.T rows sum to one too
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    finally:
        bar.close()
        model.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def retrieval_top1(
    scorer: ClipScorer, images: Tensor, prompts: list[str], keys: list[str] | None = None
) -> float:
    """Zero-shot text -> image retrieval: the share of prompts whose most similar image
    (among all `images`, image i made for prompt i) shows the prompt's scene. With `keys`,
    an image of an equivalent caption ("B below A" for "A above B") counts as a match."""
    if len(images) != len(prompts):
        raise UserError(f"{len(images)} images but {len(prompts)} prompts: give one each")
    keys = list(prompts) if keys is None else list(keys)
    sims = scorer.text_features(prompts) @ scorer.image_features(images).T
    best = sims.argmax(1).tolist()
    return sum(keys[j] == keys[i] for i, j in enumerate(best)) / len(prompts)
