"""The profiling backend interface, its timings, and the registry the backends enter."""

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
        self.check_setting(compute_unit, precision)
        if repeats < 1 or warmup < 0:
            raise UserError("repeats must be >= 1 and warmup >= 0")
        self.compute_unit, self.precision = compute_unit, precision
        self.repeats, self.warmup, self.threads = repeats, warmup, threads

    @classmethod
    def check_setting(cls, compute_unit: str, precision: str) -> None:
        """A UserError unless this backend has the compute unit and the precision."""
        if compute_unit not in cls.compute_units:
            raise UserError(
                f"backend {cls.name!r} has no compute unit {compute_unit!r}; "
                f"choose one of {', '.join(cls.compute_units)}"
            )
        if precision not in cls.precisions:
            raise UserError(
                f"backend {cls.name!r} has no precision {precision!r}; "
                f"choose one of {', '.join(cls.precisions)}"
            )

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
