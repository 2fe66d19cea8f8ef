"""The distillation objective (after BK-SDM, Kim et al. 2023): the task loss, output KD against
a frozen teacher's prediction, and scale-free feature KD on the blocks the student still
computes in (docs/distill.md), as an `Objective` of robust training's loop.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nas.distill_config import DistillConfig
from nas.searched_unet import RemovedAttention, RemovedResnet
from nas.supernet import ElasticUNet
from nas.training.robust import Objective, _loss
from search_spaces import UserError


def feature_points(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules whose outputs feature KD may compare, by name: down blocks, mid block, up
    blocks (diffusers' top-level blocks)."""
    unet = unet.unet if isinstance(unet, ElasticUNet) else unet
    points = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    if unet.mid_block is not None:
        points["mid_block"] = unet.mid_block
    return points | {f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)}


def computes(unet: torch.nn.Module, name: str) -> bool:
    """Whether the top-level block `name` of `unet` keeps a ResNet or attention: False when
    every one of them is removed (the block then returns its input, resampled if it
    resamples). `unet`: a standalone network, an ElasticUNet (its current architecture) or
    a plain diffusers UNet (always True)."""
    block = feature_points(unet)[name]
    parts = {
        f"{name}.{kind}.{i}": m
        for kind in ("resnets", "attentions")
        for i, m in enumerate(getattr(block, kind, None) or [])
    }
    if not parts:  # a block of nothing but a sampler is not a removal
        return True
    if isinstance(unet, ElasticUNet):
        multiplicity = unet.architecture.multiplicity
        return any(multiplicity.get(path, 1) > 0 for path in parts)
    return not all(isinstance(m, (RemovedResnet, RemovedAttention)) for m in parts.values())


def matched_points(student: torch.nn.Module) -> list[str]:
    """The feature points feature KD matches: every block in which the student still computes
    something (docs/distill.md: a block whose ResNets and attentions are all removed is left
    out)."""
    return [name for name in feature_points(student) if computes(student, name)]


@contextmanager
def _capture(modules: list[torch.nn.Module]):
    """Collect each module's output (a down block's hidden state, not its skips) in order."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class Distillation(Objective):
    """The distillation loss of one step (see the module docstring)."""

    name = "distillation"

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, config: DistillConfig):
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config
        student_points, teacher_points = feature_points(student), feature_points(teacher)
        if student_points.keys() != teacher_points.keys():
            raise UserError(
                f"the teacher has {len(teacher_points)} down/mid/up blocks and the student "
                f"{len(student_points)}: feature KD needs the same UNet topology"
            )
        self.points = matched_points(student)  # the blocks feature KD compares
        self.student_points = [student_points[n] for n in self.points]
        self.teacher_points = [teacher_points[n] for n in self.points]

    def feature_kd(self, student: list[torch.Tensor], teacher: list[torch.Tensor]):
        """The feature term from the matched blocks' outputs (config.feature_loss); None
        where no block is matched."""
        errors = []
        for s, te in zip(student, teacher, strict=True):
            s, te = s.float(), te.float()
            if self.config.feature_loss == "relative":
                # each sample's error over that sample's teacher mean square, averaged over
                # the samples: scale-free, and a mean of per-sample values, so that data-
                # parallel workers' shards average to the whole batch's value
                error = (s - te).pow(2).flatten(1).mean(1)
                errors.append((error / te.pow(2).flatten(1).mean(1).clamp_min(1e-12)).mean())
            else:
                errors.append(F.mse_loss(s, te))
        if not errors:  # the student kept nothing of any block: nothing to match
            return None
        total = torch.stack(errors)
        return total.mean() if self.config.feature_loss == "relative" else total.sum()

    def __call__(self, runner, noisy, t, cond, target, scheduler, config):
        c = self.config
        features = c.feature_weight > 0
        with _capture(self.student_points if features else []) as student_feats:
            pred = runner(noisy, t, encoder_hidden_states=cond).sample
        task = _loss(pred, target, t, scheduler, config)
        zero = task.new_zeros(())
        out_kd = feat_kd = zero
        if c.output_weight > 0 or features:  # task only: the teacher is not run at all
            with (
                torch.no_grad(),
                _capture(self.teacher_points if features else []) as teacher_feats,
            ):
                teacher_pred = self.teacher(noisy, t, encoder_hidden_states=cond).sample
            out_kd = F.mse_loss(pred.float(), teacher_pred.float())
            if features:
                feat_kd = self.feature_kd(student_feats, teacher_feats)
                feat_kd = zero if feat_kd is None else feat_kd
        total = c.task_weight * task + c.output_weight * out_kd + c.feature_weight * feat_kd
        terms = {
            "task": task.detach(),
            "output_kd": out_kd.detach(),
            "feature_kd": feat_kd.detach(),
        }
        return total, terms


@dataclass
class DistillationJob:
    """The distillation objective as a Ray Train worker builds it (`nas.training.ray`'s
    `objective`): the teacher travels as plain data (`nas.training.ray._pack`), and each worker
    makes its own copy on its device, frozen, beside its copy of the student."""

    teacher: dict  # nas.training.ray._pack(teacher)
    config: DistillConfig

    def __call__(self, student: torch.nn.Module, device: torch.device) -> Distillation:
        from nas.training.ray import _unpack

        return Distillation(student, _unpack(self.teacher).to(device), self.config)
