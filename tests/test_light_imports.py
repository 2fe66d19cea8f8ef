"""Commands that need no network must not import torch, diffusers or Ray: loading them takes
seconds (more than ten on a busy machine), and `--help`, a space file's error or the latency
service's start would wait for them. Each check runs in a fresh interpreter, since this test
process has imported them long ago."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from search_spaces import SearchSpace

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "search_spaces" / "builtin"
HEAVY = ("torch", "diffusers", "ray", "transformers", "open_clip")


def loaded_after(code: str, cwd: Path, **env: str) -> dict:
    """Run `code` in a new interpreter (with `env` added to a bare environment); the heavy
    modules it left in sys.modules, and what `code` stored in the variable `out`."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print(json.dumps({{"heavy": heavy, "out": out}}))
        """)
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def cli(argv: list[str]) -> str:
    return f"""
        from nas.cli import main
        try:
            main({argv!r})
            out = 0
        except SystemExit as e:
            out = e.code
        """


def test_help_imports_no_heavy_module(tmp_path):
    for argv in (["--help"], ["latency", "--help"], ["space", "--help"], ["search", "--help"]):
        got = loaded_after(cli(argv), tmp_path)
        assert got == {"heavy": [], "out": 0}, argv


def test_a_space_file_error_imports_no_heavy_module(tmp_path, write_yaml):
    bad = write_yaml("""
        name: bad
        base: {builtin: tiny}
        inputs: {latent: [12, 16, 16], context: [16, 128]}
        rules:
          - match: "*"
            removeable: true
        """)
    got = loaded_after(cli(["space", "validate", str(bad)]), tmp_path)
    assert got == {"heavy": [], "out": 2}


def test_space_show_reads_the_unet_once(tmp_path):
    """The slots need a meta forward of the UNet (torch, diffusers) the first time only."""
    cache = str(tmp_path / "cache")
    show = cli(["space", "show", "tiny", "--slots"])
    first = loaded_after(show, tmp_path, DIFFNAS_CACHE=cache)
    assert first["out"] == 0 and "torch" in first["heavy"]
    assert loaded_after(show, tmp_path, DIFFNAS_CACHE=cache) == {"heavy": [], "out": 0}
    # another input shape is another set of slots: read again
    other = (
        "from search_spaces import load_space; out = load_space('tiny').with_inputs(batch=1).batch"
    )
    assert "torch" in loaded_after(other, tmp_path, DIFFNAS_CACHE=cache)["heavy"]


def test_a_damaged_slot_cache_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path))
    slots = list(SearchSpace.from_yaml(BUILTIN / "tiny.yaml").slots)  # not load_space's copy
    (entry,) = (tmp_path / "space-blocks").iterdir()
    entry.write_text('{"blocks": [{"path": 1}]')
    assert list(SearchSpace.from_yaml(BUILTIN / "tiny.yaml").slots) == slots
    assert json.loads(entry.read_text())["params"] > 0  # written again, whole


def test_the_latency_service_starts_without_torch(tmp_path):
    # what `diffnas latency serve` runs before it listens: the app, its store, its routes
    got = loaded_after(
        f"""
        from latency.service import create_app
        import latency.service_cli
        app = create_app({str(tmp_path / "t.db")!r}, "admin-token-0123456789abcdef")
        out = sorted(r.path for r in app.routes)
        """,
        tmp_path,
    )
    assert got["heavy"] == [] and "/health" in got["out"] and "/docs" in got["out"]
