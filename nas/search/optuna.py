"""The Optuna strategy: `diffnas search EXPERIMENT --strategy optuna [--trials N]`.

Instead of evolving one architecture action by action, an Optuna study samples whole
architectures of the same space and scores each on the supernet with the evolution's
`Evaluator` and protocol (same prompts, same initial noises): one trial, one architecture.

    parameters    one integer per searchable slot: its multiplicity, from 0 (removable
                  slots) or 1 up to 1 + max_copies; slots with one choice are not parameters
    objectives    CLIP score (maximised) and predicted latency (minimised, from the table)
    constraints   "rules": how many of the space's rules the sample breaks (stage minimums,
                  max_params...); "latency": predicted latency - target (feasible when <= 0)

The sampler is Optuna's TPE (multi-objective, with constraints), not NSGA-II: a supernet
affords tens to hundreds of scored architectures, and NSGA-II's first generation alone is
that many random samples (population 50), while TPE models good and bad regions from its
first ten. Latency is both a constraint and an objective: the constraint keeps the sampler
near the target, where the result is judged; the objective keeps a front of trade-offs
below it.

Samples that break the space's rules are pruned before any scoring (recorded with their
violations, infeasible for TPE, so it learns to avoid them); a sample of an architecture
the study has scored already is completed with the stored scores (scoring is deterministic
on a fixed supernet). So `--trials N` is N architectures scored. A new study starts with
two known points: the original network (the reference) and the space's near-smallest
network (always within a reachable target, so the study has a feasible trial).

Unlike the evolution, the supernet is not trained during the study: every architecture is
scored on the world's supernet, trained robustly once (one-shot weight sharing).

With `ray.workers > 1` or a cluster address, trials run in parallel on Ray Tune through its
`OptunaSearch` (one CPU or GPU per trial); otherwise in this process. The study lives in an
RDB storage (`--storage URL`; default the run directory's study.db): a second run with the
same storage and experiment continues the study.

The run directory (docs/distributed.md): experiment.yaml, experiment.hash, space.json,
table.json (as the evolution's), optuna_run.json (storage, study, trials asked), then at
the end optuna.json (every trial of the study, the Pareto front), pareto.png,
final.arch.json (the best-CLIP architecture within the target) and result.json.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch
from tqdm.auto import tqdm

from latency.predict import Predictor
from nas.experiment import Experiment, absolute_paths
from nas.search.evolve import RunDir, SearchResult, resolve_target, smallest_latency
from nas.search.optuna_study import (
    DEFAULT_TRIALS,
    METRICS,
    MODES,
    RUN_FILE,
    StudySpace,
    finish,
    make_sampler,
    open_study,
    scored_in_run,
    stored_result,
)
from search_spaces import Architecture, UserError

log = logging.getLogger(__name__)


def run_optuna(
    exp: Experiment,
    trials: int | None = None,
    runs: Path = Path("runs"),
    name: str | None = None,
    resume: Path | None = None,
    storage: str | None = None,
    progress: bool = True,
) -> SearchResult:
    """Score `trials` architectures of `exp`'s space in an Optuna study (or, with `resume`,
    finish a run that was cut short) and write the run directory."""
    from nas.search.run import experiment_space, latency_table, open_world

    if trials is not None and trials < 1:
        raise UserError(f"--trials {trials}: give at least 1 (architectures to score)")
    space = experiment_space(exp)
    if resume is not None:
        run = RunDir(Path(resume))
        run.check_same(exp)
        if not (run.path / RUN_FILE).is_file():
            raise UserError(f"{run.path} is not a run of --strategy optuna (no {RUN_FILE})")
        info = json.loads((run.path / RUN_FILE).read_text())
        if storage is not None and storage != info["storage"]:
            raise UserError(f"{run.path} keeps its study in {info['storage']}; resume it there")
        info["trials"] = trials or info["trials"]
    else:
        run = RunDir(runs / (name or exp.name))
        if run.path.exists() and any(run.path.iterdir()):
            raise UserError(
                f"run directory {run.path} exists; resume it with --resume {run.path}, or "
                "choose another --name"
            )
        info = {
            "strategy": "optuna",
            "storage": storage or f"sqlite:///{run.path.resolve() / 'study.db'}",
            "study": exp.name,
            "trials": trials or DEFAULT_TRIALS,
            "run_id": uuid.uuid4().hex,
        }
    if (run.path / "result.json").is_file():  # finished: nothing to do
        return stored_result(run.path)

    sampler = make_sampler(exp.seed)
    study = None
    table = latency_table(exp, space, progress)
    try:
        predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
        target = resolve_target(exp, space, predictor)
        if resume is None:
            if storage is not None:  # refuse another experiment's study before writing
                study, rdb = open_study(info["storage"], exp, sampler)
            _create_run_dir(run, exp, space, table, predictor)
            (run.path / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    finally:
        table.close()
    if study is None:
        study, rdb = open_study(info["storage"], exp, sampler)

    study_space = StudySpace(space, predictor, target, info["run_id"])
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("run") == info["run_id"]:  # cut short by a kill: never told
            study.tell(t.number, state=TrialState.FAIL)
    if not study.trials:  # a new study starts from the two ends of the space
        study.enqueue_trial(study_space.params(space.original()), user_attrs={"start": "original"})
        smallest, _ = smallest_latency(space, predictor)
        study.enqueue_trial(study_space.params(smallest), user_attrs={"start": "smallest"})

    done = scored_in_run(study, info["run_id"])
    if done < info["trials"]:
        if exp.ray.enabled:
            if exp.world.kind == "tiny":  # built once here, not by every worker at once
                open_world(exp, space, progress)
            _run_on_ray(exp, study, study_space, rdb, info, run.path, progress)
        else:
            world = open_world(exp, space, progress)
            _run_here(exp, world, study, study_space, info, done, progress)
    done = scored_in_run(study, info["run_id"])
    if done < info["trials"]:
        raise UserError(
            f"the study stopped after {done} of {info['trials']} architectures; continue "
            f"with --resume {run.path}"
        )
    return finish(run.path, study, study_space, info, done)


def _create_run_dir(run: RunDir, exp, space, table, predictor) -> None:
    from latency.signature import unet_parts

    s = predictor.setting
    used = table.lookup(
        exp.latency.device,
        [p.signature for p in unet_parts(space, s["precision"])],
        backend=s["backend"],
        compute_unit=s["compute_unit"],
        precision=s["precision"],
    )
    run.create(exp, space, [m.to_dict() for m in used.values()])


def _run_here(exp, world, study, study_space: StudySpace, info: dict, done: int, progress):
    """The study in this process: ask, score on the supernet, tell."""
    from nas.search.run import make_evaluator

    evaluator = make_evaluator(exp, world)
    with tqdm(
        total=info["trials"], initial=done, desc="optuna: architectures", disable=not progress
    ) as bar:
        while done < info["trials"]:
            trial, arch, ms = study_space.draw(study)
            clip = evaluator.clip_score(arch)
            study.tell(trial, [clip, ms])
            done += 1
            bar.update()
            log.info("trial %d: %.2f ms, CLIP %.2f", trial.number, ms, clip)


# -- parallel trials on Ray Tune --------------------------------------------------------------


class ArchitectureSearch(OptunaSearch):
    """Ray Tune's OptunaSearch over a `StudySpace`: each Tune trial gets an architecture the
    study has not scored yet; illegal and repeated samples are settled in the driver
    (`StudySpace.draw`) and never reach a worker. The trial reports the two objectives and
    `OptunaSearch.on_trial_complete` tells the study."""

    def __init__(self, study_space: StudySpace, study_name: str, storage, sampler):
        super().__init__(
            space=study_space.suggest,
            metric=METRICS,
            mode=MODES,
            sampler=sampler,
            study_name=study_name,
            storage=storage,
        )
        self.study_space = study_space

    def suggest(self, trial_id: str) -> dict:
        # replaces OptunaSearch.suggest (one ask per Tune trial) with asks until a legal, new
        # architecture; the trial goes where on_trial_complete looks for it
        trial, arch, ms = self.study_space.draw(self._ot_study)
        self._ot_trials[trial_id] = trial
        return {"number": trial.number, "multiplicity": dict(arch.multiplicity), "ms": ms}


_EVALUATORS: dict = {}  # experiment hash -> Evaluator, per worker process (actors are reused)


def _score_trial(config: dict, experiment: dict, env: dict[str, str], gpu: bool) -> None:
    """A Tune trial: the CLIP score of one architecture, on the world's supernet."""
    import torch
    from ray import tune

    from nas.search.run import open_evaluator

    os.environ.update(env)
    if not gpu:
        torch.set_num_threads(1)  # one CPU per trial: the trials are the parallelism
    exp = Experiment.model_validate(experiment)
    key = exp.content_hash()
    if key not in _EVALUATORS:
        evaluator = open_evaluator(exp)
        _EVALUATORS[key] = evaluator.to("cuda") if gpu else evaluator
    evaluator = _EVALUATORS[key]
    arch = Architecture(evaluator.supernet.space.name, config["multiplicity"])
    tune.report({"clip": evaluator.clip_score(arch), "latency_ms": config["ms"]})


def _run_on_ray(exp, study, study_space, storage, info, run_path: Path, progress) -> None:
    """The study's next trials as Ray Tune trials, `exp.ray.workers` at a time."""
    from ray import tune

    from nas.cluster import ENV_FORWARDED, RayCluster

    remaining = info["trials"] - scored_in_run(study, info["run_id"])
    cluster = RayCluster.connect(exp.ray)  # refuses a bad address or too few CPUs/GPUs
    try:
        env = {k: os.environ[k] for k in ENV_FORWARDED if k in os.environ}
        trial = tune.with_parameters(
            _score_trial,
            experiment=absolute_paths(exp).model_dump(mode="json"),
            env=env,
            gpu=cluster.use_gpu,
        )
        sampler = make_sampler(exp.seed)
        searcher = ArchitectureSearch(study_space, study.study_name, storage, sampler)
        tuner = tune.Tuner(
            tune.with_resources(trial, {"gpu": 1} if cluster.use_gpu else {"cpu": 1}),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=remaining,
                max_concurrent_trials=exp.ray.workers,
                reuse_actors=True,  # a worker keeps its world and evaluator between trials
            ),
            run_config=tune.RunConfig(
                name=f"tune-{len(study.trials)}",  # one folder per continuation of the study
                storage_path=str((run_path / "tune").resolve()),
                verbose=1 if progress else 0,
            ),
        )
        grid = tuner.fit()
    finally:
        cluster.close()
    failed = [r for r in grid if r.error is not None]
    if failed:
        lines = [line for line in str(failed[0].error).splitlines() if line.strip()]
        raise UserError(
            f"{len(failed)} trial(s) failed; the first: {lines[-1]}\n"
            f"the scored ones are kept in the study; continue with --resume {run_path}"
        )


__all__ = ["RUN_FILE", "run_optuna"]
