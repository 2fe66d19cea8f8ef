"""`diffnas distill` and `diffnas export`: from a run's found network to a trained, deployable
one (`nas/cli.py` registers them)."""

from __future__ import annotations

from pathlib import Path

import typer

from nas.cli_options import GPUS, RAY_ADDRESS, WORKERS


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

    from nas.distill_config import DistillConfig
    from nas.experiment import Experiment

    overrides = dict(steps=steps, batch_size=batch_size, lr=lr, device=device)
    overrides |= dict(
        task_weight=task_weight, output_weight=output_weight, feature_weight=feature_weight
    )
    DistillConfig().with_overrides(**overrides)  # bad flags fail before anything loads
    from nas.deploy.distill import check_finished, distill
    from nas.training.ray import check_train_args

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


def export_cmd(
    run: Path = typer.Argument(..., help="A finished search's run directory (runs/<name>)."),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers, coreml or executorch."),
    distilled: bool = typer.Option(False, "--distilled", help="The distilled network."),
    out: Path = typer.Option(None, "--out", help="Default: RUN/export/<network>-<format>."),
    force: bool = typer.Option(False, "--force", help="Replace what --out holds."),
) -> None:
    """Write the found (or distilled) network as a model that loads without diffnas."""
    from nas.deploy.export import check_format, export_network

    check_format(fmt)  # before anything loads
    path, info = export_network(run, fmt, distilled=distilled, out=out, force=force)
    typer.echo(f"{info['network']} network as {info['form']}: {path}")


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_cmd)
    app.command("export")(export_cmd)
