"""The one-call metrics of the evaluation protocol (x0_clip, x0_distance): a candidate is scored
by how well it denoises the current network's own samples in one UNet call per timestep,
instead of sampling images of its own (docs/evaluation-cost.md says what each costs and keeps).
"""

from __future__ import annotations

import random

import torch

from nas.protocol_checks import check_timesteps
from nas.search.evaluate import ActionScorer, Evaluator
from nas.worlds.generate import guided_prediction, make_scheduler
from search_spaces import Architecture, UserError


class DenoisingProxy(ActionScorer):
    """The one-call metrics (x0_clip, x0_distance) around an `Evaluator` (its prompts, text
    conditions, noises, CLIP and sampler).

    `prepare(arch)`, once per iteration: the current architecture samples its images from the
    protocol's noises; each is noised to every timestep t of the protocol (x_t = sqrt(ᾱ_t) x0 +
    sqrt(1 - ᾱ_t) ε, ε fixed by the protocol's seed); the current architecture predicts x0 from
    each x_t (one guided UNet call). A candidate is scored on the same x_t, one call each:
    x0_clip is the CLIP score of its decoded predictions; x0_distance is minus the mean squared
    distance of its predictions to the current architecture's (0 for the current one). Per
    image, the mean over timesteps."""

    def __init__(self, evaluator: Evaluator):
        if evaluator.protocol.metric == "sample_clip":
            raise UserError("DenoisingProxy is for the x0 metrics; sample_clip is the Evaluator")
        self.evaluator = evaluator
        self.supernet, self.protocol = evaluator.supernet, evaluator.protocol
        self.prompts = evaluator.prompts
        config = getattr(self.supernet, "scheduler_config", None)
        schedule = make_scheduler(config)
        self.prediction_type = schedule.config.prediction_type
        check_timesteps(self.protocol.timesteps, schedule.config.num_train_timesteps)
        self.timesteps = list(self.protocol.timesteps)
        self.alphas = schedule.alphas_cumprod[self.timesteps].float()  # ᾱ_t
        self.reference: Architecture | None = None
        self.sample_clip: float | None = None  # CLIP of the reference's own samples

    def prepare(self, arch: Architecture) -> None:
        ev, p = self.evaluator, self.protocol
        previous = self.supernet.architecture
        self.supernet.set_architecture(arch)
        samples, clips = [], []
        try:
            for i in range(0, len(self.prompts), p.batch_size):
                sl = slice(i, min(i + p.batch_size, len(self.prompts)))
                with ev.autocast(), torch.no_grad():
                    latents = ev.sample(self.supernet, sl).float()
                    feats = ev.clip.image_features(ev.decode(latents))
                clips.append(ev.clip.score_features(feats.float(), ev.text_features[sl]))
                samples.append(latents.cpu())
        finally:
            self.supernet.set_architecture(previous)
        x0 = torch.cat(samples)  # (n, C, H, W): the current network's own samples
        g = torch.Generator().manual_seed(random.Random(f"x0-proxy-{p.seed}").getrandbits(63))
        eps = torch.randn((len(self.timesteps), *x0.shape), generator=g)
        a = self.alphas.view(-1, 1, 1, 1, 1)
        self.noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps  # (T, n, C, H, W), on the CPU
        self.sample_clip = float(torch.cat(clips).mean())
        self.reference = arch
        self.base_prediction = None
        self.base_prediction = self._predict(arch, 0, len(self.prompts))
        self.base_scores = self._score(self.base_prediction, 0, len(self.prompts))

    def _predict(self, arch: Architecture, start: int, stop: int) -> torch.Tensor:
        """x0 predictions (T, stop - start, C, H, W) of `arch` from the prepared x_t."""
        ev, p = self.evaluator, self.protocol
        previous = self.supernet.architecture
        self.supernet.set_architecture(arch)
        device = next(self.supernet.parameters()).device
        out = []
        was_training = self.supernet.training
        self.supernet.eval()
        try:
            for k, t in enumerate(self.timesteps):
                a = float(self.alphas[k])
                rows = []
                for i in range(start, stop, p.batch_size):
                    j = min(i + p.batch_size, stop)
                    x = self.noisy[k, i:j].to(device)
                    context = ev.context[i:j]
                    if p.cfg != 1.0:
                        uncond = ev.uncond.to(device).expand(len(x), -1, -1)
                        context = torch.cat([context, uncond])
                    with ev.autocast(), torch.no_grad():
                        pred = guided_output(self.supernet, x, t, context, p.cfg).float()
                    rows.append(x0_from_output(pred, x, a, self.prediction_type).cpu())
                out.append(torch.cat(rows))
        finally:
            self.supernet.set_architecture(previous)
            self.supernet.train(was_training)
        return torch.stack(out)

    def _score(self, prediction: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Per-image scores (stop - start) of x0 predictions (T, stop - start, ...)."""
        ev, p = self.evaluator, self.protocol
        if p.metric == "x0_distance":
            if self.base_prediction is None:  # the reference itself
                return torch.zeros(stop - start)
            base = self.base_prediction[:, start:stop]
            return -((prediction - base) ** 2).mean(dim=(0, 2, 3, 4))
        device = next(self.supernet.parameters()).device
        per_t = []
        for k in range(len(self.timesteps)):
            rows = []
            for i in range(0, stop - start, p.batch_size):
                j = min(i + p.batch_size, stop - start)
                with ev.autocast(), torch.no_grad():
                    images = ev.decode(prediction[k, i:j].to(device))
                    feats = ev.clip.image_features(images)
                texts = ev.text_features[start + i : start + j]
                rows.append(ev.clip.score_features(feats.float(), texts).cpu())
            per_t.append(torch.cat(rows))
        return torch.stack(per_t).mean(0)

    def scores(self, arch: Architecture, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if self.reference is None:
            raise UserError("DenoisingProxy.prepare(arch) first: it draws the noised samples")
        stop = len(self.prompts) if stop is None else min(stop, len(self.prompts))
        if arch == self.reference:
            return self.base_scores[start:stop]
        return self._score(self._predict(arch, start, stop), start, stop)


def guided_output(model, x: torch.Tensor, t: int, context: torch.Tensor, cfg: float):
    """The model's guided output at `x`, timestep `t` (`context`: conditional then
    unconditional contexts when cfg != 1), as a sampler step computes it."""
    return guided_prediction(model, x, torch.tensor(t, device=x.device), context, cfg)


def x0_from_output(output: torch.Tensor, x: torch.Tensor, alpha: float, kind: str):
    """x0 from a UNet output at x_t with ᾱ_t = alpha, for the scheduler's prediction type."""
    a, s = alpha**0.5, (1 - alpha) ** 0.5
    if kind == "epsilon":
        return (x - s * output) / a
    if kind == "v_prediction":
        return a * x - s * output
    if kind == "sample":
        return output
    raise UserError(f"prediction type {kind!r}: the x0 metrics know epsilon, v_prediction, sample")


def action_scorer(evaluator) -> ActionScorer:
    """What the evolution scores actions with under the evaluator's protocol: the evaluator
    itself (sample_clip) or a `DenoisingProxy` around it (the x0 metrics)."""
    if evaluator.protocol.metric == "sample_clip":
        return evaluator
    return DenoisingProxy(evaluator)
