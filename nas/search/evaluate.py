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
from nas.protocol_checks import METRICS, PROXY_TIMESTEPS, check_steps, check_timesteps
from nas.supernet import ElasticUNet
from nas.worlds.clip import ClipScorer
from nas.worlds.generate import generate, initial_noise
from search_spaces import Action, Architecture, UserError

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Cost:
    """Evaluation compute: UNet forward passes of one latent (a guided step of one image is
    two: the conditional and the unconditional prediction), and images decoded and scored
    with CLIP. Independent of batch sizes, so it projects to any device."""

    unet_calls: int = 0
    images: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.unet_calls + other.unet_calls, self.images + other.images)

    def __mul__(self, k: int) -> Cost:
        return Cost(self.unet_calls * k, self.images * k)

    def to_dict(self) -> dict:
        return asdict(self)

    def seconds(self, per_call: float, per_image: float = 0.0) -> float:
        """Device seconds at `per_call` s per UNet call and `per_image` s per image
        (decoding and CLIP)."""
        return self.unet_calls * per_call + self.images * per_image


@dataclass
class Protocol:
    """How an architecture is scored."""

    prompts: list[str]  # validation prompts (each scored once per seed)
    seeds: int = 1  # initial noises per prompt
    steps: int = 20  # sampler steps
    cfg: float = 3.0  # classifier-free guidance scale
    batch_size: int = 32  # images generated at once
    seed: int = 0  # seeds the initial noises
    # "fp32", or "fp16" / "bf16": sampling, decoding and CLIP under torch.autocast (weights
    # stay fp32). fp16 is for GPUs: SD-v1.5's evaluation runs 3.7x faster than fp32 on an H100
    precision: str = "fp32"
    sampler: str = "ddim"  # "ddim" or "dpm_solver" (nas.worlds.generate.SAMPLERS)
    metric: str = "sample_clip"  # see the module docstring
    timesteps: tuple[int, ...] | None = None  # the x0 metrics' (default PROXY_TIMESTEPS)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(
                f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}; fp16 needs "
                "a GPU, bf16 runs on GPUs and recent CPUs"
            )
        check_steps(self.sampler, self.steps)
        if self.metric not in METRICS:
            raise UserError(f"metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.metric == "sample_clip":
            if self.timesteps is not None:
                raise UserError("timesteps are the x0 metrics' (x0_clip, x0_distance)")
        else:
            self.timesteps = tuple(self.timesteps or PROXY_TIMESTEPS)
            check_timesteps(self.timesteps)

    # -- what scoring costs (nas.search.plan projects from these) -------------------------------

    @property
    def images(self) -> int:
        """Images (prompt, noise) an architecture is scored on."""
        return len(self.prompts) * self.seeds

    @property
    def calls_per_prediction(self) -> int:
        """UNet calls of one latent per (guided) prediction: 2 with guidance, else 1."""
        return 2 if self.cfg != 1.0 else 1

    def sample_cost(self, n: int) -> Cost:
        """Sampling n images and CLIP-scoring them."""
        return Cost(n * self.steps * self.calls_per_prediction, n)

    def score_cost(self, n: int) -> Cost:
        """Scoring one architecture (an action) on n images with the protocol's metric."""
        if self.metric == "sample_clip":
            return self.sample_cost(n)
        predictions = n * len(self.timesteps)
        images = predictions if self.metric == "x0_clip" else 0
        return Cost(predictions * self.calls_per_prediction, images)

    def reference_cost(self, n: int) -> Cost:
        """Once per iteration: the current architecture. sample_clip: scored like an action;
        the x0 metrics: its samples (CLIP-scored, the iteration's CLIP), then its own
        predictions from them."""
        if self.metric == "sample_clip":
            return self.sample_cost(n)
        return self.sample_cost(n) + self.score_cost(n)


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
    unet_calls: int = 0  # compute spent scoring it (Cost)
    images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class ActionScorer:
    """What the evolution scores actions with: per-image scores of an architecture (`scores`,
    the same images for every architecture, so differences are paired), their mean (`score`),
    and every action's value (`evaluate`). Subclasses give `supernet`, `protocol`, `prompts`
    and `scores`."""

    supernet: ElasticUNet
    protocol: Protocol
    prompts: list[str]

    def scores(self, arch: Architecture, start: int = 0, stop: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, arch: Architecture) -> None:
        """Called once per iteration with the current architecture, before its actions."""

    def score(self, arch: Architecture) -> float:
        return float(self.scores(arch).mean())

    def evaluate(
        self,
        arch: Architecture,
        predictor: Predictor,
        kinds=("remove",),
        base_clip: float | None = None,
        progress=None,
    ) -> list[ActionValue]:
        """Δscore, ΔLatency and value of every legal action of `kinds` from `arch`
        (`base_clip`: the score of `arch`, if known)."""
        space = self.supernet.space
        base = self.score(arch) if base_clip is None else base_clip
        base_ms = predictor.predict(arch).raw_ms
        cost = self.protocol.score_cost(len(self.prompts))
        out = []
        for action in space.actions(arch):
            if action.kind not in kinds:
                continue
            start = time.perf_counter()
            after = arch.apply(action)
            clip = self.score(after)
            ms = predictor.predict(after).raw_ms
            seconds = time.perf_counter() - start
            out.append(action_value(action, base, clip, base_ms, ms, seconds, cost=cost))
            if progress is not None:
                progress()
        return out


class Evaluator(ActionScorer):
    """Scores architectures by sampling images and CLIP-scoring them (metric sample_clip);
    `action_scorer` wraps it in the protocol's metric for the evolution."""

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
                    latents = self.sample(self.supernet, sl)
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
                images = self.decode(self.sample(self.supernet, slice(0, n)))
            return images.float().clamp(0, 1)
        finally:
            self.supernet.set_architecture(previous)

    def model_scores(self, model: torch.nn.Module) -> torch.Tensor:
        """Per-image CLIP scores of another UNet (a standalone or distilled network, a
        teacher) on the same prompts and noises, sampled with the supernet's scheduler."""
        p, out = self.protocol, []
        for i in range(0, len(self.prompts), p.batch_size):
            sl = slice(i, min(i + p.batch_size, len(self.prompts)))
            with self.autocast(), torch.no_grad():
                feats = self.clip.image_features(self.decode(self.sample(model, sl)))
            out.append(self.clip.score_features(feats.float(), self.text_features[sl]))
        return torch.cat(out)

    def model_images(self, model: torch.nn.Module, n: int) -> torch.Tensor:
        """The first n images of another UNet (as `images`), in [0, 1]."""
        with self.autocast(), torch.no_grad():
            return self.decode(self.sample(model, slice(0, n))).float().clamp(0, 1)

    def sample(self, model: torch.nn.Module, sl: slice) -> torch.Tensor:
        """Latents of images `sl` (their prompts and noises) sampled with `model` (the supernet
        in its current architecture, or another UNet with the supernet's scheduler)."""
        p = self.protocol
        scheduler = getattr(self.supernet, "scheduler_config", None)
        return generate(
            model,
            self.context[sl],
            self.uncond,
            self.noise[sl],
            p.steps,
            p.cfg,
            scheduler,
            sampler=p.sampler,
        )

    def clip_score(self, arch: Architecture) -> float:
        """CLIP score of `arch`'s sampled images (the protocol's sampler and steps)."""
        return self.score(arch)


def action_value(
    action: Action,
    base: float,
    clip: float,
    base_ms: float,
    ms: float,
    seconds: float,
    node: str | None = None,
    cost: Cost | None = None,
) -> ActionValue:
    """The ActionValue of `action` from the CLIP score and raw latency before (`base`,
    `base_ms`) and after it (`clip`, `ms`); shared by in-process and Ray evaluation."""
    if action.kind == "remove":  # what the block gives and costs
        d_clip, d_ms = base - clip, base_ms - ms
    else:  # what the copy would give and cost
        d_clip, d_ms = clip - base, ms - base_ms
    value = d_clip / d_ms if d_ms > 0 else float("inf")
    cost = cost or Cost()
    return ActionValue(
        str(action),
        action.kind,
        action.slot,
        clip,
        d_clip,
        d_ms,
        value,
        seconds,
        node,
        cost.unet_calls,
        cost.images,
    )
