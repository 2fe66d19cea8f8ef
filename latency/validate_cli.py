"""`diffnas latency validate`: predicted against measured whole networks."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from search_spaces import load_space

from .backends import setting_backend
from .cli_options import Db, console, open_table
from .predict import Predictor


def validate_command(measure_factory):
    """The `latency validate` command; `measure_factory(space, backend) -> callable(arch) -> ms`
    times whole networks (the nas side supplies it, keeping latency free of nas)."""

    def validate_cmd(
        space: str = typer.Argument(..., help="Space name or YAML file."),
        device: str = typer.Option(..., "--device"),
        samples: int = typer.Option(20, "--samples", help="Random architectures to measure."),
        db: Db = None,
        repeats: int = typer.Option(5, "--repeats", help="Timed runs per network."),
        rounds: int = typer.Option(
            2,
            "--rounds",
            help="Passes over all networks, each in a new order: 1, or an even number. Each "
            "network keeps its fastest of the odd rounds (judged); its fastest of the even rounds "
            "measures the timing noise the same way.",
        ),
        threads: int = typer.Option(None, "--threads"),
        seed: int = typer.Option(0, "--seed"),
        protocol: str = typer.Option(
            "separate",
            "--protocol",
            help="separate: predict from the table as it is (what a search uses). paired: "
            "time each network right after its own blocks and predict from those, which checks "
            "the additive model free of the machine's drift since the table was built (the "
            "table is not changed).",
        ),
        out: Path = typer.Option(
            Path("latency_validation"),
            "--out",
            help="Folder for the JSON report and the scatter PNG.",
        ),
        calibrate: bool = typer.Option(
            False, "--calibrate", help="Store the fitted calibration with the table."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        backend: str = typer.Option(None, "--backend", help="Setting of the device to check."),
        compute_unit: str = typer.Option(None, "--compute-unit"),
        precision: str = typer.Option(None, "--precision"),
    ) -> None:
        """Predicted vs measured whole networks: MAPE, ±5%/±10% shares, Kendall τ."""
        from .validate import PROTOCOLS, scatter_plot, validate

        if protocol not in PROTOCOLS:
            raise typer.BadParameter(
                f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}",
                param_hint="--protocol",
            )
        if samples < 2:
            raise typer.BadParameter("need at least 2 samples", param_hint="--samples")
        if rounds < 1:
            raise typer.BadParameter("need at least 1 round", param_hint="--rounds")
        if rounds % 2 and rounds > 1:
            raise typer.BadParameter(
                f"{rounds}: give 1, or an even number (half the rounds measure the noise)",
                param_hint="--rounds",
            )
        sp = load_space(space)
        with open_table(db) as table:
            predictor = Predictor(
                sp,
                table,
                device,
                backend=backend,
                compute_unit=compute_unit,
                precision=precision,
                calibrate=False,
            )
            s = predictor.setting
            backend = setting_backend(
                s,
                repeats=repeats,
                threads=threads,
            )
            measure = measure_factory(sp, backend)
            report = validate(
                sp,
                predictor,
                measure,
                samples,
                seed=seed,
                rounds=rounds,
                protocol=protocol,
                profile=lambda sig: backend.profile(sig).median_ms,
            )
            if calibrate:
                c = report.calibration
                table.add_calibration(
                    device,
                    sp.name,
                    c["slope"],
                    c["intercept"],
                    len(report.archs),
                    report.mape,
                    c["mape_after"],
                    backend=s["backend"],
                    compute_unit=s["compute_unit"],
                    precision=s["precision"],
                )
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{sp.name}-{device}.json").write_text(json.dumps(report.to_dict(), indent=2))
        scatter_plot(report, out / f"{sp.name}-{device}.png")
        if as_json:
            console.print_json(json.dumps(report.to_dict()))
        else:
            console.print(
                f"{sp.name} on {device} ({protocol}): MAPE {report.mape:.2f}%, within ±5% "
                f"{100 * report.within_5:.0f}%, within ±10% {100 * report.within_10:.0f}%, "
                f"Kendall τ {report.kendall_tau:.3f} ({len(report.archs)} networks)\n"
                f"calibrated MAPE {report.calibration['mape_after']:.2f}%; wrote {out}/"
            )
            if report.repeat:  # what the same networks measured twice agree to
                r = report.repeat
                console.print(
                    f"timing noise (round 2 vs round 1): MAPE {r['mape']:.2f}%, "
                    f"Kendall τ {r['kendall_tau']:.3f}"
                )

    return validate_cmd
