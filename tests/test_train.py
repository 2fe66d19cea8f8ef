"""Robust training (nas.training) on the tiny space with random data: a few steps per test."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from nas.supernet import ElasticUNet, SkipConfig
from nas.training.robust import LatentEncoder, TrainConfig, _timesteps, train
from search_spaces import UserError, load_space

LATENT = (12, 16, 16)
CONTEXT = (16, 128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny ops gain nothing from two, and on a busy 2-core machine
    two threads spin against other processes (measured 10x slower); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(16, *LATENT, generator=g), torch.randn(16, *CONTEXT, generator=g)
    )


def make_model(space, p: float = 0.3, **skip) -> ElasticUNet:
    torch.manual_seed(0)  # the same initial weights in every test
    return ElasticUNet(space, skip=SkipConfig(p=p, **skip))


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 3, "batch_size": 4, "checkpoint_every": 0, **kw})


def within(count: int, n: int, p: float, sigmas: float) -> bool:
    """count/n is within `sigmas` binomial standard deviations of p."""
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


# -- training runs -------------------------------------------------------------------------------


def test_training_runs_changes_weights_and_skips_at_rate_p(space, data):
    model = make_model(space, p=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data, config(steps=3), progress=False)

    assert result.steps == 3 and len(result.losses) == 3
    assert all(math.isfinite(loss) for loss in result.losses)
    after = model.state_dict()
    assert not torch.equal(before["unet.conv_in.weight"], after["unet.conv_in.weight"])
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed > len(before) // 2

    # the skips the model made while training: only removable blocks, at rate p overall
    removable = [path for path, slot in space.slots.items() if slot.removable]
    assert {path for path, _ in result.skip_counts} <= set(removable)
    assert all(i == 0 for _, i in result.skip_counts)  # no copies in the original network
    total = sum(result.skip_counts.values())
    assert within(total, 3 * len(removable), 0.3, sigmas=4)


def test_same_seed_same_losses_and_v_prediction(space, data):
    cfg = config(steps=2, prediction_type="v_prediction", seed=3)
    a = train(make_model(space), data, cfg, progress=False)
    b = train(make_model(space), data, cfg, progress=False)
    assert a.losses == b.losses
    assert all(math.isfinite(loss) for loss in a.losses)
    assert a.skip_counts == b.skip_counts

    other_seed = config(steps=1, prediction_type="v_prediction", seed=4)
    other = train(make_model(space), data, other_seed, progress=False)
    assert other.losses[0] != a.losses[0]


def test_lr_schedule_is_applied_from_the_first_step(space, data):
    # diffusers' warm-up starts at lr 0: the first step changes nothing, unlike a constant lr
    warm = make_model(space)
    before = {k: v.clone() for k, v in warm.state_dict().items()}
    cfg = config(steps=1, lr=1e-2, lr_scheduler="constant_with_warmup", lr_warmup_steps=5)
    train(warm, data, cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in warm.state_dict().items())
    constant = make_model(space)
    train(constant, data, config(steps=1, lr=1e-2), progress=False)
    assert not torch.equal(before["unet.conv_in.weight"], constant.unet.conv_in.weight)


def test_skip_warmup_trains_the_full_network_first(space, data):
    # p = 0.9 skips almost every removable block in every step: the counts show which steps did
    removable = sum(slot.removable for slot in space.slots.values())
    model = make_model(space, p=0.9)
    warm = train(model, data, config(steps=3, skip_warmup_steps=2), progress=False)
    assert 0 < sum(warm.skip_counts.values()) <= removable  # only the third step skipped
    assert model.robust  # left as it was: the next training call skips again
    full = train(
        make_model(space, p=0.9), data, config(steps=2, skip_warmup_steps=2), progress=False
    )
    assert full.skip_counts == {}
    with pytest.raises(UserError, match="skip_warmup_steps=-1 must not be negative"):
        config(skip_warmup_steps=-1).check()


def test_min_snr_weighting(space, data):
    plain = train(make_model(space), data, config(steps=2), progress=False).losses
    # epsilon loss weight min(SNR, gamma) / SNR: 1 for a gamma above every SNR
    huge = train(make_model(space), data, config(steps=2, snr_gamma=1e12), progress=False)
    assert huge.losses == pytest.approx(plain, rel=1e-5)
    # gamma = 1 weighs down every timestep whose SNR exceeds 1
    small = train(make_model(space), data, config(steps=1, snr_gamma=1.0), progress=False)
    assert small.losses[0] < plain[0]


def test_timestep_shift_draws_noisier_timesteps(space, data):
    n = 20_000
    uniform = _timesteps(config(), n, torch.Generator().manual_seed(0))
    shifted = _timesteps(config(timestep_shift=3.0), n, torch.Generator().manual_seed(0))
    assert uniform.min() >= 0 and shifted.min() >= 0 and shifted.max() <= 999
    # t >= 750: a quarter of the uniform draws, half of the shift-3 ones (u >= 1/2)
    assert within(int((uniform >= 750).sum()), n, 0.25, 4)
    assert within(int((shifted >= 750).sum()), n, 0.5, 4)
    plain = train(make_model(space), data, config(steps=2), progress=False).losses
    noisy = train(make_model(space), data, config(steps=2, timestep_shift=3.0), progress=False)
    assert noisy.losses != pytest.approx(plain)  # other timesteps, other losses
    with pytest.raises(UserError, match="timestep_shift=0.0 must be positive"):
        config(timestep_shift=0.0).check()


def test_noisy_share_draws_more_of_the_noisiest_timesteps(space, data):
    n = 20_000
    uniform = _timesteps(config(), n, torch.Generator().manual_seed(0))
    # share 0 draws nothing more: the same stream as before the option
    assert torch.equal(
        uniform, torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0))
    )
    mixed = _timesteps(config(timestep_noisy_share=0.3), n, torch.Generator().manual_seed(0))
    assert mixed.min() >= 0 and mixed.max() <= 999
    # t >= 850: 15% of the uniform draws; 0.3 + 0.7 * 0.15 with the share
    assert within(int((uniform >= 850).sum()), n, 0.15, 4)
    assert within(int((mixed >= 850).sum()), n, 0.405, 4)
    # below the noisiest part every timestep keeps 70% of its uniform frequency
    assert within(int((mixed < 300).sum()), n, 0.7 * 0.3, 4)
    later = _timesteps(
        config(timestep_noisy_share=1.0, timestep_noisy_from=0.5), n, torch.Generator()
    )
    assert later.min() >= 500
    plain = train(make_model(space), data, config(steps=2), progress=False).losses
    noisy = train(
        make_model(space), data, config(steps=2, timestep_noisy_share=0.5), progress=False
    )
    assert noisy.losses != pytest.approx(plain)
    with pytest.raises(UserError, match=r"timestep_noisy_share=1.5 must be a share in \[0, 1\]"):
        config(timestep_noisy_share=1.5).check()
    with pytest.raises(UserError, match=r"timestep_noisy_from=1.0 must be a fraction"):
        config(timestep_noisy_from=1.0).check()


def test_resume_reaches_the_same_weights_and_losses(space, data, tmp_path):
    # a schedule and Min-SNR weighting, to check that a resumed run picks the schedule up
    cfg = dict(ema_decay=0.9, seed=1, lr_scheduler="cosine", lr_warmup_steps=2, snr_gamma=5.0)
    full = make_model(space)
    whole = train(full, data, config(steps=6, **cfg), out_dir=tmp_path / "whole", progress=False)

    first = make_model(space)
    half = train(first, data, config(steps=3, **cfg), out_dir=tmp_path / "split", progress=False)
    assert half.losses == whole.losses[:3]
    assert (tmp_path / "split" / "checkpoint" / "model" / "elastic.json").is_file()

    resumed = make_model(space)  # a fresh process would build a fresh model
    rest = train(
        resumed,
        data,
        config(steps=6, **cfg),
        out_dir=tmp_path / "split",
        resume=True,
        progress=False,
    )
    assert rest.steps == 6
    assert rest.losses == whole.losses  # 6 steps cross an epoch of 16 samples at batch 4
    assert rest.skip_counts == whole.skip_counts
    theirs = resumed.state_dict()
    for key, value in full.state_dict().items():
        assert torch.allclose(value, theirs[key], atol=1e-6), key
    for a, b in zip(whole.ema.shadow_params, rest.ema.shadow_params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # the EMA weights are saved as a loadable model
    ema_model = ElasticUNet.from_pretrained(tmp_path / "split" / "ema")
    shadow = rest.ema.shadow_params[0]
    assert torch.allclose(next(ema_model.parameters()), shadow, atol=1e-6)


# -- classifier-free-guidance dropout -----------------------------------------------------------


class Iterable:
    """An iterable dataset (no __getitem__): items are read in order and batched in-process."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        return (self.dataset[i] for i in range(len(self.dataset)))


def spy_contexts(model: ElasticUNet) -> list[torch.Tensor]:
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_cfg_dropout_one_feeds_only_the_unconditional_context(space, data):
    model = make_model(space)
    seen = spy_contexts(model)
    uncond = torch.full(CONTEXT, 0.5)
    train(model, Iterable(data), config(steps=1, cfg_dropout=1.0), uncond=uncond, progress=False)
    assert len(seen) == 1 and seen[0].shape == (4, *CONTEXT)
    assert torch.equal(seen[0], uncond.expand(4, *CONTEXT))


def test_cfg_dropout_zero_feeds_the_data_and_default_uncond_is_zeros(space, data):
    model = make_model(space)
    seen = spy_contexts(model)
    train(model, Iterable(data), config(steps=1, cfg_dropout=0.0), progress=False)
    assert torch.equal(seen[0], torch.stack([data[i][1] for i in range(4)]))  # in order

    from nas.training.robust import _cfg_dropout

    cond = torch.randn(64, *CONTEXT)
    out = _cfg_dropout(cond, None, 0.5, torch.Generator().manual_seed(0))
    dropped = (out == 0).flatten(1).all(1)
    kept = (out == cond).flatten(1).all(1)
    assert bool((dropped | kept).all()) and 16 < int(dropped.sum()) < 48


# -- skip probabilities --------------------------------------------------------------------------


def skip_frequencies(model: ElasticUNet, draws: int) -> dict[str, int]:
    counts = dict.fromkeys(model.space.slots, 0)
    for _ in range(draws):
        for path, _i in model.draw_skips():
            counts[path] += 1
    return counts


def test_skip_frequency_matches_p(space):
    model = make_model(space, p=0.3)
    draws = 200
    counts = skip_frequencies(model, draws)
    removable = [path for path, slot in space.slots.items() if slot.removable]
    assert len(removable) < len(space.slots)  # the tiny space has blocks that cannot go
    for path, slot in space.slots.items():
        if slot.removable:
            assert within(counts[path], draws, 0.3, sigmas=5), (path, counts[path])
        else:
            assert counts[path] == 0, path
    assert within(sum(counts[p] for p in removable), draws * len(removable), 0.3, sigmas=4)


def test_skip_overrides_per_kind_and_per_stage(space):
    model = make_model(space, p=0.3, per_kind={"resnet": 0.1}, per_stage={"Up-2": 0.0})
    draws = 200
    counts = skip_frequencies(model, draws)
    by_kind = {"resnet": [0, 0], "cross_attention": [0, 0]}
    for path, slot in space.slots.items():
        if slot.stage == "Up-2" or not slot.removable:
            assert counts[path] == 0, path  # the stage override wins over the kind override
            continue
        by_kind[slot.kind][0] += counts[path]
        by_kind[slot.kind][1] += draws
    assert within(*by_kind["resnet"], 0.1, sigmas=4)
    assert within(*by_kind["cross_attention"], 0.3, sigmas=4)


# -- the Stable Diffusion encoder, with tiny random modules ----------------------------------------


@pytest.fixture
def sd_folder(tmp_path):
    """A tiny SD pipeline folder: VAE to 12x16x16 latents, CLIP text encoder to 16x128."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["re"], vocab["red</w>"] = len(vocab), len(vocab) + 1  # the results of the merges
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tokenizer = CLIPTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=CONTEXT[0]
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=CONTEXT[1],
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CONTEXT[0],
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,  # one downsampling: 32x32 -> 16x16
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=LATENT[0],
        norm_num_groups=4,
        sample_size=32,
    )
    folder = tmp_path / "pipeline"
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def test_latent_encoder_from_a_local_folder(sd_folder, space):
    encoder = LatentEncoder.from_pretrained(sd_folder)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    captions = ["a red circle", "red", "", "a blue square above a red circle"]

    torch.manual_seed(1)
    latents, context = encoder(images, captions)
    assert latents.shape == (4, *LATENT) and context.shape == (4, *CONTEXT)
    torch.manual_seed(1)
    raw = encoder.vae.encode(images).latent_dist.sample()
    assert torch.allclose(latents, raw * encoder.vae.config.scaling_factor)
    ids = encoder.tokenizer(
        captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    expected = encoder.text_encoder(ids.input_ids).last_hidden_state
    assert torch.allclose(context, expected)
    assert encoder.unconditional().shape == CONTEXT
    assert torch.allclose(encoder.unconditional(), context[2], atol=1e-5)

    # training on raw (image, caption) items; CFG dropout feeds the empty caption's context
    items = [(images[i], captions[i]) for i in range(4)]
    model = make_model(space)
    seen = spy_contexts(model)
    result = train(model, items, config(steps=1, cfg_dropout=1.0), encode=encoder, progress=False)
    assert math.isfinite(result.losses[0])
    assert torch.allclose(seen[0], encoder.unconditional().expand(4, *CONTEXT), atol=1e-6)

    with pytest.raises(UserError, match=r"\[-1, 1\]"):
        encoder.encode_images(images * 127 + 128)


def test_latent_encoder_needs_a_pipeline_folder(tmp_path):
    with pytest.raises(UserError, match="text_encoder/"):
        LatentEncoder.from_pretrained(tmp_path)


# -- bad input -----------------------------------------------------------------------------------


def test_fp16_on_cpu_is_a_user_error(space, data):
    with pytest.raises(UserError, match="fp16.*CUDA"):
        train(make_model(space), data, config(mixed_precision="fp16"), progress=False)


def test_unknown_prediction_type_is_a_user_error(space, data):
    with pytest.raises(UserError, match="prediction_type 'sample'.*epsilon"):
        train(make_model(space), data, config(prediction_type="sample"), progress=False)


def test_resume_without_checkpoint_is_a_user_error(space, data, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train(make_model(space), data, config(), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(UserError, match="no out_dir"):
        train(make_model(space), data, config(), resume=True, progress=False)


def test_images_without_an_encoder_and_small_data_are_user_errors(space, data):
    images = TensorDataset(torch.rand(8, 3, 32, 32), torch.randn(8, *CONTEXT))
    with pytest.raises(UserError, match="12 channels.*encode="):
        train(make_model(space), images, config(), progress=False)
    with pytest.raises(UserError, match="fewer than batch_size"):
        train(make_model(space), data, config(batch_size=32), progress=False)
    with pytest.raises(UserError, match="cfg_dropout"):
        train(make_model(space), data, config(cfg_dropout=1.5), progress=False)
    with pytest.raises(UserError, match="lr_scheduler 'step'.*'cosine'"):
        train(make_model(space), data, config(lr_scheduler="step"), progress=False)
    with pytest.raises(UserError, match="snr_gamma=0.*positive"):
        train(make_model(space), data, config(snr_gamma=0), progress=False)
