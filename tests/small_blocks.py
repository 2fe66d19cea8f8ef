"""Block signatures small enough to lower and run in a second: a ResNet block and a
cross-attention block at 8 channels on a 4x4 latent (the ExecuTorch and Android tests)."""

from __future__ import annotations

from latency.signature import BlockSignature


def resnet_sig(channels: int = 8) -> BlockSignature:
    init = {
        "in_channels": channels,
        "out_channels": channels,
        "temb_channels": 16,
        "groups": 4,
        "groups_out": 4,
        "eps": 1e-5,
        "non_linearity": "swish",
        "time_embedding_norm": "default",
        "output_scale_factor": 1.0,
        "conv_shortcut": False,
        "skip_time_act": False,
    }
    return BlockSignature.make(
        "resnet", init, {"hidden_states": (1, channels, 4, 4), "temb": (1, 16)}
    )


def attention_sig() -> BlockSignature:
    init = {
        "num_attention_heads": 2,
        "attention_head_dim": 4,
        "in_channels": 8,
        "cross_attention_dim": 16,
        "norm_num_groups": 4,
    }
    return BlockSignature.make(
        "cross_attention",
        init,
        {"hidden_states": (1, 8, 4, 4), "encoder_hidden_states": (1, 4, 16)},
    )
