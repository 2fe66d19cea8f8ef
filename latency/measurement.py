"""Measurement: the timings of one block signature on one device setting, as a table stores them."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field

from search_spaces import UserError

from .signature import BlockSignature

DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
SOURCES = ("measured", "predicted")


def check_device_name(name: str) -> str:
    if not isinstance(name, str) or not DEVICE_NAME.match(name):
        raise UserError(
            f"invalid device name {name!r}: use letters, digits and . _ - + @ "
            "(no slashes or spaces, at most 64 characters), e.g. 'iphone-14-pro' or 'cpu-2core'"
        )
    return name


@dataclass
class Measurement:
    device: str
    backend: str  # torch, coreml, ...
    compute_unit: str  # cpu, cuda, mps; or Core ML's CPU_ONLY / CPU_AND_GPU / CPU_AND_NE / ALL
    precision: str  # fp32 | fp16 | bf16
    signature: BlockSignature
    samples: list[float]  # every timed repeat, ms
    median_ms: float
    iqr_ms: float
    source: str = "measured"  # measured | predicted
    created: float = field(default_factory=time.time)
    versions: dict = field(default_factory=dict)  # tool versions, thread count, ...

    def check(self) -> None:
        check_device_name(self.device)
        if self.source not in SOURCES:
            raise UserError(f"source must be one of {', '.join(SOURCES)}, not {self.source!r}")
        values = [self.median_ms, self.iqr_ms, *self.samples]
        if not self.samples or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in values
        ):
            raise UserError(
                f"measurement of {self.signature.describe()} on {self.device}: "
                "latencies must be finite numbers, with at least one sample"
            )
        if self.median_ms <= 0 or min(self.samples) <= 0 or self.iqr_ms < 0:
            raise UserError(
                f"measurement of {self.signature.describe()} on {self.device}: "
                "latencies must be positive (median and samples > 0, IQR >= 0)"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["signature"] = self.signature.to_dict()
        d["sig_hash"] = self.signature.hash
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        try:
            d = dict(d)
            d.pop("sig_hash", None)
            d.pop("id", None)
            sig = d.pop("signature")
            sig = BlockSignature.from_dict(json.loads(sig) if isinstance(sig, str) else sig)
            for key in ("samples", "versions"):
                if isinstance(d.get(key), str):
                    d[key] = json.loads(d[key])
            m = cls(signature=sig, **d)
            numbers = [m.median_ms, m.iqr_ms, m.created, *m.samples]
            if any(isinstance(v, bool) or v is None for v in numbers):
                raise ValueError("latencies and times must be numbers")
            m.median_ms, m.iqr_ms = float(m.median_ms), float(m.iqr_ms)
            m.samples = [float(s) for s in m.samples]
            m.created = float(m.created)
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"not a latency measurement ({e}): {str(d)[:200]}") from None
        return m
