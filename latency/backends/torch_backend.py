"""The torch backend: times blocks with PyTorch eager on cpu, cuda or mps."""

from __future__ import annotations

import platform
import time

import diffusers
import torch

from search_spaces import UserError

from ..signature import BlockSignature
from . import Backend, Timing, register


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels (CUDA and MPS calls return before they finish)."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


@register
class TorchBackend(Backend):
    name = "torch"
    compute_units = ("cpu", "cuda", "mps")
    precisions = ("fp32", "fp16", "bf16")

    def test_connection(self) -> None:
        if self.compute_unit == "cuda" and not torch.cuda.is_available():
            raise UserError("torch backend: CUDA is not available here; use --compute-unit cpu")
        if self.compute_unit == "mps" and not torch.backends.mps.is_available():
            raise UserError("torch backend: MPS is not available here; use --compute-unit cpu")
        if self.compute_unit == "cpu" and self.precision == "fp16":
            raise UserError(
                "torch backend: fp16 on the CPU is not a deployment setting; "
                "use --precision fp32 (or bf16) on cpu"
            )
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def convert_model(self, signature: BlockSignature):
        sig = signature.with_dtype(self.precision)
        return sig.build(self.compute_unit), sig.example_inputs(self.compute_unit)

    def profile(self, signature: BlockSignature) -> Timing:
        module, inputs = self.convert_model(signature)
        return self.time_callable(lambda: module(*inputs))

    def time_callable(self, fn) -> Timing:
        """Median-friendly timing: warm-up, then one synchronised timing per repeat."""
        device = self.compute_unit
        samples = []
        with torch.inference_mode():
            for _ in range(self.warmup):
                fn()
            synchronize(device)
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                synchronize(device)
                samples.append((time.perf_counter() - start) * 1000)
        return Timing(samples, self.versions())

    def versions(self) -> dict:
        v = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        }
        if self.compute_unit == "cuda" and torch.cuda.is_available():
            v["gpu"] = torch.cuda.get_device_name()
        return v
