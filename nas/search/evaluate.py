"""Action evaluation (paper Sec. 3.1): ΔCLIP and ΔLatency of every legal action.

Every architecture is scored on the *same* prompts from the *same* initial noises, so two
architectures' scores differ only by the architecture (a paired comparison); text
conditions and CLIP text features are computed once per evaluator.

Signs: for removing a block, ΔCLIP = CLIP(arch) − CLIP(arch without it) (what the block
contributes; positive if it helps) and ΔLatency = latency(arch) − latency(arch without it)
(what it costs, > 0). value = ΔCLIP / ΔLatency: CLIP per millisecond. The evolution removes
the blocks of lowest value and copies the blocks of highest value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from latency.predict import Predictor
from nas.supernet import ElasticUNet
from nas.worlds.clip import ClipScorer
from nas.worlds.generate import generate, initial_noise
from search_spaces import Action, Architecture, UserError

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Protocol:
    """How an architecture is scored."""

    prompts: list[str]  # validation prompts (each scored once per seed)
    seeds: int = 1  # initial noises per prompt
    steps: int = 20  # DDIM steps
    cfg: float = 3.0  # classifier-free guidance scale
    batch_size: int = 32  # images generated at once
    seed: int = 0  # seeds the initial noises
    # "fp32", or "fp16" / "bf16": sampling, decoding and CLIP under torch.autocast (weights
    # stay fp32). fp16 is for GPUs: SD-v1.5's evaluation runs 3.7x faster than fp32 on an H100
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(
                f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}; fp16 needs "
                "a GPU, bf16 runs on GPUs and recent CPUs"
            )


@dataclass
class ActionValue:
    action: str  # "remove SLOT" / "copy SLOT"
    kind: str
    slot: str
    clip: float  # CLIP score of the architecture after the action
    delta_clip: float  # see the module docstring for signs
    delta_ms: float
    value: float  # delta_clip / delta_ms
    seconds: float  # time spent scoring this action
    node: str | None = None  # Ray node id that scored it (None: in process; nas.search.ray)

    def to_dict(self) -> dict:
        return asdict(self)


class Evaluator:
    def __init__(
        self,
        supernet: ElasticUNet,
        clip: ClipScorer,
        protocol: Protocol,
        encode_text: Callable[[list[str]], torch.Tensor],
        uncond: torch.Tensor,
        decode: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.supernet, self.clip, self.protocol, self.decode = supernet, clip, protocol, decode
        prompts = [p for p in protocol.prompts for _ in range(protocol.seeds)]
        self.prompts = prompts
        with torch.no_grad():
            self.context = encode_text(prompts)  # once per run
            self.text_features = clip.text_features(prompts)
        self.uncond = uncond
        self.noise = initial_noise(supernet.space, len(prompts), protocol.seed)

    def to(self, device: str | torch.device) -> Evaluator:
        """Score on `device` (supernet, CLIP and text conditions move; noises are drawn on the
        CPU and moved per batch by `generate`, so they stay the same on every device)."""
        self.supernet.to(device)
        self.clip.to(device)
        self.context = self.context.to(device)
        self.text_features = self.text_features.to(device)
        self.uncond = self.uncond.to(device)
        return self

    def autocast(self):
        """The protocol's precision for what runs inside (a no-op for fp32)."""
        dtype = PRECISIONS[self.protocol.precision]
        device = next(self.supernet.parameters()).device
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def scores(self, arch: Architecture, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Per-image CLIP scores of `arch` (same prompts and noises for every architecture),
        of images start..stop (default all): racing (`nas.search.racing`) scores them in slices."""
        previous = self.supernet.architecture
        self.supernet.set_architecture(arch)
        p, out = self.protocol, []
        stop = len(self.prompts) if stop is None else min(stop, len(self.prompts))
        try:
            for i in range(start, stop, p.batch_size):
                sl = slice(i, min(i + p.batch_size, stop))
                with self.autocast(), torch.no_grad():
                    latents = generate(
                        self.supernet, self.context[sl], self.uncond, self.noise[sl], p.steps, p.cfg
                    )
                    feats = self.clip.image_features(self.decode(latents))
                out.append(self.clip.score_features(feats.float(), self.text_features[sl]))
        finally:
            self.supernet.set_architecture(previous)
        return torch.cat(out)

    def images(self, arch: Architecture, n: int) -> torch.Tensor:
        """The first n images of `arch` (prompts and noises as in scoring), in [0, 1]."""
        previous = self.supernet.architecture
        self.supernet.set_architecture(arch)
        try:
            with self.autocast(), torch.no_grad():
                latents = generate(
                    self.supernet,
                    self.context[:n],
                    self.uncond,
                    self.noise[:n],
                    self.protocol.steps,
                    self.protocol.cfg,
                )
                images = self.decode(latents)
            return images.float().clamp(0, 1)
        finally:
            self.supernet.set_architecture(previous)

    def model_scores(self, model: torch.nn.Module) -> torch.Tensor:
        """Per-image CLIP scores of another UNet (a standalone or distilled network, a
        teacher) on the same prompts and noises, sampled with the supernet's scheduler."""
        p, out = self.protocol, []
        scheduler = getattr(self.supernet, "scheduler_config", None)
        for i in range(0, len(self.prompts), p.batch_size):
            sl = slice(i, min(i + p.batch_size, len(self.prompts)))
            with self.autocast(), torch.no_grad():
                latents = generate(
                    model, self.context[sl], self.uncond, self.noise[sl], p.steps, p.cfg, scheduler
                )
                feats = self.clip.image_features(self.decode(latents))
            out.append(self.clip.score_features(feats.float(), self.text_features[sl]))
        return torch.cat(out)

    def model_images(self, model: torch.nn.Module, n: int) -> torch.Tensor:
        """The first n images of another UNet (as `images`), in [0, 1]."""
        scheduler = getattr(self.supernet, "scheduler_config", None)
        p = self.protocol
        with self.autocast(), torch.no_grad():
            latents = generate(
                model, self.context[:n], self.uncond, self.noise[:n], p.steps, p.cfg, scheduler
            )
            return self.decode(latents).float().clamp(0, 1)

    def clip_score(self, arch: Architecture) -> float:
        return float(self.scores(arch).mean())

    def evaluate(
        self,
        arch: Architecture,
        predictor: Predictor,
        kinds=("remove",),
        base_clip: float | None = None,
        progress=None,
    ) -> list[ActionValue]:
        """ΔCLIP, ΔLatency and value of every legal action of `kinds` from `arch`."""
        space = self.supernet.space
        base = self.clip_score(arch) if base_clip is None else base_clip
        base_ms = predictor.predict(arch).raw_ms
        out = []
        for action in space.actions(arch):
            if action.kind not in kinds:
                continue
            start = time.perf_counter()
            after = arch.apply(action)
            clip = self.clip_score(after)
            ms = predictor.predict(after).raw_ms
            seconds = time.perf_counter() - start
            out.append(action_value(action, base, clip, base_ms, ms, seconds))
            if progress is not None:
                progress()
        return out


def action_value(
    action: Action,
    base: float,
    clip: float,
    base_ms: float,
    ms: float,
    seconds: float,
    node: str | None = None,
) -> ActionValue:
    """The ActionValue of `action` from the CLIP score and raw latency before (`base`,
    `base_ms`) and after it (`clip`, `ms`); shared by in-process and Ray evaluation."""
    if action.kind == "remove":  # what the block gives and costs
        d_clip, d_ms = base - clip, base_ms - ms
    else:  # what the copy would give and cost
        d_clip, d_ms = clip - base, ms - base_ms
    value = d_clip / d_ms if d_ms > 0 else float("inf")
    return ActionValue(
        str(action), action.kind, action.slot, clip, d_clip, d_ms, value, seconds, node
    )
