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
from nas.cli_options import GPUS, RAY_ADDRESS, WORKERS
from nas.deploy.cli import register as register_deploy
from nas.worlds.cli import WORLD_CONFIG_HELP, open_tiny_world
from nas.worlds.cli import register as register_world
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
    from nas.search.measure import NetworkTimer

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
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print what the search will cost (as `diffnas plan`); run nothing."
    ),
) -> None:
    """Evolve the architecture to a latency target (or, with --strategy optuna, search it with
    an Optuna study); write runs/<name>/ and its report."""
    from nas.experiment import load_experiment
    from nas.search.run import run_search

    if dry_run:
        plan_cmd(experiment, target_ms, target_ratio, device, None, None, None, None, None)
        return

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
        from nas.search.optuna import run_optuna

        if exp.evaluation.metric != "sample_clip":
            raise UserError(
                f"evaluation.metric {exp.evaluation.metric} scores actions against the current "
                "network; --strategy optuna scores whole architectures: use sample_clip"
            )
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


@app.command("plan")
def plan_cmd(
    experiment: Path = typer.Argument(..., help="Experiment YAML, e.g. experiments/tiny.yaml."),
    target_ms: float = typer.Option(None, "--target-ms", help="Latency target in ms."),
    target_ratio: float = typer.Option(
        None, "--target-ratio", help="Target as a fraction of the original's latency."
    ),
    device: str = typer.Option(None, "--device", help="Device of the latency table."),
    db: Path = typer.Option(None, "--db", help="Latency table file (default: the experiment's)."),
    timing: Path = typer.Option(
        None,
        "--timing",
        help="Per-call device time from an sd15_action.py result, e.g. "
        "experiments/benchmarks/results/sd15_action_cuda.json.",
    ),
    seconds_per_call: float = typer.Option(
        None, "--seconds-per-call", help="Device seconds per UNet call of one latent."
    ),
    seconds_per_image: float = typer.Option(
        None, "--seconds-per-image", help="Device seconds to decode and CLIP-score one image."
    ),
    out: Path = typer.Option(None, "--json", help="Also write the plan as JSON here."),
) -> None:
    """What a search will cost before it runs: actions per iteration, iterations to the
    target, evaluation compute in UNet calls and images (device hours with a per-call time).
    Measures the latency table's missing blocks if the experiment builds its table."""
    import json

    from nas.experiment import load_experiment

    if timing is not None and seconds_per_call is not None:
        raise UserError("give --timing or --seconds-per-call, not both")
    if seconds_per_image is not None and seconds_per_call is None:
        raise UserError("--seconds-per-image goes with --seconds-per-call")
    if seconds_per_call is not None and (seconds_per_call <= 0 or (seconds_per_image or 0) < 0):
        raise UserError("--seconds-per-call must be positive, --seconds-per-image at least 0")
    exp = load_experiment(
        experiment,
        **{"target.ms": target_ms, "target.ratio": target_ratio, "latency.device": device},
        **{"latency.db": str(db) if db else None},
    )
    from latency.predict import Predictor
    from nas.search.evolve import resolve_target
    from nas.search.plan import Timing, describe, make_plan
    from nas.search.run import experiment_space, latency_table

    clock = None
    if timing is not None:
        clock = Timing.from_action_benchmark(timing, exp.evaluation.precision)
    elif seconds_per_call is not None:
        clock = Timing(seconds_per_call, seconds_per_image or 0.0, "--seconds-per-call")
    space = experiment_space(exp)
    with latency_table(exp, space, progress=False) as table:
        predictor = Predictor(space, table, exp.latency.device, precision=exp.latency.precision)
        plan = make_plan(exp, space, predictor, resolve_target(exp, space, predictor), clock)
    typer.echo(describe(plan))
    if out is not None:
        out.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        typer.echo(f"wrote {out}")


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
    compare: bool = typer.Option(
        False,
        "--compare",
        help="Also Optuna and random search at each evolution's budget, and the space's hand "
        "designs, all judged on held-out prompts (docs/pareto.md).",
    ),
    design: list[Path] = typer.Option(
        None,
        "--design",
        help="With --compare: a hand design's architecture JSON (repeat); "
        "default: experiments/designs/ for the space.",
    ),
    judge_prompts: int = typer.Option(
        None, "--judge-prompts", help="With --compare: held-out prompts (default: all)."
    ),
    judge_noises: int = typer.Option(2, "--judge-noises", help="With --compare: noises each."),
    judge_steps: int = typer.Option(20, "--judge-steps", help="With --compare: DDIM steps."),
    fine_tune_steps: int = typer.Option(
        0,
        "--fine-tune-steps",
        help="With --compare: robust steps every judged network gets first (default 0: none).",
    ),
) -> None:
    """One evolution per (target, seed) as Ray Tune trials; a results table, a Pareto plot of
    predicted latency vs CLIP and report.html in runs/<name>/ (with --compare: against
    Optuna, random search and the hand designs)."""
    from nas.experiment import load_experiment
    from nas.search.sweep import local_cpus, run_sweep

    if design and not compare:
        raise UserError("--design goes with --compare")
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
    spec = None
    if compare:  # the hand designs are checked against the space before anything runs
        from nas.search.pareto import CompareSpec, check_designs, default_designs
        from search_spaces import load_space

        space = load_space(exp.space)
        designs = check_designs(space, design) if design else default_designs(space)
        spec = CompareSpec(designs, judge_prompts, judge_noises, judge_steps, fine_tune_steps)
        spec.check()
    result = run_sweep(
        exp,
        targets,
        seeds if resume is not None else (seeds or 1),
        runs,
        name,
        resume,
        compare=spec,
    )
    typer.echo(f"sweep of {len(result.rows)} trial(s): {result.path}")


@app.command("report")
def report_cmd(
    run: Path = typer.Argument(..., help="A run directory (runs/<name>) or a sweep directory."),
) -> None:
    """Write runs/<name>/report.html with its pictures (of a sweep: its front, and with
    --compare the baselines and hand designs beside it)."""
    if (run / "sweep_config.json").is_file():
        from nas.search.pareto_report import write_sweep_report

        typer.echo(f"wrote {write_sweep_report(run)}")
        return
    from nas.search.report import write_report

    typer.echo(f"wrote {write_report(run)}")


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
    from nas.training.ray import check_train_args
    from nas.training.robust import TrainConfig
    from nas.training.run import train_supernet

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
        from nas.experiment import load_experiment
        from nas.search.run import open_world
        from search_spaces import load_space

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
        the_world = open_tiny_world(world_config, None)
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


register_world(app)
register_deploy(app)


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
