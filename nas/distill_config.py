"""`DistillConfig`: how `diffnas distill` trains a found network from a teacher.

Kept apart from `nas.deploy.distill` (torch, diffusers) so that the experiment file can validate its
`distill:` section without loading them.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from search_spaces import UserError

# the default weight of both KD terms (relative feature loss), measured on the tiny world by
# experiments/benchmarks/distill.py (docs/distill.md, "The default weights were measured"):
# KD weights 1 / 0.3 / 0.1 kept 97.7% / 99.8% / 101.0% of the full network's held-out CLIP
KD_WEIGHT = 0.1


@dataclass(config=ConfigDict(extra="forbid"))
class DistillConfig:
    """Student = the found architecture, initialised from the supernet's weights; teacher =
    frozen. Each step minimises, on one noisy batch (same noise, timestep and text for both):

        task_weight * task + output_weight * output KD + feature_weight * feature KD

    the three terms of BK-SDM (Kim et al. 2023). Unlike BK-SDM (plain MSEs summed over the
    blocks, all weights 1), feature KD is by default scale-free (`feature_loss`), and the KD
    weights are the ones measured on the tiny world (KD_WEIGHT, docs/distill.md): there the
    teacher is barely better than the student, and more KD weight cost CLIP. Raise them for a
    teacher far better than its student (BK-SDM's setting: an SD UNet with blocks removed).
    """

    steps: int = Field(500, ge=1)  # optimizer steps in total (--resume continues up to this)
    batch_size: int = Field(32, ge=1)  # samples per step
    lr: float = Field(1e-4, gt=0)  # AdamW peak learning rate
    lr_scheduler: str = "constant"  # diffusers schedule name: constant, cosine, linear, ...
    lr_warmup_steps: int = Field(0, ge=0)  # steps of linear warm-up (schedules with one)
    # the denoising loss against the data (epsilon or v target, the world's robust-training loss)
    task_weight: float = Field(1.0, ge=0)
    # output KD: MSE between the student's and the teacher's predictions (on the scale of the
    # task loss: both compare predictions of the same target). KD_WEIGHT: measured, above
    output_weight: float = Field(KD_WEIGHT, ge=0)
    # feature KD on the output of each down block, the mid block and each up block that the
    # student still computes in (a block whose ResNets and attentions are all removed is left
    # out: its output is its input). KD_WEIGHT: measured, above
    feature_weight: float = Field(KD_WEIGHT, ge=0)
    # "relative": the mean over those blocks of MSE(student, teacher) / mean(teacher^2) (per
    # sample, averaged), each block's error relative to its own scale (block outputs are not on
    # the loss's scale: on the tiny world one has a mean square of 21, another 1); "mse":
    # BK-SDM's sum of plain MSEs
    feature_loss: Literal["relative", "mse"] = "relative"
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of the student (None: last weights)
    checkpoint_every: int = Field(100, ge=0)  # checkpoint every N steps; 0: at the end only
    seed: int | None = None  # data order, noise and timesteps; None: the experiment's seed
    held_out_seeds: int = Field(2, ge=1)  # initial noises per held-out prompt
    held_out_steps: int = Field(20, ge=1)  # DDIM steps of the held-out protocol
    device: str = "cpu"  # torch device of student, teacher and scoring ("cuda", ...)

    def with_overrides(self, **overrides) -> DistillConfig:
        """A copy with the given fields changed (None: unchanged), validated."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        try:
            return replace(self, **changes)
        except ValidationError as e:
            raise UserError(_message(e)) from None
        except TypeError as e:  # an unknown field
            raise UserError(f"DistillConfig: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def _message(e: ValidationError) -> str:
    return "; ".join(
        f"distill.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
    )


def distill_config(data: dict | None = None) -> DistillConfig:
    """A DistillConfig from a mapping (the experiment file's `distill:` section)."""
    try:
        return DistillConfig(**(data or {}))
    except ValidationError as e:
        raise UserError(_message(e)) from None
    except TypeError as e:
        raise UserError(f"distill: {e}") from None


__all__ = ["DistillConfig", "distill_config"]
