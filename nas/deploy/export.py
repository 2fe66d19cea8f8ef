"""`diffnas export`: the found (or distilled) network of a run, written as a model that loads
without diffnas — a diffusers folder, a Core ML package or an ExecuTorch program
(docs/distill.md says which architectures take which form, and why). The network itself is
built by `nas.deploy.standalone`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from nas.deploy.distill import DISTILLED_DIR, load_distilled
from nas.deploy.standalone import plain_config, to_plain, to_standalone
from nas.supernet import ElasticUNet
from search_spaces import Architecture, SearchSpace, UserError

FORMATS = ("diffusers", "coreml", "executorch")
EXPORT_DIR = "export"  # RUN_DIR/export/<found|distilled>-<format>
EXPORT_INFO = "export.json"  # what was exported, from where, in which form


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


def network_inputs(space: SearchSpace) -> tuple[torch.Tensor, ...]:
    """Inputs of the space's shapes: an exported program's fixed shapes (values do not matter)."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(space.batch, *space.latent, generator=g),
        torch.full((space.batch,), 500.0),
        torch.randn(space.batch, *space.context, generator=g),
    )


def write_executorch(net: nn.Module, space: SearchSpace, path: Path, meta: dict) -> Path:
    """An XNNPACK `.pte` (with its `.pte.json` sidecar), lowered as the table's blocks are
    (`latency.executorch.lower`: same delegate, same attention processor)."""
    from latency import executorch as et

    lowered = et.lower(_Tensors(net.eval()), network_inputs(space), "xnnpack", "classic")
    inputs = ["sample", "timestep", "encoder_hidden_states"]
    return et.save(path, lowered, {**meta, "delegate": "xnnpack", "inputs": inputs})


def _write_coreml(net: nn.Module, space: SearchSpace, path: Path, meta: dict) -> Path:
    from latency.coreml import convert_program
    from nas.deploy.coreml import OUTPUT_NAME

    inputs = network_inputs(space)
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
        write_executorch(net, space, out, info)
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
    "network_inputs",
    "write_executorch",
]
