"""The tiny world: shapes data, CLIP scorer, DDIM generation, the cache and the CLI.

Uses `TinyWorldConfig.miniature()` (a few training steps): these tests check the code paths,
determinism and the cache, not image quality (the benchmark experiments/benchmarks/
tiny_world.py does that on the full world).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from nas.cli import main
from nas.worlds import shapes
from nas.worlds.clip import ClipScorer, clip_score, retrieval_top1
from nas.worlds.generate import generate, initial_noise, step_noise_generator
from nas.worlds.tiny import TinyWorld, TinyWorldConfig, load_tiny_world
from nas.worlds.tiny_config import _ADDED_FIELDS, BUILD_THREADS, config_hash
from search_spaces import UserError, load_space

MINI = TinyWorldConfig.miniature()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny ops gain nothing from two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A private DIFFNAS_CACHE for the module: never the user's cache."""
    folder = tmp_path_factory.mktemp("diffnas-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFNAS_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def world(cache) -> TinyWorld:
    return load_tiny_world(MINI, progress=False)


def cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return 0 if e.code is None else e.code
    return 0


# -- the dataset ---------------------------------------------------------------------------------


def test_dataset_is_deterministic_by_seed():
    a, b = shapes.ShapesDataset(6, seed=3), shapes.ShapesDataset(6, seed=3)
    for i in range(6):
        (xa, ca), (xb, cb) = a[i], b[i]
        assert ca == cb and torch.equal(xa, xb)
    other = shapes.ShapesDataset(6, seed=4)
    assert [other[i][1] for i in range(6)] != [a[i][1] for i in range(6)]
    x, caption = a[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and isinstance(caption, str)


def test_world_has_enough_variety():
    captions = shapes.all_captions()
    assert len(shapes.COLOURS) >= 6 and len(shapes.SHAPES) >= 3
    assert len(captions) == len(set(captions)) == 6 * 3 * 5 + 18 * 17 * 4
    train = shapes.train_prompts(0)
    for word in [*shapes.COLOURS, *shapes.SHAPES, *shapes.POSITIONS, *shapes.RELATIONS]:
        assert any(word in c for c in train), word


def test_validation_prompts_are_held_out():
    train_keys, val_keys = shapes.split_keys(0)
    assert not train_keys & val_keys and len(val_keys) >= 60
    val = shapes.val_prompts(0)
    assert len(val) == len(val_keys) and len(set(val)) == len(val)
    assert {shapes.caption_key(p) for p in val} == val_keys
    train = set(shapes.train_prompts(0))
    assert not train & set(val)
    # no phrasing of a validation scene is trained on ("B below A" for "A above B")
    assert not {shapes.caption_key(c) for c in train} & val_keys
    items = shapes.ShapesDataset(300, seed=0)
    assert all(shapes.caption_key(items.scene(i).caption) in train_keys for i in range(300))
    assert shapes.split_keys(1)[1] != val_keys  # the split seed chooses


def test_equivalent_captions_share_a_key():
    key = shapes.caption_key
    assert key("a red circle above a blue square") == key("a blue square below a red circle")
    assert key("a red circle to the left of a white square") == key(
        "a white square to the right of a red circle"
    )
    assert key("a red circle above a blue square") != key("a blue square above a red circle")
    assert key("A  Red circle on the left") == key("a red circle on the left")
    for text in ["a pink circle on the left", "a red circle above a red circle", "hello", ""]:
        assert key(text) is None


def _colour_mask(image: torch.Tensor, colour: str) -> torch.Tensor:
    rgb = torch.tensor(shapes.COLOURS[colour])[:, None, None]
    return (image - rgb).abs().amax(0) < 0.02  # fully covered pixels of that colour


def _centroid(mask: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


def test_images_show_what_their_captions_say():
    data = shapes.ShapesDataset(200, seed=5)
    checked = 0
    for i in range(len(data)):
        scene = data.scene(i)
        image = shapes.render(scene)
        text = scene.caption
        if m := shapes._SINGLE_RE.match(text):
            colour, _, position = m.groups()
            x, y = _centroid(_colour_mask(image, colour))
            expected = {
                "on the left": x < 13,
                "on the right": x > 19,
                "at the top": y < 13,
                "at the bottom": y > 19,
                "in the center": 13 <= x <= 19 and 13 <= y <= 19,
            }
            assert expected[position], (text, x, y)
        else:
            c1, _, relation, c2, _ = shapes._PAIR_RE.match(text).groups()
            if c1 == c2:
                continue  # same colour: the pixels do not say which shape is which
            (x1, y1), (x2, y2) = (_centroid(_colour_mask(image, c)) for c in (c1, c2))
            expected = {
                "above": y1 < y2 - 6,
                "below": y1 > y2 + 6,
                "to the left of": x1 < x2 - 6,
                "to the right of": x1 > x2 + 6,
            }
            assert expected[relation], (text, (x1, y1), (x2, y2))
        checked += 1
    assert checked > 150
    triangle, square = (
        shapes.render(shapes.Scene((shapes.Shape("red", k, 16, 16, 6),), "", ""))
        for k in ("triangle", "square")
    )
    assert not torch.equal(triangle, square)  # shape kinds differ in pixels


def test_scene_for_caption_rejects_other_text():
    with pytest.raises(UserError, match="not a caption of the shapes world"):
        shapes.scene_for_caption("a cat on a mat", random.Random(0))
    with pytest.raises(UserError, match="split must be"):
        shapes.ShapesDataset(4, split="test")


# -- the CLIP scorer ----------------------------------------------------------------------------


def test_clip_features_are_normalised_and_shaped(world):
    clip = world.clip
    prompts = ["a red circle on the left", "a blue square above a green triangle", "x"]
    text = clip.text_features(prompts)
    images = shapes.render_batch(shapes.scenes_for_prompts(prompts[:2], seed=0))
    image = clip.image_features(images)
    assert text.shape == (3, 128) and image.shape == (2, 128)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(image.norm(dim=-1), torch.ones(2), atol=1e-5)
    tokens = clip.token_features(prompts)
    assert tokens.shape == (3, 16, 128)
    # images of another size go through the same resize + crop
    assert clip.image_features(torch.rand(2, 3, 64, 48)).shape == (2, 128)


def test_clip_score_is_100_times_positive_cosine(world):
    clip = world.clip
    prompts = ["a red circle on the left", "a purple triangle at the top"]
    images = shapes.render_batch(shapes.scenes_for_prompts(prompts, seed=0))
    cos = (clip.image_features(images) * clip.text_features(prompts)).sum(-1)
    assert torch.allclose(clip.score(images, prompts), 100 * cos.clamp(min=0), atol=1e-4)
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    b = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(clip.score_features(a, b), torch.tensor([0.0, 100 / 2**0.5]))
    assert torch.equal(clip_score(a, b), clip.score_features(a, b))


def test_clip_bad_input(world):
    clip = world.clip
    with pytest.raises(UserError, match="empty"):
        clip.text_features([])
    with pytest.raises(UserError, match="list of strings"):
        clip.text_features("a red circle on the left")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        clip.image_features(torch.full((1, 3, 32, 32), -1.0))
    with pytest.raises(UserError, match="N, 3, H, W"):
        clip.image_features(torch.rand(3, 32, 32))
    with pytest.raises(UserError, match="one each"):
        clip.score(torch.rand(2, 3, 32, 32), ["a red circle on the left"])
    with pytest.raises(UserError, match="pair up"):
        clip.score_features(torch.rand(2, 128), torch.rand(3, 128))


def test_from_open_clip_needs_a_local_weights_file(tmp_path):
    missing = tmp_path / "vit-g-14.bin"
    with pytest.raises(UserError, match="not found at") as e:
        ClipScorer.from_open_clip("ViT-g-14", missing)
    assert str(missing) in str(e.value) and "put it at" in str(e.value)
    with pytest.raises(UserError, match="weights file"):
        ClipScorer.from_open_clip("ViT-g-14")
    with pytest.raises(UserError, match="unknown open_clip model"):
        ClipScorer.from_open_clip("no-such-model", missing)
    with pytest.raises(UserError, match="not an open_clip model folder"):
        ClipScorer.from_open_clip(f"local-dir:{tmp_path}")


def test_from_open_clip_loads_a_named_model_from_a_file(world, tmp_path):
    """The path SD's ViT-g-14 takes, with the tiny CLIP's config registered under a name."""
    name = "diffnas-test-tiny-clip"
    config = json.loads((world.folder / "clip" / "open_clip_config.json").read_text())
    (tmp_path / f"{name}.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    weights = tmp_path / "weights.pt"
    torch.save(world.clip.model.state_dict(), weights)
    loaded = ClipScorer.from_open_clip(name, weights)
    prompts = ["a red circle on the left"]
    assert torch.allclose(loaded.text_features(prompts), world.clip.text_features(prompts))


def test_clip_saves_in_open_clip_layout(world, tmp_path):
    world.clip.save(tmp_path / "clip")
    model = open_clip.create_model(f"local-dir:{tmp_path / 'clip'}")
    again = ClipScorer.load(tmp_path / "clip")
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again.image_features(images), world.clip.image_features(images))
    assert type(model).__name__ == "CLIP"


def test_retrieval_counts_equivalent_captions_as_matches(world):
    clip = world.clip
    prompts = ["a red circle above a blue square", "a blue square below a red circle"]
    images = shapes.render_batch(shapes.scenes_for_prompts(prompts, seed=0))
    keys = [shapes.caption_key(p) for p in prompts]
    assert retrieval_top1(clip, images, prompts, keys) == 1.0  # both images match both


# -- generation ---------------------------------------------------------------------------------


def test_generation_is_deterministic_given_the_noise(world):
    prompts = ["a red circle on the left", "a blue square above a green triangle"]
    context, uncond = world.encode_text(prompts), world.uncond()
    noise = initial_noise(world.space, 2, seed=7)
    assert torch.equal(noise, initial_noise(world.space, 2, seed=7))
    a = generate(world.supernet, context, uncond, noise, steps=3, cfg=3.0)
    b = generate(world.supernet, context, uncond, noise.clone(), steps=3, cfg=3.0)
    assert a.shape == (2, 12, 16, 16) and torch.equal(a, b)
    c = generate(world.supernet, context, uncond, initial_noise(world.space, 2, 8), 3, 3.0)
    assert not torch.equal(a, c)
    # w = 1 is plain conditional sampling (one UNet call per step); w changes the result
    assert not torch.equal(a, generate(world.supernet, context, uncond, noise, 3, 1.0))
    assert not world.supernet.training


def test_stochastic_generation_is_seeded(world):
    prompts = ["a red circle on the left", "a blue square above a green triangle"]
    context, uncond = world.encode_text(prompts), world.uncond()
    noise = initial_noise(world.space, 2, seed=7)
    deterministic = generate(world.supernet, context, uncond, noise, steps=3, cfg=3.0)
    # eta = 0 draws nothing: a generator changes nothing
    gen = step_noise_generator(0)
    assert torch.equal(
        deterministic,
        generate(world.supernet, context, uncond, noise, 3, 3.0, eta=0.0, generator=gen),
    )
    assert torch.equal(gen.get_state(), step_noise_generator(0).get_state())

    def ancestral(seed: int) -> torch.Tensor:
        return generate(
            world.supernet,
            context,
            uncond,
            noise,
            3,
            3.0,
            eta=1.0,
            generator=step_noise_generator(seed),
        )

    a = ancestral(0)
    assert torch.equal(a, ancestral(0)) and not torch.equal(a, ancestral(1))
    assert not torch.equal(a, deterministic) and torch.isfinite(a).all()
    # the step noise is a stream of its own, not the initial noise drawn again
    first = torch.randn(noise.numel(), generator=step_noise_generator(7))
    assert not torch.equal(first, noise.flatten())
    # the world's generate seeds it from its seed
    images = world.generate(prompts, seed=3, steps=2, eta=1.0)
    assert torch.equal(images, world.generate(prompts, seed=3, steps=2, eta=1.0))
    assert not torch.equal(images, world.generate(prompts, seed=3, steps=2))


def test_generation_runs_any_architecture(world):
    space = world.space
    no_attention = space.original()
    for path, slot in space.slots.items():
        if slot.kind == "cross_attention":
            no_attention = no_attention.with_multiplicity(path, 0)
    prompts = ["a red circle on the left"]
    full = world.generate(prompts, steps=2)
    cut = world.generate(prompts, steps=2, arch=no_attention)
    assert full.shape == cut.shape == (1, 3, 32, 32) and not torch.equal(full, cut)
    assert world.supernet.architecture == space.original()  # restored


def test_generation_bad_input(world):
    net, uncond = world.supernet, world.uncond()
    context = world.encode_text(["a red circle on the left"])
    noise = initial_noise(world.space, 1, 0)
    with pytest.raises(UserError, match="empty"):
        world.generate([])
    with pytest.raises(UserError, match="at least one step"):
        generate(net, context, uncond, noise, steps=0, cfg=3.0)
    with pytest.raises(UserError, match="noise must be"):
        generate(net, context, uncond, torch.randn(1, 3, 32, 32), steps=2, cfg=3.0)
    with pytest.raises(UserError, match="context must be"):
        generate(net, context.repeat(2, 1, 1), uncond, noise, steps=2, cfg=3.0)
    with pytest.raises(UserError, match="uncond"):
        generate(net, context, uncond[:, :8], noise, steps=2, cfg=3.0)
    with pytest.raises(UserError, match="at least one"):
        initial_noise(world.space, 0, 0)
    for eta in (-0.1, 1.5):
        with pytest.raises(UserError, match=r"eta=.* is in \[0, 1\]"):
            generate(net, context, uncond, noise, steps=2, cfg=3.0, eta=eta)


def test_prompts_outside_the_grammar_are_fine(world):
    """Any text tokenizes (unknown words are just other tokens); only an empty list is wrong."""
    prompts = ["a zebra doing yoga", "", "A RED CIRCLE!!"]
    assert world.encode_text(prompts).shape == (3, 16, 128)
    assert world.generate(prompts, steps=1).shape == (3, 3, 32, 32)
    long = " ".join(["red"] * 40)  # longer than the 16-token context: truncated
    assert world.encode_text([long]).shape == (1, 16, 128)


def test_latents_are_the_image_exactly(world):
    images = shapes.render_batch(shapes.scenes_for_prompts(world.val_prompts[:3], seed=0))
    latents = world.to_latent(images)
    assert latents.shape == (3, 12, 16, 16)
    assert torch.allclose(world.decode(latents), images, atol=1e-6)
    assert world.encode_text(world.val_prompts[:3]).shape == (3, 16, 128)
    assert world.uncond().shape == (1, 16, 128)
    with pytest.raises(UserError, match="32, 32"):
        world.to_latent(torch.rand(1, 3, 64, 64))


def test_world_prompts_and_training_hooks(world):
    assert world.val_prompts == shapes.val_prompts(MINI.split_seed)
    assert not set(world.val_prompts) & set(world.train_prompts)
    config = world.train_config(steps=5)
    assert config.steps == 5 and config.prediction_type == MINI.prediction_type
    data = world.dataset(2)
    images, captions = torch.stack([data[0][0], data[1][0]]), [data[0][1], data[1][1]]
    latents, context = world.encode_batch(images, captions)
    assert latents.shape == (2, 12, 16, 16) and context.shape == (2, 16, 128)


# -- the cache ----------------------------------------------------------------------------------


def _mtimes(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_second_load_reuses_the_cache(world, cache):
    assert world.folder.parent.parent == cache
    assert world.folder.name == config_hash(MINI, world.space)
    before = _mtimes(world.folder)
    again = load_tiny_world(MINI, progress=False)
    assert not again.built and again.folder == world.folder
    assert _mtimes(world.folder) == before  # nothing was trained or rewritten
    for name, p in world.supernet.state_dict().items():
        assert torch.equal(p, again.supernet.state_dict()[name]), name
    metrics = json.loads((world.folder / "metrics.json").read_text())
    assert metrics["config_hash"] == world.folder.name
    saved = json.loads((world.folder / "config.json").read_text())["config"]
    assert TinyWorldConfig(**saved) == MINI  # what is left out is at its default


def test_cache_is_keyed_by_the_config_content(world, cache):
    space = load_space("tiny")
    assert config_hash(MINI, space) == config_hash(TinyWorldConfig.miniature(), space)
    other = replace(MINI, unet_steps=3)
    assert config_hash(other, space) != config_hash(MINI, space)
    # a UNet-only change keeps the CLIP stage: its trained CLIP is reused, not retrained
    assert config_hash(other, space, clip_only=True) == config_hash(MINI, space, clip_only=True)
    clip_folder = cache / "tiny_clip" / config_hash(MINI, space, clip_only=True)
    clip_before = _mtimes(clip_folder)
    built = load_tiny_world(other, progress=False)
    assert built.built and built.folder != world.folder
    assert "clip_built" not in built.metrics  # loaded from the CLIP stage's cache
    assert _mtimes(clip_folder) == clip_before
    assert built.metrics["unet_final_loss"] > 0


def test_an_added_field_at_its_neutral_value_keeps_the_hash(world):
    """A field added to TinyWorldConfig after a world was cached leaves that world's hash and
    config.json alone at the value that builds what was built before the field existed."""
    space = load_space("tiny")
    saved = json.loads((world.folder / "config.json").read_text())["config"]
    for name, neutral in _ADDED_FIELDS.items():
        assert getattr(MINI, name) == neutral and name not in saved
        shifted = replace(MINI, **{name: 2 * neutral + 1})
        assert config_hash(shifted, space) != config_hash(MINI, space)
    # the hash is that of the fields the config had before: as a config of an older version
    before = {k: v for k, v in asdict(MINI).items() if k not in _ADDED_FIELDS}
    assert saved == json.loads(json.dumps(before))
    assert load_tiny_world(MINI, progress=False).folder == world.folder


def test_rebuild_trains_again_and_reproduces(world):
    # the fixture's build was called with this module's 1 thread, the rebuild with 3: the
    # build's own fixed thread count makes the weights the same bit for bit
    torch.set_num_threads(3)
    try:
        rebuilt = load_tiny_world(MINI, progress=False, rebuild=True)
        assert torch.get_num_threads() == 3  # the caller's count is given back
    finally:
        torch.set_num_threads(1)
    assert rebuilt.built and rebuilt.metrics["torch_threads"] == BUILD_THREADS
    for name, p in world.supernet.state_dict().items():
        assert torch.equal(p, rebuilt.supernet.state_dict()[name]), name  # seeded: same weights
    prompts = ["a red circle on the left"]
    assert torch.equal(world.clip.text_features(prompts), rebuilt.clip.text_features(prompts))


def test_config_checks_and_files(tmp_path):
    with pytest.raises(UserError, match="clip_steps"):
        load_tiny_world(replace(MINI, clip_steps=0), progress=False)
    with pytest.raises(UserError, match="clip_width"):
        load_tiny_world(replace(MINI, clip_width=96), progress=False)
    with pytest.raises(UserError, match="unknown lr_scheduler 'cosin'"):
        load_tiny_world(replace(MINI, unet_lr_scheduler="cosin"), progress=False)
    with pytest.raises(UserError, match="snr_gamma=-1"):
        load_tiny_world(replace(MINI, unet_snr_gamma=-1.0), progress=False)
    with pytest.raises(UserError, match="skip_warmup_steps=-2 must not be negative"):
        load_tiny_world(replace(MINI, unet_skip_warmup_steps=-2), progress=False)
    path = tmp_path / "world.json"
    path.write_text(json.dumps({"unet_steps": 3, "clip_steps": 2}))
    assert TinyWorldConfig.from_json(path) == TinyWorldConfig(unet_steps=3, clip_steps=2)
    path.write_text(json.dumps({"unet_step": 3}))
    with pytest.raises(UserError, match="unknown: unet_step"):
        TinyWorldConfig.from_json(path)
    path.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        TinyWorldConfig.from_json(path)
    with pytest.raises(UserError, match="does not exist"):
        TinyWorldConfig.from_json(tmp_path / "missing.json")


def test_unet_training_fields_reach_the_trainer(world):
    from nas.worlds.tiny_config import unet_train_config

    config = replace(MINI, unet_lr_scheduler="cosine", unet_warmup_steps=5, unet_snr_gamma=5.0)
    train_config = unet_train_config(replace(config, unet_skip_warmup_steps=7))
    assert train_config.lr_scheduler == "cosine"
    assert train_config.lr_warmup_steps == 5
    assert train_config.snr_gamma == 5.0
    assert train_config.skip_warmup_steps == 7
    # continuing a built world (the search's fine-tuning, `diffnas train`) skips from step 1
    warmed = replace(config, unet_skip_warmup_steps=7)
    built = TinyWorld(warmed, world.space, world.clip, world.supernet)
    assert built.train_config(steps=20).skip_warmup_steps == 0
    assert unet_train_config(MINI).snr_gamma is None
    noisy = unet_train_config(replace(MINI, unet_timestep_shift=2.0, unet_timestep_noisy_share=0.3))
    assert (noisy.timestep_shift, noisy.timestep_noisy_share) == (2.0, 0.3)
    with pytest.raises(UserError, match="timestep_noisy_share=2"):
        replace(MINI, unet_timestep_noisy_share=2.0).check()  # before anything is built


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture
def mini_json(tmp_path) -> Path:
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(asdict(MINI)))
    return path


def test_cli_generate_writes_a_png(world, mini_json, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["generate", "--prompt", "a red circle on the left", "-p", "a blue square at the top"]
    argv += ["--out", str(out), "--world-config", str(mini_json), "--steps", "2", "--n", "3"]
    assert cli(argv) == 0
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == (3 * 128 + 4 * 2, 2 * 128 + 3 * 2)  # 3 x 2 images, 4x, padded
    text = capsys.readouterr().out
    assert "a blue square at the top" in text and "CLIP" in text and str(out) in text


def test_cli_generate_with_an_architecture(world, mini_json, tmp_path):
    arch = world.space.original().with_multiplicity("mid_block.attentions.0", 0)
    arch.save(tmp_path / "arch.json")
    out = tmp_path / "grid.png"
    argv = ["generate", "-p", "a red circle on the left", "--arch", str(tmp_path / "arch.json")]
    assert cli([*argv, "--out", str(out), "--world-config", str(mini_json), "--steps", "1"]) == 0
    assert out.is_file()
    out.unlink()
    argv += ["--eta", "1", "--steps", "2"]  # stochastic DDIM
    assert cli([*argv, "--out", str(out), "--world-config", str(mini_json)]) == 0
    assert out.is_file()


def test_cli_world_build_reports_the_cached_world(world, mini_json, capsys):
    for flag in ("--world-config", "--config"):  # the name of generate/train, and the old one
        assert cli(["world", "build", flag, str(mini_json)]) == 0
        text = capsys.readouterr().out
        assert "cached" in text and world.folder.name in text and "top-1" in text


def test_cli_bad_input(world, mini_json, tmp_path, capsys):
    base = ["--world-config", str(mini_json), "--steps", "1"]
    assert cli(["generate", "-p", "a red circle", "--out", str(tmp_path / "x.jpg"), *base]) == 2
    assert "give a .png file" in capsys.readouterr().err
    missing = tmp_path / "none.json"
    argv = ["generate", "-p", "x", "--out", str(tmp_path / "x.png"), "--arch", str(missing)]
    assert cli([*argv, *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["generate", "--out", str(tmp_path / "x.png"), *base]) == 2  # no --prompt
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 1}))
    assert cli(["world", "build", "--config", str(bad)]) == 2
    assert "unknown: nope" in capsys.readouterr().err
    assert cli(["generate", "-p", "x", "--out", str(tmp_path / "x.png"), "--n", "0", *base]) == 2
    capsys.readouterr()
    argv = ["generate", "-p", "x", "--out", str(tmp_path / "x.png"), "--eta", "2"]
    assert cli([*argv, *base]) == 2
    assert "eta=2.0: DDIM's eta is in [0, 1]" in capsys.readouterr().err
