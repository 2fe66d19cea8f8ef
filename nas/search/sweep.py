"""`diffnas sweep`: one evolution per (latency target, seed), run as Ray Tune trials.

A sweep answers "what does each latency budget cost in quality?": every trial is a whole
`diffnas search` (the evolution of `nas.search.evolve`) with the experiment's target ratio and seed
replaced, in its own run directory. Ray Tune schedules the trials (one CPU each), records
which have finished, and `Tuner.restore` continues an interrupted sweep. Each trial reports
once, when its evolution has finished, with a Tune checkpoint that points at its run
directory; the progress *within* a trial lives in that run directory's own checkpoints, so a
trial cut short resumes its evolution where it stopped (`nas.search.run.run_search(resume=...)`).

    runs/<name>/
      experiment.yaml         the experiment as given (target and seed are per trial)
      experiment.hash         its content hash: --resume refuses another experiment
      sweep_config.json       targets and seeds
      target0.50-seed0/ ...   one evolution run directory per trial (docs/experiment.md)
      tune/                   Ray Tune's experiment state (what Tuner.restore reads)
      sweep.json, sweep.csv   one row per trial: target, seed, latency, CLIP, parameters
      pareto.png              predicted latency vs CLIP, the Pareto front highlighted
      front.png, report.html  `diffnas report`: the front, and with --compare the baselines
                              and hand designs beside it (search/pareto.py, search/pareto_report.py)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from latency.predict import Predictor
from nas.cluster import ENV_FORWARDED, RayCluster
from nas.experiment import Experiment, RaySpec, TargetSpec, absolute_paths
from nas.search.evolve import resolve_target
from nas.search.front import CONFIG, pareto_front, plot_pareto, trial_name, trial_row
from nas.search.pareto import CompareSpec
from search_spaces import UserError

log = logging.getLogger(__name__)

TUNE_DIR = "tune"  # Ray Tune's experiment folder inside the sweep directory
COLUMNS = [  # sweep.csv, in this order
    "trial",
    "target_ratio",
    "seed",
    "target_ms",
    "latency_ms",
    "target_met",
    "clip",
    "original_clip",
    "original_ms",
    "params",
    "iterations",
    "run_dir",
]


@dataclass
class SweepResult:
    path: Path  # the sweep directory
    rows: list[dict]  # one per trial, ordered by target (descending) then seed
    pareto: list[str]  # trial names on the Pareto front, fastest first


# -- input --------------------------------------------------------------------------------------


def parse_targets(text: str | Sequence[float]) -> list[float]:
    """`--targets 0.7,0.5,0.3`: latency targets as fractions of the original's latency."""
    how = "give fractions of the original's latency in (0, 1), e.g. --targets 0.7,0.5,0.3"
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            values = [float(t) for t in items]
        except ValueError:
            raise UserError(f"--targets {text!r}: not a list of numbers; {how}") from None
    else:
        values = [float(t) for t in text]
    if not values:
        raise UserError(f"--targets is empty; {how}")
    bad = [v for v in values if not 0 < v < 1]  # 1: the original itself, nothing to search
    if bad:
        raise UserError(f"--targets: {', '.join(map(str, bad))} out of range; {how}")
    if len(set(values)) != len(values):
        raise UserError(f"--targets {text!r}: a target is repeated; give each once")
    names = [f"{v:.2f}" for v in values]  # a trial is named by its target to 0.01
    if len(set(names)) != len(names):
        raise UserError(
            f"--targets {text!r}: targets closer than 0.01 share a trial name; give targets "
            "at least 0.01 apart"
        )
    return sorted(values, reverse=True)


def local_cpus() -> int:
    """CPUs this process may run on (a `taskset` or a container's CPU set counts)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# -- one trial ----------------------------------------------------------------------------------


def _run_trial(config: dict, experiment: dict, env: dict[str, str]) -> None:
    """A Tune trial: the evolution of one (target, seed) in its own run directory."""
    import torch
    from ray import tune

    from nas.search.run import run_search

    os.environ.update(env)  # where the driver's worlds and tables are cached
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # one CPU per trial: the trials are the parallelism
    sweep = Path(config["sweep_dir"])
    exp = trial_experiment(Experiment.model_validate(experiment), config["target"], config["seed"])
    compare = json.loads((sweep / CONFIG).read_text()).get("compare")
    name = trial_name(config["target"], config["seed"])
    run_dir = sweep / name
    if (run_dir / "result.json").is_file():
        pass  # finished before the sweep was stopped, but after Tune last saved its state
    elif (run_dir / "experiment.hash").is_file():
        run_search(exp, resume=run_dir, progress=False)  # the evolution's own resume
    else:
        run_search(exp, runs=sweep, name=name, progress=False)
    if compare is not None:  # Optuna and random search at this evolution's budget
        from nas.search.pareto import run_baselines

        run_baselines(exp, sweep, name)
    row = trial_row(run_dir, config["target"], config["seed"], sweep)
    with tempfile.TemporaryDirectory() as tmp:
        # the checkpoint marks the trial done and points at its run directory (which holds
        # the supernet checkpoints: copying them into Tune's storage would only double them)
        (Path(tmp) / "run.json").write_text(json.dumps({**row, "run_dir": str(run_dir)}))
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(tmp))


def trial_experiment(exp: Experiment, target: float, seed: int) -> Experiment:
    """The experiment of one trial: its target and seed; its actions scored in process (the
    sweep's parallelism is its trials)."""
    return exp.model_copy(
        update={"target": TargetSpec(ratio=target), "seed": seed, "ray": RaySpec()}
    )


# -- the sweep ------------------------------------------------------------------------------------


def run_sweep(
    exp: Experiment,
    targets: Sequence[float] | str | None,
    seeds: int | None = 1,
    runs: Path = Path("runs"),
    name: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
    compare: CompareSpec | None = None,
) -> SweepResult:
    """Run (or, with `resume`, continue) the sweep of `exp` over targets × seeds.

    `seeds` = n runs seeds exp.seed, exp.seed + 1, ..., exp.seed + n - 1 for every target.
    On resume, `targets` and `seeds` may be left out (None): the sweep's own are used.
    `exp.ray` says where the trials run: `workers` trials at a time (one CPU each, or one
    GPU each on a cluster with GPUs), on a local Ray instance or the cluster at `address`.
    `compare` (nas.search.pareto): also run Optuna and random search at each evolution's budget and
    judge them, the space's hand designs and the original on held-out prompts (a sweep's
    own setting: on resume, leave it out or give the same).
    """
    from ray import tune

    if resume is not None:
        path = Path(resume)
        config = _check_resume(path, exp, targets, seeds, compare)
    else:
        if seeds is None or seeds < 1:
            raise UserError(f"--seeds {seeds}: give at least 1")
        config = {"targets": parse_targets(targets), "seeds": [exp.seed + i for i in range(seeds)]}
        if compare is not None:
            compare.check()
            config["compare"] = asdict(compare)
        path = runs / (name or f"{exp.name}-sweep")
        if path.exists() and any(path.iterdir()):
            raise UserError(
                f"sweep directory {path} exists; resume it with --resume {path}, or choose "
                "another --name"
            )
    path = path.resolve()
    _prepare(exp, config, progress)
    if resume is None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "experiment.yaml").write_text(
            yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
        )
        (path / "experiment.hash").write_text(exp.content_hash() + "\n")
        (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    cluster = RayCluster.connect(exp.ray)  # refuses a bad address or too few CPUs/GPUs
    try:
        env = {k: os.environ[k] for k in ENV_FORWARDED if k in os.environ}
        trial = tune.with_parameters(
            _run_trial, experiment=absolute_paths(exp).model_dump(mode="json"), env=env
        )
        trainable = tune.with_resources(trial, {"gpu": 1} if cluster.use_gpu else {"cpu": 1})
        if tune.Tuner.can_restore(str(path / TUNE_DIR)):
            # finished trials are kept; unfinished and failed ones run again, and resume
            # their run directories (a failed trial "restarts" in Tune's terms only)
            tuner = tune.Tuner.restore(
                str(path / TUNE_DIR), trainable, resume_unfinished=True, restart_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "sweep_dir": str(path),
                    "target": tune.grid_search(config["targets"]),
                    "seed": tune.grid_search(config["seeds"]),
                },
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=exp.ray.workers,
                    trial_dirname_creator=_tune_dirname,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR,
                    storage_path=str(path),
                    verbose=1 if progress else 0,
                    # a trial whose worker died runs once more: it resumes its run directory
                    failure_config=tune.FailureConfig(max_failures=1),
                ),
            )
        grid = tuner.fit()
    finally:
        cluster.close()
    failed = [r for r in grid if r.error is not None]
    if failed:
        names = ", ".join(trial_name(r.config["target"], r.config["seed"]) for r in failed)
        lines = [line for line in str(failed[0].error).splitlines() if line.strip()]
        raise UserError(
            f"{len(failed)} trial(s) of the sweep failed ({names}); the first: {lines[-1]}\n"
            f"the finished ones are kept; continue the sweep with --resume {path}"
        )
    unfinished = [
        trial_name(t, s)
        for t in config["targets"]
        for s in config["seeds"]
        if not (path / trial_name(t, s) / "result.json").is_file()
    ]
    if unfinished:  # Tune was interrupted (Ctrl-C): it saved its state for a resume
        raise UserError(
            f"the sweep stopped with {len(unfinished)} unfinished trial(s) "
            f"({', '.join(unfinished)}); continue it with --resume {path}"
        )
    result = summarize(path, progress)
    if config.get("compare") is not None:
        from nas.search.pareto import judge_sweep

        judge_sweep(exp, path, progress)
    from nas.search.pareto_report import write_sweep_report

    report = write_sweep_report(path)
    if progress:
        print(f"report: {report}")
    return result


def _tune_dirname(trial) -> str:
    return trial_name(trial.config["target"], trial.config["seed"])


def _check_resume(path: Path, exp: Experiment, targets, seeds, compare) -> dict:
    stored = path / "experiment.hash"
    if not (path / CONFIG).is_file() or not stored.is_file():
        raise UserError(f"{path} is not a diffnas sweep directory (no {CONFIG})")
    if stored.read_text().strip() != exp.content_hash():
        raise UserError(
            f"{path} is a sweep of another experiment (its experiment.yaml differs from this "
            "one); resume with the same experiment file, or start a new --name"
        )
    config = json.loads((path / CONFIG).read_text())
    if targets is not None and parse_targets(targets) != config["targets"]:
        raise UserError(
            f"{path} sweeps targets {config['targets']}; resume it without --targets (or with "
            "the same ones), or start a new sweep with --name"
        )
    if seeds is not None and seeds != len(config["seeds"]):
        raise UserError(f"{path} sweeps {len(config['seeds'])} seed(s); resume it with those")
    if compare is not None and asdict(compare) != config.get("compare"):
        raise UserError(
            f"{path} was started {'with other' if config.get('compare') else 'without'} "
            "--compare settings; resume it without them (its own are kept), or start a new "
            "sweep with --name"
        )
    return config


def _prepare(exp: Experiment, config: dict, progress: bool) -> None:
    """Before any trial starts: measure the latency table and build a tiny world once
    (instead of every trial at the same time), and refuse targets the space cannot reach
    and hand designs of another space."""
    from nas.search.run import experiment_space, latency_table, open_world

    space = experiment_space(exp)
    targets = config["targets"]
    if config.get("compare") is not None:
        from nas.search.pareto import check_designs

        check_designs(space, config["compare"]["designs"].values())
    table = latency_table(exp, space, progress)
    try:
        predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
        for ratio in targets:
            resolve_target(trial_experiment(exp, ratio, exp.seed), space, predictor)
    finally:
        table.close()
    if exp.world.kind == "tiny":  # a Stable Diffusion world is read from files, not built
        open_world(exp, space, progress)


# -- results --------------------------------------------------------------------------------------


def summarize(path: Path, progress: bool = True) -> SweepResult:
    """sweep.json, sweep.csv and pareto.png of a finished sweep directory; prints the table."""
    config = json.loads((path / CONFIG).read_text())
    rows = [
        trial_row(path / trial_name(t, s), t, s, path)
        for t in config["targets"]
        for s in config["seeds"]
    ]
    points = [(r["latency_ms"], r["clip"]) for r in rows]
    front = [rows[i]["trial"] for i in pareto_front(points)]
    for r in rows:
        r["pareto"] = r["trial"] in front
    (path / "sweep.json").write_text(
        json.dumps({**config, "trials": rows, "pareto_front": front}, indent=2) + "\n"
    )
    with open(path / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "pareto"])
        writer.writeheader()
        writer.writerows(rows)
    plot_pareto(
        points,
        path / "pareto.png",
        f"sweep {path.name}: {len(rows)} evolution(s)",
        labels=[
            f"{r['target_ratio']:.2f}/s{r['seed']}" + ("" if r["target_met"] else " (missed)")
            for r in rows
        ],
        targets_ms=sorted({r["target_ms"] for r in rows}),
        original=(rows[0]["original_ms"], rows[0]["original_clip"]),
    )
    if progress:
        print_table(rows, path)
    return SweepResult(path, rows, front)


def print_table(rows: list[dict], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {path.name}")
    for column in ["target", "seed", "target ms", "latency ms", "met", "CLIP", "params", "front"]:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r['target_ratio']:.2f}",
            str(r["seed"]),
            f"{r['target_ms']:.2f}",
            f"{r['latency_ms']:.2f}",
            "yes" if r["target_met"] else "no",
            f"{r['clip']:.2f}",
            f"{r['params'] / 1e6:.2f}M",
            "*" if r["pareto"] else "",
        )
    Console().print(table)
    print(f"results: {path / 'sweep.csv'}, {path / 'sweep.json'}; plot: {path / 'pareto.png'}")
