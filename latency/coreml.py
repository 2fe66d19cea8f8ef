"""Converting a torch module to a Core ML ML program, the one way that works for diffusers.

`torch.export.export` -> `.run_decompositions({})` (coremltools takes the ATEN dialect) ->
`coremltools.convert(..., convert_to="mlprogram")`. The `torch.jit.trace` path fails on
diffusers' blocks (an `int` cast op). Conversion works on Linux; loading and `predict` need
macOS, so the model is converted with `skip_model_load=True`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from search_spaces import UserError

PRECISIONS = ("fp32", "fp16")
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def cache_dir() -> Path:
    """Where diffnas caches converted models and trained worlds (`DIFFNAS_CACHE`)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffnas"
    return Path(os.environ.get("DIFFNAS_CACHE", default))


def check_options(precision: str, compute_units: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(
            f"Core ML precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"
        )
    if compute_units not in COMPUTE_UNITS:
        raise UserError(
            f"Core ML compute unit must be one of {', '.join(COMPUTE_UNITS)}, not {compute_units!r}"
        )


def convert(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    precision: str = "fp32",
    compute_units: str = "ALL",
    output_name: str = "output",
    metadata: dict[str, str] | None = None,
    description: str = "",
) -> Path:
    """Export `module` on `inputs` (their shapes become the model's) and save `.mlpackage`."""
    check_path(path)
    check_options(precision, compute_units)
    exported = torch.export.export(module.eval(), inputs).run_decompositions({})
    return convert_program(
        exported, path, precision, compute_units, output_name, metadata, description
    )


def check_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise UserError(f"a Core ML ML program is saved as a .mlpackage folder; got {str(path)!r}")
    return path


def convert_program(
    exported,
    path: str | Path,
    precision: str = "fp32",
    compute_units: str = "ALL",
    output_name: str = "output",
    metadata: dict[str, str] | None = None,
    description: str = "",
) -> Path:
    """Convert a `torch.export` program (decompositions run) and save it as `.mlpackage`."""
    path = check_path(path)
    check_options(precision, compute_units)
    import coremltools as ct
    import numpy as np

    mlmodel = ct.convert(
        exported,
        convert_to="mlprogram",
        # float32 output whatever the precision, so every package is fed and read alike
        outputs=[ct.TensorType(name=output_name, dtype=np.float32)],
        compute_precision={"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}[precision],
        compute_units=getattr(ct.ComputeUnit, compute_units),
        # iOS 17 / macOS 14: the ML program version whose ops cover diffusers' UNet
        minimum_deployment_target=ct.target.iOS17,
        skip_model_load=True,  # loading needs the Core ML runtime, which Linux lacks
    )
    mlmodel.short_description = description
    mlmodel.user_defined_metadata.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(path))
    return path


def input_spec(path: str | Path) -> dict[str, list[int]]:
    """Input names and shapes of a saved package (reads the spec; works on Linux)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    return {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
