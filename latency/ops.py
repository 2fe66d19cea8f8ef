"""`diffnas latency show --ops`: where an ExecuTorch block spends its time, per operator.

The block's program is run with an ETDump (ExecuTorch's event trace) and read back with
`executorch.devtools.Inspector`: every XNNPACK kernel inside the delegate, and every op left to
ExecuTorch's portable kernels outside it — what a user needs to see when a block is slower on
the runtime than expected (e.g. attention masking ops outside the delegate).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from search_spaces import UserError

from . import executorch as et
from .table import LatencyTable

# runtime bookkeeping events of the trace, not operators
_FRAME_EVENTS = ("OPERATOR_CALL", "DELEGATE_CALL", "Method::init", "Program::load_method")


@dataclass
class OpTime:
    name: str  # XNNPACK kernel ("Fully Connected (NC, F32) GEMM") or portable op ("mul.Scalar")
    delegated: bool  # ran inside the delegate
    calls: int  # occurrences per run
    ms: float  # Σ of their median times per run


def profile_ops(path: str | Path, inputs, runs: int = 5) -> list[OpTime]:
    """Per-operator medians of `runs` runs of the program at `path` (slowest first)."""
    program = et.load(path, etdump=True)
    for _ in range(runs):
        program.forward(list(inputs))
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "run.etdump"
        program.write_etdump_result_to_file(str(dump))
        from executorch.devtools import Inspector

        frame = Inspector(etdump_path=str(dump)).to_dataframe()
    ops: dict[tuple[str, bool], OpTime] = {}
    for _, row in frame.iterrows():
        name = str(row["event_name"])
        if row["event_block_name"] != "Execute" or name in _FRAME_EVENTS:
            continue
        delegated = bool(row["is_delegated_op"])
        if not delegated:  # portable kernels trace as native_call_<op>.out
            name = re.sub(r"^native_call_|\.out$|_out$", "", name)
        name = re.sub(r" #\d+$", "", name)  # XNNPACK numbers each instance of a kernel
        op = ops.setdefault((name, delegated), OpTime(name, delegated, 0, 0.0))
        op.calls += 1
        op.ms += float(row["p50 (ms)"])
    return sorted(ops.values(), key=lambda o: -o.ms)


def show_ops(table: LatencyTable, device: str, prefix: str, console: Console) -> None:
    """Print the per-operator breakdown of the device's ExecuTorch block `prefix` (a hash)."""
    rows = [m for m in table.rows(device) if m.signature.hash.startswith(prefix)]
    if not rows:
        raise UserError(f"no block of device {device!r} has a hash starting with {prefix!r}")
    if len({m.signature.hash for m in rows}) > 1:
        raise UserError(f"{prefix!r} matches several blocks of {device!r}: give more of the hash")
    m = rows[-1]
    if m.backend != "executorch":
        raise UserError(
            f"--ops reads ExecuTorch traces; {device!r} was measured with {m.backend!r}"
        )
    from .backends import get_backend

    attention = str(m.versions.get("attention", "classic")).split()[0]
    backend = get_backend("executorch", compute_unit=m.compute_unit, attention=attention)
    backend.test_connection()
    path = backend.convert_model(m.signature)
    ops = profile_ops(path, m.signature.example_inputs())
    t = Table("operator", "where", "calls", "ms", title=f"{m.signature.describe()} on {device}")
    for op in ops:
        t.add_row(
            op.name, m.compute_unit if op.delegated else "portable", str(op.calls), f"{op.ms:.3f}"
        )
    console.print(t)
    outside = et.read_sidecar(path).get("outside_delegate", {})
    if outside:
        listed = ", ".join(f"{k} x{v}" for k, v in sorted(outside.items()))
        console.print(f"left outside the {m.compute_unit} delegate: {listed}")
    else:
        console.print(f"every compute op is inside the {m.compute_unit} delegate")
