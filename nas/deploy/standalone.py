"""The found network as a standalone model: its own weights, no supernet, no diffnas to load.

`to_standalone(supernet, arch)` builds a `SearchedUNet2DConditionModel`
(`nas/searched_unet.py`, a file that imports only torch, diffusers and safetensors):
removed blocks have no module and no weights left, copies are real modules with their
weights. `diffnas export` (`nas.deploy.export`) writes it as

- `diffusers`: a plain `UNet2DConditionModel` folder when the architecture can be said in a
  diffusers config (`plain_config`), otherwise the searched-UNet folder (config, architecture,
  safetensors and the module file; `AutoModel.from_pretrained(folder, trust_remote_code=True)`);
- `coreml`: an `.mlpackage` converted from the standalone network's `torch.export` program;
- `executorch`: an XNNPACK `.pte` lowered from the same graph as the latency table's blocks.

docs/distill.md says which architectures take which form, and why.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from nas.searched_unet import SearchedUNet2DConditionModel
from nas.supernet import ElasticUNet
from search_spaces import Architecture, SearchSpace


def standalone_state_dict(supernet: ElasticUNet, arch: Architecture) -> dict[str, torch.Tensor]:
    """The supernet's weights for `arch`, keyed as `SearchedUNet2DConditionModel` keys them."""
    previous = supernet.architecture
    supernet.set_architecture(arch)  # validates, and creates copies the supernet never had
    try:
        changed = [p for p, n in arch.multiplicity.items() if n != 1]
        out = {
            k: v
            for k, v in supernet.unet.state_dict().items()
            if not any(k.startswith(p + ".") for p in changed)
        }
        for path in changed:
            for i, module in enumerate(supernet.instances(path)):
                for k, v in module.state_dict().items():
                    out[f"{path}.blocks.{i}.{k}"] = v
        return {k: v.detach().clone() for k, v in out.items()}
    finally:
        supernet.set_architecture(previous)


def to_standalone(supernet: ElasticUNet, arch: Architecture) -> SearchedUNet2DConditionModel:
    """The network of `arch` with its own copy of the supernet's weights (eval mode)."""
    net = SearchedUNet2DConditionModel.from_architecture(
        dict(supernet.space.unet_config), dict(arch.multiplicity)
    )
    net.load_state_dict(standalone_state_dict(supernet, arch), strict=True)
    return _like(net, next(supernet.parameters())).eval()


def _like(module: nn.Module, param: torch.Tensor) -> nn.Module:
    """`module` on `param`'s device and dtype (diffusers warns of a cast that changes nothing)."""
    own = next(module.parameters())
    if own.dtype != param.dtype:
        module.to(param.dtype)
    return module.to(param.device) if own.device != param.device else module


# -- the plain diffusers form ----------------------------------------------------------------------

_PLAIN = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}


def plain_config(space: SearchSpace, multiplicity: dict[str, int]) -> tuple[dict, dict] | str:
    """A `UNet2DConditionModel` config computing the same network, and the renaming of the
    weights' keys (old prefix -> new prefix, None: dropped); or why there is none.

    Expressible: removing every attention of a down or up block (its type loses "CrossAttn"),
    and in the mid block removing its attention and one of its two ResNets (`UNetMidBlock2D`
    has one ResNet) or everything (`mid_block_type: None`). Anything else changes the pairing
    of skips and decoder ResNets that `layers_per_block` fixes, or repeats a block.
    """
    config = {k: v for k, v in dict(space.unet_config).items() if not k.startswith("_")}
    changed = {p: n for p, n in multiplicity.items() if n != 1}
    if any(n > 1 for n in changed.values()):
        return "it copies blocks (a diffusers config cannot repeat a block with its own weights)"
    rename: dict[str, str | None] = {}
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    groups: dict[str, set[str]] = {}
    for path in changed:
        groups.setdefault(path.rsplit(".", 2)[0], set()).add(path)
    for prefix, removed in groups.items():
        members = {p for p in space.slots if p.startswith(prefix + ".")}
        attentions = {p for p in members if ".attentions." in p}
        resnets = members - attentions
        if prefix == "mid_block":
            if removed == members:
                config["mid_block_type"] = None
                rename[prefix] = None
                continue
            kept = sorted(resnets - removed)
            if attentions <= removed and len(kept) == 1:
                config["mid_block_type"] = "UNetMidBlock2D"
                rename |= {p: None for p in attentions}
                rename[kept[0]] = "mid_block.resnets.0"
                rename |= {p: None for p in resnets & removed}
                continue
            return (
                "its mid block keeps more than one ResNet without its attention (diffusers' "
                "UNetMidBlock2D has one ResNet)"
            )
        kind, index = prefix.split(".")
        types = down if kind == "down_blocks" else up
        if removed != attentions or types[int(index)] not in _PLAIN:
            return (
                f"it removes {', '.join(sorted(removed))}: in a diffusers config a block's "
                "ResNets are tied to skip connections, and its attentions go all or none"
            )
        types[int(index)] = _PLAIN[types[int(index)]]
        rename |= {p: None for p in attentions}
    config["down_block_types"], config["up_block_types"] = down, up
    return config, rename


def to_plain(net: SearchedUNet2DConditionModel, space: SearchSpace) -> UNet2DConditionModel | None:
    """`net` as a plain diffusers `UNet2DConditionModel`, or None when its architecture cannot
    be said in a diffusers config."""
    found = plain_config(space, net.multiplicity)
    if isinstance(found, str):
        return None
    config, rename = found
    state = {}
    for key, value in net.state_dict().items():
        prefix = next((p for p in rename if key.startswith(p + ".")), None)
        if prefix is None:
            state[key] = value
        elif rename[prefix] is not None:
            state[rename[prefix] + key[len(prefix) :]] = value
    plain = UNet2DConditionModel.from_config(config)
    plain.load_state_dict(state, strict=True)
    return _like(plain, next(net.parameters())).eval()


__all__ = ["plain_config", "standalone_state_dict", "to_plain", "to_standalone"]
