"""ElasticUNet: one diffusers UNet that runs every architecture of its search space.

The diffusers `UNet2DConditionModel` is kept as it is (`self.unet`: same modules, same
state-dict keys, so SD-v1.5 weights load unchanged and save back unchanged). Each slot's
block gets a gate: its `forward` is replaced on the instance by one that runs the block as
often as the architecture says (the original, then its copies), or the identity when it is
removed — or, in training mode, skipped at random (robust training, paper Eq. 5). The UNet's
own forward is untouched, so with the original architecture the output is diffusers' own.

Copies are real modules kept in `self.copies`, created from the original's weights the first
time an architecture asks for them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from safetensors.torch import load_file, save_file
from torch import nn

from search_spaces import Architecture, ArchitectureError, SearchSpace, SpaceError, UserError
from search_spaces.spec import SpaceSpec

CONFIG_NAME = "elastic.json"
COPIES_NAME = "copies.safetensors"


@dataclass
class SkipConfig:
    """Robust training: the probability that a removable block is skipped in a training step.

    The default 0.1 makes a step of the sd15 space (34 removable blocks) drop ~3 blocks and
    run the full network 3% of the time: the search later scores networks one or a few
    removals away from the current one, so training must mostly see networks like those.
    Stage overrides win over kind overrides, which win over `p`.
    """

    p: float = 0.1  # skip probability of every removable block (and every copy)
    per_kind: dict[str, float] = field(default_factory=dict)  # e.g. {"resnet": 0.05}
    per_stage: dict[str, float] = field(default_factory=dict)  # e.g. {"Up-3": 0.0}

    def prob(self, kind: str, stage: str) -> float:
        return self.per_stage.get(stage, self.per_kind.get(kind, self.p))

    def check(self) -> None:
        for name, p in [("p", self.p), *self.per_kind.items(), *self.per_stage.items()]:
            if not 0.0 <= p < 1.0:
                raise UserError(f"skip probability {name}={p} must be in [0, 1)")


def _key(path: str) -> str:
    return path.replace(".", "_")  # ModuleDict keys may not contain dots


class ElasticUNet(nn.Module):
    def __init__(
        self,
        space: SearchSpace,
        unet: UNet2DConditionModel | None = None,
        skip: SkipConfig | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.space = space
        if unet is None:
            unet = UNet2DConditionModel.from_config(space.unet_config)
        else:
            check_weights_fit(space, unet)
        self.unet = unet
        self.copies = nn.ModuleDict()  # slot key -> ModuleList of copies, in order
        self.skip = skip or SkipConfig()
        self.skip.check()
        self.skip_generator = torch.Generator().manual_seed(seed)  # robust-training draws
        self.last_skipped: list[tuple[str, int]] = []  # (slot, instance) skipped last step
        self.robust = True  # in training mode, skip blocks at random (False: the full network)
        self._arch = space.original()
        self._skipped: set[tuple[str, int]] = set()
        # slot -> its block, looked up once: get_submodule on every gate call costs ~40 µs
        self._blocks: dict[str, nn.Module] = {p: unet.get_submodule(p) for p in space.slots}
        for path, slot in space.slots.items():
            module = self._blocks[path]
            gate = _resnet_gate if slot.kind == "resnet" else _attention_gate
            module.forward = partial(gate, self, path, type(module).forward.__get__(module))

    # -- the OFA-like API ---------------------------------------------------------------------

    @property
    def architecture(self) -> Architecture:
        return self._arch

    def set_architecture(self, arch: Architecture) -> None:
        """Run `arch` from now on; copies it needs for the first time start as the original."""
        self.space.validate(arch)
        for path, n in arch.multiplicity.items():
            if n < 2:
                continue
            copies = self._copies_of(path)
            while len(copies) < n - 1:
                copies.append(_clone(self.unet.get_submodule(path)))
        self._arch = arch

    @contextmanager
    def frozen_in(self, arch: Architecture) -> Iterator[ElasticUNet]:
        """The model running `arch` in eval mode (every instance of `arch` runs, no robust-
        training skips), as an export traces it; architecture and mode restored afterwards,
        also on error."""
        previous, was_training = self.architecture, self.training
        self.set_architecture(arch)  # validates; creates the copies `arch` needs
        self.eval()
        try:
            yield self
        finally:
            self.set_architecture(previous)
            self.train(was_training)

    def sample_architecture(self, seed: int) -> Architecture:
        """Set and return a random legal architecture of the space."""
        arch = self.space.random(seed)
        self.set_architecture(arch)
        return arch

    def copies_paths(self) -> list[str]:
        """Slots that have copies (created by some architecture so far)."""
        return [p for p in self.space.slots if _key(p) in self.copies]

    def copy_counts(self) -> dict[str, int]:
        return {path: len(self.copies[_key(path)]) for path in self.copies_paths()}

    def ensure_copies(self, counts: dict[str, int]) -> None:
        """Create copies up to `counts` (slot -> copies), e.g. before loading a state dict."""
        for path, n in counts.items():
            copies = self._copies_of(path)
            while len(copies) < n:
                copies.append(_clone(self.unet.get_submodule(path)))

    def _copies_of(self, path: str) -> nn.ModuleList:
        key = _key(path)
        if key not in self.copies:
            self.copies[key] = nn.ModuleList()
        return self.copies[key]

    def instances(self, path: str) -> list[nn.Module]:
        """The modules a slot runs under the current architecture, in order."""
        n = self._arch[path]
        if n == 0:
            return []
        copies = self.copies[_key(path)] if _key(path) in self.copies else []
        return [self._blocks[path], *list(copies)[: n - 1]]

    # -- forward ----------------------------------------------------------------------------

    def draw_skips(self) -> list[tuple[str, int]]:
        """Draw which block instances the next training forward skips (seeded, reproducible)."""
        skipped = []
        for path, slot in self.space.slots.items():
            p = self.skip.prob(slot.kind, slot.stage)
            for i in range(self._arch[path]):
                if (i > 0 or slot.removable) and p > 0:
                    if torch.rand((), generator=self.skip_generator).item() < p:
                        skipped.append((path, i))
        return skipped

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        """Same arguments and output as `UNet2DConditionModel.forward`."""
        self._skipped = set(self.draw_skips()) if self.training and self.robust else set()
        self.last_skipped = sorted(self._skipped)
        try:
            return self.unet(sample, timestep, encoder_hidden_states, **kwargs)
        finally:
            self._skipped = set()

    def _runs(self, path: str) -> list[tuple[int, nn.Module]]:
        skipped = self._skipped
        return [(i, m) for i, m in enumerate(self.instances(path)) if (path, i) not in skipped]

    # -- save / load ------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """`folder/unet/` (a plain diffusers UNet), copies, and the space + architecture."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.copies.state_dict().items()}
        save_file(tensors, str(folder / COPIES_NAME))
        spec = self.space.spec.model_dump(mode="json")
        spec["base"] = {"config": dict(self.space.unet_config)}  # self-contained folder
        config = {
            "space": spec,
            "architecture": self._arch.to_dict(),
            "copies": self.copy_counts(),
            "skip": asdict(self.skip),
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ElasticUNet:
        folder = Path(folder)
        config_file = folder / CONFIG_NAME
        if not config_file.is_file():
            raise UserError(
                f"{folder} is not a saved ElasticUNet (no {CONFIG_NAME}); to start from a "
                "diffusers pipeline folder use ElasticUNet.from_diffusers(space, folder)"
            )
        config = json.loads(config_file.read_text())
        space = SearchSpace(SpaceSpec.model_validate(config["space"]))
        unet = _load_unet(folder)
        model = cls(space, unet, skip=SkipConfig(**config["skip"]))
        model.ensure_copies(config["copies"])
        model.copies.load_state_dict(load_file(str(folder / COPIES_NAME)))
        model.set_architecture(Architecture.from_dict(config["architecture"], str(config_file)))
        return model

    @classmethod
    def from_diffusers(cls, space: SearchSpace, folder: str | Path | None = None, **kw):
        """Weights from a local diffusers pipeline folder (`<folder>/unet/`), default the
        space's own `pretrained` folder; random weights from the config if neither is given."""
        folder = folder if folder is not None else space.pretrained
        unet = _load_unet(Path(folder)) if folder is not None else None
        return cls(space, unet, **kw)


def _load_unet(folder: Path) -> UNet2DConditionModel:
    if not (folder / "unet").is_dir():
        raise UserError(
            f"{folder} has no unet/ folder: give the root of a diffusers pipeline folder "
            "(the one that holds unet/config.json and its weights)"
        )
    try:
        return UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the UNet weights in {folder / 'unet'}: {e}") from None


def check_weights_fit(space: SearchSpace, unet: UNet2DConditionModel) -> None:
    """Raise a UserError naming the first mismatching tensors if `unet` is not the space's."""
    with torch.device("meta"):
        expected = UNet2DConditionModel.from_config(space.unet_config).state_dict()
    got = unet.state_dict()
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [
        f"{k}: {tuple(got[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise SpaceError(
            f"the UNet weights do not fit space {space.name!r}: {'; '.join(problems[:5])}{more}"
        )


def _clone(module: nn.Module) -> nn.Module:
    """A copy of a slot's block with its current weights and the class's own forward."""
    gate = module.__dict__.pop("forward", None)
    try:
        return copy.deepcopy(module)
    finally:
        if gate is not None:
            module.forward = gate


def _resnet_gate(model: ElasticUNet, path: str, original_forward, hidden_states, temb, *a, **kw):
    runs = model._runs(path)
    skip = model.space.slots[path].block.skip_channels
    if skip and (not runs or runs[0][0] != 0):
        # a decoder ResNet got [hidden, skip]: its identity passes the hidden state on and
        # drops the skip (DESIGN.md, "Semantics that must hold")
        hidden_states = hidden_states[:, : hidden_states.shape[1] - skip]
    for i, module in runs:
        call = original_forward if i == 0 else module
        hidden_states = call(hidden_states, temb, *a, **kw)
    return hidden_states


def _attention_gate(model: ElasticUNet, path: str, original_forward, hidden_states, *a, **kw):
    return_dict = kw.get("return_dict", True)
    for i, module in model._runs(path):
        call = original_forward if i == 0 else module
        out = call(hidden_states, *a, **kw)
        hidden_states = out.sample if return_dict else out[0]
    return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


__all__ = ["ArchitectureError", "ElasticUNet", "SkipConfig", "check_weights_fit"]
