"""Core ML export of ElasticUNet architectures (nas/deploy/coreml.py), on the tiny space.

Each conversion of the whole tiny UNet takes tens of seconds (coremltools' pass pipeline over
~900 ops), so the two packages are converted once per module and every check reads them. The
`torch.export` program that each conversion started from is kept (by wrapping
`nas.deploy.coreml.export_program`) and compared against the ElasticUNet itself: the package
cannot be run on Linux, but the program it was converted from can.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import nas.deploy.coreml as export_module
from nas.deploy.coreml import COMPUTE_UNITS, PRECISIONS, export_coreml
from nas.supernet import ElasticUNet
from search_spaces import Architecture, ArchitectureError, UserError, load_space

ct = pytest.importorskip("coremltools")

# coremltools 9 warns of its own deprecated registry on every op it converts (~900 per model)
pytestmark = pytest.mark.filterwarnings("ignore:Function _TORCH_OPS_REGISTRY:DeprecationWarning")

RANDOM_SEED = 3  # space.random(3) of the tiny space removes some blocks and copies others


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


@pytest.fixture(scope="module")
def model(space):
    torch.manual_seed(0)
    return ElasticUNet(space)


@pytest.fixture(scope="module")
def random_arch(space):
    arch = space.random(RANDOM_SEED)
    counts = list(arch.multiplicity.values())
    assert 0 in counts and max(counts) > 1, "the seed must give removals and copies"
    return arch


def _export(model, arch, path, **kwargs):
    """export_coreml, also returning the exported program it converted; predict forbidden."""
    programs = []
    real_export_program = export_module.export_program

    def keep(*a, **kw):
        programs.append(real_export_program(*a, **kw))
        return programs[-1]

    def no_predict(*a, **kw):
        raise AssertionError("export must not load or run the Core ML model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_module, "export_program", keep)
        mp.setattr(ct.models.MLModel, "predict", no_predict)
        out = export_coreml(model, arch, path, **kwargs)
    assert len(programs) == 1
    return out, programs[0]


@pytest.fixture(scope="module")
def original_export(model, space):
    # the exported program only: one Core ML conversion (random_export) keeps the suite fast
    return None, export_module.export_program(model, space.original())


@pytest.fixture(scope="module")
def random_export(model, random_arch, tmp_path_factory):
    # a different arch is current while exporting: export must set `arch` and restore this one
    model.set_architecture(model.space.original())
    model.train()
    path = tmp_path_factory.mktemp("coreml") / "sub" / "random.mlpackage"  # parent is created
    out = _export(model, random_arch, path, precision="fp16", compute_units="CPU_AND_NE", batch=1)
    assert model.architecture == model.space.original() and model.training
    model.eval()
    return out


def _inputs(batch, space, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, *space.latent, generator=g),
        torch.tensor([10.0 + 37 * i for i in range(batch)]),
        torch.randn(batch, *space.context, generator=g),
    )


def _io(spec):
    def shapes(features):
        return {f.name: tuple(f.type.multiArrayType.shape) for f in features}

    return shapes(spec.description.input), shapes(spec.description.output)


# -- the packages ------------------------------------------------------------------------------


def test_original_program_has_space_shapes(original_export, space):
    _, program = original_export
    b, latent, context = space.batch, tuple(space.latent), tuple(space.context)
    shapes = [tuple(s.shape) for s in program.example_inputs[0]]
    assert shapes == [(b, *latent), (b,), (b, *context)]


def test_random_package_has_overrides_and_its_architecture(random_export, random_arch, space):
    path, _ = random_export
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)  # a spec, no Core ML runtime
    inputs, outputs = _io(mlmodel.get_spec())
    assert inputs["sample"] == (1, *space.latent)  # batch=1 override
    assert inputs["encoder_hidden_states"] == (1, *space.context)
    assert outputs == {"noise_pred": (1, *space.latent)}
    output_type = mlmodel.get_spec().description.output[0].type.multiArrayType.dataType
    assert output_type == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32  # also in fp16
    meta = mlmodel.user_defined_metadata
    assert meta["diffnas.architecture_hash"] == random_arch.hash != space.original().hash
    assert Architecture.from_dict(json.loads(meta["diffnas.architecture"])) == random_arch
    assert meta["diffnas.precision"] == "fp16"
    assert meta["diffnas.compute_units"] == "CPU_AND_NE"


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_predict_is_unavailable_on_linux(random_export, space):
    # what export avoids (it converts with skip_model_load=True and never predicts): on Linux
    # the Core ML runtime is missing, so a loaded package cannot run
    path, _ = random_export
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    sample, timestep, context = (t.numpy() for t in _inputs(1, space, 0))
    with pytest.raises(Exception, match="macOS|CoreML"):  # coremltools raises a bare Exception
        mlmodel.predict({"sample": sample, "timestep": timestep, "encoder_hidden_states": context})


# -- the exported programs equal the ElasticUNet -----------------------------------------------


def _elastic(model, arch, inputs):
    model.eval()
    model.set_architecture(arch)
    try:
        return model(*inputs, return_dict=False)[0]
    finally:
        model.set_architecture(model.space.original())


@torch.no_grad()
def test_exported_original_matches_elastic(original_export, model, space):
    _, program = original_export
    inputs = _inputs(space.batch, space, seed=1)  # not the values export traced with
    expected = _elastic(model, space.original(), inputs)
    torch.testing.assert_close(program.module()(*inputs), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_exported_random_arch_matches_elastic(random_export, model, space, random_arch):
    _, program = random_export
    inputs = _inputs(1, space, seed=2)
    expected = _elastic(model, random_arch, inputs)
    torch.testing.assert_close(program.module()(*inputs), expected, atol=1e-5, rtol=0)
    # the architecture is baked into the graph: the original network computes something else
    assert not torch.allclose(_elastic(model, space.original(), inputs), expected, atol=1e-3)


# -- bad input: fails at once, before any export, and leaves the model as it was ---------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "model.mlmodel"}, ".mlpackage"),
        ({"path": "model"}, ".mlpackage"),
        ({"precision": "int8"}, ", ".join(PRECISIONS)),
        ({"precision": "FP16"}, ", ".join(PRECISIONS)),
        ({"compute_units": "NE_ONLY"}, ", ".join(COMPUTE_UNITS)),
        ({"batch": 0}, "batch must be a positive integer"),
        ({"latent": (12, 16)}, "three integers"),
        ({"latent": (12, 0, 16)}, "positive"),
        ({"latent": (4, 16, 16)}, "takes 12"),
    ],
)
def test_bad_arguments_raise_user_errors(model, space, tmp_path, monkeypatch, kwargs, message):
    def no_export(*a, **kw):
        raise AssertionError("bad input must fail before exporting")

    monkeypatch.setattr(torch.export, "export", no_export)
    args = {"path": tmp_path / "m.mlpackage", **kwargs}
    before = model.architecture
    with pytest.raises(UserError, match=re.escape(message)):
        export_coreml(model, space.random(RANDOM_SEED), **args)
    assert model.architecture == before
    assert not any(tmp_path.iterdir())


def test_architecture_of_another_space_or_illegal_is_rejected(model, space, tmp_path):
    other = Architecture("sd15", dict(space.original().multiplicity))
    with pytest.raises(ArchitectureError, match="space 'sd15'"):
        export_coreml(model, other, tmp_path / "m.mlpackage")
    not_removable = next(p for p, s in space.slots.items() if not s.removable)
    illegal = space.original().with_multiplicity(not_removable, 0)
    with pytest.raises(ArchitectureError, match="not removable"):
        export_coreml(model, illegal, tmp_path / "m.mlpackage")


def test_failed_export_restores_architecture_and_mode(model, space, tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("export failed")

    monkeypatch.setattr(torch.export, "export", broken)
    model.set_architecture(space.original())
    model.train()
    try:
        with pytest.raises(RuntimeError, match="export failed"):
            export_coreml(model, space.random(RANDOM_SEED), tmp_path / "m.mlpackage")
        assert model.architecture == space.original()
        assert model.training
    finally:
        model.eval()
