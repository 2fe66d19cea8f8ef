"""The base UNet of a search space, and the block slots read off it.

The slots are not derived from the config by hand: the UNet is built on the meta device
(no memory, no weights) and run once with hooks, so the in/out channels, skip channels,
spatial sizes and execution order of every block are those diffusers itself produces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SpaceError

if TYPE_CHECKING:  # torch and diffusers take seconds to import: only building a UNet needs them
    import torch
    from diffusers import UNet2DConditionModel


def builtin_unet_names() -> list[str]:
    folder = resources.files("search_spaces") / "builtin" / "unets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def builtin_unet_config(name: str) -> dict[str, Any]:
    if name not in builtin_unet_names():
        raise SpaceError(
            f"unknown built-in UNet {name!r}; built-in UNets are: {', '.join(builtin_unet_names())}"
        )
    path = resources.files("search_spaces") / "builtin" / "unets" / f"{name}.json"
    return json.loads(path.read_text())


def pretrained_unet_config(folder: str | Path) -> dict[str, Any]:
    """The UNet config of a local diffusers pipeline folder (`<folder>/unet/config.json`)."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise SpaceError(
            f"pretrained {str(folder)!r} is a file, but must be a folder: the root of a diffusers "
            f"pipeline (the one that holds unet/config.json); for a UNet config file, write "
            f"`config: {folder.name}` instead"
        )
    if not folder.is_dir():
        raise SpaceError(f"pretrained folder {str(folder)!r} does not exist")
    config = folder / "unet" / "config.json"
    if not config.is_file():
        raise SpaceError(
            f"pretrained folder {str(folder)!r} has no unet/config.json: "
            "give the root of a diffusers pipeline folder (the one that holds unet/)"
        )
    return _read_json_config(config)


def file_unet_config(path: str | Path) -> dict[str, Any]:
    """A UNet config from its JSON file (as diffusers writes `unet/config.json`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        hint = (
            f"`pretrained: {path}` reads a diffusers pipeline folder"
            if (path / "unet" / "config.json").is_file()
            else f"give the JSON file, e.g. {path / 'config.json'}"
        )
        raise SpaceError(f"config {str(path)!r} is a folder, not a UNet config file; {hint}")
    if not path.is_file():
        raise SpaceError(f"config file {str(path)!r} does not exist")
    config = _read_json_config(path)
    if not isinstance(config, dict):
        raise SpaceError(f"{path}: a UNet config file holds a JSON object ({{...}})")
    return config


def _read_json_config(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpaceError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def context_problem(
    config: Mapping[str, Any], written: Mapping[str, Any], context: tuple[int, int]
) -> str | None:
    """Why text context of shape `context` (tokens, width) cannot feed this UNet, or None.

    `config` is the built UNet's (diffusers' defaults filled in), `written` the config as
    given, to tell the user when a width comes from a default they never wrote."""
    kinds = [*config["down_block_types"], *config["up_block_types"], config["mid_block_type"]]
    if not any("CrossAttn" in (k or "") for k in kinds):
        return None  # no cross-attention: the context is not used
    if config.get("encoder_hid_dim") is not None:
        if config.get("encoder_hid_dim_type") not in (None, "text_proj"):
            return None  # image projections: diffusers checks those itself
        key = "encoder_hid_dim"  # a projection to cross_attention_dim comes first
    else:
        key = "cross_attention_dim"
    expected = config[key]
    widths = set(expected) if isinstance(expected, list | tuple) else {expected}
    if widths == {context[1]}:
        return None
    said = "" if key in written else ", diffusers' default: the config does not set it"
    return (
        f"inputs.context {list(context)} is {context[1]} wide, but the base UNet's "
        f"cross-attention takes {key} {expected}{said}; set `{key}: {context[1]}` in the "
        f"UNet config, or the context to [{context[0]}, {expected}]"
    )


def build_unet(config: dict[str, Any], device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """A `UNet2DConditionModel` from a config; on "meta" it has shapes and no weights."""
    import torch
    from diffusers import UNet2DConditionModel

    try:
        with torch.device(device):
            return UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        msg = f"the base UNet config is not a valid UNet2DConditionModel config: {e}"
        raise SpaceError(msg) from None


@dataclass(frozen=True)
class BlockInfo:
    """One searchable block of a UNet, as read off a meta forward."""

    path: str  # module path in UNet2DConditionModel, e.g. "up_blocks.1.attentions.2"
    kind: str  # "resnet" or "cross_attention"
    in_channels: int  # channels of the hidden state entering the block (skip excluded)
    out_channels: int
    skip_channels: int  # decoder ResNets: channels of the skip concatenated to the input
    height: int  # spatial size of the block's input
    width: int
    params: int
    heads: int  # attention heads (0 for ResNets)
    head_dim: int  # attention head width (0 for ResNets)
    resamples: bool  # the block itself up/down-samples (a ResNet with up=True or down=True)


def read_blocks(
    unet: UNet2DConditionModel, latent: tuple[int, int, int], context: tuple[int, int], batch: int
) -> list[BlockInfo]:
    """Every ResNet and Transformer2D block of the down, mid and up blocks, in execution order."""
    import torch
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    seen: dict[str, tuple[int, ...]] = {}
    skips: dict[str, int] = {}
    handles = []

    def block_hook(path):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(path, tuple(x.shape))

        return hook

    def up_hook(prefix):
        def hook(module, args, kwargs):
            tup = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else ())
            for j in range(len(module.resnets)):
                skips[f"{prefix}.resnets.{j}"] = tup[-(j + 1)].shape[1]

        return hook

    groups = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        groups.append(("mid_block", unet.mid_block))
    groups += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for prefix, block in groups:
        if prefix.startswith("up_blocks"):
            handles.append(block.register_forward_pre_hook(up_hook(prefix), with_kwargs=True))
        for attr in ("resnets", "attentions"):
            for j, module in enumerate(getattr(block, attr, None) or []):
                path = f"{prefix}.{attr}.{j}"
                handles.append(module.register_forward_pre_hook(block_hook(path), with_kwargs=True))
    try:
        device = next(unet.parameters()).device
        with torch.no_grad():
            unet(
                torch.zeros(batch, *latent, device=device),
                torch.zeros((), device=device),
                encoder_hidden_states=torch.zeros(batch, *context, device=device),
            )
    except RuntimeError as e:
        raise SpaceError(
            f"the base UNet does not run on inputs latent={list(latent)} context={list(context)}: "
            f"{e}. Check `inputs` against the UNet config (in_channels, cross_attention_dim)."
        ) from None
    finally:
        for h in handles:
            h.remove()

    blocks = []
    modules = dict(unet.named_modules())
    for path, shape in seen.items():
        module = modules[path]
        kind = "resnet" if isinstance(module, ResnetBlock2D) else "cross_attention"
        if kind == "resnet":
            skip = skips.get(path, 0)
            heads = head_dim = 0
            resamples = bool(module.up or module.down)
            out = module.out_channels
        else:
            if not isinstance(module, Transformer2DModel):
                raise SpaceError(f"{path}: unsupported block class {type(module).__name__}")
            skip = 0
            attn = next(m for m in module.modules() if isinstance(m, Attention))
            heads, head_dim = attn.heads, attn.inner_dim // attn.heads
            resamples = False
            out = module.out_channels or module.in_channels
        blocks.append(
            BlockInfo(
                path=path,
                kind=kind,
                in_channels=shape[1] - skip,
                out_channels=out,
                skip_channels=skip,
                height=shape[2],
                width=shape[3],
                params=sum(p.numel() for p in module.parameters()),
                heads=heads,
                head_dim=head_dim,
                resamples=resamples,
            )
        )
    return blocks
