"""The Stable Diffusion world (nas/worlds/sd.py) and the paper's experiment file.

Nothing here is downloaded: the tests write a diffusers pipeline folder with
`StableDiffusionPipeline.save_pretrained` (a small random VAE, text encoder and tokenizer made
here, and either SD-v1.5's UNet config at random weights or a small UNet), MS-COCO-format
caption files, a few training images and a small open_clip model's weights file, laid out as
`experiments/snapfusion_sd15.yaml` expects its data folder.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latency.signature import unet_parts
from nas.cli import main
from nas.experiment import load_experiment
from nas.search.evolve import RunDir
from nas.search.run import experiment_space, run_search
from nas.worlds.coco import read_val_prompts
from nas.worlds.sd import load_sd_world, world_space
from search_spaces import UserError, load_space

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "snapfusion_sd15.yaml"
CLIP_NAME = "diffnas-test-clip"  # a small open_clip config, registered like any custom model
CLIP_WEIGHTS = "open_clip/test/open_clip_pytorch_model.bin"  # under the data folder
RESOLUTION = 64  # 64 px images -> 8x8 latents through the factor-8 VAE below

VAL_CAPTIONS = {
    "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (42, 7, 9, 13)],
    "annotations": [  # the real file's order is not by id: the prompts' order must not depend on it
        {"image_id": 42, "id": 500, "caption": "A dog  runs on the beach."},
        {"image_id": 7, "id": 900, "caption": "a second caption of image 7"},
        {"image_id": 7, "id": 300, "caption": " A red bus parked\nby a curb. "},
        {"image_id": 9, "id": 100, "caption": "A dog runs on the beach."},  # a repeat: kept once
        {"image_id": 13, "id": 50, "caption": "Two cats sleep on a sofa."},
    ],
}
VAL_PROMPTS = [
    "A red bus parked by a curb.",
    "A dog runs on the beach.",
    "Two cats sleep on a sofa.",
]


# -- making the files ----------------------------------------------------------------------------


def write_clip(data: Path) -> Path:
    """A small open_clip model: its config registered with open_clip, its random weights
    saved as a plain state-dict file (the format of open_clip_pytorch_model.bin)."""
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 1,
        },
    }
    configs = data / "open_clip_configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{CLIP_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(configs)
    torch.manual_seed(0)
    weights = data / CLIP_WEIGHTS
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip.create_model(CLIP_NAME).state_dict(), weights)
    return weights


def write_pipeline(folder: Path, unet: UNet2DConditionModel, tokens: int) -> None:
    """A diffusers SD pipeline folder around `unet`: a factor-8 VAE, a one-layer CLIP text
    encoder of the UNet's cross-attention width, a letters-only BPE tokenizer, SD-v1.5's
    noise schedule (its PNDM scheduler config, as the real pipeline ships)."""
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["th"], vocab["the</w>"] = len(vocab), len(vocab) + 1  # the results of the merges
    (folder.parent / "vocab.json").write_text(json.dumps(vocab))
    (folder.parent / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    tokenizer = CLIPTokenizer(
        str(folder.parent / "vocab.json"),
        str(folder.parent / "merges.txt"),
        model_max_length=tokens,
    )
    width = unet.config.cross_attention_dim
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=width // 64 if width >= 64 else 2,
            max_position_embeddings=tokens,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,  # three downsamplings: factor 8, as SD's
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32] * 4,
        layers_per_block=1,
        latent_channels=4,
        sample_size=RESOLUTION,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def write_coco(data: Path) -> None:
    """MS-COCO-format captions (val and train) and three training images of odd sizes, at
    the paths of the paper's experiment file."""
    annotations = data / "coco" / "annotations"
    annotations.mkdir(parents=True)
    (annotations / "captions_val2014.json").write_text(json.dumps(VAL_CAPTIONS))
    images = data / "coco" / "train2014"
    images.mkdir()
    rng = np.random.default_rng(0)
    train = {"images": [], "annotations": []}
    for i, (h, w) in enumerate([(72, 96), (80, 64), (64, 64)]):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
        train["images"].append({"id": i, "file_name": name, "height": h, "width": w})
        for k in range(2):
            caption = f"the picture {i} caption {k}"
            train["annotations"].append({"image_id": i, "id": 10 * i + k, "caption": caption})
    (annotations / "captions_train2014.json").write_text(json.dumps(train))


SMALL_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "sample_size": 8,
}
SMALL_SPACE = """
name: small-sd
base: {pretrained: sd-small}
inputs: {latent: [4, 16, 16], context: [16, 32], batch: 2}
rules:
  - {match: "*", kind: cross_attention, removable: true, max_copies: 1}
  - {match: "*", kind: resnet, removable: true, on_illegal: skip}
constraints:
  - {stage: "*", kind: resnet, min: 1}
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A data folder in the paper's layout with a small SD pipeline (sd-small/) and its space."""
    data = tmp_path_factory.mktemp("data")
    write_clip(data)
    write_coco(data)
    torch.manual_seed(0)
    write_pipeline(data / "sd-small", UNet2DConditionModel(**SMALL_UNET), tokens=16)
    (data / "small.yaml").write_text(SMALL_SPACE)
    return data


def overrides(data: Path, root: Path, **more) -> dict:
    """The paper's experiment scaled to this machine: the test's files, a CPU table measured
    here, one evolution iteration, two prompts."""
    return {
        "world.data_dir": str(data),
        "world.clip_model": CLIP_NAME,
        "world.clip_weights": CLIP_WEIGHTS,
        "world.resolution": RESOLUTION,
        "world.device": "cpu",
        "latency.device": "cpu-test",
        "latency.backend": "torch",
        "latency.compute_unit": "cpu",
        "latency.precision": "fp32",
        "latency.build": True,
        "latency.repeats": 1,
        "latency.db": str(root / "latency.db"),
        "target.ratio": 0.9,
        "search.max_iterations": 1,
        "search.group_size": 1,
        "evaluation.prompts": 2,
        "evaluation.batch_size": 2,
        **more,
    }


# -- the paper's experiment file without its files -----------------------------------------------


def test_the_paper_protocol_is_what_the_file_says():
    exp = load_experiment(EXPERIMENT)
    assert exp.space == "sd15" and exp.world.kind == "stable_diffusion"
    assert (exp.evaluation.prompts, exp.evaluation.steps, exp.evaluation.cfg) == (2000, 50, 7.5)
    assert exp.world.clip_model == "ViT-g-14" and exp.world.resolution == 512
    assert exp.world.captions.endswith("captions_val2014.json")
    assert (exp.latency.device, exp.latency.backend) == ("iphone-14-pro", "coreml")
    assert exp.target.ms == 230  # SnapFusion's UNet on an iPhone 14 Pro (paper Tables 1, 4)


def test_missing_files_are_named_with_their_keys_and_nothing_is_created(tmp_path):
    exp = load_experiment(EXPERIMENT, **{"world.data_dir": str(tmp_path / "data")})
    with pytest.raises(UserError) as e:
        run_search(exp, runs=tmp_path / "runs", progress=False)
    message = str(e.value)
    data = tmp_path / "data"
    for key, path, source in [
        ("pipeline", data / "sd-v1-5", "huggingface-cli download"),
        ("captions", data / "coco/annotations/captions_val2014.json", "cocodataset.org"),
        ("clip_weights", data / "open_clip/ViT-g-14/open_clip_pytorch_model.bin", "laion/"),
        ("train_images", data / "coco/train2014", "train2014.zip"),
        ("train_captions", data / "coco/annotations/captions_train2014.json", "captions_train"),
    ]:
        line = next(ln for ln in message.splitlines() if ln.strip().startswith(f"- world.{key}:"))
        assert str(path) in line and source in line, line
    assert "lacks 5 of its files" in message and f"world.data_dir = {data}" in message
    assert not (tmp_path / "runs").exists()


def test_the_cli_says_so_and_exits_with_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the file's data_dir, data/, is read from here: empty
    with pytest.raises(SystemExit) as e:
        main(["search", str(EXPERIMENT), "--runs", str(tmp_path / "runs")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the stable_diffusion world lacks 5 of its files")
    assert str(tmp_path / "data" / "sd-v1-5") in err
    assert not (tmp_path / "runs").exists()


def test_a_pipeline_folder_without_its_parts(tmp_path):
    (tmp_path / "sd-v1-5" / "unet").mkdir(parents=True)
    exp = load_experiment(EXPERIMENT, **{"world.data_dir": str(tmp_path)})
    with pytest.raises(UserError, match=r"has no vae/, text_encoder/, tokenizer/, scheduler/"):
        experiment_space(exp)


# -- validation prompts --------------------------------------------------------------------------


def test_validation_prompts_order_one_caption_per_image_distinct(small):
    prompts = read_val_prompts(small / "coco/annotations/captions_val2014.json")
    # images by id (7, 9, 13, 42); image 7's lowest annotation id; 42 repeats 9's caption
    assert prompts == VAL_PROMPTS


def test_a_captions_file_of_another_format(tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps({"annotations": [{"image_id": 1, "text": "no caption key"}]}))
    with pytest.raises(UserError, match="not an MS-COCO captions file"):
        read_val_prompts(bad)
    bad.write_text("{")
    with pytest.raises(UserError, match=r"captions\.json:1: not valid JSON"):
        read_val_prompts(bad)


# -- a small pipeline: loading, training data, bad input -----------------------------------------


def small_experiment(small: Path, root: Path, **more):
    return load_experiment(
        EXPERIMENT,
        **overrides(
            small,
            root,
            **{"space": str(small / "small.yaml"), "world.pipeline": "sd-small", **more},
        ),
    )


def test_the_world_loads_every_part_from_the_pipeline(small, tmp_path):
    exp = small_experiment(small, tmp_path, **{"search.train_steps": 1})
    space = experiment_space(exp)
    assert space.latent == (4, 8, 8)  # resolution 64 through a factor-8 VAE, not the file's 16
    world = load_sd_world(exp, space, progress=False)
    assert world.space.latent == space.latent
    assert world.val_prompts == VAL_PROMPTS
    # DDIM from the pipeline's (PNDM) scheduler config: SD-v1.5's noise schedule
    assert world.scheduler_config["_class_name"] == "DDIMScheduler"
    assert world.scheduler_config["beta_schedule"] == "scaled_linear"
    assert world.scheduler_config["steps_offset"] == 1
    config = world.train_config(steps=3)
    assert (config.beta_start, config.beta_end) == (0.00085, 0.012)
    assert config.prediction_type == "epsilon"

    context = world.encode_text(["the picture", ""])
    assert context.shape == (2, 16, 32)
    assert torch.allclose(world.uncond(), context[1:], atol=1e-6)
    images = world.decode(torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    vae = world.encoder.vae
    expected = (vae.decode(torch.ones(1, 4, 8, 8) / vae.config.scaling_factor).sample + 1) / 2
    assert torch.allclose(world.decode(torch.ones(1, 4, 8, 8)), expected.clamp(0, 1), atol=1e-5)

    data = world.dataset(4, seed=0)
    assert len(data) == 6  # every caption of every training image
    image, caption = data[1]
    assert image.shape == (3, 64, 64) and -1 <= image.min() and image.max() <= 1
    assert caption == "the picture 0 caption 1"
    latents, contexts = world.encode_batch(image[None], [caption])
    assert latents.shape == (1, 4, 8, 8) and contexts.shape == (1, 16, 32)
    scores = world.clip.score(world.decode(torch.randn(2, 4, 8, 8)), VAL_PROMPTS[:2])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_one_iteration_with_robust_training_on_local_images(small, tmp_path):
    exp = small_experiment(
        small, tmp_path, **{"search.train_steps": 1, "search.batch_size": 2, "evaluation.steps": 2}
    )
    result = run_search(exp, runs=tmp_path / "runs", progress=False)
    (record,) = RunDir(result.run_dir).history()
    assert record["actions"] and all(a["delta_ms"] > 0 for a in record["actions"])
    before = UNet2DConditionModel.from_pretrained(small / "sd-small", subfolder="unet")
    after = UNet2DConditionModel.from_pretrained(result.run_dir / "final", subfolder="unet")
    moved = [k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])]
    assert moved  # the training step changed the weights the search evaluated


@pytest.mark.parametrize(
    "more, message",
    [
        ({"world.train_images": "nowhere"}, r"world.train_images: no folder .*nowhere"),
        ({"world.resolution": 60}, r"world.resolution=60 is not a multiple of .* factor 8"),
        ({"world.clip_model": "ViT-nothing"}, r"open_clip has no model 'ViT-nothing'"),
        (
            {"space": "sd15"},  # the small pipeline's UNet is not the sd15 space's
            r"not the base network of space 'sd15': .*block_out_channels is \[32, 64\], "
            r"the space's \[320, 640, 1280, 1280\]",
        ),
    ],
    ids=["train-images-missing", "resolution", "clip-model", "unet-of-another-space"],
)
def test_bad_world_input_is_a_clear_error(small, tmp_path, more, message):
    exp = small_experiment(small, tmp_path, **more)
    with pytest.raises(UserError, match=message):
        run_search(exp, runs=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_training_steps_without_training_data_is_an_error(small, tmp_path):
    data = yaml.safe_load(EXPERIMENT.read_text())
    del data["world"]["train_images"], data["world"]["train_captions"]
    path = tmp_path / "no-train.yaml"
    path.write_text(yaml.safe_dump(data))
    exp = load_experiment(path, **overrides(small, tmp_path, **{"world.pipeline": "sd-small"}))
    with pytest.raises(UserError, match=r"search.train_steps=500: robust training needs") as e:
        experiment_space(exp)
    assert "world.train_images" in str(e.value) and "search.train_steps: 0" in str(e.value)


def test_world_keys_belong_to_their_kind(tmp_path):
    with pytest.raises(UserError, match=r"world: pipeline, captions, .*: only for kind stable"):
        load_experiment(EXPERIMENT, **{"world.kind": "tiny"})
    data = yaml.safe_load(EXPERIMENT.read_text())
    del data["world"]["captions"]
    path = tmp_path / "no-captions.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"world: kind stable_diffusion needs captions"):
        load_experiment(path)


# -- the sd15 UNet: one evolution iteration on the real path -------------------------------------


@pytest.fixture(scope="module")
def sd15_run(small, tmp_path_factory):
    """One evolution iteration of the paper's experiment with the sd15 UNet (random weights)
    at 8x8 latents: the pipeline is written next to the small one, as data/sd-v1-5/."""
    root = tmp_path_factory.mktemp("sd15")
    torch.manual_seed(0)
    write_pipeline(
        small / "sd-v1-5", UNet2DConditionModel.from_config(load_space("sd15").unet_config), 77
    )
    gc.collect()  # the 860M-parameter UNet written above is freed before the world loads its own
    exp = load_experiment(
        EXPERIMENT, **overrides(small, root, **{"search.train_steps": 0, "evaluation.steps": 1})
    )
    result = run_search(exp, runs=root / "runs", progress=False)
    yield exp, result
    # three copies of 3.4 GB (pipeline, checkpoint, final): not kept after the module
    shutil.rmtree(small / "sd-v1-5")
    shutil.rmtree(root)


def test_sd15_iteration_scores_every_removal(sd15_run):
    exp, result = sd15_run
    history = RunDir(result.run_dir).history()
    assert len(history) == 1
    (record,) = history
    sd15 = load_space("sd15")
    removable = [p for p, s in sd15.slots.items() if s.removable]
    assert sorted(a["slot"] for a in record["actions"]) == sorted(removable)
    for a in record["actions"]:
        assert math.isfinite(a["delta_clip"]) and a["delta_ms"] > 0
        assert a["value"] == pytest.approx(a["delta_clip"] / a["delta_ms"])
    assert record["latency_ms"] > record["target_ms"] and record["decision"] == "remove"
    assert len(record["applied"]) == 1


def test_sd15_table_holds_the_8x8_signatures(sd15_run):
    exp, result = sd15_run
    space = json.loads((result.run_dir / "space.json").read_text())
    assert space["name"] == "sd15" and space["inputs"]["latent"] == [4, 8, 8]
    rows = json.loads((result.run_dir / "table.json").read_text())
    sd15_at_8 = load_space("sd15").with_inputs(latent=(4, 8, 8))
    at_8 = {p.signature.hash for p in unet_parts(sd15_at_8, "fp32")}
    assert {r["sig_hash"] for r in rows} == at_8
    sides = {
        side
        for r in rows
        for shape in r["signature"]["inputs"].values()
        if len(shape) == 4  # feature maps (B, C, H, W); the time embedding is (B, C)
        for side in shape[2:]
    }
    assert max(sides) == 8  # measured at the 8x8 latent, not at the space file's 64x64
    assert all(r["device"] == "cpu-test" and r["backend"] == "torch" for r in rows)
    assert (result.run_dir / "report.html").is_file()
    assert world_space(exp, load_space("sd15")).latent == (4, 8, 8)
