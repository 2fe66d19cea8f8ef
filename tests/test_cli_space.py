"""`diffnas space list/show/validate`, user errors, and search-space plug-ins."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nas.cli import main
from search_spaces import Architecture, SearchSpace, SpaceError, list_spaces, load_space
from search_spaces import cli as space_cli
from search_spaces.unet import builtin_unet_config

ROOT = Path(__file__).resolve().parent.parent
SNAPFUSION_ARCH = ROOT / "experiments" / "snapfusion_sd15.arch.json"
DIFFNAS = Path(sys.executable).with_name("diffnas")

TINY_SPACE = """\
name: {name}
description: {description}
base:
  builtin: tiny
inputs:
  latent: [12, 16, 16]
  context: [16, 128]
rules:
  - match: "*"
    kind: cross_attention
    removable: true
"""


def cli(argv: list[str]) -> int:
    """Run `diffnas ARGV` in-process; its exit code."""
    try:
        main(argv)
    except SystemExit as e:
        return 0 if e.code is None else e.code
    return 0


def diffnas(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    assert DIFFNAS.is_file(), f"console script {DIFFNAS} is not installed"
    return subprocess.run(
        [str(DIFFNAS), *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def stage_rows(output: str) -> dict[str, tuple[int, ...]]:
    """(CA origin, ResNet origin[, CA arch, ResNet arch]) per stage of `space show`'s table."""
    rows: dict[str, list[int]] = {}
    stage = None
    for line in re.sub(r"\x1b\[[0-9;]*m", "", output).splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0]:
            stage = cells[0]
        if cells[2].startswith(("Cross", "ResNet")):
            rows.setdefault(stage, []).append([int(c) for c in cells[4:]])
    # reorder as (CA origin, ResNet origin, CA arch, ResNet arch)
    return {s: tuple(n for col in zip(*r, strict=True) for n in col) for s, r in rows.items()}


# -- show / validate / list ------------------------------------------------------------------


def test_show_sd15_with_snapfusion_arch(capsys):
    assert cli(["space", "show", "sd15", "--arch", str(SNAPFUSION_ARCH)]) == 0
    out = capsys.readouterr().out
    assert stage_rows(out) == {
        "Down-1": (2, 2, 0, 2),
        "Down-2": (2, 2, 2, 2),
        "Down-3": (2, 2, 2, 1),
        "Mid": (1, 7, 1, 4),
        "Up-1": (3, 3, 6, 2),
        "Up-2": (3, 3, 3, 3),
        "Up-3": (3, 3, 0, 3),
    }
    space = load_space("sd15")
    arch_params = space.params(Architecture.load(SNAPFUSION_ARCH))
    assert f"parameters, origin: {space.base_params:,}" in out
    assert "859,520,964" in out
    assert f"parameters, snapfusion_sd15: {arch_params:,}" in out
    assert "latent 4×64×64, context 77×768, batch 2" in out


def test_show_with_slots(capsys, monkeypatch):
    # wide enough for the slot paths (rich assumes 80 columns when stdout is not a terminal)
    monkeypatch.setattr(space_cli.console, "width", 200)
    assert cli(["space", "show", "tiny", "--slots"]) == 0
    out = capsys.readouterr().out
    for path in load_space("tiny").slots:
        assert path in out
    assert "parameters, origin: 1,538,700" in out


def test_validate_space_and_arch(capsys, tmp_path):
    space = load_space("tiny")
    arch_path = tmp_path / "r.arch.json"
    space.random(3).save(arch_path)
    assert cli(["space", "validate", "tiny", "--arch", str(arch_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich may wrap lines
    assert "ok space 'tiny'" in out
    assert f"{len(space.slots)} slots in {len(space.stages)} stages" in out
    assert space.random(3).hash in out


def test_list_shows_builtins(capsys):
    assert cli(["space", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("sd15", "sd21", "tiny"):
        assert name in out
    assert "built-in" in out


# -- user errors ---------------------------------------------------------------------------------


def _bad_arch(tmp_path: Path) -> Path:
    path = tmp_path / "bad.arch.json"
    space = load_space("tiny")
    space.original().with_multiplicity("down_blocks.1.resnets.0", 0).save(path)
    return path


USER_ERRORS = [
    (["space", "show", "no-such-space"], "unknown search space 'no-such-space'"),
    (
        ["space", "validate", "{tmp}/missing.yaml"],
        "search space file '{tmp}/missing.yaml' does not",
    ),
    (["space", "show", "tiny", "--arch", "{tmp}/missing.json"], "'{tmp}/missing.json' does not"),
    (["space", "validate", "sd15", "--arch", "{tmp}/bad.arch.json"], "is for space 'tiny'"),
]


@pytest.mark.parametrize(("argv", "expected"), USER_ERRORS)
def test_user_errors_exit_2_with_a_message_and_no_traceback(capsys, tmp_path, argv, expected):
    _bad_arch(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ")
    assert expected.format(tmp=tmp_path) in " ".join(err.split())  # rich may wrap it
    assert "Traceback" not in err and "SpaceError" not in err and "ArchitectureError" not in err


# BUG (nas/cli.py, main): typer >= 0.22 vendors click as `typer._click`, so `except
# click.ClickException` / `click.exceptions.Exit` / `Abort` (the separate `click` package) never
# match: a usage error (missing option value, unknown command, `diffnas` with no arguments)
# escapes with a traceback and exit code 1 instead of click's usage message and exit code 2.
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["space", "show", "tiny", "--arch"], "Option '--arch' requires an argument"),
        (["space", "nonsense"], "No such command 'nonsense'"),
    ],
)
def test_usage_errors_exit_2_without_traceback(capsys, argv, expected):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


# BUG (nas/cli.py, main): the message goes through a rich Console, which wraps it at the
# terminal width (80 columns when stderr is not a terminal: CI logs, pipes), so a message
# longer than that, e.g. any one naming a file, is split over several lines.
def test_user_error_message_is_one_line(capsys, tmp_path):
    missing = tmp_path / "missing.arch.json"
    assert cli(["space", "show", "tiny", "--arch", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: architecture file '{missing}' does not exist\n"


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("config: my_unet.json", "config file '{tmp}/my_unet.json' does not exist"),
        ("pretrained: cfg.json", "'{tmp}/cfg.json' is a file, but must be a folder"),
        ("config: cfg.json", "takes cross_attention_dim 1280, diffusers' default"),
    ],
)
def test_own_unet_config_errors_exit_2(capsys, tmp_path, write_yaml, base, expected):
    config = {k: v for k, v in builtin_unet_config("tiny").items() if k != "cross_attention_dim"}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    text = TINY_SPACE.format(name="t", description="x").replace("builtin: tiny", base)
    assert cli(["space", "validate", str(write_yaml(text))]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: " in err and expected.format(tmp=tmp_path) in err, err


def test_illegal_arch_lists_every_problem(capsys, tmp_path):
    path = _bad_arch(tmp_path)
    assert cli(["space", "validate", "tiny", "--arch", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not legal in space 'tiny'" in err
    assert "down_blocks.1.resnets.0" in err and "not removable" in err
    assert "Traceback" not in err


# BUG (nas/cli.py, main): the message is printed with rich markup enabled, so text in square
# brackets inside it is taken as markup: a glob such as 'down_blocks.[2-3]*' is shown as
# 'down_blocks.*' (and a message with "[/...]" in it would even raise a MarkupError).
def test_error_message_is_printed_verbatim(capsys, write_yaml):
    text = TINY_SPACE.format(name="t", description="x") + '  - match: "down_blocks.[a-z]*"\n'
    path = write_yaml(text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    assert cli(["space", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'down_blocks.[a-z]*'" in str(info.value)
    assert "'down_blocks.[a-z]*'" in err.replace("\n", "")


def test_debug_shows_the_traceback(capsys):
    # in-process, "shows the traceback" = the error is not turned into a message and exit 2,
    # but propagates out of main() (and the interpreter prints it) with the library frames
    with pytest.raises(SpaceError, match="unknown search space 'no-such-space'") as info:
        main(["--debug", "space", "show", "no-such-space"])
    assert capsys.readouterr().err == ""
    files = [Path(entry.frame.code.path).parts[-2:] for entry in info.traceback]
    assert ("nas", "cli.py") in files and ("search_spaces", "registry.py") in files


# -- plug-ins ------------------------------------------------------------------------------------


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """A real installed distribution `my-spaces` declaring two diffnas.search_spaces entries."""
    (tmp_path / "mine.yaml").write_text(
        TINY_SPACE.format(name="mine", description="my plug-in space")
    )
    (tmp_path / "my_spaces.py").write_text(
        textwrap.dedent(
            '''
            from pathlib import Path


            def space():
                """The plug-in space: the path of a YAML file next to this module."""
                return Path(__file__).with_name("mine.yaml")


            not_a_space = 42
            '''
        )
    )
    dist_info = tmp_path / "my_spaces-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-spaces\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[diffnas.search_spaces]\nmine = my_spaces:space\nbroken = my_spaces:not_a_space\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_spaces", None)  # the next test's module lives in another folder


def test_plugin_space_loads_through_entry_points(plugin_dir):
    space = load_space("mine")
    assert isinstance(space, SearchSpace)
    assert space.name == "mine"
    assert list(space.slots) == list(load_space("tiny").slots)
    entries = {e.name: e for e in list_spaces()}
    assert entries["mine"].origin == "plug-in (my-spaces)"
    assert entries["mine"].description == "my_spaces:space"
    assert entries["tiny"].origin == "built-in"


def test_broken_plugin_is_a_user_error(plugin_dir):
    with pytest.raises(SpaceError) as info:
        load_space("broken")
    message = str(info.value)
    assert "'broken'" in message and "my_spaces:not_a_space" in message and "int" in message


def test_plugin_is_gone_without_its_distribution():
    assert "mine" not in {e.name for e in list_spaces()}
    with pytest.raises(SpaceError, match="unknown search space 'mine'"):
        load_space("mine")


def test_plugin_in_cli_list(plugin_dir):
    result = diffnas("space", "list", env={"PYTHONPATH": str(plugin_dir)})
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "│ mine " in line]
    assert len(rows) == 1, result.stdout
    assert "plug-in (my-spaces)" in rows[0]
    assert "built-in" in result.stdout
