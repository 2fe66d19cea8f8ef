"""`diffnas search`: from an experiment file to a run directory and its report.

space → latency table (measured here if it lacks blocks) → world (supernet, CLIP, data)
→ evolution → runs/<name>/ → report.html.
"""

from __future__ import annotations

import time
from pathlib import Path

from latency.backends import get_backend
from latency.coreml import cache_dir
from latency.predict import Predictor
from latency.profile import build_table
from latency.signature import unet_parts
from latency.table import LatencyTable
from search_spaces import SearchSpace, UserError, load_space

from .evaluate import Evaluator, Protocol
from .evolve import RunDir, SearchResult, evolve, resolve_target
from .experiment import Experiment
from .report import write_report
from .train import train


def open_world(exp: Experiment, space: SearchSpace, progress: bool = True):
    """The world the search runs in: supernet, CLIP scorer, prompts, training data."""
    if exp.world.kind == "tiny":
        from .world import TinyWorldConfig, load_tiny_world

        config = TinyWorldConfig.miniature() if exp.world.miniature else TinyWorldConfig()
        world = load_tiny_world(config, progress=progress)
    else:  # the Stable Diffusion world (local pipeline, MS-COCO captions) is not built yet
        raise UserError(
            "world kind 'stable_diffusion' is not available in this version of diffnas; "
            "use `world: {kind: tiny}`"
        )
    if world.space.name != space.name or world.space.slots.keys() != space.slots.keys():
        raise UserError(
            f"the {exp.world.kind} world's UNet is space {world.space.name!r}, but the "
            f"experiment searches {space.name!r}; set `space: {world.space.name}`"
        )
    return world


def latency_table(exp: Experiment, space: SearchSpace, progress: bool = True):
    db = Path(exp.latency.db) if exp.latency.db else cache_dir() / "latency.db"
    table = LatencyTable(db)
    if exp.latency.build:
        backend = get_backend(
            exp.latency.backend,
            compute_unit=exp.latency.compute_unit,
            precision=exp.latency.precision,
            repeats=exp.latency.repeats,
        )
        build_table(space, table, backend, exp.latency.device, progress=progress)
    return table


def run_search(
    exp: Experiment,
    runs: Path = Path("runs"),
    name: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> SearchResult:
    start = time.perf_counter()
    space = load_space(exp.space)
    if resume is not None:
        run = RunDir(Path(resume))
        run.check_same(exp)
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
    e = exp.evaluation
    prompts = world.val_prompts[: e.prompts]
    protocol = Protocol(
        prompts, seeds=e.seeds, steps=e.steps, cfg=e.cfg, batch_size=e.batch_size, seed=exp.seed
    )
    evaluator = Evaluator(
        world.supernet, world.clip, protocol, world.encode_text, world.uncond(), world.decode
    )
    s = exp.search

    def robust_train(model, steps: int, seed: int):
        config = world.train_config(
            steps=steps, batch_size=s.batch_size, lr=s.lr, seed=seed, checkpoint_every=0
        )
        data = world.dataset(steps * s.batch_size, seed)
        return train(
            model, data, config, encode=world.encode_batch, progress=False, uncond=world.uncond()
        )

    result = evolve(
        exp, world.supernet, evaluator, predictor, robust_train, run, target, progress=progress
    )
    write_report(run.path)
    (run.path / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    table.close()
    return result
