"""`diffnas world build` and `diffnas generate`: the tiny world's commands (`nas/cli.py`
registers them)."""

from __future__ import annotations

from pathlib import Path

import typer

from search_spaces.errors import UserError

world_app = typer.Typer(
    help="The tiny world: shapes data, a tiny CLIP and the tiny space's supernet, trained here.",
    no_args_is_help=True,
)
WORLD_CONFIG_HELP = "JSON file of TinyWorldConfig fields (default: the standard tiny world)."
THREADS_HELP = "torch CPU threads (default: torch's choice)."


def open_tiny_world(config_file: Path | None, threads: int | None, rebuild: bool = False):
    from nas.worlds.tiny import TinyWorldConfig, load_tiny_world

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
    world = open_tiny_world(config, None, rebuild)
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
    from nas.worlds.generate import check_eta
    from nas.worlds.tiny import write_grid
    from search_spaces import Architecture

    if n < 1 or scale < 1:
        raise UserError("--n and --scale must be at least 1")
    check_eta(eta)  # before a world is built
    world = open_tiny_world(config, threads)
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


def register(app: typer.Typer) -> None:
    app.add_typer(world_app, name="world")
    app.command("generate")(generate_cmd)
