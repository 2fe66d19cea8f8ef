"""experiments/benchmarks/eval_cost.py: a protocol's reference shares none of its images."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "experiments" / "benchmarks" / "eval_cost.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("eval_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_reference_images_share_no_prompt_and_no_noise():
    bench = load_bench()
    prompts = [f"prompt {i % 10}" for i in range(40)]  # 10 prompts cycled, image i noise i
    ref = bench.independent_images(prompts, 4, 16)
    assert len(ref) == 16 and not set(ref) & set(range(4))  # other noises
    assert not {prompts[i] for i in ref} & set(prompts[:4])  # other prompts
    assert ref == [i for i in range(4, 40) if i % 10 >= 4][:16]
    # 40 images hold 24 independent of the first 4; 8 prompts leave only 2 of 10 free
    assert bench.independent_images(prompts, 4, 25) is None
    assert bench.independent_images(prompts, 8, 9) is None
