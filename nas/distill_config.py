"""`DistillConfig`: how `diffnas distill` trains a found network from a teacher.

Kept apart from `nas.deploy.distill` (torch, diffusers) so that the experiment file can validate its
`distill:` section without loading them.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from search_spaces import UserError


@dataclass(config=ConfigDict(extra="forbid"))
class DistillConfig:
    """Student = the found architecture, initialised from the supernet's weights; teacher =
    frozen. Each step minimises, on one noisy batch (same noise, timestep and text for both):

        task_weight * task + output_weight * output KD + feature_weight * feature KD

    as BK-SDM (Kim et al. 2023) does, whose weights are all 1.
    """

    steps: int = Field(300, ge=1)  # optimizer steps in total (--resume continues up to this)
    batch_size: int = Field(32, ge=1)  # samples per step
    lr: float = Field(1e-4, gt=0)  # AdamW peak learning rate
    lr_scheduler: str = "constant"  # diffusers schedule name: constant, cosine, linear, ...
    lr_warmup_steps: int = Field(0, ge=0)  # steps of linear warm-up (schedules with one)
    # the denoising loss against the data (epsilon or v target, the world's robust-training loss)
    task_weight: float = Field(1.0, ge=0)
    # output KD: MSE between the student's and the teacher's predictions
    output_weight: float = Field(1.0, ge=0)
    # feature KD: sum over the UNet's down blocks, mid block and up blocks of the MSE between
    # the student's and the teacher's output of that block (BK-SDM's "feat" loss)
    feature_weight: float = Field(1.0, ge=0)
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
