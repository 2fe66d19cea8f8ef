"""Lowering torch modules to ExecuTorch programs (`.pte`) and running them on this machine.

The path is ExecuTorch's own: `torch.export.export` -> `to_edge_transform_and_lower(...,
partitioner=[<delegate's partitioner>])` -> `.to_executorch()` -> the program's bytes. The
XNNPACK delegate (ExecuTorch's CPU backend on Android and iOS) also runs here, through
`executorch.extension.pybindings.portable_lib`, so a phone-class runtime can be timed on Linux.

Attention: diffusers' default processor (`AttnProcessor2_0`, scaled-dot-product attention)
lowers with its masking ops outside XNNPACK (a 320-channel cross-attention block measured
173 ms against 69 ms with the classic `AttnProcessor` on a 2-core x86 VM). Blocks and whole
networks are therefore exported with one named processor (`ATTENTION`), set by
`set_attention_processor`, and the name is recorded with every measurement, so that a table
and the network deployed from it agree.

ExecuTorch is an optional extra (`pip install "diffnas[executorch]"`); without it every entry
point here raises one `UserError` saying how to install it.
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from search_spaces import UserError

from .coreml import cache_dir

INSTALL_HINT = 'pip install "diffnas[executorch]" (ExecuTorch 1.5, beside torch 2.14)'
PTE_MAGIC_OFFSET = slice(4, 8)  # a .pte is a flatbuffer: its 4-byte file identifier, "ET12"


@dataclass(frozen=True)
class Delegate:
    """One ExecuTorch backend a block can be lowered to (`--compute-unit` names it)."""

    name: str  # the compute unit, as the table stores it
    partitioner: str  # "module:Class" of its partitioner in the executorch package
    runtime: str  # the backend's name in the runtime (portable_lib._is_available)
    runs_on: str  # where its programs run, for the message when they cannot run here


DELEGATES = {
    d.name: d
    for d in (
        Delegate(
            "xnnpack",
            "executorch.backends.xnnpack.partition.xnnpack_partitioner:XnnpackPartitioner",
            "XnnpackBackend",
            "Arm and x86 CPUs (Android, iOS, Linux, macOS)",
        ),
        Delegate(
            "coreml",
            "executorch.backends.apple.coreml.partition:CoreMLPartitioner",
            "CoreMLBackend",
            "Apple devices: time it with an ExecuTorch runtime built for iOS or macOS",
        ),
        Delegate(
            "vulkan",
            "executorch.backends.vulkan.partitioner.vulkan_partitioner:VulkanPartitioner",
            "VulkanBackend",
            "GPUs with Vulkan (most Android phones): time it with the Android agent",
        ),
        Delegate(
            "qnn",
            "executorch.backends.qualcomm.partition.qnn_partitioner:QnnPartitioner",
            "QnnBackend",
            "Qualcomm NPUs: time it with the Android agent",
        ),
        Delegate(
            "mps",
            "executorch.backends.apple.mps.partition:MPSPartitioner",
            "MPSBackend",
            "Apple GPUs (Metal)",
        ),
    )
}

# name -> diffusers processor class (in diffusers.models.attention_processor)
ATTENTION = {"classic": "AttnProcessor", "sdpa": "AttnProcessor2_0"}


def require() -> str:
    """The installed ExecuTorch version, or a UserError saying how to install it."""
    try:
        version = importlib.metadata.version("executorch")
        importlib.import_module("executorch.exir")
    except (importlib.metadata.PackageNotFoundError, ImportError) as e:
        raise UserError(
            f"ExecuTorch is not installed ({e}); install it with {INSTALL_HINT}"
        ) from None
    return version


def runtime():
    """ExecuTorch's Python runtime bindings (imported quietly: they warn on every import)."""
    require()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from executorch.extension.pybindings import portable_lib
    return portable_lib


def partitioner(delegate: str):
    """The delegate's partitioner, or a UserError saying why this ExecuTorch cannot lower to it."""
    require()
    if delegate not in DELEGATES:
        raise UserError(
            f"unknown ExecuTorch delegate {delegate!r}; choose one of {', '.join(DELEGATES)}"
        )
    d = DELEGATES[delegate]
    if delegate == "qnn":
        # QNN lowering compiles with Qualcomm's SDK for one SoC, which this package cannot know
        raise UserError(
            "the qnn delegate needs the Qualcomm AI Engine Direct SDK and a target SoC to "
            "lower; diffnas does not configure them: lower with ExecuTorch's QNN scripts and "
            "time the .pte with the Android agent, or use --compute-unit xnnpack"
        )
    module, cls = d.partitioner.split(":")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError) as e:
        raise UserError(
            f"the installed ExecuTorch ({require()}) cannot lower to {delegate!r}: {e}; "
            f"choose one of {', '.join(lowerable())}"
        ) from None


def lowerable() -> list[str]:
    """The delegates this installation can lower to (qnn needs an SDK it cannot configure)."""
    out = []
    for name, d in DELEGATES.items():
        try:
            found = importlib.util.find_spec(d.partitioner.split(":")[0]) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if found and name != "qnn":
            out.append(name)
    return out


def can_run_here(delegate: str) -> bool:
    return bool(runtime()._is_available(DELEGATES[delegate].runtime))


def set_attention_processor(module: nn.Module, attention: str = "classic") -> int:
    """Give every diffusers `Attention` inside `module` the processor named `attention`
    (a block, a UNet, an ElasticUNet with its copies); returns how many were set.

    The table's blocks and a deployed network must use the same one (see the module doc)."""
    from diffusers.models import attention_processor

    if attention not in ATTENTION:
        raise UserError(
            f"unknown attention processor {attention!r}; choose one of {', '.join(ATTENTION)}"
        )
    n = 0
    for m in module.modules():
        if isinstance(m, attention_processor.Attention):
            m.set_processor(getattr(attention_processor, ATTENTION[attention])())
            n += 1
    return n


@dataclass
class Lowered:
    """A lowered program and what the delegate left to ExecuTorch's portable kernels."""

    buffer: bytes  # the .pte
    delegate_calls: int  # subgraphs handed to the delegate
    outside: dict[str, int]  # op name -> count of compute ops that stayed outside it


# bookkeeping nodes that do no compute, whether inside a delegate or not
_NOT_COMPUTE = ("getitem", "executorch_call_delegate", "alloc", "sym_size")


def lower(
    module: nn.Module, inputs: tuple, delegate: str = "xnnpack", attention: str = "classic"
) -> Lowered:
    """Export `module` on `inputs` (their shapes become the program's) and lower it.

    Raises a UserError naming the ops left outside when the delegate took none of the compute
    (its program would time ExecuTorch's portable kernels, not the delegate)."""
    part = partitioner(delegate)
    from executorch.exir import to_edge_transform_and_lower

    set_attention_processor(module, attention)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module.eval(), inputs)
        try:
            edge = to_edge_transform_and_lower(exported, partitioner=[part])
        except Exception as e:  # a delegate's preprocess raising on an op it claimed
            raise UserError(f"ExecuTorch could not lower to {delegate!r}: {e}") from None
        calls, outside = count_ops(edge.exported_program().graph_module)
        if calls == 0:
            listed = ", ".join(f"{op} x{n}" for op, n in outside.most_common())
            raise UserError(
                f"the {delegate} delegate took none of this block; ops left outside: {listed}"
            )
        buffer = edge.to_executorch().buffer
    return Lowered(buffer, calls, dict(outside))


def count_ops(graph_module) -> tuple[int, collections.Counter]:
    """(delegate calls, Counter of compute op names outside any delegate) of an edge graph."""
    calls, outside = 0, collections.Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            calls += 1
        elif not any(s in name for s in _NOT_COMPUTE):
            # EdgeOpOverload names read "aten.native_group_norm.default"
            outside[str(getattr(node.target, "_op", node.target)).split(".default")[0]] += 1
    return calls, outside


# -- .pte files: written with a sidecar that says what made them ------------------------------


def versions() -> dict:
    import diffusers

    return {"executorch": require(), "torch": torch.__version__, "diffusers": diffusers.__version__}


def save(path: str | Path, lowered: Lowered, metadata: dict | None = None) -> Path:
    """Write `path` (.pte) and `path`.json: versions, delegate, ops left outside, `metadata`."""
    path = Path(path)
    if path.suffix != ".pte":
        raise UserError(f"an ExecuTorch program is saved as a .pte file; got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(lowered.buffer)
    info = {
        **versions(),
        "delegate_calls": lowered.delegate_calls,
        "outside_delegate": lowered.outside,
        **(metadata or {}),
    }
    sidecar(path).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # the program last: a .pte that exists is complete
    return path


def sidecar(path: str | Path) -> Path:
    return Path(f"{path}.json")


def read_sidecar(path: str | Path) -> dict:
    try:
        return json.loads(sidecar(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def check_version(path: str | Path) -> None:
    """A UserError if `path` was written by another ExecuTorch than the one installed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    ours = require()
    made_by = read_sidecar(path).get("executorch")
    if made_by is not None and made_by != ours:
        raise UserError(
            f"{path} was written by ExecuTorch {made_by}, and this runtime is {ours}: a .pte "
            "runs only on the runtime version that wrote it; lower the block again"
        )
    with open(path, "rb") as f:
        ident = f.read(8)[PTE_MAGIC_OFFSET]
    expected = _program_identifier()
    if ident != expected:
        raise UserError(
            f"{path} is not an ExecuTorch program this runtime ({ours}) reads: its identifier "
            f"is {ident!r}, expected {expected!r} (another ExecuTorch version, or not a .pte)"
        )


def _program_identifier() -> bytes:
    """The file identifier of the installed runtime's program schema (ExecuTorch 1.x: ET12)."""
    from importlib.resources import files

    schema = files("executorch.exir._serialize").joinpath("program.fbs").read_bytes()
    found = re.search(rb'file_identifier\s+"([^"]{4})"', schema)
    return found.group(1) if found else b"ET12"


def load(path: str | Path, etdump: bool = False):
    """The program at `path`, loaded by this machine's runtime (version checked first)."""
    check_version(path)
    try:
        return runtime()._load_for_executorch(str(path), enable_etdump=etdump)
    except RuntimeError as e:
        raise UserError(f"the ExecuTorch runtime could not load {path}: {e}") from None


def set_threads(threads: int | None) -> int:
    """Set the runtime's thread pool (None: leave it) and return its size."""
    rt = runtime()
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1, not {threads}")
        rt._unsafe_reset_threadpool(threads)
    return int(rt._threadpool_get_thread_count())


def time_program(program, inputs, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `repeats` runs of `forward`, after `warmup` untimed ones."""
    return time_in_turns({"program": program}, inputs, warmup, repeats)["program"]


def time_in_turns(programs: dict, inputs, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of `repeats` runs of each program, one run of each in turn, again and
    again: a machine that gets busy part-way slows every program alike, so their ratios hold."""
    args = list(inputs)
    for program in programs.values():
        for _ in range(warmup):
            program.forward(args)
    samples: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(repeats):
        for name, program in programs.items():
            start = time.perf_counter()
            program.forward(args)
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def cache_path(key: str, delegate: str, attention: str) -> Path:
    """Where a block's program is cached: per ExecuTorch version, so a new one lowers again."""
    return cache_dir() / "executorch" / require() / f"{key}-{delegate}-{attention}.pte"
