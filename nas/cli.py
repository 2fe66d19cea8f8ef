"""The `diffnas` command line.

User errors (bad files, flags, architectures) print one message and exit with code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys

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
