"""The `diffnas` command line.

User errors (bad files, flags, architectures) print one message and exit with code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys

import click
import typer
from rich.console import Console

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


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    err = Console(stderr=True)
    try:
        app(args=argv, prog_name="diffnas", standalone_mode=False)
    except UserError as e:
        if "--debug" in argv:
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
