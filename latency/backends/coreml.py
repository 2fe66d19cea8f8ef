"""The Core ML backend: converts each block to an `.mlpackage` and times `MLModel.predict`.

Conversion runs anywhere (cached by signature hash and precision); timing needs macOS and
stops elsewhere with a message that says what to do instead.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from search_spaces import UserError

from .. import coreml
from ..signature import BlockSignature
from .base import Backend, Timing, register

MACOS_ONLY = "Core ML timing needs macOS: run the agent on a Mac, or use --backend torch"


@register
class CoreMLBackend(Backend):
    name = "coreml"
    compute_units = coreml.COMPUTE_UNITS
    precisions = coreml.PRECISIONS

    def test_connection(self) -> None:
        if platform.system() != "Darwin":
            raise UserError(MACOS_ONLY)

    def package_path(self, signature: BlockSignature):
        return coreml.cache_dir() / "coreml" / f"{signature.hash}-{self.precision}.mlpackage"

    def convert_model(self, signature: BlockSignature):
        """The block's `.mlpackage` (converted once, then taken from the cache)."""
        path = self.package_path(signature)
        if not path.exists():
            # convert in fp32 and let Core ML lower the precision: torch fp16 on CPU is partial
            sig = signature.with_dtype("fp32")
            coreml.convert(
                sig.build(),
                tuple(x.float() for x in sig.example_inputs()),
                path,
                precision=self.precision,
                compute_units=self.compute_unit,
                metadata={"diffnas.signature": signature.to_json()},
                description=signature.describe(),
            )
        return path

    def feeds(self, signature: BlockSignature) -> dict[str, np.ndarray]:
        inputs = signature.with_dtype("fp32").example_inputs()
        return {
            name: x.float().numpy() for (name, _), x in zip(signature.inputs, inputs, strict=True)
        }

    def load(self, path):
        import coremltools as ct

        return ct.models.MLModel(
            str(path), compute_units=getattr(ct.ComputeUnit, self.compute_unit)
        )

    def profile(self, signature: BlockSignature) -> Timing:
        self.test_connection()
        model = self.load(self.convert_model(signature))
        feeds = self.feeds(signature)
        for _ in range(self.warmup):
            model.predict(feeds)
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            model.predict(feeds)
            samples.append((time.perf_counter() - start) * 1000)
        return Timing(samples, self.versions())

    def versions(self) -> dict:
        import coremltools as ct

        return {
            "coremltools": ct.__version__,
            "macos": platform.mac_ver()[0],
            "machine": platform.machine(),
            "compute_unit": self.compute_unit,
        }
