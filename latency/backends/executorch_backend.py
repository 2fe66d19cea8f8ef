"""The ExecuTorch backend: each block lowered to a `.pte` program and timed by the runtime.

Programs are cached by signature hash, delegate and attention processor, per ExecuTorch
version (like the Core ML packages). The delegate is the table's compute unit (`xnnpack`
times here; `coreml`, `vulkan` programs are built here and timed on their devices).
"""

from __future__ import annotations

import platform

from search_spaces import UserError

from .. import executorch as et
from ..signature import BlockSignature
from .base import Backend, Timing, register


@register
class ExecuTorchBackend(Backend):
    name = "executorch"
    compute_units = tuple(et.DELEGATES)  # xnnpack, coreml, vulkan, qnn, mps
    precisions = ("fp32",)  # XNNPACK's fp16 kernels are Arm-only; x86 would time a fallback

    def __init__(self, compute_unit: str = "xnnpack", attention: str = "classic", **kwargs):
        super().__init__(compute_unit, **kwargs)
        if attention not in et.ATTENTION:
            known = ", ".join(et.ATTENTION)
            raise UserError(f"unknown attention processor {attention!r}; choose one of {known}")
        self.attention = attention  # diffusers processor the blocks are exported with

    def check_lowering(self) -> None:
        """A UserError unless this ExecuTorch can build programs for the delegate."""
        et.partitioner(self.compute_unit)

    def test_connection(self) -> None:
        self.check_lowering()
        if not et.can_run_here(self.compute_unit):
            d = et.DELEGATES[self.compute_unit]
            raise UserError(
                f"ExecuTorch here has no {d.runtime} runtime, so {self.compute_unit} programs "
                f"cannot be timed on this machine; they run on {d.runs_on}"
            )
        self.thread_count = et.set_threads(self.threads)

    def program_path(self, signature: BlockSignature):
        return et.cache_path(signature.hash, self.compute_unit, self.attention)

    def convert_model(self, signature: BlockSignature):
        """The block's `.pte` (lowered once, then taken from the cache)."""
        path = self.program_path(signature)
        if not path.exists():
            lowered = et.lower(
                signature.build(), signature.example_inputs(), self.compute_unit, self.attention
            )
            et.save(
                path,
                lowered,
                {
                    "signature": signature.to_dict(),
                    "delegate": self.compute_unit,
                    "attention": self.attention,
                },
            )
        return path

    def profile(self, signature: BlockSignature) -> Timing:
        if not hasattr(self, "thread_count"):  # checked (and threads set) once per backend
            self.test_connection()
        path = self.convert_model(signature)
        program = et.load(path)
        samples = et.time_program(program, signature.example_inputs(), self.warmup, self.repeats)
        versions = self.versions()
        versions["outside_delegate"] = et.read_sidecar(path).get("outside_delegate", {})
        return Timing(samples, versions)

    def versions(self) -> dict:
        return {
            **et.versions(),
            "delegate": self.compute_unit,
            "attention": f"{self.attention} ({et.ATTENTION[self.attention]})",
            "threads": getattr(self, "thread_count", self.threads),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        }
