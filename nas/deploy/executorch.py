"""ExecuTorch export of one architecture of an ElasticUNet, and timing whole networks with it.

The network goes the way the table's blocks go (`latency.executorch.lower`): the same
`torch.export` graph, the same delegate, the same attention processor, so a table built with
`--backend executorch` predicts the program this writes. The ElasticUNet's gates are plain
Python, so the export traces the searched network alone (see `nas.deploy.coreml`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from latency import executorch as et
from latency.backends import Timing
from nas.deploy.coreml import UNetForExport, example_inputs
from search_spaces import Architecture, SearchSpace, UserError

if TYPE_CHECKING:
    from latency.backends.executorch_backend import ExecuTorchBackend
    from nas.supernet import ElasticUNet


def lower_network(
    model: ElasticUNet,
    arch: Architecture,
    delegate: str = "xnnpack",
    attention: str = "classic",
    batch: int | None = None,
    latent: Sequence[int] | None = None,
) -> tuple[et.Lowered, tuple[torch.Tensor, ...]]:
    """The lowered program of `arch` and the inputs it was exported on (the program's shapes).

    Sets `attention` on every attention block of `model` (copies included) and leaves it set:
    the deployed network must run the processor its table was measured with."""
    inputs = example_inputs(model, batch, latent)
    with model.frozen_in(arch):
        et.set_attention_processor(model, attention)
        return et.lower(UNetForExport(model), inputs, delegate, attention), inputs


def export_executorch(
    model: ElasticUNet,
    arch: Architecture,
    path: str | Path,
    delegate: str = "xnnpack",
    attention: str = "classic",
    batch: int | None = None,
    latent: Sequence[int] | None = None,
) -> Path:
    """Write the UNet of `arch` as an ExecuTorch program (`.pte`, with a `.pte.json` sidecar).

    Inputs `sample` (batch, *latent), `timestep` (batch,) float, `encoder_hidden_states`
    (batch, *context), all float32, in that order; output the noise prediction."""
    path = Path(path)
    if path.suffix != ".pte":
        raise UserError(f"an ExecuTorch program is saved as a .pte file; got {str(path)!r}")
    model.space.validate(arch)
    lowered, _ = lower_network(model, arch, delegate, attention, batch, latent)
    return et.save(
        path,
        lowered,
        {
            "space": model.space.name,
            "architecture_hash": arch.hash,
            "architecture": json.dumps(arch.to_dict(), separators=(",", ":")),
            "delegate": delegate,
            "attention": attention,
            "inputs": ["sample", "timestep", "encoder_hidden_states"],
        },
    )


class ExecuTorchNetworkTimer:
    """Times whole networks of a space as `.pte` programs, with the backend's runtime settings.

    Each architecture is lowered once; its program waits in `folder` (a temporary one by
    default), so later rounds of a validation time it again without lowering again."""

    def __init__(
        self,
        space: SearchSpace,
        backend: ExecuTorchBackend,
        seed: int = 0,
        folder: str | Path | None = None,
    ):
        from nas.supernet import ElasticUNet

        backend.test_connection()
        self.backend = backend
        torch.manual_seed(seed)
        self.model = ElasticUNet(space).eval()
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="diffnas-pte-")
        self.folder = Path(folder or self._tmp.name)
        self.inputs = example_inputs(self.model)
        self.lower_seconds: dict[str, float] = {}  # architecture hash -> time to lower it

    def program(self, arch: Architecture) -> Path:
        path = self.folder / f"{self.model.space.name}-{arch.hash}.pte"
        if not path.exists():
            import time

            start = time.perf_counter()
            export_executorch(
                self.model, arch, path, self.backend.compute_unit, self.backend.attention
            )
            self.lower_seconds[arch.hash] = time.perf_counter() - start
        return path

    def timing(self, arch: Architecture) -> Timing:
        b = self.backend
        program = et.load(self.program(arch))
        samples = et.time_program(program, self.inputs, b.warmup, b.repeats)
        return Timing(samples, b.versions())

    def __call__(self, arch: Architecture) -> float:
        """Median milliseconds of one run of `arch`'s program."""
        return self.timing(arch).median_ms


__all__ = ["ExecuTorchNetworkTimer", "export_executorch", "lower_network"]
