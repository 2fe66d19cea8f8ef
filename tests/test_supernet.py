"""ElasticUNet: parity with diffusers, architectures, save/load, bad input."""

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from nas.supernet import ElasticUNet, SkipConfig
from search_spaces import Architecture, ArchitectureError, SpaceError, UserError, load_space


def _inputs(space, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, h, w = space.latent
    if size:
        h = w = size
    x = torch.randn(2, c, h, w, generator=g)
    ctx = torch.randn(2, *space.context, generator=g)
    return x, torch.tensor([10, 700]), ctx


def _pair(name):
    space = load_space(name)
    torch.manual_seed(0)
    plain = UNet2DConditionModel.from_config(space.unet_config).eval()
    return space, plain, ElasticUNet(space, copy.deepcopy(plain)).eval()


@pytest.fixture(scope="module")
def tiny():
    return _pair("tiny")


@pytest.mark.parametrize("name,size", [("tiny", None), ("sd15", 16)])
def test_parity_with_diffusers(name, size):
    space, plain, elastic = _pair("tiny") if name == "tiny" else _pair(name)
    x, t, ctx = _inputs(space, size)
    with torch.no_grad():
        expected = plain(x, t, ctx).sample
        got = elastic(x, t, ctx).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the UNet inside is still diffusers' own: same keys, loads into a plain model
    assert elastic.unet.state_dict().keys() == plain.state_dict().keys()


def test_removed_block_is_identity(tiny):
    space, _, elastic = tiny
    x, t, ctx = _inputs(space)
    path = "mid_block.attentions.0"
    module = elastic.unet.get_submodule(path)
    h = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        full = elastic(x, t, ctx).sample
        assert not torch.equal(module(h, encoder_hidden_states=ctx, return_dict=False)[0], h)
        elastic.set_architecture(space.original().with_multiplicity(path, 0))
        assert module(h, encoder_hidden_states=ctx, return_dict=False)[0] is h
        assert module(h, encoder_hidden_states=ctx).sample is h
        assert not torch.allclose(elastic(x, t, ctx).sample, full)
    elastic.set_architecture(space.original())


def test_removed_decoder_resnet_drops_its_skip(tiny):
    space, _, elastic = tiny
    path = "up_blocks.1.resnets.0"
    block = space.slots[path].block
    assert block.skip_channels > 0
    elastic.set_architecture(space.original().with_multiplicity(path, 0))
    hidden = torch.randn(2, block.in_channels, block.height, block.width)
    skip = torch.randn(2, block.skip_channels, block.height, block.width)
    out = elastic.unet.get_submodule(path)(torch.cat([hidden, skip], 1), torch.randn(2, 256))
    torch.testing.assert_close(out, hidden)
    elastic.set_architecture(space.original())


def test_copies_start_from_original_weights_and_change_output(tiny):
    space, _, elastic = tiny
    x, t, ctx = _inputs(space)
    path = "down_blocks.0.attentions.0"
    with torch.no_grad():
        before = elastic(x, t, ctx).sample
        elastic.set_architecture(space.original().with_multiplicity(path, 2))
        after = elastic(x, t, ctx).sample
    (clone,) = elastic.instances(path)[1:]
    original = elastic.unet.get_submodule(path)
    assert clone is not original
    for (k, a), b in zip(original.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not torch.allclose(before, after)
    # going back to the original arch keeps the copy, but does not run it
    elastic.set_architecture(space.original())
    with torch.no_grad():
        torch.testing.assert_close(elastic(x, t, ctx).sample, before)
    assert len(elastic.copies) == 1


def test_every_random_architecture_runs(tiny):
    space, _, elastic = tiny
    x, t, ctx = _inputs(space)
    for seed in range(4):
        arch = elastic.sample_architecture(seed)
        assert elastic.architecture == arch
        with torch.no_grad():
            out = elastic(x, t, ctx).sample
        assert out.shape == x.shape and torch.isfinite(out).all()
    elastic.set_architecture(space.original())


def test_snapfusion_architecture_runs_on_sd15():
    space = load_space("sd15")
    with torch.device("meta"):  # shapes only: the point is that every gate composes
        elastic = ElasticUNet(space)
    elastic.set_architecture(Architecture.load("experiments/snapfusion_sd15.arch.json"))
    x, t, ctx = (a.to("meta") for a in _inputs(space, 16))
    assert elastic(x, t, ctx).sample.shape == x.shape


def test_training_mode_skips_and_eval_does_not(tiny):
    space, _, _ = tiny
    elastic = ElasticUNet(space, skip=SkipConfig(p=0.5), seed=1)
    x, t, ctx = _inputs(space)
    elastic.train()
    with torch.no_grad():
        elastic(x, t, ctx)
    assert elastic.last_skipped
    assert all(space.slots[p].removable for p, _ in elastic.last_skipped)
    elastic.eval()
    with torch.no_grad():
        elastic(x, t, ctx)
    assert elastic.last_skipped == []


def test_save_and_load_round_trip(tmp_path, tiny):
    space, _, _ = tiny
    elastic = ElasticUNet(space).eval()
    arch = space.random(5)
    elastic.set_architecture(arch)
    assert len(elastic.copies) > 0
    x, t, ctx = _inputs(space)
    with torch.no_grad():
        expected = elastic(x, t, ctx).sample
    elastic.save_pretrained(tmp_path / "model")
    # unet/ is a plain diffusers UNet folder
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "model", subfolder="unet")
    assert plain.state_dict().keys() == elastic.unet.state_dict().keys()
    loaded = ElasticUNet.from_pretrained(tmp_path / "model").eval()
    assert loaded.architecture == arch
    assert loaded.space.name == space.name and loaded.space.slots.keys() == space.slots.keys()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx).sample, expected)


def test_from_diffusers_folder(tmp_path, tiny):
    space, plain, _ = tiny
    plain.save_pretrained(tmp_path / "pipe" / "unet")
    elastic = ElasticUNet.from_diffusers(space, tmp_path / "pipe")
    for k, v in plain.state_dict().items():
        assert torch.equal(elastic.unet.state_dict()[k], v)


def test_bad_input(tmp_path, tiny):
    space, _, elastic = tiny
    other = load_space("sd15").original()
    with pytest.raises(ArchitectureError, match="is for space 'sd15', not 'tiny'"):
        elastic.set_architecture(other)
    wider = {**space.unet_config, "block_out_channels": [32, 64, 96]}
    wrong = UNet2DConditionModel.from_config(wider)
    with pytest.raises(SpaceError, match="do not fit space 'tiny'"):
        ElasticUNet(space, wrong)
    (tmp_path / "nounet").mkdir()
    with pytest.raises(UserError, match="has no unet/ folder"):
        ElasticUNet.from_diffusers(space, tmp_path / "nounet")
    with pytest.raises(UserError, match="not a saved ElasticUNet"):
        ElasticUNet.from_pretrained(tmp_path / "nounet")
    with pytest.raises(UserError, match="must be in"):
        ElasticUNet(space, skip=SkipConfig(p=1.5))
    # an architecture with an illegal multiplicity is refused and the current one is kept
    before = elastic.architecture
    bad = space.original().with_multiplicity("down_blocks.1.resnets.0", 0)
    with pytest.raises(ArchitectureError, match="not removable"):
        elastic.set_architecture(bad)
    assert elastic.architecture == before
    json.dumps(before.to_dict())
