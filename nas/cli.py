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
) -> None:
    """Evolve the architecture to a latency target; write runs/<name>/ and its report."""
    from .experiment import load_experiment
    from .search import run_search

    if target_ms is not None and target_ratio is not None:
        raise UserError("give --target-ms or --target-ratio, not both")
    exp = load_experiment(
        experiment,
        **{"target.ms": target_ms, "target.ratio": target_ratio, "latency.device": device},
    )
    result = run_search(exp, runs=runs, name=name, resume=resume)
    typer.echo(
        f"found {result.arch.hash}: {result.latency_ms:.2f} ms (target {result.target_ms:.2f}), "
        f"CLIP {result.clip:.2f}, {result.iterations} iteration(s)\n"
        f"report: {result.run_dir / 'report.html'}"
    )


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
    config: Path = typer.Option(None, "--config", help=WORLD_CONFIG_HELP),
    threads: int = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Build the tiny world (first use: a few minutes) or show the cached one."""
    world = _open_world(config, threads, rebuild)
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
    scale: int = typer.Option(4, "--scale", help="Upscale the 32x32 images by this factor."),
    config: Path = typer.Option(None, "--world-config", help=WORLD_CONFIG_HELP),
    threads: int = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Generate images in the tiny world with DDIM + CFG and write them as a grid (the world
    is built on first use: a few minutes)."""
    from search_spaces import Architecture

    from .world import write_grid

    if n < 1 or scale < 1:
        raise UserError("--n and --scale must be at least 1")
    world = _open_world(config, threads)
    architecture = None
    if arch is not None:
        architecture = Architecture.load(arch)
        world.space.validate(architecture, str(arch))
    prompts = [p for p in prompt for _ in range(n)]
    images = world.generate(prompts, seed=seed, steps=steps, cfg=cfg, arch=architecture)
    scores = world.score(images, prompts).view(len(prompt), n).mean(1)
    write_grid(images, out, nrow=n, scale=scale)
    for p, s in zip(prompt, scores.tolist(), strict=True):
        typer.echo(f"CLIP {s:5.1f}  {p}")
    typer.echo(f"wrote {out}")


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
