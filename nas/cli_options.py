"""Options that more than one `diffnas` command takes, defined once."""

from __future__ import annotations

import typer

# the data-parallel options of `train` and `distill` (Ray Train, nas.training.ray)
WORKERS = typer.Option(
    1, "--workers", help="Data-parallel workers on Ray Train (1: in this process, no Ray)."
)
RAY_ADDRESS = typer.Option(
    None, "--ray-address", help="Join this Ray cluster (HOST:PORT) instead of a local one."
)
GPUS = typer.Option(
    None, "--gpus/--no-gpus", help="One GPU per worker (default: if there is one each)."
)
