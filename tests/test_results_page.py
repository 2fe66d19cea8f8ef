"""The results page (docs/results.md) and the README's short table are written from the JSON
results by experiments/benchmarks/results_page.py: checked here on small result files made by
the test, and the committed page and table against the repository's own results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SPEC = importlib.util.spec_from_file_location(
    "results_page", REPO / "experiments" / "benchmarks" / "results_page.py"
)
page = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = page
SPEC.loader.exec_module(page)
Row = page.Row

MACHINE = {"cpu": "x86_64", "cores": 2, "torch": "2.14.1", "torch_threads": 1, "load_1min": 0.5}


def write(folder: Path, name: str, data: dict) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def rows() -> list:
    ratio = Row(
        "Speed",
        "speed-up [≥ 1.5×]",
        "speed.json",
        lambda d: f"{d['speedup']:.2f}×",
        lambda d: d["speedup"] >= 1.5,
        readme=True,
    )
    score = Row(
        "Quality", "score [≥ 0.9]", "quality.json", lambda d: f"{d['score']:.2f}",
        lambda d: d["score"] >= 0.9, readme=True,
    )  # fmt: skip
    gone = Row("Quality", "never run", "absent.json", lambda d: d["x"], readme=True)
    return [ratio, score, gone]


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    write(
        folder,
        "speed.json",
        {
            "speedup": 1.734,
            "command": "/somewhere/experiments/benchmarks/speed.py --rounds 2 --out /gpu/x.json",
            "machine": MACHINE,
            "created": "2026-01-02T03:04:05",
        },
    )
    # no date of its own: the driver's summary says when it ran
    write(folder, "quality.json", {"score": 0.42, "command": "python experiments/benchmarks/q.py"})
    write(
        folder,
        "summary.json",
        {"benchmarks": [{"benchmark": "quality", "created": "2026-02-03T04:05:06"}]},
    )
    write(
        folder,
        "full/old.json",
        {"command": "python experiments/benchmarks/old.py", "superseded": "an earlier protocol"},
    )
    write(folder, "speed_times_x.json", {"kept": [], "times": {}})  # raw timings: not listed
    return folder


def test_page_has_a_table_per_area_with_value_verdict_and_provenance(results):
    text = page.render_page(rows(), results)
    assert text.index("## Speed") < text.index("## Quality")
    speed = next(line for line in text.splitlines() if line.startswith("| speed-up"))
    cells = [c.strip() for c in speed.strip("|").split(" | ")]
    assert cells == [
        "speed-up [≥ 1.5×]",
        "1.73×",
        "met",
        "`python experiments/benchmarks/speed.py --rounds 2`",
        "2-core CPU, 1 thread, load 0.5",
        "2026-01-02 03:04",
    ]
    quality = next(line for line in text.splitlines() if line.startswith("| score"))
    assert "0.42" in quality and "**missed**" in quality and "2026-02-03 04:05" in quality
    assert "not measured yet (no `results/absent.json`)" in text
    # files no row quotes are listed with what they say of themselves; raw timings are not
    assert "`full/old.json`" in text and "Superseded: an earlier protocol" in text
    assert "speed_times_x" not in text


def test_page_follows_the_files(results):
    write(results, "speed.json", {"speedup": 1.2, "command": "python experiments/benchmarks/s.py"})
    text = page.render_page(rows(), results)
    line = next(line for line in text.splitlines() if line.startswith("| speed-up"))
    assert "1.20×" in line and "**missed**" in line and "| CPU |" in line and "| — |" in line


def test_readme_block_is_replaced_and_the_rest_kept(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{page.START}\nold table\n{page.END}\nafter\n")
    out = tmp_path / "docs" / "results.md"
    page.write_all(rows(), results, out, readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{page.END}\nafter\n")
    assert "old table" not in text
    assert "| speed-up [≥ 1.5×] ([details](docs/results.md#speed)) | 1.73× (met) |" in text
    assert "| score [≥ 0.9] ([details](docs/results.md#quality)) | 0.42 (**missed**) |" in text
    assert out.read_text() == page.render_page(rows(), results)
    page.write_all(rows(), results, out, readme)  # again: the same text
    assert readme.read_text() == text


def test_bad_input_is_one_clear_error(results):
    with pytest.raises(ValueError, match="one <!-- results:start --> line"):
        page.replace_block("no markers here", "| table |\n")
    broken = [Row("A", "needs a key", "speed.json", lambda d: d["missing"])]
    with pytest.raises(ValueError, match=r"results/speed.json has no 'missing'"):
        page.render_page(broken, results)
    many = [Row("A", f"row {i}", "speed.json", lambda d: "x", readme=True) for i in range(16)]
    with pytest.raises(ValueError, match="keeps 15"):
        page.render_readme_table(many, results)


def test_committed_page_and_readme_table_are_the_generated_ones():
    # docs/results.md and the README's table are never edited by hand: regenerate them with
    # `python experiments/benchmarks/results_page.py` (make bench does) after new results
    stale = "out of date: run `python experiments/benchmarks/results_page.py` and commit it"
    assert (REPO / "docs" / "results.md").read_text() == page.render_page(), (
        f"docs/results.md {stale}"
    )
    readme = (REPO / "README.md").read_text()
    table = page.replace_block(readme, page.render_readme_table())
    assert readme == table, f"the README's results table {stale}"
    for path, text in page.render_blocks().items():  # docs pages showing a result's tables
        assert path.read_text() == text, f"the result tables of {path} {stale}"
    assert {path for path, *_ in page.BLOCKS} <= set(page.render_blocks())


def test_a_page_block_needs_its_two_marker_lines():
    text = "intro\n<!-- distill:start -->\nold\n<!-- distill:end -->\nafter\n"
    assert page.replace_block(text, "new\n", "distill") == (
        "intro\n<!-- distill:start -->\nnew\n<!-- distill:end -->\nafter\n"
    )
    with pytest.raises(ValueError, match="docs/x.md needs one <!-- distill:start --> line"):
        page.replace_block("no markers\n", "new\n", "distill", "docs/x.md")
    assert sum(r.readme for r in page.ROWS) <= 15
