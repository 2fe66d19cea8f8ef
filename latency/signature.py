"""Block signatures: everything that determines a block's latency, and nothing else.

A `BlockSignature` is a block kind, the arguments that construct it, the shapes of its inputs
and a dtype. Equal signatures are profiled once per device; a signature is self-contained,
so a device agent can build and time the block with no search space at hand.

Besides the searchable blocks (`resnet`, `cross_attention`), the *fixed parts* of the UNet
are signatures too (`conv_in`, `time_embedding`, `downsample`, `upsample`, `concat`,
`conv_out`): whole-network prediction needs them (they are ~14% of SD-v1.5 on a CPU).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search_spaces import UserError

if TYPE_CHECKING:  # torch and diffusers load in seconds: only code that runs blocks imports them
    import torch
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from torch import nn

    from search_spaces import SearchSpace

DTYPE_NAMES = ("fp32", "fp16", "bf16")
SEARCHABLE = ("resnet", "cross_attention")
FIXED = ("conv_in", "time_embedding", "downsample", "upsample", "concat", "conv_out")


@dataclass(frozen=True, eq=False)
class BlockSignature:
    """Equal when their canonical JSON is equal (so 1 and 1.0, or 0 and False, differ)."""

    kind: str  # one of SEARCHABLE or FIXED
    init: tuple[tuple[str, Any], ...]  # constructor arguments, sorted by name
    inputs: tuple[tuple[str, tuple[int, ...]], ...]  # input name -> shape, in call order
    dtype: str = "fp32"  # fp32 | fp16 | bf16

    @classmethod
    def make(cls, kind: str, init: dict, inputs: dict, dtype: str = "fp32") -> BlockSignature:
        if kind not in SEARCHABLE + FIXED:
            raise UserError(f"unknown block kind {kind!r}; known: {', '.join(SEARCHABLE + FIXED)}")
        if dtype not in DTYPE_NAMES:
            raise UserError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_NAMES)}")
        return cls(
            kind,
            tuple(sorted((k, _freeze(v)) for k, v in init.items())),
            tuple((k, tuple(int(s) for s in v)) for k, v in inputs.items()),
            dtype,
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockSignature) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def with_dtype(self, dtype: str) -> BlockSignature:
        return BlockSignature.make(self.kind, dict(self.init), dict(self.inputs), dtype)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "init": {k: _thaw(v) for k, v in self.init},
            "inputs": {k: list(v) for k, v in self.inputs},
            "dtype": self.dtype,
        }

    def to_json(self) -> str:
        """Canonical JSON: the same signature always gives the same text (and hash)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> BlockSignature:
        try:
            inputs = data["inputs"]
            order = _CALL_ORDER.get(data["kind"], ())
            if isinstance(inputs, dict) and set(inputs) == set(order):
                # canonical JSON sorts the input names; the block is called in its own order
                inputs = {name: inputs[name] for name in order}
            return cls.make(data["kind"], data["init"], inputs, data.get("dtype", "fp32"))
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"not a block signature ({e}): {str(data)[:200]}") from None

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def describe(self) -> str:
        """A short human label, e.g. 'cross_attention 640ch 32x32 ctx77x768 b2 fp32'."""
        init, shapes = dict(self.init), dict(self.inputs)
        first = next(iter(shapes.values()))
        label = f"{self.kind} {first[1]}ch" if len(first) == 4 else self.kind
        if len(first) == 4:
            label += f" {first[2]}x{first[3]}"
        if "encoder_hidden_states" in shapes:
            label += "x".join(map(str, [" ctx" + str(shapes["encoder_hidden_states"][1])]))
            label += f"x{shapes['encoder_hidden_states'][2]}"
        if self.kind == "resnet" and init["in_channels"] != init["out_channels"]:
            label += f"->{init['out_channels']}"
        return f"{label} b{first[0]} {self.dtype}"

    # -- running it ------------------------------------------------------------------------

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The block with random weights, in eval mode, on `device`, in this dtype."""
        import torch

        from .blocks import BUILDERS

        with torch.device(device):
            module = BUILDERS[self.kind](dict(self.init))
        return module.to(dtype=torch_dtype(self.dtype)).eval()

    def example_inputs(self, device: str | torch.device = "cpu", seed: int = 0) -> tuple:
        import torch

        g = torch.Generator().manual_seed(seed)
        out = []
        for name, shape in self.inputs:
            if name == "timestep":
                out.append(torch.randint(0, 1000, shape, generator=g).to(device))
            else:
                out.append(torch.randn(shape, generator=g).to(device, torch_dtype(self.dtype)))
        return tuple(out)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a signature's dtype name (fp32, fp16, bf16)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# Input names in call order, for the kinds with several inputs (the others have one); the
# builders' forwards (latency/blocks.py) take them so.
_CALL_ORDER = {
    "resnet": ("hidden_states", "temb"),
    "cross_attention": ("hidden_states", "encoder_hidden_states"),
    "concat": ("hidden", "skip"),
}


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list | tuple) else v


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


# -- reading signatures off a UNet -----------------------------------------------------------


def _resnet_init(m: ResnetBlock2D) -> dict:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "temb_channels": m.time_emb_proj.in_features if m.time_emb_proj is not None else None,
        "groups": m.norm1.num_groups,
        "groups_out": m.norm2.num_groups,
        "eps": m.norm1.eps,
        "non_linearity": {"SiLU": "swish", "Mish": "mish", "GELU": "gelu"}.get(
            type(m.nonlinearity).__name__, "swish"
        ),
        "time_embedding_norm": m.time_embedding_norm,
        "output_scale_factor": m.output_scale_factor,
        "conv_shortcut": m.use_conv_shortcut,
        "skip_time_act": m.skip_time_act,
    }


def _attention_init(m: Transformer2DModel) -> dict:
    return {k: v for k, v in m.config.items() if not k.startswith("_")}


@dataclass(frozen=True)
class Part:
    """Where a signature occurs in the UNet: a slot, or a fixed part."""

    name: str  # slot path, or a fixed part's name ("conv_in", "up_blocks.0.upsamplers.0", ...)
    stage: str  # the slot's stage; "fixed" for fixed parts
    signature: BlockSignature


def unet_parts(space: SearchSpace, dtype: str = "fp32") -> list[Part]:
    """Every slot and fixed part of the space's base UNet, with its signature, in run order."""
    key = json.dumps(
        [
            space.unet_config,
            space.latent,
            space.context,
            space.batch,
            dtype,
            {p: s.stage for p, s in space.slots.items()},
        ],
        sort_keys=True,
        default=str,
    )
    if key not in _PARTS:  # a meta forward takes seconds; searches ask for the parts often
        _PARTS[key] = _read_parts(space, dtype)
    return list(_PARTS[key])


_PARTS: dict[str, list[Part]] = {}


def _read_parts(space: SearchSpace, dtype: str) -> list[Part]:
    import torch

    from search_spaces.unet import build_unet

    unet = build_unet(space.unet_config, device="meta")
    shapes: dict[str, list[tuple[int, ...]]] = {}
    handles = []

    def hook(name):
        def record(module, args, kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [v for v in kwargs.values() if torch.is_tensor(v)]
            shapes.setdefault(name, [tuple(t.shape) for t in tensors])

        return record

    modules = dict(unet.named_modules())
    watched = [p for p in space.slots] + ["conv_in", "time_embedding", "conv_norm_out"]
    watched += [n for n in modules if n.endswith((".downsamplers.0", ".upsamplers.0"))]
    for name in watched:
        handles.append(modules[name].register_forward_pre_hook(hook(name), with_kwargs=True))
    batch, context = space.batch, space.context
    try:
        unet(
            torch.zeros(batch, *space.latent, device="meta"),
            torch.zeros((), device="meta"),
            encoder_hidden_states=torch.zeros(batch, *context, device="meta"),
        )
    finally:
        for h in handles:
            h.remove()

    parts = []
    temb = unet.time_embedding.linear_1.out_features
    t_in = unet.time_embedding.linear_1.in_features
    parts.append(
        Part(
            "time_embedding",
            "fixed",
            BlockSignature.make(
                "time_embedding",
                {
                    "num_channels": t_in,
                    "flip_sin_to_cos": unet.time_proj.flip_sin_to_cos,
                    "downscale_freq_shift": unet.time_proj.downscale_freq_shift,
                    "time_embed_dim": temb,
                    "act_fn": "silu",
                },
                {"timestep": (batch,)},
                dtype,
            ),
        )
    )
    conv_in = unet.conv_in
    parts.append(
        Part(
            "conv_in",
            "fixed",
            BlockSignature.make(
                "conv_in",
                {
                    "in_channels": conv_in.in_channels,
                    "out_channels": conv_in.out_channels,
                    "kernel_size": conv_in.kernel_size[0],
                    "padding": conv_in.padding[0],
                },
                {"sample": shapes["conv_in"][0]},
                dtype,
            ),
        )
    )
    for name in [n for n in shapes if n.endswith(".downsamplers.0")]:
        m = modules[name]
        init = {
            "channels": m.channels,
            "use_conv": m.use_conv,
            "out_channels": m.out_channels,
            "padding": m.padding,
            "name": m.name,
        }
        parts.append(
            Part(
                name,
                "fixed",
                BlockSignature.make("downsample", init, {"hidden_states": shapes[name][0]}, dtype),
            )
        )
    for path, slot in space.slots.items():
        m = modules[path]
        b = slot.block
        if slot.kind == "resnet":
            shape = (batch, b.in_channels + b.skip_channels, b.height, b.width)
            sig = BlockSignature.make(
                "resnet", _resnet_init(m), {"hidden_states": shape, "temb": (batch, temb)}, dtype
            )
            if b.skip_channels:  # the decoder's concatenation runs whether the block does or not
                cat = BlockSignature.make(
                    "concat",
                    {},
                    {
                        "hidden": (batch, b.in_channels, b.height, b.width),
                        "skip": (batch, b.skip_channels, b.height, b.width),
                    },
                    dtype,
                )
                parts.append(Part(f"{path}.concat", "fixed", cat))
        else:
            sig = BlockSignature.make(
                "cross_attention",
                _attention_init(m),
                {
                    "hidden_states": (batch, b.in_channels, b.height, b.width),
                    "encoder_hidden_states": (batch, *context),
                },
                dtype,
            )
        parts.append(Part(path, slot.stage, sig))
    for name in [n for n in shapes if n.endswith(".upsamplers.0")]:
        m = modules[name]
        init = {"channels": m.channels, "use_conv": m.use_conv, "out_channels": m.out_channels}
        parts.append(
            Part(
                name,
                "fixed",
                BlockSignature.make("upsample", init, {"hidden_states": shapes[name][0]}, dtype),
            )
        )
    norm = unet.conv_norm_out
    parts.append(
        Part(
            "conv_out",
            "fixed",
            BlockSignature.make(
                "conv_out",
                {
                    "channels": norm.num_channels,
                    "out_channels": unet.conv_out.out_channels,
                    "groups": norm.num_groups,
                    "eps": norm.eps,
                },
                {"hidden_states": shapes["conv_norm_out"][0]},
                dtype,
            ),
        )
    )
    return parts


def signatures(space: SearchSpace, dtype: str = "fp32") -> list[BlockSignature]:
    """The distinct signatures of the space: every slot (copies share the original's) and
    every fixed part."""
    return list(dict.fromkeys(p.signature for p in unet_parts(space, dtype)))
