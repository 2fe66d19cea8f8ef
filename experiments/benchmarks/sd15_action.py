"""What one action evaluation costs at Stable Diffusion v1.5's sizes (random weights).

The paper scores each action on 2K MS-COCO prompts, 50 DDIM steps, CFG 7.5, 512 px, with a
ViT-g/14 CLIP score, and says that takes "about 2.5 A100 GPU hours". This builds a
`StableDiffusionWorld` (nas/worlds/sd.py) with the real parts at their real sizes and random
weights (speed does not depend on the weights; nothing is downloaded):

    UNet         the sd15 space's UNet2DConditionModel config, wrapped as ElasticUNet
    VAE          SD-v1.5's AutoencoderKL config (factor 8: 512 px images from 64x64 latents)
    text encoder CLIP ViT-L/14's text transformer config, open_clip's BPE vocabulary
    CLIP score   open_clip ViT-g-14 (the paper's score model)

and times, on --prompts prompts with the paper's steps and CFG:

1. the original architecture and one removal scored (`Evaluator.clip_score`, as the search
   does for every action), per image and projected to the paper's 2,000 prompts;
2. the parts of one batch: DDIM sampling (steps x one UNet call on the doubled CFG batch),
   VAE decoding, CLIP image features;

in fp32 and in fp16 (--precision; `evaluation.precision` of an experiment: autocast, as a
search runs it). The UNet alone at batch 2 is timed by `supernet_overhead.py --device cuda`.

    python experiments/benchmarks/sd15_action.py                      # needs a CUDA GPU
    python experiments/benchmarks/sd15_action.py --device cpu --prompts 2 --steps 2  # smoke

Writes experiments/benchmarks/results/sd15_action_<device>.json; the last line printed is
`sd15_action_hours_2k_fp16: X` (GPU hours per action at the paper's protocol, fp16).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import diffusers
import open_clip
import torch
from diffusers import AutoencoderKL
from provenance import provenance
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latency.backends.torch_backend import synchronize
from nas.search.evaluate import Evaluator, Protocol
from nas.supernet import ElasticUNet
from nas.training.robust import LatentEncoder
from nas.worlds.clip import ClipScorer
from nas.worlds.generate import SD15_SCHEDULER, generate
from nas.worlds.sd import StableDiffusionWorld
from search_spaces import load_space

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_PROMPTS = 2000  # per action (Sec. 3.1)
PAPER_HOURS = 2.5  # "about 2.5 A100 GPU hours to test each action"

# SD-v1.5's vae/config.json
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# SD-v1.5's text_encoder/config.json (CLIP ViT-L/14's text transformer)
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """CLIP's BPE tokenizer in transformers' format, written from open_clip's vocabulary file
    (the same BPE that SD-v1.5's tokenizer/ holds)."""
    bpe = open_clip.SimpleTokenizer()
    # open_clip spells the two special tokens differently from transformers' CLIP tokenizer
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def build_world(prompts: list[str], device: torch.device) -> StableDiffusionWorld:
    space = load_space("sd15")
    torch.manual_seed(0)
    supernet = ElasticUNet(space).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp))
    encoder = LatentEncoder(
        AutoencoderKL(**SD15_VAE), CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer
    ).to(device)
    clip = ClipScorer.from_config(open_clip.get_model_config("ViT-g-14"), device=device)
    return StableDiffusionWorld(
        space, supernet, clip, encoder, prompts, dict(SD15_SCHEDULER), None, device
    )


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device.type)
    start = time.perf_counter()
    out = fn()
    synchronize(device.type)
    return time.perf_counter() - start, out


@torch.no_grad()
def measure(world: StableDiffusionWorld, args, precision: str) -> dict:
    protocol = Protocol(
        world.val_prompts,
        steps=args.steps,
        cfg=args.cfg,
        batch_size=args.batch,
        precision=precision,
    )
    device = world.device
    evaluator = Evaluator(
        world.supernet, world.clip, protocol, world.encode_text, world.uncond(), world.decode
    )
    with evaluator.autocast():  # for the parts below; clip_score applies it itself
        space = world.space
        base = space.original()
        action = next(a for a in space.actions(base) if a.kind == "remove")
        # warm-up: one batch of the base (cuDNN picks its kernels, the allocator grows)
        evaluator.scores(base, 0, min(args.batch, len(world.val_prompts)))
        seconds = {}
        for name, arch in (("original", base), (str(action), base.apply(action))):
            seconds[name], _ = timed(lambda arch=arch: evaluator.clip_score(arch), device)
        # the parts of one batch, on the original
        n = min(args.batch, len(world.val_prompts))
        world.supernet.set_architecture(base)
        t_gen, latents = timed(
            lambda: generate(
                world.supernet,
                evaluator.context[:n],
                evaluator.uncond,
                evaluator.noise[:n],
                args.steps,
                args.cfg,
            ),
            device,
        )
        t_dec, images = timed(lambda: world.decode(latents), device)
        t_clip, _ = timed(lambda: world.clip.image_features(images), device)
    per_action = statistics.mean(seconds.values())
    per_image = per_action / len(world.val_prompts)
    return {
        "seconds_per_action": seconds,
        "seconds_per_image": per_image,
        "hours_per_action_2k": per_image * PAPER_PROMPTS / 3600,
        "batch_parts_s": {"images": n, "ddim": t_gen, "vae_decode": t_dec, "clip": t_clip},
        "ms_per_unet_step_in_ddim": t_gen / args.steps * 1e3,  # one call on 2n latents
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="torch device (default cuda)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts scored per action")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (the paper: 50)")
    ap.add_argument("--cfg", type=float, default=7.5, help="CFG scale (the paper: 7.5)")
    ap.add_argument("--batch", type=int, default=16, help="images generated at once")
    ap.add_argument("--precision", default="fp32,fp16", help="fp32 and/or fp16 (autocast)")
    ap.add_argument("--out", type=Path, help="result JSON (default under results/)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU here (use --device cpu for a smoke run)")
    precisions = args.precision.split(",")
    if bad := set(precisions) - {"fp32", "fp16"}:
        ap.error(f"--precision: unknown {sorted(bad)}; use fp32, fp16 or fp32,fp16")
    if args.prompts < 1 or args.steps < 1 or args.batch < 1:
        ap.error("--prompts, --steps and --batch must be at least 1")

    prompts = [f"a photo of object number {i} on a table" for i in range(args.prompts)]
    world = build_world(prompts, device)
    results = {}
    for precision in precisions:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results[precision] = r = measure(world, args, precision)
        print(
            f"{precision}: {r['seconds_per_image']:.3f} s per image, "
            f"{r['hours_per_action_2k']:.3f} h per action at {PAPER_PROMPTS} prompts "
            f"(paper: {PAPER_HOURS} A100 h); DDIM batch of {r['batch_parts_s']['images']}: "
            f"{r['batch_parts_s']['ddim']:.2f} s, decode {r['batch_parts_s']['vae_decode']:.2f} s,"
            f" CLIP {r['batch_parts_s']['clip']:.2f} s",
            flush=True,
        )

    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(args),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "protocol": {"prompts": args.prompts, "steps": args.steps, "cfg": args.cfg},
        "batch": args.batch,
        "paper_hours_per_action": PAPER_HOURS,
        "results": results,
    }
    out = args.out or RESULTS / f"sd15_action_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    last = results.get("fp16") or results[precisions[0]]
    name = "fp16" if "fp16" in results else precisions[0]
    print(f"sd15_action_hours_2k_{name}: {last['hours_per_action_2k']:.4f}", flush=True)


if __name__ == "__main__":
    main()
