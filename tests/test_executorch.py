"""The ExecuTorch backend (latency/executorch.py, latency/backends/executorch_backend.py) and
whole-network export (nas/deploy/executorch.py), run by this machine's real ExecuTorch runtime.

Programs are lowered from tiny random-weight blocks and a micro UNet (a few seconds each);
outputs are compared with eager torch, never timings. ExecuTorch is the `executorch` extra,
which `make install` installs: these tests do not skip without it, they fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers.models import attention_processor
from small_blocks import attention_sig, resnet_sig

from latency import executorch as et
from latency.backends import get_backend
from latency.signature import BlockSignature
from latency.table import LatencyTable
from nas.deploy.executorch import ExecuTorchNetworkTimer, export_executorch
from nas.supernet import ElasticUNet
from search_spaces import UserError, load_space
from search_spaces.unet import build_unet

MICRO = """
name: micro
base:
  config:
    _class_name: UNet2DConditionModel
    act_fn: silu
    attention_head_dim: 2
    block_out_channels: [8, 16]
    cross_attention_dim: 16
    down_block_types: [CrossAttnDownBlock2D, DownBlock2D]
    up_block_types: [UpBlock2D, CrossAttnUpBlock2D]
    in_channels: 4
    out_channels: 4
    layers_per_block: 1
    norm_num_groups: 4
    sample_size: 8
inputs: {latent: [4, 8, 8], context: [4, 16], batch: 1}
stages:
  Down: ["down_blocks.*"]
  Mid: ["mid_block.*"]
  Up: ["up_blocks.*"]
rules:
  - {match: "*", kind: cross_attention, removable: true, max_copies: 1}
  - {match: "*", kind: resnet, removable: true, on_illegal: skip}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFNAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def micro_space(tmp_path_factory):
    path = tmp_path_factory.mktemp("micro") / "micro.yaml"
    path.write_text(textwrap.dedent(MICRO).lstrip())
    return path


# -- blocks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make_sig", [resnet_sig, attention_sig])
def test_block_program_computes_the_block_and_is_cached(cache, make_sig):
    sig = make_sig()
    backend = get_backend("executorch", compute_unit="xnnpack", repeats=3, warmup=1, threads=1)
    timing = backend.profile(sig)
    path = backend.program_path(sig)
    assert path.is_file() and path.parent.parent.name == "executorch"
    assert len(timing.samples) == 3 and min(timing.samples) > 0
    v = timing.versions
    assert v["executorch"] == et.require() and v["delegate"] == "xnnpack"
    assert v["attention"] == "classic (AttnProcessor)" and v["threads"] == 1
    info = et.read_sidecar(path)
    assert info["signature"] == sig.to_dict() and info["delegate_calls"] >= 1

    # the program the runtime runs computes the block (same random weights: same seed)
    torch.manual_seed(0)
    module = sig.build()
    torch.manual_seed(0)
    fresh = et.lower(sig.build(), sig.example_inputs())
    program = et.runtime()._load_for_executorch_from_buffer(fresh.buffer)
    got = program.forward(list(sig.example_inputs()))[0]
    et.set_attention_processor(module)
    with torch.no_grad():
        want = module(*sig.example_inputs())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # a second profile takes the cached program: it is not lowered again
    stamp = path.stat().st_mtime_ns
    backend.profile(sig)
    assert path.stat().st_mtime_ns == stamp


def test_classic_attention_keeps_the_masking_ops_out_of_the_program():
    sig = attention_sig()
    sdpa = et.lower(sig.build(), sig.example_inputs(), attention="sdpa")
    classic = et.lower(sig.build(), sig.example_inputs(), attention="classic")
    masking = {"aten.logical_not", "aten.any", "aten.where"}
    # diffusers' default processor leaves its mask handling to portable kernels
    assert masking & set(sdpa.outside), sdpa.outside
    assert not masking & set(classic.outside), classic.outside


def test_set_attention_processor_covers_a_whole_unet():
    unet = build_unet(load_space("tiny").unet_config)
    n = et.set_attention_processor(unet, "classic")
    attentions = [m for m in unet.modules() if isinstance(m, attention_processor.Attention)]
    assert n == len(attentions) > 0
    assert all(type(m.processor) is attention_processor.AttnProcessor for m in attentions)
    with pytest.raises(UserError, match="unknown attention processor 'flash'.*classic, sdpa"):
        et.set_attention_processor(unet, "flash")


def test_a_block_the_delegate_takes_nothing_of_names_the_ops_left_outside():
    class Cumulative(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)  # no XNNPACK kernel: the partitioner leaves it

    with pytest.raises(UserError, match=r"xnnpack delegate took none.*aten\.cumsum"):
        et.lower(Cumulative(), (torch.randn(2, 8),))


def test_delegates_that_cannot_lower_or_run_here_are_refused():
    with pytest.raises(UserError, match="cannot lower to 'mps'.*choose one of xnnpack"):
        get_backend("executorch", compute_unit="mps").test_connection()
    with pytest.raises(UserError, match="qnn delegate needs the Qualcomm AI Engine Direct SDK"):
        get_backend("executorch", compute_unit="qnn").test_connection()
    for unit, runtime in (("coreml", "CoreMLBackend"), ("vulkan", "VulkanBackend")):
        get_backend("executorch", compute_unit=unit).check_lowering()  # builds here ...
        with pytest.raises(UserError, match=f"no {runtime} runtime"):  # ... runs elsewhere
            get_backend("executorch", compute_unit=unit).test_connection()
    with pytest.raises(UserError, match="no compute unit 'gpu'.*xnnpack, coreml, vulkan"):
        get_backend("executorch", compute_unit="gpu")


def test_cli_refuses_a_delegate_with_exit_2_and_stores_nothing(run_cli, tmp_path, micro_space):
    db = tmp_path / "t.db"
    code, out, err = run_cli(
        "latency", "build", micro_space, "--device", "phone", "--db", db,
        "--backend", "executorch", "--compute-unit", "mps",
    )  # fmt: skip
    assert code == 2 and "Traceback" not in out + err
    assert "cannot lower to 'mps'" in err
    with LatencyTable(db) as table:
        assert table.rows() == []


def test_a_program_of_another_executorch_version_is_refused(cache):
    sig = resnet_sig()
    backend = get_backend("executorch", compute_unit="xnnpack", repeats=1, warmup=0)
    path = backend.convert_model(sig)
    et.load(path)  # this version's program loads

    info = json.loads(et.sidecar(path).read_text())
    et.sidecar(path).write_text(json.dumps({**info, "executorch": "0.7.0"}))
    with pytest.raises(UserError, match=r"written by ExecuTorch 0\.7\.0.*this runtime is 1\."):
        et.load(path)
    with pytest.raises(UserError, match=r"written by ExecuTorch 0\.7\.0"):
        backend.profile(sig)  # the backend reads it through the same check: no row is made

    # a program without its sidecar, whose schema identifier is another version's
    et.sidecar(path).unlink()
    data = bytearray(path.read_bytes())
    data[4:8] = b"ET11"
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"identifier is b'ET11', expected b'ET12'"):
        et.load(path)


def test_executorch_not_installed_is_one_clear_error(tmp_path, micro_space):
    # a fresh interpreter in which importing executorch fails, as on a machine without it
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["executorch"] = None  # `import executorch` raises ImportError
        from nas.cli import main
        main(["latency", "build", {str(micro_space)!r}, "--device", "phone",
              "--db", {str(tmp_path / "t.db")!r}, "--backend", "executorch"])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ExecuTorch is not installed" in done.stderr
    assert 'pip install "diffnas[executorch]"' in done.stderr
    assert "Traceback" not in done.stderr


# -- whole networks and the CLI --------------------------------------------------------------


def test_whole_network_program_computes_the_elastic_unet(tmp_path, micro_space):
    space = load_space(micro_space)
    arch = next(a for a in (space.random(s) for s in range(50)) if a != space.original())
    torch.manual_seed(0)
    model = ElasticUNet(space).eval()
    path = export_executorch(model, arch, tmp_path / "net.pte")
    info = et.read_sidecar(path)
    assert info["architecture_hash"] == arch.hash and info["attention"] == "classic"
    assert model.architecture == space.original()  # the model's own architecture is restored

    from nas.deploy.coreml import example_inputs

    inputs = example_inputs(model)
    got = et.load(path).forward(list(inputs))[0]
    model.set_architecture(arch)
    with torch.no_grad():
        want = model(*inputs, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="saved as a .pte file"):
        export_executorch(model, arch, tmp_path / "net.onnx")

    backend = get_backend("executorch", compute_unit="xnnpack", repeats=2, warmup=0, threads=1)
    timer = ExecuTorchNetworkTimer(space, backend, folder=tmp_path / "programs")
    assert timer(arch) > 0 and set(timer.lower_seconds) == {arch.hash}
    timer(arch)
    assert set(timer.lower_seconds) == {arch.hash}  # timed again, not lowered again
    both = {"first": et.load(path), "again": et.load(path)}
    samples = et.time_in_turns(both, inputs, warmup=1, repeats=2)
    assert {k: len(v) for k, v in samples.items()} == {"first": 2, "again": 2}
    assert all(ms > 0 for v in samples.values() for ms in v)


def test_programs_timed_in_turns_run_each_one_in_alternation():
    class Program:  # a loaded program's interface: forward(list of inputs)
        def __init__(self, name, calls):
            self.name, self.calls = name, calls

        def forward(self, args):
            self.calls.append(self.name)
            return args

    calls: list[str] = []
    programs = {"a": Program("a", calls), "b": Program("b", calls)}
    samples = et.time_in_turns(programs, (torch.zeros(1),), warmup=2, repeats=3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    assert all(ms >= 0 for v in samples.values() for ms in v)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups, then one of each in turn


def test_cli_builds_and_shows_an_executorch_table(run_cli, tmp_path, micro_space, cache):
    db = tmp_path / "t.db"
    code, out, err = run_cli(
        "latency", "build", micro_space, "--device", "phone-cpu", "--db", db,
        "--backend", "executorch", "--compute-unit", "xnnpack",
        "--repeats", 1, "--warmup", 0, "--threads", 1,
    )  # fmt: skip
    assert code == 0, err
    with LatencyTable(db) as table:
        rows = table.rows("phone-cpu")
    assert rows and {(m.backend, m.compute_unit) for m in rows} == {("executorch", "xnnpack")}
    assert {m.versions["attention"] for m in rows} == {"classic (AttnProcessor)"}
    code, out, err = run_cli("latency", "predict", micro_space, "--device", "phone-cpu",
                             "--db", db)  # fmt: skip
    assert code == 0 and "predicted:" in out, err

    # per-operator breakdown of a cross-attention block, from the runtime's ETDump
    ca = next(m.signature.hash for m in rows if m.signature.kind == "cross_attention")
    code, out, err = run_cli("latency", "show", "--device", "phone-cpu", "--db", db,
                             "--ops", ca[:8])  # fmt: skip
    out = " ".join(out.split())
    assert code == 0, err
    assert "Fully Connected" in out and "xnnpack" in out  # XNNPACK's own kernels, inside
    assert "native_group_norm" in out and "portable" in out  # no XNNPACK group norm: outside
    assert "left outside the xnnpack delegate: aten.native_group_norm" in out
    code, out, err = run_cli("latency", "show", "--device", "phone-cpu", "--db", db,
                             "--ops", "zzzz")  # fmt: skip
    assert code == 2 and "no block of device 'phone-cpu' has a hash starting with 'zzzz'" in err


def test_a_signature_read_back_from_json_keeps_its_call_order():
    # canonical JSON sorts input names (encoder_hidden_states < hidden_states); a block rebuilt
    # from a table row or a service job must still be called in its own order
    sig = attention_sig()
    back = BlockSignature.from_dict(json.loads(sig.to_json()))
    assert back == sig and back.hash == sig.hash
    assert [name for name, _ in back.inputs] == ["hidden_states", "encoder_hidden_states"]
    with torch.no_grad():
        sig.build()(*back.example_inputs())  # raises if the inputs came in sorted order
