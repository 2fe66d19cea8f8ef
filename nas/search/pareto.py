"""Is the search worth it? A sweep's evolved front against what a researcher would do instead.

`diffnas sweep ... --compare` adds, to every (target, seed) trial of the sweep, the two
searches a researcher could run instead of the evolution, each at the evolution's own
evaluation budget (images generated to score architectures, `evaluation_budget`):

- an Optuna study (`nas.search.optuna`) scoring that many architectures;
- the best of that many random legal networks within the target (`random_best`);

and, once every trial has finished, judges every network on one protocol (`judge_sweep`):
the evolved, Optuna and random networks, the space's hand designs (experiments/designs/:
published recipes, `default_designs`) and the original, each once per seed of the sweep, on
the world's validation prompts that no search scored (`nas.search.run.held_out_prompts`), with
noises drawn from the seed. The seeds give every point its seed-to-seed error bar: for a
search, another search and another judging noise; for a hand design, another noise.

Fair comparison: every network is judged on the same weights. `fine_tune_steps` = 0 (the
default) gives no network any training: all are judged on the world's supernet as built,
so the evolution is credited for its choice of blocks only, not for the fine-tuning it does
along its path. `fine_tune_steps` = N gives every network the same N robust-training steps
from the world's supernet, in its own architecture, before judging. compare.json says which.

    runs/<sweep>/
      baselines/<trial>/optuna/       the Optuna run directory (nas.search.optuna)
      baselines/<trial>/random.json   every random network drawn and its search-protocol CLIP
      judged.jsonl                    one line per judged (network, seed): kept on resume
      compare.json                    every point, the summary per target, each design's verdict
      front.png, report.html          `diffnas report <sweep>` (nas.search.pareto_report)
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from latency.predict import Predictor
from nas.experiment import Experiment
from nas.search.evolve import RunDir
from nas.search.pareto_stats import summarize
from search_spaces import Architecture, SearchSpace, UserError

DESIGNS = Path(__file__).resolve().parents[2] / "experiments" / "designs"
SNAPFUSION = DESIGNS.parent / "snapfusion_sd15.arch.json"  # SnapFusion's Table 3 network
BASELINES = "baselines"
JUDGED = "judged.jsonl"
MEASURED = "measured.json"  # each network's whole-network time here, kept on resume
COMPARE = "compare.json"
NOISE_OFFSET = 7919  # judging noises: seed + this, never the noises a search scored with


@dataclass
class CompareSpec:
    """What `--compare` adds to a sweep, stored in its sweep_config.json."""

    designs: dict[str, str] = field(default_factory=dict)  # name -> architecture file
    prompts: int | None = None  # held-out prompts to judge on (None: all the world holds out)
    noises: int = 2  # initial noises per prompt
    steps: int = 20  # DDIM steps of the judging protocol
    fine_tune_steps: int = 0  # robust-training steps every network gets before judging
    measure: bool = True  # also time every network whole here (torch backend tables only)

    def check(self) -> None:
        if self.noises < 1 or self.steps < 1 or (self.prompts is not None and self.prompts < 1):
            raise UserError("--judge-prompts, --judge-noises and --judge-steps: at least 1")
        if self.fine_tune_steps < 0:
            raise UserError(f"--fine-tune-steps {self.fine_tune_steps}: give 0 (none) or more")

    def fine_tuning(self) -> dict:
        """What compare.json says of training: the same for every network."""
        if self.fine_tune_steps == 0:
            rule = "none for all: every network judged on the world's supernet as built"
        else:
            rule = (
                f"the same for all: every network (searched, random, hand design, original) "
                f"trained {self.fine_tune_steps} robust steps from the world's supernet, in its "
                "own architecture, before judging"
            )
        return {"steps": self.fine_tune_steps, "rule": rule}


def design_name(path: Path, space: str) -> str:
    """bksdm_base.tiny.arch.json -> bksdm_base."""
    name = path.name.removesuffix(".json").removesuffix(".arch")
    return name.removesuffix(f".{space}")


def default_designs(space: SearchSpace) -> dict[str, str]:
    """The hand designs of experiments/designs/ for this space (and SnapFusion's Table 3
    network for sd15): {} for a space no recipe was translated to."""
    found = sorted(DESIGNS.glob(f"*.{space.name}.arch.json")) if DESIGNS.is_dir() else []
    if space.name == "sd15" and SNAPFUSION.is_file():
        found.append(SNAPFUSION)
    return {design_name(p, space.name): str(p) for p in found}


def check_designs(space: SearchSpace, files) -> dict[str, str]:
    """{name: absolute path} of architecture files, each legal in `space` (a file of another
    space, a missing slot or a broken rule is refused, naming the file)."""
    out = {}
    for f in files:
        path = Path(f)
        arch = Architecture.load(path)
        space.validate(arch, source=str(path))
        name = design_name(path, space.name)
        if name in out:
            raise UserError(f"two designs are named {name!r} ({out[name]}, {path}); rename one")
        out[name] = str(path.resolve())
    return out


# -- the baselines, at the evolution's evaluation budget ----------------------------------------


def evaluation_budget(run_dir: Path) -> dict:
    """What an evolution spent on scoring: images generated (every iteration's current
    architecture and its actions; with racing, each action on the images it was raced on)
    and architectures scored. The final report's scoring is not part of the search."""
    exp = Experiment.model_validate(yaml.safe_load((run_dir / "experiment.yaml").read_text()))
    per_arch = exp.evaluation.prompts * exp.evaluation.seeds
    images = archs = 0
    for h in RunDir(run_dir).history():
        raced = h.get("images")
        images += per_arch + (sum(raced.values()) if raced else per_arch * len(h["actions"]))
        archs += 1 + len(h["actions"])
    return {
        "images": images,
        "architectures": archs,
        "images_per_architecture": per_arch,
        # what Optuna and random search may score at the full protocol for the same images
        "baseline_architectures": max(1, round(images / per_arch)),
    }


def random_walk(space: SearchSpace, predictor: Predictor, target_ms: float, rng):
    """A random legal network within the target: random legal removals from the original
    until the predicted latency meets the target (None if a walk gets stuck above it)."""
    arch = space.original()
    while predictor.predict(arch).total_ms > target_ms:
        removals = [a for a in space.actions(arch) if a.kind == "remove"]
        if not removals:
            return None
        arch = arch.apply(rng.choice(removals))
    return arch


def random_best(exp: Experiment, world, predictor: Predictor, target_ms: float, n: int) -> dict:
    """Random search: `n` distinct random legal networks within the target, each scored with
    the search's own protocol on the world's supernet; the best is its result."""
    from nas.search.run import make_evaluator

    space, evaluator = world.supernet.space, make_evaluator(exp, world)
    rng = random.Random(exp.seed * 100_003 + round(target_ms * 1000))
    draws: dict[str, dict] = {}
    for _ in range(50 * n):  # a small space may hold fewer than n networks within the target
        if len(draws) == n:
            break
        arch = random_walk(space, predictor, target_ms, rng)
        if arch is None or arch.hash in draws:
            continue
        ms = predictor.predict(arch).total_ms
        draws[arch.hash] = {"arch": arch.to_dict(), "latency_ms": ms, "clip": 0.0}
        draws[arch.hash]["clip"] = evaluator.clip_score(arch)
    if not draws:
        raise UserError(f"no random legal network of {space.name!r} within {target_ms:.2f} ms")
    best = max(draws.values(), key=lambda d: (d["clip"], -d["latency_ms"]))
    return {"asked": n, "scored": len(draws), "target_ms": target_ms, "best": best, "draws": draws}


def run_baselines(exp: Experiment, sweep: Path, trial: str) -> None:
    """Optuna and random search for one finished evolution trial, at its budget (resumable:
    a finished part is kept, an Optuna study cut short continues)."""
    from nas.search.optuna import RUN_FILE, run_optuna
    from nas.search.run import experiment_space, latency_db, open_world

    folder = sweep / BASELINES / trial
    folder.mkdir(parents=True, exist_ok=True)
    budget = evaluation_budget(sweep / trial)
    (folder / "budget.json").write_text(json.dumps(budget, indent=2) + "\n")
    n = budget["baseline_architectures"]
    optuna_dir = folder / "optuna"
    if not (optuna_dir / "result.json").is_file():
        started = (optuna_dir / RUN_FILE).is_file()
        if optuna_dir.exists() and not started:  # killed while creating it: start again
            shutil.rmtree(optuna_dir)
        resume = optuna_dir if started else None
        run_optuna(exp, n, runs=folder, name="optuna", resume=resume, progress=False)
    if not (folder / "random.json").is_file():
        from latency.table import LatencyTable

        space = experiment_space(exp)
        world = open_world(exp, space, progress=False)
        target = json.loads((sweep / trial / "result.json").read_text())["target_ms"]
        with LatencyTable(latency_db(exp)) as table:
            predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
            result = random_best(exp, world, predictor, target, n)
        (folder / "random.json").write_text(json.dumps(result, indent=1) + "\n")


# -- judging every network on one protocol ------------------------------------------------------


def sweep_networks(path: Path, config: dict, space: SearchSpace) -> list[dict]:
    """Every point to judge: (method, name, target, seed) and its architecture."""
    from nas.search.front import trial_name

    compare = CompareSpec(**config["compare"])
    points = []
    for seed in config["seeds"]:
        points.append({"method": "original", "name": "original", "seed": seed, "arch": None})
        for name, file in compare.designs.items():
            arch = Architecture.load(file).to_dict()
            points.append({"method": "design", "name": name, "seed": seed, "arch": arch})
        for target in config["targets"]:
            trial = trial_name(target, seed)
            base = path / BASELINES / trial
            found = {
                "evolution": (path / trial / "final.arch.json", path / trial / "result.json"),
                "optuna": (base / "optuna" / "final.arch.json", base / "optuna" / "result.json"),
            }
            for method, (arch_file, result_file) in found.items():
                result = json.loads(result_file.read_text())
                arch = Architecture.load(arch_file).to_dict()
                points.append(
                    {"method": method, "name": trial, "target_ratio": target, "seed": seed}
                    | {
                        "arch": arch,
                        "target_ms": result["target_ms"],
                        "search_clip": result["clip"],
                    }
                )
            rand = json.loads((base / "random.json").read_text())
            points.append(
                {"method": "random", "name": trial, "target_ratio": target, "seed": seed}
                | {"arch": rand["best"]["arch"], "target_ms": rand["target_ms"]}
                | {"search_clip": rand["best"]["clip"]}
            )
    for p in points:
        if p["arch"] is None:
            p["arch"] = space.original().to_dict()
    return points


def judge_sweep(exp: Experiment, path: Path, progress: bool = True) -> dict:
    """Judge every network of a finished `--compare` sweep; write compare.json."""
    from latency.table import LatencyTable
    from nas.search.evaluate import Evaluator, Protocol
    from nas.search.run import (
        experiment_space,
        held_out_prompts,
        latency_db,
        open_world,
        robust_trainer,
    )

    config = json.loads((path / "sweep_config.json").read_text())
    compare = CompareSpec(**config["compare"])
    space = experiment_space(exp)
    world = open_world(exp, space, progress=False)
    prompts = held_out_prompts(exp, world, compare.prompts)
    points = sweep_networks(path, config, space)
    archs = {
        Architecture.from_dict(p["arch"]).hash: Architecture.from_dict(p["arch"]) for p in points
    }
    judged_file = path / JUDGED
    done = {}
    if judged_file.is_file():
        for line in judged_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["arch_hash"], r["seed"], r["fine_tune_steps"], r["protocol"])] = r["clip"]
    train = robust_trainer(exp, world)
    for seed in config["seeds"]:
        e = exp.evaluation
        protocol = Protocol(
            prompts, compare.noises, compare.steps, e.cfg, e.batch_size, seed + NOISE_OFFSET
        )
        tag = f"{len(prompts)}x{compare.noises}x{compare.steps}@{protocol.seed}"
        shared = None  # without fine-tuning, one evaluator (text encoded once) for all

        def evaluator_of(model, protocol=protocol):
            model.eval()
            return Evaluator(
                model, world.clip, protocol, world.encode_text, world.uncond(), world.decode
            )

        for h, arch in archs.items():
            key = (h, seed, compare.fine_tune_steps, tag)
            if key in done:
                continue
            if compare.fine_tune_steps:
                model = copy.deepcopy(world.supernet)
                model.set_architecture(arch)
                model.train()
                train(model, compare.fine_tune_steps, seed)
                evaluator = evaluator_of(model)
            else:
                shared = shared or evaluator_of(world.supernet)
                evaluator = shared
            done[key] = evaluator.clip_score(arch)
            with open(judged_file, "a") as f:
                row = dict(
                    zip(("arch_hash", "seed", "fine_tune_steps", "protocol"), key, strict=True)
                )
                f.write(json.dumps(row | {"clip": done[key]}) + "\n")
            if progress:
                print(f"judged {h} (seed {seed}): CLIP {done[key]:.2f}", flush=True)
        for p in points:
            if p["seed"] == seed:
                h = Architecture.from_dict(p["arch"]).hash
                p["arch_hash"], p["clip"] = h, done[(h, seed, compare.fine_tune_steps, tag)]
    with LatencyTable(latency_db(exp)) as table:
        predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
        networks = {
            h: {"latency_ms": predictor.predict(a).total_ms, "params": space.params(a)}
            | {"counts": space.counts(a), "arch": a.to_dict()}
            for h, a in archs.items()
        }
    measured = measure_networks(exp, space, archs, path / MEASURED) if compare.measure else {}
    for h, ms in measured.items():
        networks[h]["measured_ms"] = ms
    for p in points:
        p["latency_ms"] = networks[p["arch_hash"]]["latency_ms"]
        p["measured_ms"] = networks[p["arch_hash"]].get("measured_ms")
        del p["arch"]
    out = {
        "protocol": {
            "prompts": len(prompts),
            "noises": compare.noises,
            "steps": compare.steps,
            "cfg": exp.evaluation.cfg,
            "noise_seed": f"seed + {NOISE_OFFSET}",
            "held_out": True,  # nas.search.run.held_out_prompts: no search scored these prompts
            "weights": "the world's supernet",
        },
        "fine_tuning": compare.fine_tuning(),
        "measured": bool(measured),
        "budgets": {
            p.name: json.loads((p / "budget.json").read_text())
            for p in sorted((path / BASELINES).iterdir())
        },
        "designs": compare.designs,
        "networks": networks,
        "points": points,
    }
    out["summary"] = summarize(points)
    (path / COMPARE).write_text(json.dumps(out, indent=1) + "\n")
    return out


def measure_networks(exp: Experiment, space: SearchSpace, archs: dict, keep: Path) -> dict:
    """Each network timed whole on this machine (the fastest of two rounds in shuffled
    orders), when the experiment's table is a torch table (else {}: nothing to time here);
    the times are kept in `keep`, and only networks it lacks are timed."""
    if exp.latency.backend != "torch":
        return {}
    kept = json.loads(keep.read_text()) if keep.is_file() else {}
    todo = {h: a for h, a in archs.items() if h not in kept}
    if not todo:
        return {h: kept[h] for h in archs}
    from latency.backends import get_backend
    from nas.search.measure import NetworkTimer

    backend = get_backend(
        "torch",
        compute_unit=exp.latency.compute_unit,
        precision=exp.latency.precision,
        repeats=exp.latency.repeats,
    )
    timer, out = NetworkTimer(space, backend), {}
    rng = random.Random(0)
    for _ in range(2):
        order = list(todo)
        rng.shuffle(order)
        for h in order:
            out[h] = min(out.get(h, math.inf), timer(todo[h]))
    kept |= out
    keep.write_text(json.dumps(kept, indent=1) + "\n")
    return {h: kept[h] for h in archs}
