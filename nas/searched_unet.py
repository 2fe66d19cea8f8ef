"""A UNet found by an architecture search, as plain torch + diffusers modules.

This file is self-contained: it imports torch, diffusers and safetensors only, and is copied
verbatim into every exported network folder, so that the network loads where the search tool
is not installed:

    from diffusers import AutoModel
    unet = AutoModel.from_pretrained("exported/", trust_remote_code=True)

or, without diffusers' remote-code loader:

    import sys; sys.path.insert(0, "exported/")
    from searched_unet import SearchedUNet2DConditionModel
    unet = SearchedUNet2DConditionModel.from_pretrained("exported/")

The network is a diffusers `UNet2DConditionModel` (same forward, same call signature, drops into
a Stable Diffusion pipeline) in which some ResNet (`ResnetBlock2D`) and cross-attention
(`Transformer2DModel`) blocks are changed, as `architecture.json` says for each block path:

- multiplicity 0: the block is removed. It becomes a module without weights that returns its
  input; a decoder ResNet receives [hidden state, skip] concatenated, and its removal passes
  the hidden state on and drops the skip.
- multiplicity k > 1: the block runs k times in a row, each time with its own weights (the
  block, then k - 1 copies of it), kept in a `RepeatedBlock`.

Why not a plain diffusers config: `layers_per_block` ties every encoder (ResNet, attention)
pair to a skip connection and a decoder ResNet, so removing a single block changes which skip
each decoder ResNet consumes; and a copied Transformer2DModel runs its input projection,
norm, output projection and residual twice, which `transformer_layers_per_block` (more
transformer layers inside one projection) does not express.

Folder: config.json (the UNet config of the unchanged network, with `auto_map`),
architecture.json ({"multiplicity": {block path: k}}), diffusion_pytorch_model.safetensors
(the changed network's own weights: removed blocks have none, copies have theirs) and this file.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file, save_file
from torch import nn

ARCHITECTURE_NAME = "architecture.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
AUTO_MAP = {"AutoModel": "searched_unet.SearchedUNet2DConditionModel"}


class RemovedResnet(nn.Module):
    """A removed ResNet: returns the first `channels` channels of its input (all of them in
    the encoder; in the decoder the hidden state without the concatenated skip)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        return input_tensor[:, : self.channels]


class RemovedAttention(nn.Module):
    """A removed Transformer2DModel: returns its input, in the format that was asked for."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


class RepeatedBlock(nn.Module):
    """A block followed by its copies (each with its own weights), run in a row."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resnet = isinstance(blocks[0], ResnetBlock2D)

    def forward(self, hidden_states, *args, **kwargs):
        if self.resnet:  # ResnetBlock2D(input_tensor, temb)
            for block in self.blocks:
                hidden_states = block(hidden_states, *args, **kwargs)
            return hidden_states
        return_dict = kwargs.pop("return_dict", True)
        for block in self.blocks:
            hidden_states = block(hidden_states, *args, return_dict=False, **kwargs)[0]
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


class SearchedUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel` with the blocks of `multiplicity` removed or repeated."""

    multiplicity: dict[str, int]

    @classmethod
    def from_architecture(
        cls, config: dict, multiplicity: dict[str, int]
    ) -> SearchedUNet2DConditionModel:
        """The network of `config` changed as `multiplicity` says, with fresh weights."""
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "auto_map"}
        model = cls.from_config(config)
        model.multiplicity = {}
        for path, n in multiplicity.items():
            n = int(n)
            if n < 0:
                raise ValueError(f"{path}: multiplicity {n} must be >= 0")
            block = model.get_submodule(path)
            if n == 1:
                pass
            elif isinstance(block, ResnetBlock2D):
                # a removable ResNet keeps its hidden channels; the rest of its input is a skip
                new = RemovedResnet(block.out_channels) if n == 0 else None
                model.set_submodule(path, new or RepeatedBlock([block, *_copies(block, n)]))
            elif type(block).__name__ == "Transformer2DModel":
                new = RemovedAttention() if n == 0 else None
                model.set_submodule(path, new or RepeatedBlock([block, *_copies(block, n)]))
            else:
                raise ValueError(f"{path} is a {type(block).__name__}, not a ResNet or attention")
            model.multiplicity[path] = n
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> SearchedUNet2DConditionModel:
        """Load an exported folder (local). Other keyword arguments (diffusers' hub options)
        are accepted and ignored: the folder holds everything."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        config = json.loads((folder / CONFIG_NAME).read_text())
        multiplicity = json.loads((folder / ARCHITECTURE_NAME).read_text())["multiplicity"]
        model = cls.from_architecture(config, multiplicity)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
        if torch_dtype is not None or device is not None:
            model.to(device=device, dtype=torch_dtype)
        return model.eval()

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the folder `from_pretrained` (and `AutoModel`) loads: config, architecture,
        weights, and this file."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        config = {
            "_class_name": type(self).__name__,
            **config,
            "auto_map": AUTO_MAP,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        arch = {"multiplicity": dict(self.multiplicity)}
        (folder / ARCHITECTURE_NAME).write_text(json.dumps(arch, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        if Path(__file__).resolve() != (folder / "searched_unet.py").resolve():
            shutil.copyfile(__file__, folder / "searched_unet.py")


def _copies(block: nn.Module, n: int) -> list[nn.Module]:
    """n - 1 blocks of the same class and shapes (their weights are loaded afterwards)."""
    return [copy.deepcopy(block) for _ in range(n - 1)]
