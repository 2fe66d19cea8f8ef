"""The search-space DSL: built-in spaces, legality, architectures, bases and stages."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from search_spaces import Action, Architecture, SearchSpace, load_space

ROOT = Path(__file__).resolve().parent.parent
SNAPFUSION_ARCH = ROOT / "experiments" / "snapfusion_sd15.arch.json"
UNET_CONFIGS = resources.files("search_spaces") / "builtin" / "unets"

KINDS = ("cross_attention", "resnet")

# Table 3 of the SnapFusion paper: (cross-attention, ResNet) blocks per stage.
TABLE3_ORIGIN = {
    "Down-1": (2, 2),
    "Down-2": (2, 2),
    "Down-3": (2, 2),
    "Mid": (1, 7),
    "Up-1": (3, 3),
    "Up-2": (3, 3),
    "Up-3": (3, 3),
}
TABLE3_SNAPFUSION = {
    "Down-1": (0, 2),
    "Down-2": (2, 2),
    "Down-3": (2, 1),
    "Mid": (1, 4),
    "Up-1": (6, 2),
    "Up-2": (3, 3),
    "Up-3": (0, 3),
}

TINY_YAML_INPUTS = """
inputs:
  latent: [12, 16, 16]
  context: [16, 128]
"""


def unet_config(name: str) -> dict:
    return json.loads((UNET_CONFIGS / f"{name}.json").read_text())


def meta_unet(name: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config(name))


def as_table(counts: dict[str, dict[str, int]]) -> dict[str, tuple[int, int]]:
    return {stage: tuple(c[k] for k in KINDS) for stage, c in counts.items()}


@pytest.fixture(scope="module")
def sd15() -> SearchSpace:
    return load_space("sd15")


@pytest.fixture(scope="module")
def tiny() -> SearchSpace:
    return load_space("tiny")


# -- slots of the built-in spaces --------------------------------------------------------------


def test_sd15_slots_are_every_resnet_and_transformer_of_diffusers_unet(sd15):
    unet = meta_unet("sd15")
    expected = [
        path
        for path, module in unet.named_modules()
        if path.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")
        and isinstance(module, ResnetBlock2D | Transformer2DModel)
    ]
    assert len(expected) == 38  # 22 ResNets + 16 cross-attentions in SD-v1.5
    assert sorted(sd15.slots) == sorted(expected)
    modules = dict(unet.named_modules())
    for path, slot in sd15.slots.items():
        assert slot.path == path
        kind = "resnet" if isinstance(modules[path], ResnetBlock2D) else "cross_attention"
        assert slot.kind == kind, path
        assert slot.block.params == sum(p.numel() for p in modules[path].parameters()), path


def test_sd15_original_counts_match_table3_origin(sd15):
    assert list(sd15.stages) == list(TABLE3_ORIGIN)
    assert as_table(sd15.counts(sd15.original())) == TABLE3_ORIGIN


def test_snapfusion_architecture_is_valid_in_sd15_with_table3_counts(sd15):
    arch = Architecture.load(SNAPFUSION_ARCH)
    assert arch.space == "sd15"
    sd15.validate(arch, source=str(SNAPFUSION_ARCH))
    assert as_table(sd15.counts(arch)) == TABLE3_SNAPFUSION
    assert sd15.params(arch) < sd15.params(sd15.original())


def test_sd15_mid_stage_spans_the_lowest_resolution_blocks(sd15):
    mid = sd15.stages["Mid"]
    assert {p.rsplit(".", 2)[0] for p in mid} == {"down_blocks.3", "mid_block", "up_blocks.0"}
    assert {(sd15.slots[p].block.height, sd15.slots[p].block.width) for p in mid} == {(8, 8)}


# -- legality --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "down_blocks.1.resnets.0",
        "down_blocks.2.resnets.0",
        "up_blocks.2.resnets.0",
        "up_blocks.3.resnets.0",
    ],
)
def test_sd15_channel_changing_resnets_are_not_removable(sd15, path):
    slot = sd15.slots[path]
    assert slot.block.in_channels != slot.block.out_channels
    assert not slot.removable
    assert slot.max_copies == 0
    removed = sd15.original().with_multiplicity(path, 0)
    assert any(path in problem for problem in sd15.violations(removed))


def test_sd15_other_resnets_are_removable(sd15):
    blocked = {
        "down_blocks.1.resnets.0",
        "down_blocks.2.resnets.0",
        "up_blocks.2.resnets.0",
        "up_blocks.3.resnets.0",
    }
    for path, slot in sd15.slots.items():
        if slot.kind == "resnet":
            assert slot.removable == (path not in blocked), path


@pytest.mark.parametrize("name", ["sd15", "sd21", "tiny"])
def test_decoder_resnets_are_never_copyable(name):
    space = load_space(name)
    decoder = [s for s in space.slots.values() if s.kind == "resnet" and s.block.skip_channels]
    up_resnets = [
        s for p, s in space.slots.items() if p.startswith("up_blocks") and s.kind == "resnet"
    ]
    assert decoder and [s.path for s in decoder] == [s.path for s in up_resnets]
    for slot in decoder:
        assert slot.max_copies == 0, slot.path
        copied = space.original().with_multiplicity(slot.path, 2)
        assert any(slot.path in problem for problem in space.violations(copied))


@pytest.mark.parametrize("name", ["sd15", "sd21", "tiny"])
def test_every_attention_is_removable_and_copyable(name):
    space = load_space(name)
    attentions = [s for s in space.slots.values() if s.kind == "cross_attention"]
    assert attentions
    for slot in attentions:
        assert slot.removable, slot.path
        assert slot.max_copies >= 1, slot.path
        assert not space.violations(space.original().with_multiplicity(slot.path, 0))
        assert not space.violations(space.original().with_multiplicity(slot.path, 2))


# -- Architecture ------------------------------------------------------------------------------


def test_architecture_json_round_trip(sd15, tmp_path):
    arch = Architecture.load(SNAPFUSION_ARCH)
    again = Architecture.from_json(arch.to_json())
    assert again == arch
    assert again.space == "sd15"
    assert dict(again.multiplicity) == dict(arch.multiplicity)
    assert list(again.multiplicity) == list(arch.multiplicity)  # slot order is kept
    path = tmp_path / "a.arch.json"
    arch.save(path)
    assert Architecture.load(path) == arch
    assert json.loads(path.read_text()) == arch.to_dict()


def test_architecture_hash_is_stable_and_order_independent(sd15):
    original = sd15.original()
    reversed_ = Architecture("sd15", dict(reversed(list(original.multiplicity.items()))))
    assert list(reversed_.multiplicity) != list(original.multiplicity)
    assert reversed_ == original
    assert hash(reversed_) == hash(original)
    assert reversed_.hash == original.hash
    assert len(original.hash) == 16 and int(original.hash, 16) >= 0
    assert Architecture.from_json(original.to_json()).hash == original.hash
    # The content hash names run directories: it must not depend on the Python process.
    assert Architecture("s", {"a": 1, "b": 0}).hash == "6f1dbd88a56edbd5"
    assert Architecture("s", {"b": 0, "a": 1}).hash == "6f1dbd88a56edbd5"


def test_architecture_hash_changes_with_a_multiplicity(sd15):
    original = sd15.original()
    hashes = {original.hash}
    for path in list(sd15.slots)[:5]:
        for n in (0, 2):
            changed = original.with_multiplicity(path, n)
            assert changed != original
            hashes.add(changed.hash)
    assert len(hashes) == 11
    assert Architecture("other", dict(original.multiplicity)).hash != original.hash


def test_apply_actions():
    arch = Architecture("s", {"a": 1, "b": 2})
    assert arch.apply(Action("remove", "a"))["a"] == 0
    assert arch.apply(Action("copy", "b"))["b"] == 3
    assert arch["a"] == 1 and arch["b"] == 2  # immutable
    with pytest.raises(TypeError):
        arch.multiplicity["a"] = 5


# -- actions and random architectures ------------------------------------------------------


@pytest.mark.parametrize("name", ["sd15", "tiny"])
def test_actions_of_the_original_are_exactly_the_legal_ones(name):
    space = load_space(name)
    original = space.original()
    actions = space.actions(original)
    assert actions and len(set(actions)) == len(actions)
    for action in actions:
        space.validate(original.apply(action))  # raises if illegal
    for path, slot in space.slots.items():
        assert (Action("remove", path) in actions) == slot.removable, path
        assert (Action("copy", path) in actions) == (slot.max_copies > 0), path


def test_actions_from_a_searched_architecture_bring_removed_blocks_back(sd15):
    arch = Architecture.load(SNAPFUSION_ARCH)
    actions = sd15.actions(arch)
    for action in actions:
        assert not sd15.violations(arch.apply(action)), action
    # removed blocks cannot be removed again, but can be brought back
    assert Action("remove", "down_blocks.0.attentions.0") not in actions
    assert Action("copy", "down_blocks.0.attentions.0") in actions
    # up_blocks.1.attentions.0 already has its one allowed copy
    assert Action("copy", "up_blocks.1.attentions.0") not in actions
    assert Action("remove", "up_blocks.1.attentions.0") in actions


@pytest.mark.parametrize("name", ["sd15", "tiny"])
def test_random_is_deterministic_and_legal(name):
    space = load_space(name)
    seen = set()
    for seed in range(8):
        arch = space.random(seed)
        assert arch == space.random(seed)
        assert arch.hash == space.random(seed).hash
        space.validate(arch)
        assert set(arch.multiplicity) == set(space.slots)
        seen.add(arch)
    assert len(seen) >= 6  # different seeds explore different architectures
    assert space.original() not in seen


def test_params_of_original_equal_the_diffusers_model():
    sd15 = load_space("sd15")
    unet = meta_unet("sd15")
    assert sd15.params(sd15.original()) == sum(p.numel() for p in unet.parameters())
    assert sd15.params(sd15.original()) == 859_520_964  # SD-v1.5 UNet: 859.5M

    tiny = load_space("tiny")
    real = UNet2DConditionModel.from_config(unet_config("tiny"))  # real weights, small
    assert tiny.params(tiny.original()) == sum(p.numel() for p in real.parameters())


def test_params_count_each_copy_and_removal(tiny):
    original = tiny.original()
    path = "down_blocks.0.attentions.0"
    block = tiny.slots[path].block.params
    assert block > 0
    base = tiny.params(original)
    assert tiny.params(original.with_multiplicity(path, 2)) == base + block
    assert tiny.params(original.with_multiplicity(path, 0)) == base - block


# -- the other built-in spaces ---------------------------------------------------------------


def test_sd21_context_and_head_dim():
    sd21 = load_space("sd21")
    assert sd21.context == (77, 1024)
    attentions = [s for s in sd21.slots.values() if s.kind == "cross_attention"]
    assert len(attentions) == 16
    assert {s.block.head_dim for s in attentions} == {64}
    assert all(s.block.heads * 64 == s.block.out_channels for s in attentions)


def test_tiny_has_enough_to_search(tiny):
    removable = [s for s in tiny.slots.values() if s.removable]
    assert len(removable) >= 12
    with_attention = [
        stage
        for stage, paths in tiny.stages.items()
        if any(tiny.slots[p].kind == "cross_attention" for p in paths)
    ]
    assert len(with_attention) >= 3


def test_builtin_spaces_are_cached_and_named():
    assert load_space("tiny") is load_space("tiny")
    for name in ("sd15", "sd21", "tiny"):
        assert load_space(name).name == name


# -- bases and stages ------------------------------------------------------------------------


def _tiny_pretrained(folder: Path) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config("tiny")))
    return folder


def test_pretrained_base_loads(tmp_path, write_yaml, tiny):
    folder = _tiny_pretrained(tmp_path / "pipe")
    path = write_yaml(f"name: pre\nbase:\n  pretrained: {folder}\n{TINY_YAML_INPUTS}")
    space = SearchSpace.from_yaml(path)
    assert space.pretrained == folder
    assert list(space.slots) == list(tiny.slots)
    assert space.base_params == tiny.base_params


def test_pretrained_base_relative_to_the_space_file(tmp_path, write_yaml, tiny):
    _tiny_pretrained(tmp_path / "pipe")
    path = write_yaml(f"name: pre\nbase:\n  pretrained: pipe\n{TINY_YAML_INPUTS}")
    space = load_space(path)
    assert space.pretrained == tmp_path / "pipe"
    assert list(space.slots) == list(tiny.slots)


def test_inline_config_base_loads(write_yaml, tiny):
    base = yaml.safe_dump({"name": "inline", "base": {"config": unet_config("tiny")}})
    space = load_space(write_yaml(base + TINY_YAML_INPUTS))
    assert space.name == "inline"
    assert space.pretrained is None
    assert list(space.slots) == list(tiny.slots)
    assert space.base_params == tiny.base_params


def test_stages_default_to_one_per_unet_block(write_yaml):
    space = load_space(write_yaml("name: plain\nbase: {builtin: tiny}\n" + TINY_YAML_INPUTS))
    assert list(space.stages) == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ]
    for path, slot in space.slots.items():
        assert path.startswith(slot.stage + "."), path
    # without rules nothing is searched
    assert not any(s.removable or s.max_copies for s in space.slots.values())
    assert space.actions(space.original()) == []
