"""The Optuna study behind `--strategy optuna`: the space as Optuna parameters (`StudySpace`),
the study opened in its storage (one per experiment, resumable), and the run's results written
from the trials (`optuna.json`, `result.json`, the front)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from latency.predict import Predictor
from nas.experiment import Experiment
from nas.search.evolve import SearchResult
from nas.search.front import plot_pareto
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


def finish(path: Path, study, study_space: StudySpace, info: dict, done: int) -> SearchResult:
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
    return stored_result(path)


def stored_result(path: Path) -> SearchResult:
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
