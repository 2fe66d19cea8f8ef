"""`diffnas latency serve | agent | bundle | transfer`: the shared-device side of the tables."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from search_spaces import UserError, load_space

from .cli_options import Adb, Db, Repeats, Runner, Threads, Warmup, console, db_path

DEFAULT_PORT = 8470


def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port (0: any free one)."),
    db: Db = None,
    public_read: bool = typer.Option(
        False, "--public-read", help="Let anyone read tables and predictions without a token."
    ),
    admin_token_file: Path = typer.Option(
        None,
        "--admin-token-file",
        help="The admin token's file, mode 0600 (default: DB.admin-token; created if absent). "
        "$DIFFNAS_ADMIN_TOKEN overrides it.",
    ),
    lease_seconds: float = typer.Option(
        300.0,
        "--lease-seconds",
        help="A leased job returns to the queue after this long without a heartbeat.",
    ),
    max_attempts: int = typer.Option(
        3, "--max-attempts", help="Tries per job (failures and expired leases) before failed."
    ),
    max_body: int = typer.Option(1 << 20, "--max-body", help="Request body cap, bytes."),
    ssl_certfile: Path = typer.Option(None, "--ssl-certfile", help="Serve HTTPS: certificate."),
    ssl_keyfile: Path = typer.Option(None, "--ssl-keyfile", help="Serve HTTPS: private key."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level."),
) -> None:
    """Run the latency service: devices, profiling jobs, tables and predictions over HTTP."""
    from .auth import admin_token, default_admin_file
    from .service import bind, create_app, loopback, serve

    path = db_path(db)
    # plain print: the token must come out whole, never wrapped or read as markup
    token = admin_token(admin_token_file or default_admin_file(path), print)
    app = create_app(
        path,
        token,
        public_read=public_read,
        lease_seconds=lease_seconds,
        max_attempts=max_attempts,
        max_body=max_body,
    )
    sock = bind(host, port)
    scheme = "https" if ssl_certfile else "http"
    where = f"{scheme}://{host}:{sock.getsockname()[1]}"
    console.print(
        f"serving {path} at {where} (API docs at {where}/docs); reads "
        + ("are public" if public_read else "need a token")
    )
    if not loopback(host) and not ssl_certfile:
        console.print(
            "[yellow]warning:[/] listening beyond this machine over plain HTTP: tokens travel "
            "in clear; use --ssl-certfile/--ssl-keyfile or a TLS reverse proxy"
        )
    ssl = (
        {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
    )
    serve(app, sock, log_level=log_level, **ssl)


def agent_cmd(
    server: str = typer.Option(..., "--server", help="The service, e.g. http://host:8470."),
    device: str = typer.Option(..., "--device", help="The device this agent times blocks on."),
    backend: str = typer.Option(
        None, "--backend", help="torch or coreml; must be the device's (default: the device's)."
    ),
    token_file: Path = typer.Option(
        None,
        "--token-file",
        help="File (mode 0600) with this device's agent token (default: $DIFFNAS_TOKEN).",
    ),
    repeats: Repeats = 10,
    warmup: Warmup = 3,
    threads: Threads = None,
    name: str = typer.Option(None, "--name", help="This agent's name (default: host-pid)."),
    poll: float = typer.Option(5.0, "--poll", help="Seconds between asks when the queue is empty."),
    exit_when_empty: bool = typer.Option(
        False, "--exit-when-empty", help="Stop once no job is queued or leased."
    ),
    give_up_after: float = typer.Option(
        None,
        "--give-up-after",
        help="Stop after this many seconds of failed retries (default: keep trying).",
    ),
    ca: Path = typer.Option(
        None,
        "--ca",
        help="PEM certificate(s) to trust for an https:// service, e.g. its self-signed "
        "--ssl-certfile (default: the system's CAs).",
    ),
    adb: Adb = None,
    runner: Runner = None,
) -> None:
    """Lease profiling jobs of DEVICE, time them here, post the results; until stopped."""
    from .agent import Agent, install_signal_handlers
    from .auth import AGENT_ENV, read_token_file
    from .backends import setting_backend
    from .client import Client

    if token_file is not None:
        token = read_token_file(token_file)
    elif os.environ.get(AGENT_ENV):
        token = os.environ[AGENT_ENV].strip()
    else:
        raise UserError(
            f"give --token-file (an agent token for {device!r}, from POST /tokens with the "
            f"admin token) or set ${AGENT_ENV}"
        )

    def make_backend(info: dict):
        if backend is not None and backend != info["backend"]:
            raise UserError(
                f"device {device!r} is registered with backend {info['backend']}, not {backend}; "
                f"start the agent with --backend {info['backend']}"
            )
        return setting_backend(
            info,
            adb=adb,  # built here, timed on the phone (latency/backends/android.py)
            runner=runner,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
        )

    agent = Agent(
        Client(server, token, ca=ca),
        device,
        make_backend,
        name=name,
        poll=poll,
        exit_when_empty=exit_when_empty,
        say=lambda s: print(s, flush=True),  # plain lines: agents run under nohup or systemd
        give_up_after=give_up_after,
    )
    install_signal_handlers(agent)
    agent.run()


def bundle_cmd(
    out: Path = typer.Argument(..., help="New folder for the models and manifest.json."),
    device: str = typer.Option(..., "--device", help="A phone: a Core ML or an ExecuTorch device."),
    db: Db = None,
    space: str = typer.Option(
        None, "--space", help="First queue the blocks of this space that the device lacks."
    ),
    kind: str = typer.Option(
        None, "--kind", help="Register DEVICE first, as this kind (e.g. iphone-14-pro)."
    ),
    backend: str = typer.Option(
        "coreml", "--backend", help="With --kind: coreml (.mlpackage) or executorch (.pte)."
    ),
    compute_unit: str = typer.Option(
        None,
        "--compute-unit",
        help="With --kind: coreml: ALL (default), CPU_ONLY, CPU_AND_GPU or CPU_AND_NE; "
        "executorch: the delegate, xnnpack (default), coreml, vulkan, ...",
    ),
    precision: str = typer.Option(
        None, "--precision", help="With --kind: fp16 or fp32 (default: coreml fp16, else fp32)."
    ),
    repeats: int = typer.Option(10, "--repeats", help="Timed runs the app should make."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs the app should make first."),
) -> None:
    """Export DEVICE's queued jobs as .mlpackages or .pte programs + manifest.json for the
    phone."""
    from .bundle import export_bundle
    from .jobs import JobStore

    with JobStore(db_path(db)) as store:
        if kind is not None:
            precision = precision or ("fp16" if backend == "coreml" else "fp32")
            store.add_device(device, kind, backend, compute_unit, precision)
        if space is not None:
            d = store.device(device)
            from .signature import signatures

            queued = store.enqueue(device, signatures(load_space(space), d.precision))
            console.print(
                f"queued {len(queued['created'])} job(s) of {space} "
                f"({queued['already_measured']} already measured)"
            )
        manifest = export_bundle(store, device, out, warmup=warmup, repeats=repeats)
    console.print(
        f"wrote {len(manifest['models'])} model(s) and {out / 'manifest.json'} "
        f"(bundle {manifest['bundle_id']}); bring the app's results back with "
        f"`diffnas latency import --device {device} results.json`"
    )


def transfer_cmd(
    source: str = typer.Option(..., "--from", help="Fully measured device A."),
    target: str = typer.Option(..., "--to", help="New device B."),
    budget: int = typer.Option(10, "--budget", help="Blocks to measure on B (K)."),
    db: Db = None,
    space: str = typer.Option(None, "--space", help="Only the blocks of this space."),
    backend: str = typer.Option(None, "--backend", help="B's backend if B is new (default torch)."),
    compute_unit: str = typer.Option(None, "--compute-unit", help="B's compute unit if new."),
    precision: str = typer.Option(None, "--precision", help="B's precision if new (default A's)."),
    queue: bool = typer.Option(
        False,
        "--queue",
        help="Queue the chosen blocks as B's jobs instead of timing them "
        "here; run again once agents have measured them.",
    ),
    repeats: Repeats = 10,
    warmup: Warmup = 3,
    threads: Threads = None,
) -> None:
    """Fill B's table from A's with K measurements on B (the rest stored as `predicted`)."""
    from .backends import get_backend, setting_backend
    from .jobs import JobStore, NotFound
    from .signature import signatures
    from .transfer import transfer

    with JobStore(db_path(db)) as store:
        table = store.table
        src = table.setting(source)
        try:
            d = store.device(target)
            setting = {"backend": d.backend, "compute_unit": d.compute_unit}
            setting["precision"] = d.precision
        except NotFound:
            d = None
            if table.last_id(target):
                s = table.setting(target)
                setting = {k: s[k] for k in ("backend", "compute_unit", "precision")}
            else:
                b = get_backend(backend or "torch", compute_unit=compute_unit)
                setting = {
                    "backend": b.name,
                    "compute_unit": b.compute_unit,
                    "precision": precision or src["precision"],
                }
        sigs = signatures(load_space(space), src["precision"]) if space else None
        measure = None
        if not queue:
            b = setting_backend(
                setting,
                repeats=repeats,
                warmup=warmup,
                threads=threads,
            )
            try:
                b.test_connection()
            except UserError as e:
                raise UserError(f"{e}; or time B's blocks elsewhere with --queue") from None
            measure = b.profile
        report = transfer(
            table, source, target, budget, setting, measure, signatures=sigs, say=console.print
        )
        if queue:
            if d is None:
                raise UserError(
                    f"--queue needs {target!r} registered with the service (POST /devices)"
                )
            if report.to_measure:
                queued = store.enqueue(target, report.to_measure)
                console.print(
                    f"queued {len(queued['created'])} block(s) for {target}; run this command "
                    "again once its agents have measured them"
                )
                return
    console.print(
        f"{target}: {len(report.anchors)} block(s) measured ({len(report.measured)} now), "
        f"{len(report.predicted)} filled as `predicted` from {source}; leave-one-out error "
        f"on the measured ones {report.loo_mape:.1f}% (ridge λ {report.lam:g})"
    )


def register(app: typer.Typer) -> None:
    """Add the service commands to `diffnas latency`."""
    app.command("serve")(serve_cmd)
    app.command("agent")(agent_cmd)
    app.command("bundle")(bundle_cmd)
    app.command("transfer")(transfer_cmd)
