"""Every benchmark result in the repository says how it was made, and none written before a
protocol fix passes for a current result."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).parents[1] / "experiments" / "benchmarks" / "results"
FILES = sorted(p for p in RESULTS.rglob("*.json") if "_times_" not in p.name)  # raw timings


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_result_records_its_command(path):
    data = json.loads(path.read_text())
    script = path.stem.split("_cuda")[0] if "benchmarks" not in data else "run_all"
    # the script's own name, or a sibling's whose results this file holds (e.g. an ablation)
    assert "experiments/benchmarks/" in data.get("command", ""), path
    assert script.startswith(Path(data["command"].split(".py")[0]).name), (path, script)


def test_search_fidelity_results_are_held_out_or_marked_superseded():
    for path in RESULTS.rglob("search_fidelity*.json"):
        data = json.loads(path.read_text())
        if "superseded" in data:
            continue
        for table in data["tables"]:
            protocol = table["protocol"]
            assert protocol["held_out"] and protocol["search_prompts"] > 0, path
            assert {"final", "world"} <= table.keys(), path
