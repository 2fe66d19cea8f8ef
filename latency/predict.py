"""Whole-network latency from the lookup table: Σ multiplicity × block latency + fixed parts.

`Predictor` reads the table once for a (space, device) and then predicts any architecture by
arithmetic alone, as the evolution loop needs for every action of every iteration.
"""

from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass

from search_spaces import Architecture, SearchSpace, UserError

from .signature import BlockSignature, Part, unet_parts
from .table import LatencyTable


@dataclass
class Prediction:
    total_ms: float  # blocks + fixed parts (calibrated if the table has a calibration)
    raw_ms: float  # the uncalibrated sum
    blocks_ms: float  # searchable blocks only
    fixed_ms: float  # conv in/out, time embedding, samplers, skip concatenations
    per_stage: dict[str, dict[str, float]]  # stage -> kind -> ms
    per_slot: dict[str, float]  # slot -> ms (multiplicity included)
    calibrated: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class MissingSignaturesError(UserError):
    def __init__(
        self,
        missing: list[BlockSignature],
        space: str,
        device: str,
        db: str,
        ref: str | None = None,
        setting: dict | None = None,
    ):
        """`ref`: how `latency build` finds the space (its name, or its YAML file's path);
        `setting`: the table's backend, compute unit and precision for the device."""
        self.missing = missing
        listed = "\n  ".join(f"{s.hash}  {s.describe()}" for s in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        command = ["diffnas", "latency", "build", ref or space, "--device", device, "--db", db]
        setting = setting or {}
        # the build command's defaults are torch / cpu / fp32: name whatever differs
        for option, key, default in [
            ("--backend", "backend", "torch"),
            ("--compute-unit", "compute_unit", "cpu"),
            ("--precision", "precision", "fp32"),
        ]:
            if setting.get(key, default) != default:
                command += [option, setting[key]]
        super().__init__(
            f"the table {db} lacks {len(missing)} block(s) of space {space!r} on device "
            f"{device!r}:\n  {listed}{more}\nmeasure them with: {shlex.join(command)}"
        )


class Predictor:
    def __init__(
        self,
        space: SearchSpace,
        table: LatencyTable,
        device: str,
        backend: str | None = None,
        compute_unit: str | None = None,
        precision: str | None = None,
        calibrate: bool = True,
    ):
        self.space, self.device = space, device
        self.setting = table.setting(device, backend, compute_unit, precision)
        self.parts: list[Part] = unet_parts(space, self.setting["precision"])
        found = table.lookup(
            device,
            [p.signature for p in self.parts],
            backend=self.setting["backend"],
            compute_unit=self.setting["compute_unit"],
            precision=self.setting["precision"],
        )
        missing = [s for s in dict.fromkeys(p.signature for p in self.parts) if s.hash not in found]
        if missing:
            raise MissingSignaturesError(
                missing, space.name, device, str(table.path), space.ref, self.setting
            )
        self.ms = {p.name: found[p.signature.hash].median_ms for p in self.parts}
        self.fixed_ms = sum(self.ms[p.name] for p in self.parts if p.stage == "fixed")
        self.calibration = (
            table.calibration(device, space.name, **_setting_filter(self.setting))
            if calibrate
            else None
        )

    def block_ms(self, slot: str) -> float:
        """Latency of one instance of a slot's block."""
        return self.ms[slot]

    def predict(self, arch: Architecture) -> Prediction:
        self.space.validate(arch)
        per_slot = {path: arch[path] * self.ms[path] for path in self.space.slots}
        per_stage = {stage: {"cross_attention": 0.0, "resnet": 0.0} for stage in self.space.stages}
        for path, ms in per_slot.items():
            slot = self.space.slots[path]
            per_stage[slot.stage][slot.kind] += ms
        blocks = sum(per_slot.values())
        raw = blocks + self.fixed_ms
        total = raw
        if self.calibration:
            total = self.calibration["slope"] * raw + self.calibration["intercept"]
        return Prediction(
            total, raw, blocks, self.fixed_ms, per_stage, per_slot, self.calibration is not None
        )

    def signatures(self, arch: Architecture) -> list[BlockSignature]:
        """The distinct signatures the network of `arch` runs: its blocks and the fixed parts."""
        self.space.validate(arch)
        used = [p for p in self.parts if p.name not in self.space.slots or arch[p.name] > 0]
        return list(dict.fromkeys(p.signature for p in used))

    def with_latencies(self, ms: dict[str, float]) -> Predictor:
        """A copy whose blocks of these signature hashes take these latencies ({hash: ms});
        the others keep the table's."""
        new = copy.copy(self)
        new.ms = {p.name: ms.get(p.signature.hash, self.ms[p.name]) for p in self.parts}
        new.fixed_ms = sum(new.ms[p.name] for p in self.parts if p.stage == "fixed")
        return new

    def delta_ms(self, arch: Architecture, slot: str, kind: str) -> float:
        """Latency change of an action (remove: negative), from the table alone."""
        step = -1 if kind == "remove" else 1
        scale = self.calibration["slope"] if self.calibration else 1.0
        return step * self.ms[slot] * scale


def _setting_filter(setting: dict) -> dict:
    return {k: setting[k] for k in ("backend", "compute_unit", "precision")}


def predict(
    space: SearchSpace, arch: Architecture, table: LatencyTable, device: str, **setting
) -> Prediction:
    return Predictor(space, table, device, **setting).predict(arch)
