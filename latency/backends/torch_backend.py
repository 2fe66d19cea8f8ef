"""The torch backend: times blocks with PyTorch eager on cpu, cuda or mps."""

from __future__ import annotations

import ctypes
import os
import platform
import time
import warnings

import diffusers
import torch

from search_spaces import UserError

from ..signature import BlockSignature
from .base import Backend, Timing, register


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels (CUDA and MPS calls return before they finish)."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def keep_heap() -> bool:
    """Make glibc serve large CPU tensors from its heap and keep freed memory there.

    By default glibc maps every allocation over its mmap threshold (at most 32 MB) freshly
    and unmaps it on free, so each forward pays a page fault per 4 KB of its activations:
    about 250,000 per forward of SD-v1.5's UNet at a 32x32 latent, some 15% of its time on
    this project's 2-core VM, at a cost that varies with the host's load. Deployment
    runtimes plan their memory once and pay none of it. Process-wide and
    permanent (-1 turns trimming off: the heap never shrinks back); returns False where the
    C library is not glibc (macOS, musl), which is left as it is."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def passive_wait() -> bool:
    """Whether OpenMP threads sleep between ops (OMP_WAIT_POLICY=PASSIVE) in this process."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


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
        self.heap_kept = self.compute_unit == "cpu" and keep_heap()
        if self.compute_unit == "cpu" and torch.get_num_threads() > 1 and passive_wait():
            # every op then waits for its sleeping threads to wake: a tiny-space ResNet block
            # timed 3.7x slower with 2 threads, steadily, so the noise guard cannot see it
            warnings.warn(
                "OMP_WAIT_POLICY=PASSIVE is set: multi-threaded CPU timings will be several "
                "times slower than the device runs; unset it, or time with --threads 1",
                stacklevel=2,
            )

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
        if os.environ.get("OMP_WAIT_POLICY"):  # it changes multi-threaded CPU times
            v["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
        if getattr(self, "heap_kept", False):
            v["malloc"] = "heap kept"  # timed without page faults on fresh memory (keep_heap)
        if self.compute_unit == "cuda" and torch.cuda.is_available():
            v["gpu"] = torch.cuda.get_device_name()
        return v
