"""The found network as a standalone model (nas/deploy/: standalone.py, export.py,
searched_unet.py).

Random weights; the sd15 space at its own topology with small channels (the full SD-v1.5 UNet
takes ~30 s to build on a CPU, and the checks are about structure and weights, not size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from nas.deploy.standalone import plain_config, to_plain, to_standalone
from nas.searched_unet import SearchedUNet2DConditionModel
from nas.supernet import ElasticUNet
from search_spaces import Architecture, SearchSpace, load_space

REPO = Path(__file__).resolve().parents[1]
SNAPFUSION = REPO / "experiments" / "snapfusion_sd15.arch.json"
SMALL_SD15 = {  # SD-v1.5's blocks, types and layers; small channels and context
    "block_out_channels": [32, 32, 64, 64],
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}


def small_sd15() -> SearchSpace:
    sd15 = load_space("sd15")
    spec = sd15.spec.model_copy(
        update={
            "base": sd15.spec.base.model_copy(
                update={"builtin": None, "config": {**sd15.unet_config, **SMALL_SD15}}
            ),
            "inputs": sd15.spec.inputs.model_copy(
                update={"latent": (4, 16, 16), "context": (7, 32)}
            ),
        }
    )
    return SearchSpace(spec)


def _supernet(space: SearchSpace, archs: list[Architecture]) -> ElasticUNet:
    torch.manual_seed(0)
    model = ElasticUNet(space).eval()
    for arch in archs:  # create copies, then make them differ from their originals
        model.set_architecture(arch)
    with torch.no_grad():
        for p in model.copies.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(space: SearchSpace, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, *space.latent, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, *space.context, generator=g),
    )


def _same_output(supernet: ElasticUNet, arch: Architecture, net) -> torch.Tensor:
    x, t, ctx = _inputs(supernet.space)
    supernet.set_architecture(arch)
    with torch.no_grad():
        expected = supernet(x, t, ctx).sample
        got = net(x, t, ctx).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return got


def _tiny_archs(space):
    original = space.original()
    no_ca = original.with_multiplicity("down_blocks.0.attentions.0", 0)
    copy = original.with_multiplicity("up_blocks.1.attentions.0", 2)
    mixed = copy.with_multiplicity("down_blocks.0.attentions.0", 0).with_multiplicity(
        "up_blocks.2.resnets.1", 0
    )
    return {"original": original, "no_ca": no_ca, "copy": copy, "mixed": mixed}


@pytest.fixture(scope="module")
def tiny():
    space = load_space("tiny")
    archs = _tiny_archs(space)
    return space, archs, _supernet(space, list(archs.values()))


@pytest.mark.parametrize("name", ["original", "no_ca", "copy", "mixed"])
def test_tiny_standalone_equals_supernet(tiny, name):
    space, archs, supernet = tiny
    net = to_standalone(supernet, archs[name])
    _same_output(supernet, archs[name], net)
    # removed blocks own no weights, copies own theirs
    assert sum(p.numel() for p in net.parameters()) == space.params(archs[name])


def test_copy_has_its_own_weights_and_they_matter(tiny):
    space, archs, supernet = tiny
    net = to_standalone(supernet, archs["copy"])
    repeated = net.get_submodule("up_blocks.1.attentions.0")
    first, second = repeated.blocks
    assert first.proj_in.weight.data_ptr() != second.proj_in.weight.data_ptr()
    assert not torch.equal(first.proj_in.weight, second.proj_in.weight)
    # the copy's weights are the supernet's copy, not the original's
    torch.testing.assert_close(
        second.proj_in.weight, supernet.copies["up_blocks_1_attentions_0"][0].proj_in.weight
    )


def test_sd15_snapfusion_standalone_equals_supernet():
    space = small_sd15()
    arch = Architecture.load(SNAPFUSION)
    assert 0 in arch.multiplicity.values() and 2 in arch.multiplicity.values()
    supernet = _supernet(space, [arch])
    net = to_standalone(supernet, arch)
    _same_output(supernet, arch, net)
    assert plain_config(space, net.multiplicity) == (
        "it copies blocks (a diffusers config cannot repeat a block with its own weights)"
    )


def test_sd15_removed_attentions_as_plain_diffusers():
    space = small_sd15()
    arch = space.original()
    for path in ("down_blocks.0.attentions.0", "down_blocks.0.attentions.1"):
        arch = arch.with_multiplicity(path, 0)
    for path in (f"up_blocks.3.attentions.{i}" for i in range(3)):
        arch = arch.with_multiplicity(path, 0)
    arch = arch.with_multiplicity("mid_block.attentions.0", 0).with_multiplicity(
        "mid_block.resnets.1", 0
    )
    supernet = _supernet(space, [arch])
    net = to_standalone(supernet, arch)
    plain = to_plain(net, space)
    assert type(plain) is UNet2DConditionModel
    assert plain.config.down_block_types[0] == "DownBlock2D"
    assert plain.config.up_block_types[3] == "UpBlock2D"
    assert plain.config.mid_block_type == "UNetMidBlock2D"
    _same_output(supernet, arch, plain)


def test_plain_config_refuses_a_single_removed_pair_member(tiny):
    space, archs, _ = tiny
    why = plain_config(space, dict(archs["mixed"].multiplicity))
    assert isinstance(why, str) and "copies" in why
    one = space.original().with_multiplicity("up_blocks.2.resnets.1", 0)
    why = plain_config(space, dict(one.multiplicity))
    assert isinstance(why, str) and "up_blocks.2.resnets.1" in why


def test_save_and_load_without_diffnas(tiny, tmp_path):
    """The exported folder loads in a Python where `nas` and `search_spaces` cannot be
    imported, through diffusers' AutoModel and through the module file itself."""
    space, archs, supernet = tiny
    arch = archs["mixed"]
    net = to_standalone(supernet, arch)
    folder = tmp_path / "exported"
    net.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} >= {
        "config.json",
        "architecture.json",
        "diffusion_pytorch_model.safetensors",
        "searched_unet.py",
    }
    x, t, ctx = _inputs(space)
    torch.save({"x": x, "t": t, "ctx": ctx}, tmp_path / "inputs.pt")
    expected = _same_output(supernet, arch, net)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("nas", "search_spaces", "latency"):  # shadow the project's packages
        (blocker / name).mkdir()
        (blocker / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    script = f"""
import sys
sys.path.insert(0, {str(blocker)!r})
for name in ("nas", "search_spaces"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " is importable")
import torch
from diffusers import AutoModel
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
unet = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
out = unet(inputs["x"], inputs["t"], inputs["ctx"]).sample
sys.path.insert(0, {str(folder)!r})
from searched_unet import SearchedUNet2DConditionModel
out2 = SearchedUNet2DConditionModel.from_pretrained({str(folder)!r})(
    inputs["x"], inputs["t"], inputs["ctx"]).sample
torch.save({{"auto": out, "direct": out2}}, {str(tmp_path / "out.pt")!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(got["auto"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["direct"], expected, atol=1e-5, rtol=0)
    saved = json.loads((folder / "architecture.json").read_text())["multiplicity"]
    assert saved == dict(arch.multiplicity)


def test_loaded_folder_round_trips(tiny, tmp_path):
    space, archs, supernet = tiny
    net = to_standalone(supernet, archs["copy"])
    net.save_pretrained(tmp_path / "a")
    again = SearchedUNet2DConditionModel.from_pretrained(tmp_path / "a")
    _same_output(supernet, archs["copy"], again)
