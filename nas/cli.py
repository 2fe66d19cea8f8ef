"""The `diffnas` command line.

User errors (bad files, flags, architectures) print one message and exit with code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from latency.cli import app as latency_app
from latency.cli import register_validate
from search_spaces.cli import app as space_app
from search_spaces.errors import UserError

app = typer.Typer(
    help="diffnas: hardware-aware architecture search for diffusion UNets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(space_app, name="space")
app.add_typer(latency_app, name="latency")


def _network_timer(space, backend):
    from .measure import NetworkTimer

    return NetworkTimer(space, backend)


register_validate(_network_timer)


@app.command("search")
def search_cmd(
    experiment: Path = typer.Argument(..., help="Experiment YAML, e.g. experiments/tiny.yaml."),
    target_ms: float = typer.Option(None, "--target-ms", help="Latency target in ms."),
    target_ratio: float = typer.Option(
        None, "--target-ratio", help="Target as a fraction of the original's latency."
    ),
    device: str = typer.Option(None, "--device", help="Device of the latency table."),
    name: str = typer.Option(None, "--name", help="Run name (default: the experiment's)."),
    resume: Path = typer.Option(None, "--resume", help="Continue this run directory."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where run directories go."),
    workers: int = typer.Option(
        None,
        "--workers",
        help="Evaluator actors on Ray (default 1: in process, no Ray). See docs/distributed.md.",
    ),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (HOST:PORT) instead of a local one."
    ),
    gpus: bool = typer.Option(
        None, "--gpus/--no-gpus", help="One GPU per Ray actor (default: if the cluster has GPUs)."
    ),
    strategy: str = typer.Option(
        "evolution", "--strategy", help="evolution (the paper's Alg. 1) or optuna (a study)."
    ),
    trials: int = typer.Option(
        None, "--trials", help="optuna: architectures to score (default 40)."
    ),
    storage: str = typer.Option(
        None, "--storage", help="optuna: study database URL (default: the run's study.db)."
    ),
) -> None:
    """Evolve the architecture to a latency target (or, with --strategy optuna, search it with
    an Optuna study); write runs/<name>/ and its report."""
    from .experiment import load_experiment
    from .search import run_search

    if target_ms is not None and target_ratio is not None:
        raise UserError("give --target-ms or --target-ratio, not both")
    if strategy not in ("evolution", "optuna"):
        raise UserError(f"--strategy {strategy!r}: choose evolution or optuna")
    if strategy == "evolution" and (trials is not None or storage is not None):
        raise UserError("--trials and --storage are options of --strategy optuna")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: give at least 1 (1 evaluates in this process)")
    exp = load_experiment(
        experiment,
        **{"target.ms": target_ms, "target.ratio": target_ratio, "latency.device": device},
        **{"ray.workers": workers, "ray.address": ray_address, "ray.gpus": gpus},
    )
    if strategy == "optuna":
        from .optuna_search import run_optuna

        result = run_optuna(exp, trials, runs=runs, name=name, resume=resume, storage=storage)
        typer.echo(
            f"found {result.arch.hash}: {result.latency_ms:.2f} ms (target "
            f"{result.target_ms:.2f}), CLIP {result.clip:.2f}, {result.iterations} "
            f"architecture(s) scored\nresults: {result.run_dir / 'optuna.json'}"
        )
        return
    result = run_search(exp, runs=runs, name=name, resume=resume)
    typer.echo(
        f"found {result.arch.hash}: {result.latency_ms:.2f} ms (target {result.target_ms:.2f}), "
        f"CLIP {result.clip:.2f}, {result.iterations} iteration(s)\n"
        f"report: {result.run_dir / 'report.html'}"
    )


@app.command("sweep")
def sweep_cmd(
    experiment: Path = typer.Argument(..., help="Experiment YAML, e.g. experiments/tiny.yaml."),
    targets: str = typer.Option(
        None, "--targets", help="Target ratios, comma-separated, e.g. 0.7,0.5,0.3."
    ),
    seeds: int = typer.Option(None, "--seeds", help="Seeds per target (default 1)."),
    name: str = typer.Option(None, "--name", help="Sweep name (default: <experiment>-sweep)."),
    resume: Path = typer.Option(None, "--resume", help="Continue this sweep directory."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where sweep directories go."),
    device: str = typer.Option(None, "--device", help="Device of the latency table."),
    workers: int = typer.Option(
        None, "--workers", help="Trials at a time, one CPU each (default: this machine's CPUs)."
    ),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (HOST:PORT) instead of a local one."
    ),
    gpus: bool = typer.Option(
        None, "--gpus/--no-gpus", help="One GPU per trial (default: if the cluster has GPUs)."
    ),
) -> None:
    """One evolution per (target, seed) as Ray Tune trials; a results table and a Pareto plot
    of predicted latency vs CLIP in runs/<name>/."""
    from .experiment import load_experiment
    from .sweep import local_cpus, run_sweep

    if resume is None and targets is None:
        raise UserError("--targets is required (e.g. --targets 0.7,0.5,0.3), unless --resume")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: give at least 1 (trials at a time)")
    if workers is None and ray_address is None:
        workers = local_cpus()
    exp = load_experiment(
        experiment,
        **{"latency.device": device, "ray.workers": workers, "ray.address": ray_address},
        **{"ray.gpus": gpus},
    )
    result = run_sweep(
        exp, targets, seeds if resume is not None else (seeds or 1), runs, name, resume
    )
    typer.echo(f"sweep of {len(result.rows)} trial(s): {result.path}")


@app.command("report")
def report_cmd(run: Path = typer.Argument(..., help="A run directory (runs/<name>).")) -> None:
    """Write runs/<name>/report.html with its pictures."""
    from .report import write_report

    typer.echo(f"wrote {write_report(run)}")


world_app = typer.Typer(
    help="The tiny world: shapes data, a tiny CLIP and the tiny space's supernet, trained here.",
    no_args_is_help=True,
)
app.add_typer(world_app, name="world")
WORLD_CONFIG_HELP = "JSON file of TinyWorldConfig fields (default: the standard tiny world)."
THREADS_HELP = "torch CPU threads (default: torch's choice)."


def _open_world(config_file: Path | None, threads: int | None, rebuild: bool = False):
    from .world import TinyWorldConfig, load_tiny_world

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: give at least 1")
        import torch

        torch.set_num_threads(threads)
    config = TinyWorldConfig.from_json(config_file) if config_file else TinyWorldConfig()
    return load_tiny_world(config, progress=True, rebuild=rebuild)


@world_app.command("build")
def world_build_cmd(
    rebuild: bool = typer.Option(False, "--rebuild", help="Train again, ignoring the cache."),
    # --world-config as in `generate` and `train`; --config kept for existing scripts
    config: Path = typer.Option(None, "--world-config", "--config", help=WORLD_CONFIG_HELP),
) -> None:
    """Build the tiny world (first use: a few minutes) or show the cached one. The build
    always uses 2 torch threads, so that a config gives the same world everywhere."""
    world = _open_world(config, None, rebuild)
    m = world.metrics
    typer.echo(f"tiny world {m['config_hash']} in {world.folder}")
    typer.echo(
        f"{'built now' if world.built else 'cached'}: build took {m['build_seconds']:.0f} s "
        f"(CLIP {m['clip_seconds']:.0f} s, UNet {m['unet_seconds']:.0f} s)"
    )
    typer.echo(
        f"tiny CLIP: zero-shot text->image top-1 on {len(world.val_prompts)} held-out prompts: "
        f"{100 * m['clip_val_retrieval_top1']:.1f}%"
    )


@app.command("generate")
def generate_cmd(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A prompt; repeat for more."),
    out: Path = typer.Option(..., "--out", help="PNG file: one row per prompt."),
    arch: Path = typer.Option(None, "--arch", help="Architecture JSON (default: original)."),
    steps: int = typer.Option(20, "--steps", help="DDIM steps."),
    cfg: float = typer.Option(3.0, "--cfg", help="Classifier-free guidance weight."),
    n: int = typer.Option(4, "--n", help="Images per prompt."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    eta: float = typer.Option(
        0.0, "--eta", help="DDIM eta: 0 deterministic, up to 1: fresh noise at every step."
    ),
    scale: int = typer.Option(4, "--scale", help="Upscale the 32x32 images by this factor."),
    config: Path = typer.Option(None, "--world-config", help=WORLD_CONFIG_HELP),
    threads: int = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Generate images in the tiny world with DDIM + CFG and write them as a grid (the world
    is built on first use: a few minutes)."""
    from search_spaces import Architecture

    from .generate import check_eta
    from .world import write_grid

    if n < 1 or scale < 1:
        raise UserError("--n and --scale must be at least 1")
    check_eta(eta)  # before a world is built
    world = _open_world(config, threads)
    architecture = None
    if arch is not None:
        architecture = Architecture.load(arch)
        world.space.validate(architecture, str(arch))
    prompts = [p for p in prompt for _ in range(n)]
    images = world.generate(prompts, seed=seed, steps=steps, cfg=cfg, arch=architecture, eta=eta)
    scores = world.score(images, prompts).view(len(prompt), n).mean(1)
    write_grid(images, out, nrow=n, scale=scale)
    for p, s in zip(prompt, scores.tolist(), strict=True):
        typer.echo(f"CLIP {s:5.1f}  {p}")
    typer.echo(f"wrote {out}")


# the data-parallel options of `train` and `distill` (Ray Train, nas.train_ray)
WORKERS = typer.Option(
    1, "--workers", help="Data-parallel workers on Ray Train (1: in this process, no Ray)."
)
RAY_ADDRESS = typer.Option(
    None, "--ray-address", help="Join this Ray cluster (HOST:PORT) instead of a local one."
)
GPUS = typer.Option(
    None, "--gpus/--no-gpus", help="One GPU per worker (default: if there is one each)."
)


@app.command("train")
def train_cmd(
    experiment: Path = typer.Argument(
        None, help="Experiment YAML: its world, with its search's batch, lr and seed."
    ),
    world: str = typer.Option(
        None, "--world", help="Or a world, with the settings it was built with: tiny."
    ),
    world_config: Path = typer.Option(None, "--world-config", help=WORLD_CONFIG_HELP),
    steps: int = typer.Option(..., "--steps", help="Robust-training steps."),
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
    batch_size: int = typer.Option(
        None, "--batch-size", help="Samples per step, split over the workers (default: config's)."
    ),
    checkpoint_every: int = typer.Option(
        None, "--checkpoint-every", help="Checkpoint every N steps (default: config's; 0: end)."
    ),
    lr_scheduler: str = typer.Option(
        None, "--lr-scheduler", help="diffusers schedule: constant, cosine, linear, ..."
    ),
    lr_warmup_steps: int = typer.Option(None, "--lr-warmup-steps", help="Warm-up steps."),
    snr_gamma: float = typer.Option(
        None, "--snr-gamma", help="Min-SNR loss weighting, e.g. 5 (default: plain MSE)."
    ),
    gpus: bool = GPUS,
    out: Path = typer.Option(
        None, "--out", help="Folder for the trained supernet (default: runs/<name>-supernet)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue --out from its checkpoint."),
) -> None:
    """Robustly train a world's supernet (DDP on Ray Train with --workers N) and save it
    into --out (ElasticUNet.from_pretrained(out)). See docs/distributed.md."""
    from .train import TrainConfig
    from .train_ray import check_train_args, train_supernet

    if (experiment is None) == (world is None):
        raise UserError("give an experiment file or --world tiny (one of them)")
    if steps < 1 or (batch_size is not None and batch_size < 1):
        raise UserError("--steps and --batch-size must be at least 1")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise UserError(f"--checkpoint-every {checkpoint_every}: give 0 (at the end) or more")
    check_train_args(workers, ray_address, gpus)  # before a world loads: bad flags fail at once
    overrides = {"steps": steps, "batch_size": batch_size, "checkpoint_every": checkpoint_every}
    schedule = dict(lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, snr_gamma=snr_gamma)
    schedule = {k: v for k, v in schedule.items() if v is not None}
    TrainConfig(**schedule).check()
    overrides |= schedule
    if experiment is not None:
        from search_spaces import load_space

        from .experiment import load_experiment
        from .search import open_world

        if world_config is not None:
            raise UserError("--world-config goes with --world; the experiment names its world")
        exp = load_experiment(experiment)
        the_world = open_world(exp, load_space(exp.space))
        s = exp.search
        overrides = {"batch_size": s.batch_size, "lr": s.lr, "seed": exp.seed} | {
            k: v for k, v in overrides.items() if v is not None
        }
        name, source = exp.name, {"experiment": str(experiment)}
    else:
        if world != "tiny":
            raise UserError(f"--world {world!r}: the worlds are: tiny")
        the_world = _open_world(world_config, None)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        name, source = world, {"world": world, "world_config": str(world_config or "")}
    config = the_world.train_config(**overrides)
    out = out or Path("runs") / f"{name}-supernet"
    result = train_supernet(
        the_world,
        config,
        out,
        workers=workers,
        ray_address=ray_address,
        use_gpu=gpus,
        resume=resume,
        source=source,
    )
    typer.echo(
        f"trained {result.steps} steps ({workers} worker(s), batch {config.batch_size}): "
        f"loss {result.losses[-1]:.4f}\nsupernet: {out}"
    )


@app.command("distill")
def distill_cmd(
    run: Path = typer.Argument(..., help="A finished search's run directory (runs/<name>)."),
    teacher: Path = typer.Option(
        None, "--teacher", help="A diffusers UNet folder (default: the run's full network)."
    ),
    steps: int = typer.Option(None, "--steps", help="Training steps (default: experiment's)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Samples per step."),
    lr: float = typer.Option(None, "--lr", help="AdamW learning rate."),
    task_weight: float = typer.Option(None, "--task-weight", help="Weight of the task loss."),
    output_weight: float = typer.Option(None, "--output-weight", help="Weight of output KD."),
    feature_weight: float = typer.Option(None, "--feature-weight", help="Weight of feature KD."),
    device: str = typer.Option(None, "--device", help="torch device (cpu, cuda, ...)."),
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
    gpus: bool = GPUS,
    resume: bool = typer.Option(False, "--resume", help="Continue RUN/distilled/."),
    force: bool = typer.Option(False, "--force", help="Delete RUN/distilled/ and start over."),
) -> None:
    """Train the found network from a frozen teacher (task + output KD + feature KD) into
    RUN/distilled/ (docs/distill.md); DDP on Ray Train with --workers N."""
    import yaml

    from .distill_config import DistillConfig
    from .experiment import Experiment

    overrides = dict(steps=steps, batch_size=batch_size, lr=lr, device=device)
    overrides |= dict(
        task_weight=task_weight, output_weight=output_weight, feature_weight=feature_weight
    )
    DistillConfig().with_overrides(**overrides)  # bad flags fail before anything loads
    from .distill import check_finished, distill
    from .train_ray import check_train_args

    check_finished(run)
    check_train_args(workers, ray_address, gpus)
    exp = Experiment.model_validate(yaml.safe_load((run / "experiment.yaml").read_text()))
    metrics = distill(
        run,
        exp.distill.with_overrides(**overrides),
        teacher=teacher,
        resume=resume,
        force=force,
        workers=workers,
        ray_address=ray_address,
        use_gpu=gpus,
    )
    clip = metrics["clip"]
    for name in clip["after"]:
        typer.echo(
            f"CLIP ({name} prompts): found {clip['before'][name]:.2f} -> distilled "
            f"{clip['after'][name]:.2f}; teacher {clip['teacher'][name]:.2f}"
        )
    typer.echo(f"distilled network: {run / 'distilled'}")


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="A finished search's run directory (runs/<name>)."),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers, coreml or executorch."),
    distilled: bool = typer.Option(False, "--distilled", help="The distilled network."),
    out: Path = typer.Option(None, "--out", help="Default: RUN/export/<network>-<format>."),
    force: bool = typer.Option(False, "--force", help="Replace what --out holds."),
) -> None:
    """Write the found (or distilled) network as a model that loads without diffnas."""
    from .standalone import check_format, export_network

    check_format(fmt)  # before anything loads
    path, info = export_network(run, fmt, distilled=distilled, out=out, force=force)
    typer.echo(f"{info['network']} network as {info['form']}: {path}")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # standalone mode: typer/click print usage errors themselves and exit with code 2
        app(args=argv, prog_name="diffnas")
    except UserError as e:
        if "--debug" in argv:
            raise
        # plain text: a message may hold brackets or long paths that must not be reformatted
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
