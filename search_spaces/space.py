"""SearchSpace: which blocks of a diffusion UNet a search may remove or copy.

Built from a `SpaceSpec` (the YAML file): the base UNet is resolved and run on the meta
device to read its block slots (`unet.read_blocks`), every slot is placed in a stage, and the
rules set what the search may do to it. Legality comes from shapes (DESIGN.md, "Semantics
that must hold"): only shape-preserving blocks can be removed or copied.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .architecture import Action, Architecture
from .block_cache import blocks_key, load_blocks, store_blocks
from .errors import ArchitectureError, SpaceError
from .spec import SpaceSpec, read_spec
from .unet import (
    BlockInfo,
    build_unet,
    builtin_unet_config,
    context_problem,
    file_unet_config,
    pretrained_unet_config,
    read_blocks,
)


@dataclass(frozen=True)
class Slot:
    """A block position of the base UNet, with what the search may do to it."""

    block: BlockInfo  # shapes and parameters read off the UNet
    stage: str  # stage name
    removable: bool  # the search may set its multiplicity to 0
    max_copies: int  # the search may set its multiplicity up to 1 + max_copies

    @property
    def path(self) -> str:
        return self.block.path

    @property
    def kind(self) -> str:
        return self.block.kind


def removal_blocker(block: BlockInfo) -> str | None:
    """Why the block cannot be replaced by the identity, or None if it can."""
    if block.resamples:
        return "it resamples its input, so the identity has another shape"
    if block.in_channels != block.out_channels:
        what = "the decoder hidden state" if block.skip_channels else "its input"
        return (
            f"it maps {what} from {block.in_channels} to {block.out_channels} channels, "
            "so the identity has another shape"
        )
    return None


def copy_blocker(block: BlockInfo) -> str | None:
    """Why a copy of the block cannot follow it, or None if one can."""
    if reason := removal_blocker(block):
        return reason
    if block.skip_channels:
        return "it consumes a skip connection, and a copy after it would have none to consume"
    return None


def _resolve(path: str, base_dir: Path | None) -> Path:
    """A path from a space file: `~` expanded, relative to the file's folder."""
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and base_dir is not None:
        resolved = base_dir / resolved
    return resolved


def _unmatched_hint(pattern: str, blocks: list[BlockInfo]) -> str:
    """What to tell the author of a stage or rule pattern that matches no slot."""
    if pattern.startswith("mid_block") and not any(b.path.startswith("mid_block.") for b in blocks):
        # e.g. the sd15 stage map copied onto BK-SDM, which drops the mid block
        return "the base UNet has no mid block (its config's mid_block_type is null): drop it"
    return f"slot paths look like {blocks[0].path!r}"


class SearchSpace:
    def __init__(self, spec: SpaceSpec, base_dir: Path | None = None):
        self.spec = spec
        self.name = spec.name
        self.description = spec.description
        # how `load_space` finds this space again (a name, or the YAML file's path), for
        # commands printed in messages; `load_space` and `from_yaml` set it
        self.ref = spec.name
        self.pretrained: Path | None = None
        self.config_file: Path | None = None
        if spec.base.builtin is not None:
            try:
                self.unet_config = builtin_unet_config(spec.base.builtin)
            except SpaceError as e:
                raise SpaceError(f"{spec.where('base', 'builtin')}: {e}") from None
        elif isinstance(spec.base.config, dict):
            self.unet_config = dict(spec.base.config)
        elif spec.base.config is not None:  # the path of a config JSON file
            self.config_file = _resolve(spec.base.config, base_dir)
            try:
                self.unet_config = file_unet_config(self.config_file)
            except SpaceError as e:
                raise SpaceError(f"{spec.where('base', 'config')}: {e}") from None
        else:
            self.pretrained = _resolve(spec.base.pretrained, base_dir)
            try:
                self.unet_config = pretrained_unet_config(self.pretrained)
            except SpaceError as e:
                raise SpaceError(f"{spec.where('base', 'pretrained')}: {e}") from None
        self.latent = tuple(spec.inputs.latent)
        self.context = tuple(spec.inputs.context)
        self.batch = spec.inputs.batch

        key = blocks_key(self.unet_config, self.latent, self.context, self.batch)
        if (cached := load_blocks(key)) is not None:  # read before: no torch needed
            blocks, self.base_params = cached
        else:
            blocks, self.base_params = self._read_unet()
            store_blocks(key, blocks, self.base_params)
        if not blocks:
            raise SpaceError(f"{spec.where('base')}: the base UNet has no ResNet or attention")

        stage_of = self._assign_stages(blocks)
        self.stages: dict[str, list[str]] = {}
        for b in blocks:
            self.stages.setdefault(stage_of[b.path], []).append(b.path)
        removable, copies = self._apply_rules(blocks)
        self.slots: dict[str, Slot] = {
            b.path: Slot(b, stage_of[b.path], removable[b.path], copies[b.path]) for b in blocks
        }
        self._check_constraints_refer()
        if problems := self.violations(self.original()):
            raise SpaceError(
                f"{spec.where('constraints')}: the original network must satisfy the space "
                "(the search starts from it): " + "; ".join(problems)
            )

    # -- construction --------------------------------------------------------------------------

    def _read_unet(self) -> tuple[list[BlockInfo], int]:
        """The base UNet's blocks and parameter count, from a meta forward."""
        spec = self.spec
        try:
            unet = build_unet(self.unet_config, device="meta")
        except SpaceError as e:
            raise SpaceError(f"{spec.where('base')}: {e}") from None
        # before the UNet runs: a mismatch would surface as torch's matmul shape error
        if problem := context_problem(unet.config, self.unet_config, self.context):
            raise SpaceError(f"{spec.where('inputs', 'context')}: {problem}")
        try:
            blocks = read_blocks(unet, self.latent, self.context, self.batch)
        except SpaceError as e:
            raise SpaceError(f"{spec.where('base')}: {e}") from None
        return blocks, sum(p.numel() for p in unet.parameters())

    def _assign_stages(self, blocks: list[BlockInfo]) -> dict[str, str]:
        spec = self.spec
        if spec.stages is None:  # one stage per UNet block: "down_blocks.0", "mid_block", ...
            return {b.path: b.path.rsplit(".", 2)[0] for b in blocks}
        stage_of: dict[str, str] = {}
        for stage, globs in spec.stages.items():
            for i, pattern in enumerate(globs):
                matched = [b.path for b in blocks if fnmatchcase(b.path, pattern)]
                if not matched:
                    raise SpaceError(
                        f"{spec.where('stages', stage, i)}: stages.{stage}: pattern {pattern!r} "
                        f"matches no slot; {_unmatched_hint(pattern, blocks)}"
                    )
                for path in matched:
                    if stage_of.get(path, stage) != stage:
                        raise SpaceError(
                            f"{spec.where('stages', stage, i)}: slot {path} is in two stages, "
                            f"{stage_of[path]} and {stage}; make the patterns disjoint"
                        )
                    stage_of[path] = stage
        missing = [b.path for b in blocks if b.path not in stage_of]
        if missing:
            raise SpaceError(
                f"{spec.where('stages')}: these slots are in no stage: {', '.join(missing)}; "
                "add patterns for them under `stages`"
            )
        return stage_of

    def _apply_rules(self, blocks: list[BlockInfo]) -> tuple[dict[str, bool], dict[str, int]]:
        removable = {b.path: False for b in blocks}  # nothing is searched unless a rule says so
        copies = {b.path: 0 for b in blocks}
        for i, rule in enumerate(self.spec.rules):
            where = self.spec.where("rules", i)
            matched = [
                b for b in blocks if fnmatchcase(b.path, rule.match) and rule.kind in (None, b.kind)
            ]
            if not matched:
                kind = f" of kind {rule.kind}" if rule.kind else ""
                raise SpaceError(
                    f"{where}: rules[{i}]: pattern {rule.match!r} matches no slot{kind}; "
                    f"{_unmatched_hint(rule.match, blocks)}"
                )
            for b in matched:
                if rule.removable:
                    if (reason := removal_blocker(b)) is None:
                        removable[b.path] = True
                    elif rule.on_illegal == "error":
                        raise SpaceError(
                            f"{where}: rules[{i}]: slot {b.path} cannot be removed: {reason}. "
                            "Narrow `match`, or add `on_illegal: skip`"
                        )
                elif rule.removable is False:
                    removable[b.path] = False
                if rule.max_copies:
                    if (reason := copy_blocker(b)) is None:
                        copies[b.path] = rule.max_copies
                    elif rule.on_illegal == "error":
                        raise SpaceError(
                            f"{where}: rules[{i}]: slot {b.path} cannot be copied: {reason}. "
                            "Narrow `match`, or add `on_illegal: skip`"
                        )
                elif rule.max_copies == 0:
                    copies[b.path] = 0
        return removable, copies

    def _check_constraints_refer(self) -> None:
        for i, c in enumerate(self.spec.constraints):
            if not any(fnmatchcase(s, c.stage) for s in self.stages):
                raise SpaceError(
                    f"{self.spec.where('constraints', i, 'stage')}: constraints[{i}]: stage "
                    f"{c.stage!r} matches no stage; stages are {', '.join(self.stages)}"
                )

    # -- architectures -------------------------------------------------------------------------

    def original(self) -> Architecture:
        return Architecture(self.name, {path: 1 for path in self.slots})

    def counts(self, arch: Architecture) -> dict[str, dict[str, int]]:
        """Blocks per stage and kind (multiplicities summed), as in the paper's Table 3."""
        out = {stage: {"cross_attention": 0, "resnet": 0} for stage in self.stages}
        for path, slot in self.slots.items():
            out[slot.stage][slot.kind] += arch[path]
        return out

    def params(self, arch: Architecture) -> int:
        """Parameters of the UNet of `arch`: each copy has its own weights."""
        return self.base_params + sum(
            (arch[path] - 1) * slot.block.params for path, slot in self.slots.items()
        )

    def check_fits(self, arch: Architecture, source: str = "architecture") -> None:
        """Same space and same slots; raises ArchitectureError otherwise."""
        if arch.space != self.name:
            raise ArchitectureError(
                f"{source} is for space {arch.space!r}, not {self.name!r}; "
                f"pass an architecture of {self.name!r} (e.g. from `space.original()`)"
            )
        missing = [p for p in self.slots if p not in arch.multiplicity]
        extra = [p for p in arch.multiplicity if p not in self.slots]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing slots: {', '.join(missing)}")
            if extra:
                parts.append(f"unknown slots: {', '.join(extra)}")
            raise ArchitectureError(
                f"{source} does not match the slots of space {self.name!r} ({'; '.join(parts)})"
            )

    def violations(self, arch: Architecture) -> list[str]:
        """Every rule `arch` breaks, each naming the slot or stage and the rule."""
        problems = []
        for path, slot in self.slots.items():
            n = arch[path]
            if n == 0 and not slot.removable:
                why = removal_blocker(slot.block) or "no rule makes it removable"
                problems.append(f"{path} is removed, but it is not removable ({why})")
            if n > 1 + slot.max_copies:
                why = copy_blocker(slot.block) or "its rules allow"
                problems.append(
                    f"{path} has {n - 1} copies, but at most {slot.max_copies} are allowed ({why})"
                )
        counts = self.counts(arch)
        for i, c in enumerate(self.spec.constraints):
            for stage in (s for s in self.stages if fnmatchcase(s, c.stage)):
                kinds = [c.kind] if c.kind else ["cross_attention", "resnet"]
                n = sum(counts[stage][k] for k in kinds)
                label = f"{c.kind} blocks" if c.kind else "blocks"
                if c.min is not None and n < c.min:
                    problems.append(
                        f"stage {stage} has {n} {label}, constraints[{i}] needs at least {c.min}"
                    )
                if c.max is not None and n > c.max:
                    problems.append(
                        f"stage {stage} has {n} {label}, constraints[{i}] allows at most {c.max}"
                    )
        if self.spec.max_params is not None and (p := self.params(arch)) > self.spec.max_params:
            problems.append(f"{p:,} parameters exceed max_params {self.spec.max_params:,}")
        return problems

    def validate(self, arch: Architecture, source: str = "architecture") -> None:
        self.check_fits(arch, source)
        if problems := self.violations(arch):
            raise ArchitectureError(
                f"{source} is not legal in space {self.name!r}:\n  " + "\n  ".join(problems)
            )

    def actions(self, arch: Architecture) -> list[Action]:
        """The legal actions from `arch`: removing one block (A-) or copying one (A+).

        "copy" on a removed block brings the original back (multiplicity 0 -> 1).
        """
        self.validate(arch)
        out = []
        for path in self.slots:
            for kind in ("remove", "copy"):
                action = Action(kind, path)
                if (kind == "remove" and arch[path] == 0) or not self._is_legal(arch.apply(action)):
                    continue
                out.append(action)
        return out

    def _is_legal(self, arch: Architecture) -> bool:
        return not self.violations(arch)

    def random(self, seed: int, p_change: float = 0.5, max_tries: int = 10_000) -> Architecture:
        """A random legal architecture: each searchable slot changes with probability p_change
        to a multiplicity drawn uniformly from what its rules allow."""
        rng = _random.Random(seed)
        choices = {
            path: [n for n in range(0 if s.removable else 1, s.max_copies + 2) if n != 1]
            for path, s in self.slots.items()
        }
        for _ in range(max_tries):
            mult = {
                path: rng.choice(opts) if opts and rng.random() < p_change else 1
                for path, opts in choices.items()
            }
            arch = Architecture(self.name, mult)
            if self._is_legal(arch):
                return arch
        raise SpaceError(
            f"no legal architecture found in {max_tries} random draws of space {self.name!r}; "
            f"its constraints may be too tight for p_change={p_change}"
        )

    def with_inputs(self, latent=None, context=None, batch=None) -> SearchSpace:
        """The same space at other input shapes (e.g. a 32x32 latent to profile faster)."""
        inputs = self.spec.inputs.model_copy(
            update={
                k: tuple(v) if isinstance(v, list | tuple) else v
                for k, v in {"latent": latent, "context": context, "batch": batch}.items()
                if v is not None
            }
        )
        spec = self.spec.model_copy(update={"inputs": inputs})
        # paths resolved already (from the YAML file's folder): keep them absolute
        if self.pretrained is not None:
            spec = spec.model_copy(
                update={"base": spec.base.model_copy(update={"pretrained": str(self.pretrained)})}
            )
        if self.config_file is not None:
            spec = spec.model_copy(
                update={"base": spec.base.model_copy(update={"config": str(self.config_file)})}
            )
        space = SearchSpace(spec)
        space.ref = self.ref
        return space

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        space = cls(read_spec(path), base_dir=path.parent)
        space.ref = str(path)
        return space

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "latent": list(self.latent),
            "context": list(self.context),
            "batch": self.batch,
            "stages": self.stages,
            "slots": len(self.slots),
            "removable": sum(s.removable for s in self.slots.values()),
            "copyable": sum(s.max_copies > 0 for s in self.slots.values()),
            "params": self.base_params,
        }
