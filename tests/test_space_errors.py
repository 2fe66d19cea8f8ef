"""Bad spaces and bad architectures: one SpaceError / ArchitectureError naming the problem.

Where the problem is in a file, the message starts with `file:line` of the offending field.
"""

from __future__ import annotations

import json

import pytest

from search_spaces import Architecture, ArchitectureError, SearchSpace, SpaceError, load_space
from search_spaces.unet import builtin_unet_config

HEAD = """\
name: t
description: a test space over the tiny UNet
base:
  builtin: tiny
inputs:
  latent: [12, 16, 16]
  context: [16, 128]
"""

STAGES = """\
stages:
  A:
    - "down_blocks.0.*"
  B:
    - "down_blocks.1.*"
    - "down_blocks.2.*"
    - "mid_block.*"
    - "up_blocks.*"
"""

RULES = """\
rules:
  - match: "*"
    kind: cross_attention
    removable: true
    max_copies: 1
  - match: "*"
    kind: resnet
    removable: true
    on_illegal: skip
"""

GOOD = HEAD + STAGES + RULES


def load_error(path) -> str:
    """The message of the one SpaceError that loading `path` raises."""
    with pytest.raises(SpaceError) as info:
        load_space(path)
    return str(info.value)


def assert_at(message: str, path, line: int) -> None:
    assert message.startswith(f"{path}:{line}:"), message


def test_the_good_file_loads(write_yaml):
    space = load_space(write_yaml(GOOD))
    assert list(space.stages) == ["A", "B"]
    assert sum(s.removable for s in space.slots.values()) == 16


# -- the file itself ------------------------------------------------------------------------


def test_malformed_yaml(write_yaml, find_line):
    path = write_yaml(HEAD.replace("description: a test", "description: a: test"))
    message = load_error(path)
    assert_at(message, path, find_line(path, "description:"))
    assert "malformed YAML" in message


def test_not_a_mapping(write_yaml):
    path = write_yaml("- just\n- a list\n")
    message = load_error(path)
    assert message.startswith(str(path))
    assert "mapping" in message


def test_missing_file(tmp_path):
    with pytest.raises(SpaceError, match="does not exist"):
        SearchSpace.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_unknown_space_name_lists_the_known_ones():
    with pytest.raises(SpaceError) as info:
        load_space("no-such-space")
    assert "'no-such-space'" in str(info.value)
    for name in ("sd15", "sd21", "tiny"):
        assert name in str(info.value)


def test_unknown_top_level_key(write_yaml, find_line):
    path = write_yaml(GOOD + "max_param: 10\n")
    message = load_error(path)
    assert_at(message, path, find_line(path, "max_param:"))
    assert "max_param" in message and "unknown key" in message
    assert "max_params" in message  # says what is allowed
    assert "\n" not in message


# BUG (search_spaces/spec.py, _line_index): the line of a key whose value is a block mapping or
# sequence is overwritten by the line where the value starts (the next line), so the error
# points one line below the misspelled key.
def test_unknown_top_level_key_with_a_mapping_value(write_yaml, find_line):
    path = write_yaml(HEAD + STAGES.replace("stages:", "stage:") + RULES)
    message = load_error(path)
    assert "stage: unknown key" in message
    assert_at(message, path, find_line(path, "stage:"))


def test_unknown_key_in_a_rule(write_yaml, find_line):
    path = write_yaml(
        GOOD.replace("    max_copies: 1\n", "    max_copies: 1\n    removeable: no\n")
    )
    message = load_error(path)
    assert_at(message, path, find_line(path, "removeable:"))
    assert "rules.0.removeable" in message and "unknown key" in message
    for allowed in ("match", "kind", "removable", "max_copies", "on_illegal"):
        assert allowed in message


def test_unknown_block_kind_in_a_rule(write_yaml, find_line):
    path = write_yaml(GOOD.replace("kind: resnet", "kind: conv"))
    message = load_error(path)
    assert_at(message, path, find_line(path, "kind: conv"))
    assert "rules.1.kind" in message
    assert "resnet" in message and "cross_attention" in message


def test_base_needs_exactly_one_source(write_yaml):
    path = write_yaml(HEAD.replace("  builtin: tiny\n", "  builtin: tiny\n  config: {}\n"))
    message = load_error(path)
    assert message.startswith(f"{path}:")
    assert "base: give exactly one of builtin, config, pretrained (got builtin, config)" in message


# BUG (search_spaces/space.py, SearchSpace.__init__): `builtin_unet_config` is called outside
# the try/except that prefixes `spec.where(...)`, so an unknown built-in UNet is the one base
# error that does not name the space file and line (the pretrained case does).
def test_unknown_builtin_unet(write_yaml, find_line):
    path = write_yaml(HEAD.replace("builtin: tiny", "builtin: sd99"))
    message = load_error(path)
    assert "unknown built-in UNet 'sd99'" in message and "sd15, sd21, tiny" in message
    assert_at(message, path, find_line(path, "builtin: sd99"))


# -- stages ---------------------------------------------------------------------------------


def test_rule_glob_that_matches_nothing(write_yaml, find_line):
    path = write_yaml(GOOD + '  - match: "up_blocks.9.*"\n    max_copies: 1\n')
    message = load_error(path)
    assert_at(message, path, find_line(path, "up_blocks.9.*"))
    assert "rules[2]" in message and "'up_blocks.9.*'" in message and "matches no slot" in message


def test_rule_glob_that_matches_nothing_of_its_kind(write_yaml, find_line):
    path = write_yaml(GOOD + '  - match: "mid_block.resnets.*"\n    kind: cross_attention\n')
    message = load_error(path)
    assert_at(message, path, find_line(path, "mid_block.resnets.*"))
    assert "matches no slot of kind cross_attention" in message


def test_stage_glob_that_matches_nothing(write_yaml, find_line):
    path = write_yaml(HEAD + STAGES.replace('"mid_block.*"', '"mid_blocks.*"') + RULES)
    message = load_error(path)
    assert_at(message, path, find_line(path, "mid_blocks.*"))
    assert "stages.B" in message and "'mid_blocks.*'" in message and "matches no slot" in message


def test_slot_in_two_stages(write_yaml, find_line):
    path = write_yaml(
        HEAD + STAGES.replace('"down_blocks.1.*"', '"down_blocks.*.resnets.0"') + RULES
    )
    message = load_error(path)
    assert_at(message, path, find_line(path, "down_blocks.*.resnets.0"))
    assert "down_blocks.0.resnets.0 is in two stages, A and B" in message


# BUG (search_spaces/spec.py, _line_index): same as above: `where("stages")` gives the line of
# the first stage ("  A:"), not the line of the `stages:` key.
def test_slot_in_no_stage(write_yaml, find_line):
    path = write_yaml(
        HEAD + STAGES.replace('"down_blocks.0.*"', '"down_blocks.0.resnets.*"') + RULES
    )
    message = load_error(path)
    assert "in no stage: down_blocks.0.attentions.0;" in message
    assert_at(message, path, find_line(path, "stages:"))


# -- rules and constraints --------------------------------------------------------------------


def test_constraint_min_greater_than_max(write_yaml, find_line):
    path = write_yaml(GOOD + "constraints:\n  - {stage: B, kind: resnet, min: 3, max: 2}\n")
    message = load_error(path)
    assert_at(message, path, find_line(path, "min: 3"))
    assert "constraints.0" in message and "min (3) is greater than max (2)" in message


def test_constraint_without_bounds(write_yaml, find_line):
    path = write_yaml(GOOD + "constraints:\n  - stage: B\n")
    message = load_error(path)
    assert_at(message, path, find_line(path, "stage: B"))
    assert "needs min, max or both" in message


def test_negative_max_copies(write_yaml, find_line):
    path = write_yaml(GOOD.replace("max_copies: 1", "max_copies: -1"))
    message = load_error(path)
    assert_at(message, path, find_line(path, "max_copies: -1"))
    assert "rules.0.max_copies" in message and "greater than or equal to 0" in message


def test_rule_removing_a_non_removable_slot(write_yaml, find_line):
    rule = '  - match: "up_blocks.2.resnets.0"\n    removable: true\n'
    path = write_yaml(GOOD + rule)
    message = load_error(path)
    assert_at(message, path, find_line(path, '"up_blocks.2.resnets.0"'))
    assert "rules[2]" in message
    assert "slot up_blocks.2.resnets.0 cannot be removed" in message
    assert "from 64 to 32 channels" in message  # the reason
    assert "on_illegal: skip" in message  # the way out

    space = load_space(write_yaml(GOOD + rule + "    on_illegal: skip\n", name="skip.yaml"))
    assert not space.slots["up_blocks.2.resnets.0"].removable
    assert space.slots["up_blocks.1.resnets.0"].removable


def test_rule_copying_a_decoder_resnet(write_yaml, find_line):
    path = write_yaml(GOOD + '  - match: "up_blocks.1.resnets.1"\n    max_copies: 1\n')
    message = load_error(path)
    assert_at(message, path, find_line(path, '"up_blocks.1.resnets.1"'))
    assert "slot up_blocks.1.resnets.1 cannot be copied" in message
    assert "skip connection" in message


def test_constraint_on_an_unknown_stage(write_yaml, find_line):
    path = write_yaml(GOOD + "constraints:\n  - kind: resnet\n    min: 1\n    stage: Mid\n")
    message = load_error(path)
    assert_at(message, path, find_line(path, "stage: Mid"))
    assert "constraints[0]" in message and "'Mid' matches no stage" in message
    assert "stages are A, B" in message


def test_original_must_satisfy_the_constraints(write_yaml):
    path = write_yaml(GOOD + "constraints:\n  - {stage: B, kind: cross_attention, max: 1}\n")
    message = load_error(path)
    assert "original network must satisfy" in message
    assert "stage B has 6 cross_attention blocks, constraints[0] allows at most 1" in message


# -- pretrained bases -------------------------------------------------------------------------


def test_missing_pretrained_folder(tmp_path, write_yaml, find_line):
    missing = tmp_path / "no-such-pipeline"
    path = write_yaml(HEAD.replace("builtin: tiny", f"pretrained: {missing}"))
    message = load_error(path)
    assert_at(message, path, find_line(path, "pretrained:"))
    assert f"pretrained folder '{missing}' does not exist" in message


def test_pretrained_folder_without_unet(tmp_path, write_yaml, find_line):
    folder = tmp_path / "pipeline"
    (folder / "vae").mkdir(parents=True)
    path = write_yaml(HEAD.replace("builtin: tiny", f"pretrained: {folder}"))
    message = load_error(path)
    assert_at(message, path, find_line(path, "pretrained:"))
    assert "has no unet/config.json" in message and str(folder) in message


def test_pretrained_unet_config_not_json(tmp_path, write_yaml):
    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text('{"in_channels": 4,\n oops}\n')
    path = write_yaml(HEAD.replace("builtin: tiny", f"pretrained: {folder}"))
    message = load_error(path)
    assert f"{folder / 'unet' / 'config.json'}:2: not valid JSON" in message


def test_inputs_that_do_not_fit_the_unet(write_yaml):
    path = write_yaml(HEAD.replace("latent: [12, 16, 16]", "latent: [4, 16, 16]"))
    message = load_error(path)
    assert message.startswith(f"{path}:")
    assert "does not run on inputs" in message and "latent=[4, 16, 16]" in message


def test_context_width_other_than_the_unets(write_yaml, find_line):
    path = write_yaml(HEAD.replace("context: [16, 128]", "context: [16, 64]"))
    message = load_error(path)
    assert_at(message, path, find_line(path, "context:"))
    assert "is 64 wide, but the base UNet's cross-attention takes cross_attention_dim 128" in (
        message
    )
    assert "set `cross_attention_dim: 64`" in message


# -- a UNet config of one's own (the plug-in journey) -------------------------------------------


def tiny_config(drop: tuple[str, ...] = (), **changes) -> dict:
    """The tiny UNet's config with the keys in `drop` left out and some changed."""
    config = {**builtin_unet_config("tiny"), **changes}
    return {k: v for k, v in config.items() if k not in drop}


def config_space(write_yaml, config_ref: str, extra: str = "") -> str:
    return write_yaml(HEAD.replace("builtin: tiny", f"config: {config_ref}") + extra)


def test_base_config_as_a_json_file_next_to_the_space(tmp_path, write_yaml, monkeypatch):
    (tmp_path / "unets").mkdir()
    (tmp_path / "unets" / "my_unet.json").write_text(json.dumps(tiny_config()))
    path = config_space(write_yaml, "unets/my_unet.json", STAGES + RULES)
    monkeypatch.chdir("/")  # relative to the space file, not to the current folder
    space = load_space(path)
    assert space.config_file == tmp_path / "unets" / "my_unet.json"
    assert list(space.slots) == list(load_space("tiny").slots)
    assert list(space.with_inputs(batch=1).slots) == list(space.slots)


def test_base_config_file_missing_or_a_folder(tmp_path, write_yaml, find_line):
    path = config_space(write_yaml, "my_unet.json")
    message = load_error(path)
    assert_at(message, path, find_line(path, "config:"))
    assert f"config file '{tmp_path / 'my_unet.json'}' does not exist" in message

    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "config.json").write_text(json.dumps(tiny_config()))
    message = load_error(config_space(write_yaml, "pipe"))
    assert "is a folder, not a UNet config file; `pretrained:" in message


def test_base_config_neither_a_mapping_nor_a_path(write_yaml, find_line):
    path = config_space(write_yaml, "[1, 2]")
    message = load_error(path)
    assert message == (
        f"{path}:{find_line(path, 'config:')}: base.config: give the UNet config as a mapping, "
        "or the path of its JSON file (e.g. config: my_unet.json)"
    )


def test_base_config_file_not_json(tmp_path, write_yaml):
    (tmp_path / "my_unet.json").write_text('{"in_channels": 12,\n oops}')
    message = load_error(config_space(write_yaml, "my_unet.json"))
    assert f"{tmp_path / 'my_unet.json'}:2: not valid JSON" in message


def test_pretrained_that_is_a_file(tmp_path, write_yaml, find_line):
    (tmp_path / "my_unet.json").write_text(json.dumps(tiny_config()))
    path = write_yaml(HEAD.replace("builtin: tiny", "pretrained: my_unet.json"))
    message = load_error(path)
    assert_at(message, path, find_line(path, "pretrained:"))
    assert "is a file, but must be a folder" in message and "`config: my_unet.json`" in message


def test_config_without_cross_attention_dim_takes_diffusers_default(tmp_path, write_yaml):
    (tmp_path / "my_unet.json").write_text(json.dumps(tiny_config(drop=("cross_attention_dim",))))
    message = load_error(config_space(write_yaml, "my_unet.json"))
    assert "cross_attention_dim 1280, diffusers' default: the config does not set it" in message
    assert "set `cross_attention_dim: 128` in the UNet config" in message


def test_stage_map_with_a_mid_block_the_unet_lacks(tmp_path, write_yaml, find_line):
    (tmp_path / "my_unet.json").write_text(json.dumps(tiny_config(mid_block_type=None)))
    path = config_space(write_yaml, "my_unet.json", STAGES + RULES)
    message = load_error(path)
    assert_at(message, path, find_line(path, '"mid_block.*"'))
    assert "pattern 'mid_block.*' matches no slot; the base UNet has no mid block" in message


# -- architectures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> SearchSpace:
    return load_space("tiny")


def arch_error(space: SearchSpace, arch: Architecture) -> str:
    with pytest.raises(ArchitectureError) as info:
        space.validate(arch, source="my.arch.json")
    return str(info.value)


def test_architecture_of_another_space(tiny):
    arch = Architecture("sd15", dict(tiny.original().multiplicity))
    message = arch_error(tiny, arch)
    assert "my.arch.json is for space 'sd15', not 'tiny'" in message


def test_architecture_with_a_missing_slot(tiny):
    mult = dict(tiny.original().multiplicity)
    del mult["mid_block.attentions.0"]
    message = arch_error(tiny, Architecture("tiny", mult))
    assert "missing slots: mid_block.attentions.0" in message
    assert "unknown" not in message


def test_architecture_with_an_extra_slot(tiny):
    mult = {**tiny.original().multiplicity, "mid_block.attentions.1": 1}
    message = arch_error(tiny, Architecture("tiny", mult))
    assert "unknown slots: mid_block.attentions.1" in message
    assert "missing" not in message


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_architecture_with_a_bad_multiplicity(tiny, tmp_path, bad):
    mult = {**tiny.original().multiplicity, "mid_block.attentions.0": bad}
    path = tmp_path / "bad.arch.json"
    path.write_text(json.dumps({"space": "tiny", "multiplicity": mult}))
    with pytest.raises(ArchitectureError) as info:
        Architecture.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "integers >= 0" in message and "mid_block.attentions.0" in message


def test_architecture_file_not_json_or_wrong_shape(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"space": "tiny",\n "multiplicity": }\n')
    with pytest.raises(ArchitectureError, match=r"a\.json:2: not valid JSON"):
        Architecture.load(path)
    path.write_text('{"space": "tiny"}')
    with pytest.raises(ArchitectureError, match="an architecture is"):
        Architecture.load(path)
    with pytest.raises(ArchitectureError, match="does not exist"):
        Architecture.load(tmp_path / "missing.json")


def test_removed_non_removable_slot(tiny):
    arch = tiny.original().with_multiplicity("down_blocks.1.resnets.0", 0)
    message = arch_error(tiny, arch)
    assert "my.arch.json is not legal in space 'tiny'" in message
    assert "down_blocks.1.resnets.0 is removed, but it is not removable" in message
    assert "from 32 to 64 channels" in message


def test_too_many_copies(tiny):
    arch = tiny.original().with_multiplicity("mid_block.attentions.0", 3)
    message = arch_error(tiny, arch)
    assert "mid_block.attentions.0 has 2 copies, but at most 1 are allowed" in message


def test_constraint_violation(tiny):
    arch = tiny.original()
    for path in ("up_blocks.1.resnets.0", "up_blocks.1.resnets.1"):
        arch = arch.with_multiplicity(path, 0)
    message = arch_error(tiny, arch)
    assert "stage Up-1 has 0 resnet blocks, constraints[0] needs at least 1" in message
    assert "up_blocks.1.resnets" not in message  # each removal alone is legal


def test_max_params_budget(tiny, write_yaml):
    space = load_space(write_yaml(GOOD + f"max_params: {tiny.base_params}\n"))
    space.validate(space.original())
    slot = "down_blocks.0.attentions.0"
    arch = space.original().with_multiplicity(slot, 2)
    message = arch_error(space, arch)
    over = tiny.base_params + space.slots[slot].block.params
    assert f"{over:,} parameters exceed max_params {tiny.base_params:,}" in message
    assert space.actions(space.original()) and all(
        a.kind == "remove" for a in space.actions(space.original())
    )


def test_max_params_below_the_original(tiny, write_yaml):
    path = write_yaml(GOOD + f"max_params: {tiny.base_params - 1}\n")
    message = load_error(path)
    assert "original network must satisfy" in message and "exceed max_params" in message
