"""The modules a `BlockSignature` builds: each forward takes the signature's inputs in order.

Kept apart from `signature.py` because it needs torch and diffusers at import, and the
signature itself (what the latency service stores and hands out) does not.
"""

from __future__ import annotations

import torch
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn


class _Concat(nn.Module):
    def forward(self, hidden, skip):
        return torch.cat([hidden, skip], dim=1)


# Each builder's forward takes the signature's input names, in order: Core ML packages take
# their input names from these arguments, and device apps feed inputs by those names.


class _Resnet(nn.Module):
    def __init__(self, **init):
        super().__init__()
        self.block = ResnetBlock2D(**init)

    def forward(self, hidden_states, temb):
        return self.block(hidden_states, temb)


class _ConvIn(nn.Conv2d):
    def forward(self, sample):
        return super().forward(sample)


class _ConvOut(nn.Sequential):
    def __init__(self, channels: int, out_channels: int, groups: int, eps: float):
        super().__init__(
            nn.GroupNorm(groups, channels, eps=eps),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )

    def forward(self, hidden_states):
        return super().forward(hidden_states)


class _TimeEmbedding(nn.Module):
    def __init__(self, num_channels, flip_sin_to_cos, downscale_freq_shift, time_embed_dim, act_fn):
        super().__init__()
        self.proj = Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift)
        self.embedding = TimestepEmbedding(num_channels, time_embed_dim, act_fn=act_fn)

    def forward(self, timestep):
        return self.embedding(self.proj(timestep))


class _Attention(nn.Module):
    """Transformer2DModel called the way the UNet calls it."""

    def __init__(self, **config):
        super().__init__()
        self.block = Transformer2DModel(**config)

    def forward(self, hidden_states, encoder_hidden_states):
        return self.block(
            hidden_states, encoder_hidden_states=encoder_hidden_states, return_dict=False
        )[0]


BUILDERS = {
    "resnet": lambda a: _Resnet(**a),
    "cross_attention": lambda a: _Attention(**a),
    "conv_in": lambda a: _ConvIn(
        a["in_channels"], a["out_channels"], a["kernel_size"], padding=a["padding"]
    ),
    "time_embedding": lambda a: _TimeEmbedding(**a),
    "downsample": lambda a: Downsample2D(**a),
    "upsample": lambda a: Upsample2D(**a),
    "concat": lambda a: _Concat(),
    "conv_out": lambda a: _ConvOut(**a),
}
