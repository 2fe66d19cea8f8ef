"""`diffnas search`: from an experiment file to a run directory and its report.

space → latency table (measured here if it lacks blocks) → world (supernet, CLIP, data)
→ evolution → runs/<name>/ → report.html.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

from latency.backends import get_backend
from latency.coreml import cache_dir
from latency.predict import Predictor
from latency.profile import build_table
from latency.signature import unet_parts
from latency.table import LatencyTable
from nas.experiment import Experiment
from nas.search.evaluate import Evaluator, Protocol
from nas.search.evolve import RunDir, SearchResult, evolve, resolve_target
from nas.search.report import write_report
from nas.training.robust import train
from search_spaces import SearchSpace, UserError, load_space


def experiment_space(exp: Experiment) -> SearchSpace:
    """The space the experiment searches, at the input size its world generates (a Stable
    Diffusion world's `resolution`; its files are checked here, before anything costly)."""
    space = load_space(exp.space)
    if exp.world.kind == "stable_diffusion":
        from nas.worlds.sd import world_space

        space = world_space(exp, space)
    return space


def open_world(exp: Experiment, space: SearchSpace, progress: bool = True):
    """The world the search runs in: supernet, CLIP scorer, prompts, training data."""
    if exp.world.kind == "tiny":
        from nas.worlds.tiny import TinyWorldConfig, load_tiny_world

        if exp.world.world_config:
            config = TinyWorldConfig.from_json(exp.world.world_config)
        else:
            config = TinyWorldConfig.miniature() if exp.world.miniature else TinyWorldConfig()
        if exp.space != config.space:  # the world trains the supernet of the searched space
            ref = exp.space
            if ref.endswith((".yaml", ".yml")):  # one world folder whatever the cwd
                ref = str(Path(ref).resolve())
            config = dataclasses.replace(config, space=ref)
        world = load_tiny_world(config, progress=progress)
    else:  # a local Stable Diffusion pipeline, MS-COCO captions, open_clip (nas/worlds/sd.py)
        from nas.worlds.sd import load_sd_world

        world = load_sd_world(exp, space, progress=progress)
    if world.space.name != space.name or world.space.slots.keys() != space.slots.keys():
        raise UserError(
            f"the {exp.world.kind} world's UNet is space {world.space.name!r}, but the "
            f"experiment searches {space.name!r}; set `space: {world.space.name}`"
        )
    if tuple(world.space.latent) != tuple(space.latent):
        raise UserError(
            f"the {exp.world.kind} world generates {tuple(world.space.latent)} latents, but the "
            f"space was loaded at {tuple(space.latent)}; load it with experiment_space(exp)"
        )
    return world


def search_prompts(exp: Experiment, world) -> list[str]:
    """The validation prompts the search scores: the first `evaluation.prompts` of the world."""
    n = exp.evaluation.prompts
    if n > len(world.val_prompts):
        raise UserError(
            f"evaluation.prompts={n}, but the {exp.world.kind} world has only "
            f"{len(world.val_prompts)} validation prompts; lower evaluation.prompts"
        )
    return world.val_prompts[:n]


def held_out_prompts(exp: Experiment, world, n: int | None = None) -> list[str]:
    """`n` validation prompts the search never scored (default: all of them), to judge its
    result on: they follow the search's prompts in the world's list, so they share no scene
    with them, nor with training (the world holds its validation scenes out of training)."""
    used = exp.evaluation.prompts
    rest = world.val_prompts[used:]
    if n is not None and n > len(rest):
        raise UserError(
            f"{n} held-out prompts asked for, but the {exp.world.kind} world has "
            f"{len(world.val_prompts)} validation prompts and the search scores the first "
            f"{used}: at most {len(rest)} are held out; ask for fewer (and more noises each)"
        )
    return rest if n is None else rest[:n]


def evaluation_protocol(
    exp: Experiment,
    world,
    prompts: list[str] | None = None,
    seeds: int | None = None,
    steps: int | None = None,
) -> Protocol:
    """The experiment's scoring protocol (`evaluation:`: prompts, seeds, steps, CFG, batch,
    precision, the experiment's seed); `prompts`, `seeds`, `steps` replace the search's own
    (a held-out protocol: `held_out_prompts`)."""
    e = exp.evaluation
    return Protocol(
        search_prompts(exp, world) if prompts is None else prompts,
        seeds=e.seeds if seeds is None else seeds,
        steps=e.steps if steps is None else steps,
        cfg=e.cfg,
        batch_size=e.batch_size,
        seed=exp.seed,
        precision=e.precision,
        sampler=e.sampler,
        metric=e.metric,
        timesteps=tuple(e.timesteps) if e.timesteps is not None else None,
    )


def make_evaluator(
    exp: Experiment, world, protocol: Protocol | None = None, supernet=None
) -> Evaluator:
    """An evaluator in `world`: the experiment's action evaluator by default (the search's
    protocol, the world's supernet), or another `protocol` / `supernet` (e.g. a run's final
    weights) with the world's CLIP, text encoder and decoder."""
    return Evaluator(
        world.supernet if supernet is None else supernet,
        world.clip,
        evaluation_protocol(exp, world) if protocol is None else protocol,
        world.encode_text,
        world.uncond(),
        world.decode,
    )


def open_evaluator(exp: Experiment) -> Evaluator:
    """What a Ray evaluator actor builds (`nas.search.ray`): the experiment's world, loaded
    from the cache (the driver built it first), and its evaluator."""
    return make_evaluator(exp, open_world(exp, experiment_space(exp), progress=False))


def ray_evaluator(exp: Experiment, local: Evaluator, cluster):
    """`local`'s drop-in whose actions are scored on a pool of Ray actors."""
    from nas.search.ray import RayEvaluator

    if Path(exp.space).is_file():  # a space file: by absolute path, whatever the actor's cwd
        exp = exp.model_copy(update={"space": str(Path(exp.space).resolve())})
    return RayEvaluator(local, partial(open_evaluator, exp), cluster)


def latency_db(exp: Experiment) -> Path:
    """The table file of the experiment: `latency.db`, or the cache's shared latency.db."""
    return Path(exp.latency.db) if exp.latency.db else cache_dir() / "latency.db"


def latency_table(exp: Experiment, space: SearchSpace, progress: bool = True):
    table = LatencyTable(latency_db(exp))
    if exp.latency.build:
        backend = get_backend(
            exp.latency.backend,
            compute_unit=exp.latency.compute_unit,
            precision=exp.latency.precision,
            repeats=exp.latency.repeats,
        )
        build_table(space, table, backend, exp.latency.device, progress=progress)
    return table


def robust_trainer(exp: Experiment, world):
    """`train(model, steps, seed)`: robust training of `model` in its current architecture,
    with the experiment's batch and learning rate on the world's data (what the evolution
    runs before each iteration)."""
    s = exp.search

    def robust_train(model, steps: int, seed: int):
        config = world.train_config(
            steps=steps, batch_size=s.batch_size, lr=s.lr, seed=seed, checkpoint_every=0
        )
        data = world.dataset(steps * s.batch_size, seed)
        return train(
            model, data, config, encode=world.encode_batch, progress=False, uncond=world.uncond()
        )

    return robust_train


def run_search(
    exp: Experiment,
    runs: Path = Path("runs"),
    name: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run (or resume) the search of `exp`. With `exp.ray` enabled (several workers or a
    cluster address) actions are scored on Ray: the connection comes first, so a bad address
    or missing resources are refused within seconds, and a local instance is stopped at the
    end (docs/distributed.md)."""
    cluster = None
    if exp.ray.enabled and exp.evaluation.racing:
        raise UserError(
            "evaluation.racing scores actions in this process; set it to 0 to evaluate on "
            "Ray workers, or run with one worker and no --ray-address"
        )
    if exp.ray.enabled and exp.evaluation.metric != "sample_clip":
        raise UserError(
            f"evaluation.metric {exp.evaluation.metric} scores actions in this process (one "
            "call per timestep: little to spread); use metric sample_clip to evaluate on Ray "
            "workers, or run with one worker and no --ray-address"
        )
    if exp.ray.enabled:
        from nas.cluster import RayCluster

        cluster = RayCluster.connect(exp.ray)
    try:
        return _run_search(exp, runs, name, resume, progress, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def _run_search(exp, runs, name, resume, progress, cluster) -> SearchResult:
    start = time.perf_counter()
    space = experiment_space(exp)
    if resume is not None:
        run = RunDir(Path(resume))
        run.check_same(exp)
        if (run.path / "optuna_run.json").is_file():  # nas.search.optuna's run directory
            raise UserError(f"{run.path} is a run of --strategy optuna; resume it with that")
    else:
        run = RunDir(runs / (name or exp.name))
        if run.path.exists() and any(run.path.iterdir()):
            raise UserError(
                f"run directory {run.path} exists; resume it with --resume "
                f"{run.path}, or choose another --name"
            )
    table = latency_table(exp, space, progress)
    predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
    target = resolve_target(exp, space, predictor)
    world = open_world(exp, space, progress)
    if resume is None:
        used = table.lookup(
            exp.latency.device,
            [p.signature for p in unet_parts(space, predictor.setting["precision"])],
            backend=predictor.setting["backend"],
            compute_unit=predictor.setting["compute_unit"],
            precision=predictor.setting["precision"],
        )
        run.create(exp, space, [m.to_dict() for m in used.values()])
    evaluator = make_evaluator(exp, world)
    if cluster is not None:
        evaluator = ray_evaluator(exp, evaluator, cluster)
    try:
        result = evolve(
            exp,
            world.supernet,
            evaluator,
            predictor,
            robust_trainer(exp, world),
            run,
            target,
            progress=progress,
        )
    finally:
        if cluster is not None:
            evaluator.close()
    write_report(run.path)
    (run.path / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    table.close()
    return result
