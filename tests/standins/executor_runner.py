"""A stand-in for ExecuTorch's `executor_runner`, for tests: the same flags and the same
timing line, running the `.pte` with this machine's ExecuTorch runtime (inputs of ones, as
executor_runner feeds them)."""

import argparse
import sys
import time
import warnings

import torch

DTYPES = {6: torch.float32, 4: torch.int64, 3: torch.int32}  # ExecuTorch ScalarType codes

ap = argparse.ArgumentParser()
ap.add_argument("--model_path", required=True)
ap.add_argument("--num_executions", type=int, default=1)
ap.add_argument("--cpu_threads", type=int, default=-1)
ap.add_argument("--etdump_path", default=None)
args = ap.parse_args()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from executorch.extension.pybindings import portable_lib

if args.cpu_threads > 0:
    portable_lib._unsafe_reset_threadpool(args.cpu_threads)
try:
    program = portable_lib._load_for_executorch(
        args.model_path, enable_etdump=bool(args.etdump_path)
    )
except RuntimeError as e:
    print(f"E executor_runner: loading {args.model_path} failed: {e}", file=sys.stderr)
    sys.exit(1)
meta = program.method_meta("forward")
inputs = []
for i in range(meta.num_inputs()):
    info = meta.input_tensor_meta(i)
    inputs.append(torch.ones(tuple(info.sizes()), dtype=DTYPES[info.dtype()]))
start = time.perf_counter()
for _ in range(args.num_executions):
    program.forward(inputs)
ms = (time.perf_counter() - start) * 1000
n = args.num_executions
print(f"I executor_runner.cpp: Model executed successfully {n} time(s) in {ms:f} ms.")
if args.etdump_path:
    program.write_etdump_result_to_file(args.etdump_path)
