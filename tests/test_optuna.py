"""`diffnas search --strategy optuna` on a miniature tiny world: the study's results, legal
architectures, the final one within the target, a study continued through its storage, a
run resumed after a kill, trials on Ray Tune, and bad input."""

import json
import os

import optuna
import pytest

from nas.cli import main
from nas.experiment import load_experiment
from nas.search.evaluate import Evaluator
from nas.search.front import pareto_front
from nas.search.optuna import RUN_FILE, run_optuna
from nas.search.run import run_search
from search_spaces import Architecture, UserError, load_space

SECTIONS = {
    "search": {"max_iterations": 1, "train_steps": 0, "batch_size": 2},
    # four prompts: the miniature world's CLIP scores some of them above zero, so the scores
    # differ between architectures
    "evaluation": {"prompts": 4, "steps": 2, "batch_size": 4},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory, experiment_env, mini_experiment):
    experiment = mini_experiment(**SECTIONS)
    with experiment_env(tmp_path_factory, "optuna", experiment) as (root, exp_file):
        yield root, exp_file, f"sqlite:///{root / 'study.db'}"


@pytest.fixture(scope="module")
def first(env):
    root, exp_file, url = env
    exp = load_experiment(exp_file)
    return run_optuna(exp, 5, runs=root / "runs", name="first", storage=url, progress=False)


def _arch(space, multiplicity):
    return Architecture(space.name, {p: multiplicity.get(p, 1) for p in space.slots})


def _scored(report, run_id=None):
    return [
        t
        for t in report["trials"]
        if t["state"] == "complete"
        and t["duplicate_of"] is None
        and (run_id is None or t["run"] == run_id)
    ]


def test_study_writes_its_results(first):
    run = first.run_dir
    for name in ["experiment.yaml", "experiment.hash", "space.json", "table.json", RUN_FILE]:
        assert (run / name).is_file(), name
    for name in ["optuna.json", "pareto.png", "final.arch.json", "result.json"]:
        assert (run / name).is_file(), name
    report = json.loads((run / "optuna.json").read_text())
    result = json.loads((run / "result.json").read_text())
    run_id = json.loads((run / RUN_FILE).read_text())["run_id"]
    space, target = load_space("tiny"), report["target_ms"]
    scored = _scored(report, run_id)
    assert len(scored) == 5 == result["iterations"] == first.iterations
    assert [t["start"] for t in report["trials"][:2]] == ["original", "smallest"]
    assert _arch(space, report["trials"][0]["multiplicity"]) == space.original()
    for t in report["trials"]:  # every scored architecture is legal; pruned ones are not
        arch = _arch(space, t["multiplicity"])
        if t["state"] == "complete":
            space.validate(arch)
            assert t["constraints"]["latency"] == pytest.approx(t["latency_ms"] - target)
        else:
            assert t["state"] == "pruned" and t["violations"] == space.violations(arch)
            assert t["constraints"]["rules"] == len(t["violations"]) > 0
    # the final architecture is the best-CLIP one within the target
    final = Architecture.load(run / "final.arch.json")
    space.validate(final)
    feasible = [t for t in scored if t["latency_ms"] <= target]
    best = max(feasible, key=lambda t: t["clip"])
    assert final == _arch(space, best["multiplicity"]) and result["trial"] == best["number"]
    assert result["latency_ms"] <= result["target_ms"] == target and result["target_met"]
    assert first.clip == best["clip"] and result["original_clip"] == scored[0]["clip"]
    # the Pareto front: the feasible architectures no other feasible one beats
    points = [(t["latency_ms"], t["clip"]) for t in feasible]
    expected = {feasible[i]["arch_hash"] for i in pareto_front(points)}
    by_number = {t["number"]: t for t in report["trials"]}
    assert {by_number[n]["arch_hash"] for n in report["pareto_front"]} == expected
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_run_with_the_same_storage_continues_the_study(env, first):
    root, exp_file, url = env
    before = json.loads((first.run_dir / "optuna.json").read_text())["trials"]
    exp = load_experiment(exp_file)
    second = run_optuna(exp, 3, runs=root / "runs", name="second", storage=url, progress=False)
    report = json.loads((second.run_dir / "optuna.json").read_text())
    run_id = json.loads((second.run_dir / RUN_FILE).read_text())["run_id"]
    study = optuna.load_study(study_name="mini", storage=url)
    assert len(report["trials"]) == len(study.trials) > len(before)
    assert report["trials"][: len(before)] == before  # the first run's trials, kept
    new = [t for t in report["trials"] if t["run"] == run_id]
    assert min(t["number"] for t in new) == len(before)  # numbering continues
    assert len(_scored(report, run_id)) == 3 and not any(t["start"] for t in new)
    assert second.clip >= first.clip  # the best of a larger study


def test_resume_after_a_kill_finishes_the_run(env, monkeypatch):
    root, exp_file, _ = env
    real, calls = Evaluator.clip_score, []

    def killed_at_the_third(self, arch):
        calls.append(arch)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies while scoring
        return real(self, arch)

    monkeypatch.setattr(Evaluator, "clip_score", killed_at_the_third)
    exp = load_experiment(exp_file)
    with pytest.raises(KeyboardInterrupt):
        run_optuna(exp, 4, runs=root / "runs", name="killed", progress=False)
    monkeypatch.setattr(Evaluator, "clip_score", real)
    run = root / "runs" / "killed"
    assert not (run / "result.json").exists()
    resumed = run_optuna(exp, resume=run, progress=False)
    report = json.loads((run / "optuna.json").read_text())
    assert resumed.iterations == 4 == len(_scored(report))
    assert [t["state"] for t in report["trials"]].count("fail") == 1  # the one cut short
    stamp = os.stat(run / "optuna.json").st_mtime_ns
    again = run_optuna(exp, resume=run, progress=False)  # finished: nothing is redone
    assert again.arch == resumed.arch and os.stat(run / "optuna.json").st_mtime_ns == stamp


def test_trials_on_ray_tune_score_as_in_process(env, first):
    root, exp_file, _ = env
    exp = load_experiment(exp_file, **{"ray.workers": 2})
    on_ray = run_optuna(exp, 3, runs=root / "runs", name="ray", progress=False)
    report = json.loads((on_ray.run_dir / "optuna.json").read_text())
    assert len(_scored(report)) == 3 and list((on_ray.run_dir / "tune").iterdir())
    here = {
        t["arch_hash"]: t["clip"]
        for t in _scored(json.loads((first.run_dir / "optuna.json").read_text()))
    }
    common = [t for t in _scored(report) if t["arch_hash"] in here]
    assert len(common) >= 2  # the original and the smallest network start both studies
    for t in common:
        assert t["clip"] == pytest.approx(here[t["arch_hash"]], abs=1e-5)


def test_bad_input_is_refused_and_nothing_is_overwritten(env, first, capsys):
    root, exp_file, url = env
    exp = load_experiment(exp_file)
    trials = len(optuna.load_study(study_name="mini", storage=url).trials)
    with pytest.raises(UserError, match="--trials 0: give at least 1"):
        run_optuna(exp, 0, runs=root / "runs", name="zero")
    other = load_experiment(exp_file, **{"target.ratio": 0.9})
    with pytest.raises(UserError, match="study 'mini' is of another experiment"):
        run_optuna(other, 2, runs=root / "runs", name="other", storage=url, progress=False)
    assert not (root / "runs" / "other").exists()
    assert len(optuna.load_study(study_name="mini", storage=url).trials) == trials
    for bad in ["nonsense://x", f"sqlite:///{root / 'missing' / 'dir' / 'study.db'}"]:
        with pytest.raises(UserError, match="Optuna cannot open it"):
            run_optuna(exp, 2, runs=root / "runs", name="bad", storage=bad, progress=False)
    with pytest.raises(UserError, match="exists; resume it with --resume"):
        run_optuna(exp, 2, runs=root / "runs", name="first", progress=False)
    with pytest.raises(UserError, match="is a run of --strategy optuna"):
        run_search(exp, resume=first.run_dir, progress=False)  # not an evolution to resume
    with pytest.raises(UserError, match="not a run of --strategy optuna"):
        (root / "runs" / "evo").mkdir()
        (root / "runs" / "evo" / "experiment.hash").write_text(exp.content_hash() + "\n")
        run_optuna(exp, 2, resume=root / "runs" / "evo", progress=False)
    runs = ["--runs", str(root / "cli-runs")]
    for argv, message in [
        (["--strategy", "random"], "--strategy 'random': choose evolution or optuna"),
        (["--strategy", "optuna", "--trials", "0"], "--trials 0: give at least 1"),
        (["--trials", "3"], "options of --strategy optuna"),
        (["--storage", url], "options of --strategy optuna"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["search", str(exp_file), *runs, *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err
