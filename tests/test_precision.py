"""evaluation.precision: sampling, decoding and CLIP under autocast; weights stay fp32."""

import pytest
import torch

from nas.experiment import load_experiment
from nas.search.evaluate import Evaluator, Protocol
from nas.worlds.tiny import TinyWorldConfig, load_tiny_world
from search_spaces import UserError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFNAS_CACHE", str(tmp_path_factory.mktemp("precision") / "cache"))
    yield load_tiny_world(TinyWorldConfig.miniature(), progress=False)
    mp.undo()


def evaluator(world, precision: str) -> Evaluator:
    protocol = Protocol(world.val_prompts[:4], steps=2, batch_size=4, precision=precision)
    return Evaluator(
        world.supernet, world.clip, protocol, world.encode_text, world.uncond(), world.decode
    )


def test_bf16_scores_are_near_fp32_but_computed_in_bf16(world):
    arch = world.space.original()
    fp32 = evaluator(world, "fp32").scores(arch)
    bf16 = evaluator(world, "bf16").scores(arch)
    assert bf16.dtype == torch.float32  # scores are always fp32
    assert not torch.equal(bf16, fp32)  # autocast did run: bf16 rounding shows
    assert (bf16 - fp32).abs().max() < 5.0  # CLIP points, of scores in 0..100
    assert next(world.supernet.parameters()).dtype == torch.float32  # weights untouched
    images = evaluator(world, "bf16").images(arch, 2)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1


def test_an_unknown_precision_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="precision 'fp64' is not one of fp32, fp16, bf16"):
        Protocol(["a red circle"], precision="fp64")
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nspace: tiny\ntarget: {ratio: 0.5}\nevaluation:\n  precision: int8\n")
    with pytest.raises(UserError, match=r"evaluation\.precision.*'fp32', 'fp16' or 'bf16'"):
        load_experiment(path)
