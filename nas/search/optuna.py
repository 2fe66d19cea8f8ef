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

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search.optuna import OptunaSearch
from tqdm.auto import tqdm

from latency.predict import Predictor
from nas.experiment import Experiment
from nas.search.evolve import RunDir, SearchResult, resolve_target, smallest_latency
from nas.search.sweep import absolute_paths, plot_pareto
from search_spaces import Architecture, SearchSpace, UserError

log = logging.getLogger(__name__)

METRICS, MODES = ["clip", "latency_ms"], ["max", "min"]  # the objectives, in Tune's terms
DIRECTIONS = ["maximize", "minimize"]  # ... and in Optuna's
STUDY_HASH = "diffnas_experiment"  # study user attribute: the experiment's content hash
RUN_FILE = "optuna_run.json"
DEFAULT_TRIALS = 40
MAX_DRAWS = 1000  # consecutive illegal or already-scored samples before giving up
STARTUP_TRIALS = 10  # TPE's random trials before it models the results


class StudySpace:
    """A search space as Optuna parameters, and the drawing of legal, new architectures."""

    def __init__(self, space: SearchSpace, predictor: Predictor, target_ms: float, run_id: str):
        self.space, self.predictor = space, predictor
        self.target_ms = target_ms  # feasible: predicted latency <= target
        self.run_id = run_id  # tags this run's trials (a storage may hold other runs')
        self.ranges = {  # slot -> (fewest, most) blocks; slots with one choice are left out
            path: (0 if slot.removable else 1, 1 + slot.max_copies)
            for path, slot in space.slots.items()
            if slot.removable or slot.max_copies > 0
        }

    def suggest(self, trial: optuna.Trial) -> dict[str, int]:
        """The define-by-run space: one multiplicity per searchable slot."""
        return {path: trial.suggest_int(path, lo, hi) for path, (lo, hi) in self.ranges.items()}

    def architecture(self, params: dict[str, int]) -> Architecture:
        return Architecture(self.space.name, {p: params.get(p, 1) for p in self.space.slots})

    def params(self, arch: Architecture) -> dict[str, int]:
        return {path: arch[path] for path in self.ranges}

    def draw(self, study: optuna.Study) -> tuple[optuna.Trial, Architecture, float]:
        """Ask the study until it proposes a legal architecture it has not scored yet; tell it
        about the others at once (illegal: pruned; scored already: the stored values)."""
        for _ in range(MAX_DRAWS):
            trial = study.ask()
            arch = self.architecture(self.suggest(trial))
            trial.set_user_attr("run", self.run_id)
            problems = self.space.violations(arch)
            trial.set_constraint("rules", float(len(problems)))
            if problems:
                trial.set_user_attr("violations", problems)
                study.tell(trial, state=TrialState.PRUNED)
                continue
            ms = self.predictor.predict(arch).total_ms
            trial.set_constraint("latency", ms - self.target_ms)
            trial.set_user_attr("arch_hash", arch.hash)
            trial.set_user_attr("latency_ms", ms)
            earlier = scored(study).get(arch.hash)
            if earlier is not None:
                trial.set_user_attr("duplicate_of", earlier.number)
                study.tell(trial, earlier.values)
                continue
            return trial, arch, ms
        raise UserError(
            f"the study proposed {MAX_DRAWS} illegal or already scored architectures in a row; "
            f"space {self.space.name!r} may be nearly exhausted, or its rules too tight for "
            "independent per-slot sampling"
        )


def scored(study: optuna.Study) -> dict[str, FrozenTrial]:
    """arch hash -> the trial that scored it."""
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "arch_hash" in t.user_attrs and "duplicate_of" not in t.user_attrs:
            out.setdefault(t.user_attrs["arch_hash"], t)
    return out


def scored_in_run(study: optuna.Study, run_id: str) -> int:
    """Architectures scored by this run (a shared storage holds other runs' trials too)."""
    return sum(t.user_attrs.get("run") == run_id for t in scored(study).values())


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    # constant_liar (the default): parallel trials see the running ones as bad, so Ray's
    # workers are not all handed the same region
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=STARTUP_TRIALS)


def open_study(url: str, exp: Experiment, sampler: optuna.samplers.BaseSampler):
    """The experiment's study in `url` (created if absent); refuses another experiment's."""
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as e:  # a malformed URL, a missing folder, a driver not installed...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"--storage {url!r}: Optuna cannot open it ({reason}); give a database URL such "
            "as sqlite:///study.db (its folder must exist)"
        ) from None
    if exp.name in optuna.study.get_all_study_names(storage):
        study = optuna.load_study(study_name=exp.name, storage=storage, sampler=sampler)
        stored = study.user_attrs.get(STUDY_HASH)
        if stored != exp.content_hash():
            raise UserError(
                f"--storage {url}: its study {exp.name!r} is of another experiment (experiment "
                f"hash {stored or 'none'}, this one {exp.content_hash()}); continue it with the "
                "same experiment file and flags, or give another --storage (or experiment name)"
            )
        if [d.name.lower() for d in study.directions] != DIRECTIONS:
            raise UserError(f"--storage {url}: study {exp.name!r} has other objectives")
    else:
        study = optuna.create_study(
            study_name=exp.name, storage=storage, sampler=sampler, directions=DIRECTIONS
        )
        study.set_user_attr(STUDY_HASH, exp.content_hash())
    return study, storage


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
        return _stored_result(run.path)

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
    return _finish(run.path, study, study_space, info, done)


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


# -- results ------------------------------------------------------------------------------------


def _record(t: FrozenTrial) -> dict:
    a = t.user_attrs
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "multiplicity": t.params,
        "clip": t.values[0] if t.values else None,
        "latency_ms": a.get("latency_ms"),
        "constraints": t.constraints,
        "arch_hash": a.get("arch_hash"),
        "duplicate_of": a.get("duplicate_of"),
        "violations": a.get("violations", []),
        "start": a.get("start"),
        "run": a.get("run"),
    }


def _finish(path: Path, study, study_space: StudySpace, info: dict, done: int) -> SearchResult:
    space, target = study_space.space, study_space.target_ms
    unique = list(scored(study).values())
    feasible = [t for t in unique if t.user_attrs["latency_ms"] <= target]
    if not feasible:
        fastest = min(t.user_attrs["latency_ms"] for t in unique)
        raise UserError(
            f"none of the {len(unique)} scored architectures meets the target {target:.2f} ms "
            f"(the fastest: {fastest:.2f} ms); continue the study with more trials: --resume "
            f"{path} --trials {2 * info['trials']}"
        )
    best = max(feasible, key=lambda t: (t.values[0], -t.values[1]))
    arch = study_space.architecture(best.params)
    front = sorted(
        {t.user_attrs["arch_hash"]: t for t in study.best_trials}.values(),
        key=lambda t: t.values[1],
    )
    original = next((t for t in unique if t.user_attrs.get("start") == "original"), None)
    report = {
        "study": study.study_name,
        "storage": _safe_url(info["storage"]),
        "sampler": "TPESampler(multivariate, constraints: rules, latency <= target)",
        "objectives": dict(zip(METRICS, DIRECTIONS, strict=True)),
        "target_ms": target,
        "trials_in_study": len(study.trials),
        "scored_in_run": done,
        "best": best.number,
        "pareto_front": [t.number for t in front],
        "trials": [_record(t) for t in study.get_trials(deepcopy=False)],
    }
    (path / "optuna.json").write_text(json.dumps(report, indent=1) + "\n")
    points = [(t.values[1], t.values[0]) for t in unique]
    on_front = {t.number for t in front}
    plot_pareto(
        points,
        path / "pareto.png",
        f"Optuna study {study.study_name}: {len(unique)} architectures",
        targets_ms=[target],
        original=(original.values[1], original.values[0]) if original else None,
        front=[i for i, t in enumerate(unique) if t.number in on_front],
    )
    arch.save(path / "final.arch.json")
    result = {
        "strategy": "optuna",
        "arch_hash": arch.hash,
        "trial": best.number,
        "latency_ms": best.values[1],
        "target_ms": target,
        "target_met": True,
        "clip": best.values[0],
        "original_clip": original.values[0] if original else None,
        "original_ms": study_space.predictor.predict(space.original()).total_ms,
        "iterations": done,  # architectures scored by this run
        "counts": {"original": space.counts(space.original()), "found": space.counts(arch)},
        "params": {"original": space.params(space.original()), "found": space.params(arch)},
    }
    (path / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return _stored_result(path)


def _stored_result(path: Path) -> SearchResult:
    result = json.loads((path / "result.json").read_text())
    arch = Architecture.load(path / "final.arch.json")
    return SearchResult(
        arch,
        result["latency_ms"],
        result["target_ms"],
        result["clip"],
        result["iterations"],
        path,
    )


def _safe_url(url: str) -> str:
    """The storage URL without its password (it goes into a results file)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
