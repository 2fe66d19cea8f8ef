"""An Architecture: a multiplicity for every slot of a search space.

0 = the block is removed, 1 = kept, k = kept plus k-1 copies inserted right after it.
Validation against the rules lives in `SearchSpace.validate`; this is the value object.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from .errors import ArchitectureError


@dataclass(frozen=True)
class Action:
    """One evolution action (paper's A-/A+): remove a block, or add a copy of it."""

    kind: str  # "remove" (multiplicity - 1) or "copy" (multiplicity + 1)
    slot: str  # slot path

    def __str__(self) -> str:
        return f"{self.kind} {self.slot}"


class Architecture:
    def __init__(self, space: str, multiplicity: Mapping[str, int]):
        self.space = space
        self.multiplicity = MappingProxyType(dict(multiplicity))  # slot path -> count, in order

    def __getitem__(self, slot: str) -> int:
        return self.multiplicity[slot]

    def __eq__(self, other) -> bool:
        return isinstance(other, Architecture) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.multiplicity.items() if v != 1}
        return f"Architecture(space={self.space!r}, changed={changed})"

    def _key(self):
        return self.space, tuple(sorted(self.multiplicity.items()))

    def with_multiplicity(self, slot: str, n: int) -> Architecture:
        return Architecture(self.space, {**self.multiplicity, slot: n})

    def apply(self, action: Action) -> Architecture:
        step = {"remove": -1, "copy": +1}[action.kind]
        return self.with_multiplicity(action.slot, self.multiplicity[action.slot] + step)

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"space": self.space, "multiplicity": dict(self.multiplicity)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @property
    def hash(self) -> str:
        """Stable content hash (independent of slot order and of Python's hash seed)."""
        canonical = json.dumps(
            {"space": self.space, "multiplicity": dict(sorted(self.multiplicity.items()))},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: object, source: str = "<dict>") -> Architecture:
        if not isinstance(data, dict) or set(data) != {"space", "multiplicity"}:
            raise ArchitectureError(
                f'{source}: an architecture is {{"space": NAME, "multiplicity": {{SLOT: N}}}}'
            )
        mult = data["multiplicity"]
        if not isinstance(data["space"], str) or not isinstance(mult, dict):
            raise ArchitectureError(f"{source}: 'space' must be a string, 'multiplicity' a mapping")
        bad = [k for k, v in mult.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise ArchitectureError(
                f"{source}: multiplicities must be integers >= 0; not so for {', '.join(bad)}"
            )
        return cls(data["space"], mult)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> Architecture:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArchitectureError(f"{source}:{e.lineno}: not valid JSON: {e.msg}") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Architecture:
        path = Path(path)
        if not path.is_file():
            raise ArchitectureError(f"architecture file {str(path)!r} does not exist")
        return cls.from_json(path.read_text(), str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())
