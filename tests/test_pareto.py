"""The sweep's comparison (nas.search.pareto, `diffnas sweep --compare`, `diffnas report SWEEP`): a
miniature sweep end to end, the budget and verdict rules, and bad input."""

import json
from pathlib import Path

import pytest
from test_latency import DEVICE, measurement

from latency.signature import signatures
from latency.table import LatencyTable
from nas.cli import main
from nas.experiment import load_experiment
from nas.search.front import trial_name
from nas.search.pareto import CompareSpec, default_designs, evaluation_budget
from nas.search.pareto_stats import summarize, verdict
from nas.search.sweep import run_sweep
from search_spaces import load_space

REPO = Path(__file__).resolve().parents[1]
DESIGNS = REPO / "experiments" / "designs"
EXPERIMENT = {
    "name": "mini",
    "space": "tiny",
    "world": {"kind": "tiny", "miniature": True},
    "latency": {"device": "cpu-test", "repeats": 1},
    "target": {"ratio": 0.5},
    "search": {"max_iterations": 2, "train_steps": 0, "batch_size": 2, "group_size": 2},
    "evaluation": {"prompts": 2, "steps": 1, "batch_size": 4, "racing": 1},
    "seed": 0,
}


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of `diffnas ARGV` (stdout in cli.out)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    cli.out, err = capsys.readouterr()
    return code, err


@pytest.fixture(scope="module")
def env(tmp_path_factory, experiment_env):
    with experiment_env(tmp_path_factory, "pareto", EXPERIMENT) as (root, exp_file):
        yield root, exp_file


@pytest.fixture(scope="module")
def swept(env):
    root, exp_file = env
    exp = load_experiment(exp_file, **{"ray.workers": 2})
    spec = CompareSpec(default_designs(load_space("tiny")), prompts=2, noises=2, steps=1)
    result = run_sweep(exp, [0.8], 2, runs=root / "runs", name="c", progress=False, compare=spec)
    return result, json.loads((result.path / "compare.json").read_text())


def test_every_method_and_design_is_judged_per_seed(swept):
    result, compare = swept
    points = compare["points"]
    methods = {(p["method"], p["name"], p["seed"]) for p in points}
    for seed in (0, 1):
        for m in ("evolution", "optuna", "random"):
            assert (m, trial_name(0.8, seed), seed) in methods
        for d in ("bksdm_base", "bksdm_small", "bksdm_tiny", "snapgen_no_hires_attention"):
            assert ("design", d, seed) in methods
        assert ("original", "original", seed) in methods
    assert all(isinstance(p["clip"], float) and p["latency_ms"] > 0 for p in points)
    assert all(p["measured_ms"] > 0 for p in points)  # a torch table: timed whole here
    # the judging protocol: held-out prompts, the same for all, no fine-tuning
    assert compare["protocol"]["held_out"] and compare["protocol"]["noises"] == 2
    assert compare["fine_tuning"]["steps"] == 0 and "none for all" in compare["fine_tuning"]["rule"]
    # the searches within the target
    for p in points:
        if p["method"] in ("evolution", "optuna", "random"):
            assert p["latency_ms"] <= p["target_ms"] + 1e-9
    # each design's verdict is against an evolved network at most as slow, or says none is
    for v in compare["summary"]["designs"]:
        if v["against"] is not None:
            assert v["against"]["latency_ms"] <= v["latency_ms"]
            assert v["verdict"] in ("beaten", "matched", "lost")


def test_baselines_get_the_evolutions_budget(swept):
    result, compare = swept
    for seed in (0, 1):
        trial = trial_name(0.8, seed)
        budget = evaluation_budget(result.path / trial)
        assert compare["budgets"][trial] == budget
        n = budget["baseline_architectures"]
        assert n == max(1, round(budget["images"] / budget["images_per_architecture"]))
        base = result.path / "baselines" / trial
        optuna = json.loads((base / "optuna" / "result.json").read_text())
        assert optuna["iterations"] == n  # architectures the study scored
        rand = json.loads((base / "random.json").read_text())
        assert rand["asked"] == n and 1 <= rand["scored"] <= n
        assert rand["best"]["clip"] == max(d["clip"] for d in rand["draws"].values())


def test_report_of_the_sweep(swept, capsys):
    result, _ = swept
    code, _ = cli(capsys, "report", result.path)
    assert code == 0
    png = (result.path / "front.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    page = (result.path / "report.html").read_text()
    assert "front.png" in page and "bksdm_tiny" in page and "Optuna" in page
    assert "none for all" in page


def test_resume_keeps_the_judged_points(swept, env):
    result, compare = swept
    root, exp_file = env
    judged = (result.path / "judged.jsonl").read_text()
    again = run_sweep(load_experiment(exp_file), None, None, resume=result.path, progress=False)
    assert (again.path / "judged.jsonl").read_text() == judged  # nothing judged twice
    assert json.loads((again.path / "compare.json").read_text())["points"] == compare["points"]


def test_evaluation_budget_counts_raced_images(tmp_path):
    (tmp_path / "experiment.yaml").write_text(json.dumps(EXPERIMENT))  # YAML reads JSON
    history = [
        {"iteration": 0, "actions": [{}, {}, {}], "images": {"a": 1, "b": 2, "c": 1}},
        {"iteration": 1, "actions": [{}, {}], "images": None},
    ]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    budget = evaluation_budget(tmp_path)
    # 2 images per architecture: iteration 0 the base (2) + raced 4; iteration 1 all 3 × 2
    assert budget == {
        "images": 2 + 4 + 3 * 2,
        "architectures": 4 + 3,
        "images_per_architecture": 2,
        "baseline_architectures": 6,
    }


def _point(method, clip, ms, seed, name=None, target=None):
    return {"method": method, "name": name or method, "seed": seed, "clip": clip} | {
        "latency_ms": ms,
        "measured_ms": None,
        "target_ratio": target,
        "target_ms": target and 100 * target,
    }


def test_verdicts_against_the_evolved_front():
    points = []
    for seed, noise in ((0, -0.5), (1, 0.5)):
        points += [
            _point("evolution", 80 + noise, 60, seed, "t0.60", 0.6),
            _point("evolution", 75 + noise, 40, seed, "t0.40", 0.4),
            _point("optuna", 78 + noise, 59, seed, "t0.60", 0.6),
            _point("random", 70 + noise, 58, seed, "t0.60", 0.6),
            _point("design", 70 + noise, 62, seed, "fast_but_worse"),
            _point("design", 80 + noise, 61, seed, "as_good"),
            _point("design", 90 + noise, 50, seed, "better"),
            _point("design", 90 + noise, 30, seed, "faster_than_all"),
        ]
    summary = summarize(points)
    got = {v["design"]: v["verdict"] for v in summary["designs"]}
    assert got == {
        "fast_but_worse": "beaten",  # 80 vs 70 at 60 <= 62 ms: 10 / 0.71 = 14 sigma
        "as_good": "matched",
        "better": "lost",  # the evolved network as fast (40 ms) reaches 75 only
        "faster_than_all": "no evolved network as fast",
    }
    better = next(v for v in summary["designs"] if v["design"] == "better")
    assert better["against"]["target_ratio"] == 0.4
    assert better["margin"]["clip"] == pytest.approx(-15)
    versus = summary["per_target"][0]
    assert versus["evolution_minus_optuna"]["clip"] == pytest.approx(2)
    assert versus["evolution_minus_random"]["clip"] == pytest.approx(10)
    assert verdict(summary["groups"][4], [])["verdict"] == "no evolved network as fast"


# -- bad input: one clear error, exit 2, nothing written -------------------------------------


def test_a_design_of_another_space_is_refused(env, capsys):
    root, exp_file = env
    other = DESIGNS / "bksdm_base.sd15.arch.json"
    argv = ["sweep", exp_file, "--targets", "0.8", "--runs", root / "bad", "--name", "d"]
    code, err = cli(capsys, *argv, "--compare", "--design", other)
    assert code == 2 and err.startswith("error: ") and err.count("error:") == 1
    assert "is for space 'sd15', not 'tiny'" in err and str(other) in err
    assert not (root / "bad").exists()
    code, err = cli(capsys, *argv, "--design", DESIGNS / "bksdm_base.tiny.arch.json")
    assert code == 2 and "--design goes with --compare" in err


def test_targets_that_share_a_trial_name_are_refused(env, capsys):
    root, exp_file = env
    argv = ["sweep", exp_file, "--runs", root / "bad", "--compare", "--targets", "0.651,0.652"]
    code, err = cli(capsys, *argv)
    assert code == 2 and "closer than 0.01" in err
    assert not (root / "bad").exists()


def test_report_of_a_sweep_without_results(tmp_path, capsys):
    sweep = tmp_path / "s"
    (sweep / trial_name(0.5, 0)).mkdir(parents=True)  # a trial that never finished
    (sweep / "sweep_config.json").write_text(json.dumps({"targets": [0.5], "seeds": [0]}))
    before = sorted(p.name for p in sweep.rglob("*"))
    code, err = cli(capsys, "report", sweep)
    assert code == 2 and err.count("error:") == 1
    assert "no search of the sweep has finished" in err and "--resume" in err
    assert sorted(p.name for p in sweep.rglob("*")) == before  # nothing written


def test_space_show_prints_the_predicted_latency(tmp_path, capsys):
    space = load_space("sd15")
    db = tmp_path / "t.db"
    with LatencyTable(db) as table:
        table.add([measurement(s, 2.0) for s in signatures(space)])
    design = DESIGNS / "bksdm_small.sd15.arch.json"
    code, err = cli(
        capsys, "space", "show", "sd15", "--arch", design, "--device", DEVICE, "--db", db
    )
    out = cli.out
    assert code == 0, err
    assert f"predicted latency on {DEVICE}" in out and "predicted latency, bksdm_small.sd15" in out
    code, err = cli(capsys, "space", "show", "sd15", "--device", "nowhere", "--db", db)
    assert code == 2 and "no measurements for device 'nowhere'" in err


def test_sweep_targets_leave_out_extras_next_to_a_design():
    from test_eval_outcome_bench import load as load_bench

    bench = load_bench("pareto")
    ratios = {"base": 0.734, "snapgen": 0.672, "small": 0.631, "tiny": 0.605}
    # Small shares Tiny's target; 0.65 is within 0.03 of SnapGen's 0.67, the others are kept
    assert bench.design_targets(ratios) == [0.6, 0.67, 0.73]
    assert bench.sweep_targets(ratios, [0.8, 0.65, 0.5, 0.35]) == [0.8, 0.73, 0.67, 0.6, 0.5, 0.35]
    assert bench.sweep_targets(ratios, []) == [0.73, 0.67, 0.6]
