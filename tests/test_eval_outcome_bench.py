"""experiments/benchmarks/eval_outcome.py and sd15_plan.py: the gap to the reference in σ,
the goal, and the SD-v1.5 search that ends at SnapFusion's Table 3 network."""

import importlib.util
import sys
from pathlib import Path

import pytest

from search_spaces import Architecture, load_space

BENCH = Path(__file__).parents[1] / "experiments" / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def run(protocol, seed, calls, final, world):
    return {
        "protocol": protocol,
        "seed": seed,
        "compute": {"unet_calls": calls, "images": calls // 10, "iterations": 10},
        "search_seconds": 1.0,
        "target_met": True,
        "found_hash": f"{protocol}{seed}",
        "final": final,
        "world": world,
    }


def test_gap_in_pooled_sigma_and_the_goal():
    bench = load("eval_outcome")
    runs = [
        run("reference", 0, 100_000, 60.0, 50.0),
        run("reference", 1, 100_000, 62.0, 52.0),
        run("cheap", 0, 4_000, 59.0, 49.0),  # 25x less, within 1σ
        run("cheap", 1, 4_000, 61.0, 51.0),
        run("bad", 0, 1_000, 40.0, 30.0),  # 100x less, far below
        run("bad", 1, 1_000, 42.0, 32.0),
    ]
    summary = bench.summarise(runs, ["reference", "cheap", "bad"])
    cheap = summary["cheap"]
    assert cheap["compute_x_less_than_reference"] == pytest.approx(25)
    sigma = 2**0.5  # both protocols' seed-to-seed std
    assert cheap["final"]["pooled_std"] == pytest.approx(sigma)
    assert cheap["final"]["gap_sigma"] == pytest.approx(-1 / sigma)
    assert cheap["goal_met"] and not summary["bad"]["goal_met"]
    assert summary["bad"]["world"]["gap_sigma"] == pytest.approx(-20 / sigma)
    # a smaller reference ran: the 20x is judged against the full one's projected compute
    smaller = bench.summarise(runs, ["reference", "cheap"], {"typical": 40_000})
    assert smaller["cheap"]["compute_x_less_than_full_reference_projected"] == pytest.approx(10)
    assert smaller["cheap"]["within_1_sigma_both_weights"] and not smaller["cheap"]["goal_met"]


def test_sd15_path_ends_at_the_table3_network():
    plan = load("sd15_plan")
    space = load_space("sd15")
    table3 = Architecture.load(BENCH.parent / "snapfusion_sd15.arch.json")
    actions, removals, copies = plan.table3_path(space, table3, 2)
    original = space.original()
    assert removals == sum(max(0, original[p] - table3[p]) for p in space.slots)
    assert copies == sum(max(0, table3[p] - original[p]) for p in space.slots)
    assert len(actions) == -(-removals // 2) + -(-copies // 2) + 1
    first = sum(a.kind == "remove" for a in space.actions(original))
    assert actions[0] == first and all(a <= first for a in actions)
