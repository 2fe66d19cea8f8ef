"""The found network as a standalone model: its own weights, no supernet, no diffnas to load.

`to_standalone(supernet, arch)` builds a `SearchedUNet2DConditionModel` (`nas/deploy/searched_unet.py`,
a file that imports only torch, diffusers and safetensors): removed blocks have no module and no
weights left, copies are real modules with their weights. `export_network` writes it as

- `diffusers`: a plain `UNet2DConditionModel` folder when the architecture can be said in a
  diffusers config (`plain_config`), otherwise the searched-UNet folder (config, architecture,
  safetensors and the module file; `AutoModel.from_pretrained(folder, trust_remote_code=True)`);
- `coreml`: an `.mlpackage` converted from the standalone network's `torch.export` program;
- `executorch`: an XNNPACK `.pte` lowered from the same graph as the latency table's blocks.

docs/distill.md says which architectures take which form, and why.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from nas.deploy.searched_unet import SearchedUNet2DConditionModel
from nas.supernet import ElasticUNet
from search_spaces import Architecture, SearchSpace, UserError

FORMATS = ("diffusers", "coreml", "executorch")
EXPORT_DIR = "export"  # RUN_DIR/export/<found|distilled>-<format>
EXPORT_INFO = "export.json"  # what was exported, from where, in which form


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


# -- export ----------------------------------------------------------------------------------------


def check_format(fmt: str) -> None:
    """Refuse a format this installation cannot write, before anything is loaded."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "coreml" and importlib.util.find_spec("coremltools") is None:
        raise UserError(
            "--format coreml needs coremltools, which is not installed: pip install coremltools"
        )
    if fmt == "executorch":
        from latency.executorch import require

        require()  # a UserError saying how to install it


class _Tensors(nn.Module):
    """Tensors in, tensor out (what torch.export and Core ML take)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _inputs(space: SearchSpace) -> tuple[torch.Tensor, ...]:
    """Inputs of the space's shapes: an exported program's fixed shapes (values do not matter)."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(space.batch, *space.latent, generator=g),
        torch.full((space.batch,), 500.0),
        torch.randn(space.batch, *space.context, generator=g),
    )


def _write_executorch(net: nn.Module, space: SearchSpace, path: Path, meta: dict) -> Path:
    """An XNNPACK `.pte` (with its `.pte.json` sidecar), lowered as the table's blocks are
    (`latency.executorch.lower`: same delegate, same attention processor)."""
    from latency import executorch as et

    lowered = et.lower(_Tensors(net.eval()), _inputs(space), "xnnpack", "classic")
    inputs = ["sample", "timestep", "encoder_hidden_states"]
    return et.save(path, lowered, {**meta, "delegate": "xnnpack", "inputs": inputs})


def _write_coreml(net: nn.Module, space: SearchSpace, path: Path, meta: dict) -> Path:
    from latency.coreml import convert_program
    from nas.deploy.coreml import OUTPUT_NAME

    inputs = _inputs(space)
    program = torch.export.export(_Tensors(net.eval()), inputs).run_decompositions({})
    return convert_program(
        program,
        path,
        output_name=OUTPUT_NAME,
        metadata={f"diffnas.{k}": str(v) for k, v in meta.items()},
        description=f"diffnas UNet of space {space.name!r} ({meta['network']})",
    )


def load_network(run: Path, distilled: bool) -> tuple[SearchSpace, Architecture, nn.Module]:
    """The space, architecture and standalone network of a finished run (or of its
    distillation); a UserError when the run has not got that far."""
    from nas.deploy.distill import DISTILLED_DIR, load_distilled

    run = Path(run)
    if not (run / "final.arch.json").is_file() or not (run / "final").is_dir():
        raise UserError(
            f"{run} holds no finished search (no final.arch.json and final/): run "
            "`diffnas search` to the end first"
        )
    if distilled:
        if not (run / DISTILLED_DIR / "metrics.json").is_file():
            raise UserError(
                f"{run} has no finished distillation ({run / DISTILLED_DIR}/metrics.json): "
                f"run `diffnas distill {run}` first, or export without --distilled"
            )
        net, space, arch = load_distilled(run)
        return space, arch, net
    supernet = ElasticUNet.from_pretrained(run / "final")
    arch = Architecture.load(run / "final.arch.json")
    return supernet.space, arch, to_standalone(supernet, arch)


def export_network(
    run: str | Path,
    fmt: str = "diffusers",
    distilled: bool = False,
    out: str | Path | None = None,
    force: bool = False,
) -> tuple[Path, dict]:
    """Write the run's found (or distilled) network in `fmt`; return its path and what was
    written (also saved as export.json beside it)."""
    check_format(fmt)
    run = Path(run)
    name = "distilled" if distilled else "found"
    out = Path(out) if out is not None else run / EXPORT_DIR / f"{name}-{fmt}"
    if fmt == "coreml" and out.suffix != ".mlpackage":
        out = out / "unet.mlpackage"
    if fmt == "executorch" and out.suffix != ".pte":
        out = out / "unet.pte"
    folder = out.parent if fmt in ("coreml", "executorch") else out
    if folder.exists() and any(folder.iterdir()) and not force:
        raise UserError(f"{folder} exists and is not empty; give another --out, or --force")
    space, arch, net = load_network(run, distilled)
    info = {"network": name, "run": str(run), "format": fmt, "architecture_hash": arch.hash}
    if force:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "coreml":
        _write_coreml(net, space, out, info)
        info["form"] = "Core ML ML program (.mlpackage)"
    elif fmt == "executorch":
        _write_executorch(net, space, out, info)
        info["form"] = "ExecuTorch program (.pte, XNNPACK)"
    else:
        plain = to_plain(net, space)
        if plain is not None:
            plain.save_pretrained(out)
            info["form"] = "UNet2DConditionModel"
        else:
            net.save_pretrained(out)
            info["form"] = "SearchedUNet2DConditionModel (searched_unet.py)"
            info["why"] = plain_config(space, net.multiplicity)
    info["params"] = sum(p.numel() for p in net.parameters())
    (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out, info


__all__ = [
    "FORMATS",
    "check_format",
    "export_network",
    "load_network",
    "plain_config",
    "standalone_state_dict",
    "to_plain",
    "to_standalone",
]
