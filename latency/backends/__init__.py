"""Profiling backends: one small interface, and a registry of them.

A backend turns a `BlockSignature` into something runnable on its device (`convert_model`),
times it (`profile`), and says whether it can run here at all (`test_connection`).
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from search_spaces import UserError

from ..signature import BlockSignature


@dataclass
class Timing:
    samples: list[float]  # ms per repeat
    versions: dict = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr_ms(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]


class Backend(ABC):
    name: str  # registry key
    compute_units: tuple[str, ...]  # what --compute-unit accepts
    precisions: tuple[str, ...] = ("fp32", "fp16")

    def __init__(
        self,
        compute_unit: str,
        precision: str = "fp32",
        repeats: int = 10,
        warmup: int = 3,
        threads: int | None = None,
    ):
        if compute_unit not in self.compute_units:
            raise UserError(
                f"backend {self.name!r} has no compute unit {compute_unit!r}; "
                f"choose one of {', '.join(self.compute_units)}"
            )
        if precision not in self.precisions:
            raise UserError(
                f"backend {self.name!r} has no precision {precision!r}; "
                f"choose one of {', '.join(self.precisions)}"
            )
        if repeats < 1 or warmup < 0:
            raise UserError("repeats must be >= 1 and warmup >= 0")
        self.compute_unit, self.precision = compute_unit, precision
        self.repeats, self.warmup, self.threads = repeats, warmup, threads

    @abstractmethod
    def test_connection(self) -> None:
        """Raise a UserError saying why this backend cannot time on this machine."""

    @abstractmethod
    def convert_model(self, signature: BlockSignature):
        """The runnable form of the block (a module on a device, a Core ML package, ...)."""

    @abstractmethod
    def profile(self, signature: BlockSignature) -> Timing:
        """Time one block: warm-up runs, then `repeats` timed runs."""

    def versions(self) -> dict:
        return {}


BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str, **kwargs) -> Backend:
    from . import coreml, executorch_backend, torch_backend  # noqa: F401  (registers them)

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}")
    cls = BACKENDS[name]
    if kwargs.get("compute_unit") is None:
        kwargs["compute_unit"] = cls.compute_units[0]
    return cls(**kwargs)
