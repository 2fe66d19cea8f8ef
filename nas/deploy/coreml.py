"""Core ML export of one architecture of an ElasticUNet.

The path is the one DESIGN.md records as working with coremltools 9 and torch 2.14:
`torch.export.export` -> `.run_decompositions({})` (coremltools only takes the ATEN dialect)
-> `coremltools.convert(..., convert_to="mlprogram")`. The `torch.jit.trace` path fails on
diffusers' blocks. The gates that ElasticUNet puts on its blocks are plain Python around the
blocks' own forwards, so `torch.export` traces straight through them: the architecture (which
instances run, which skips are dropped) is read once at trace time and the exported graph is
the searched network alone, with no gate left in it.

Converting is all this module does: on Linux the `.mlpackage` cannot be loaded or run (Core ML
prediction needs macOS), so the model is converted with `skip_model_load=True` and nothing here
ever calls `predict`. Timing it is the job of an agent on a Mac.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from latency.coreml import COMPUTE_UNITS, PRECISIONS, convert_program
from search_spaces import Architecture, UserError

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from nas.supernet import ElasticUNet

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")  # as in diffusers' forward
OUTPUT_NAME = "noise_pred"  # an output may not share the input's name "sample"

# Keys of the package's user-defined metadata (MLModel.user_defined_metadata).
META_SPACE = "diffnas.space"
META_ARCH_HASH = "diffnas.architecture_hash"
META_ARCH = "diffnas.architecture"  # the whole architecture as JSON, to rebuild it anywhere
META_PRECISION = "diffnas.precision"
META_COMPUTE_UNITS = "diffnas.compute_units"  # not stored by Core ML itself: a load-time choice


class UNetForExport(nn.Module):
    """Tensors in, tensor out: the call signature a converter can trace.

    diffusers' forward returns a dataclass unless `return_dict=False`, and takes keyword
    options a traced graph cannot have; this fixes both.
    """

    def __init__(self, model: ElasticUNet):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def example_inputs(
    model: ElasticUNet, batch: int | None = None, latent: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (sample, timestep, encoder_hidden_states) of the space's shapes, or the overrides.

    Core ML models have fixed input shapes, so these shapes are the exported model's shapes.
    """
    space = model.space
    batch = space.batch if batch is None else batch
    latent = tuple(space.latent if latent is None else latent)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"batch must be a positive integer, not {batch!r}")
    if len(latent) != 3 or any(isinstance(n, bool) or not isinstance(n, int) for n in latent):
        raise UserError(f"latent must be three integers (channels, height, width), not {latent}")
    if min(latent) < 1:
        raise UserError(f"latent sizes must be positive, not {latent}")
    channels = model.unet.config.in_channels
    if latent[0] != channels:
        raise UserError(
            f"latent has {latent[0]} channels, but the UNet of space {space.name!r} takes "
            f"{channels}; give latent=({channels}, height, width)"
        )
    generator = torch.Generator().manual_seed(0)  # the values do not matter, only the shapes
    param = next(model.unet.parameters())
    sample = torch.randn(batch, *latent, generator=generator)
    context = torch.randn(batch, *space.context, generator=generator)
    timestep = torch.full((batch,), 500.0)  # float: Core ML takes it as a float32 input
    return (
        sample.to(param.device, param.dtype),
        timestep.to(param.device),
        context.to(param.device, param.dtype),
    )


def export_program(
    model: ElasticUNet,
    arch: Architecture,
    batch: int | None = None,
    latent: Sequence[int] | None = None,
) -> ExportedProgram:
    """The `torch.export` program of `arch` (decompositions run), in eval mode.

    The model's architecture and train/eval mode are restored afterwards, also on error.
    """
    inputs = example_inputs(model, batch, latent)
    with model.frozen_in(arch):  # validates `arch`: an ArchitectureError is a UserError
        return torch.export.export(UNetForExport(model), inputs).run_decompositions({})


def export_coreml(
    model: ElasticUNet,
    arch: Architecture,
    path: str | Path,
    precision: str = "fp32",
    compute_units: str = "ALL",
    batch: int | None = None,
    latent: Sequence[int] | None = None,
) -> Path:
    """Write the UNet of `arch` as a Core ML ML program (`.mlpackage`) and return its path.

    Inputs `sample` (batch, *latent), `timestep` (batch,) and `encoder_hidden_states`
    (batch, *context), all float32; output `noise_pred`, shaped like `sample`. Shapes are the
    space's unless `batch` / `latent` override them. `precision` is the compute precision
    (inputs and outputs stay float32). `compute_units` is recorded in the metadata for whoever
    loads the package; Core ML itself only takes it at load time.
    """
    path = Path(path)
    # Check every argument before the minutes-long conversion, and without importing
    # coremltools (slow, and noisy on Linux), so bad input fails at once.
    if path.suffix != ".mlpackage":
        raise UserError(f"a Core ML ML program is saved as a .mlpackage folder; got {str(path)!r}")
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if compute_units not in COMPUTE_UNITS:
        raise UserError(
            f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, not {compute_units!r}"
        )
    model.space.validate(arch)
    example_inputs(model, batch, latent)  # checks batch / latent

    exported = export_program(model, arch, batch, latent)

    return convert_program(
        exported,
        path,
        precision,
        compute_units,
        output_name=OUTPUT_NAME,
        metadata={
            META_SPACE: model.space.name,
            META_ARCH_HASH: arch.hash,
            META_ARCH: json.dumps(arch.to_dict(), separators=(",", ":")),
            META_PRECISION: precision,
            META_COMPUTE_UNITS: compute_units,
        },
        description=f"diffnas UNet of space {model.space.name!r}, architecture {arch.hash} "
        f"({precision})",
    )


__all__ = [
    "COMPUTE_UNITS",
    "PRECISIONS",
    "UNetForExport",
    "example_inputs",
    "export_coreml",
    "export_program",
]
