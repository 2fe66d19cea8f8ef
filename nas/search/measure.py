"""Timing whole networks of a space, to check the lookup table's predictions against."""

from __future__ import annotations

import torch

from latency.backends.torch_backend import TorchBackend
from latency.signature import torch_dtype
from nas.supernet import ElasticUNet
from search_spaces import Architecture, SearchSpace, UserError


class NetworkTimer:
    """Times the ElasticUNet of any architecture with the torch backend's timing loop."""

    def __init__(self, space: SearchSpace, backend: TorchBackend, seed: int = 0):
        if not isinstance(backend, TorchBackend):
            raise UserError(
                f"whole networks are timed here with the torch backend, not {backend.name!r}; "
                "for Core ML export the network (`diffnas export RUN --format coreml`) and time "
                "it on a Mac"
            )
        backend.test_connection()
        self.backend = backend
        device, dtype = backend.compute_unit, torch_dtype(backend.precision)
        torch.manual_seed(seed)
        self.model = ElasticUNet(space).to(device, dtype).eval()
        g = torch.Generator().manual_seed(seed)
        self.inputs = (
            torch.randn(space.batch, *space.latent, generator=g).to(device, dtype),
            torch.full((space.batch,), 500, device=device),
            torch.randn(space.batch, *space.context, generator=g).to(device, dtype),
        )

    def __call__(self, arch: Architecture) -> float:
        """Median milliseconds of one forward of `arch`."""
        self.model.set_architecture(arch)
        model, inputs = self.model, self.inputs
        return self.backend.time_callable(lambda: model(*inputs, return_dict=False)).median_ms
