"""MS-COCO captions files: the training pairs and validation prompts of a Stable Diffusion
world (`nas.worlds.sd`), read and checked with an error that names the file and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from search_spaces import UserError


def _read_coco(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"world.{key}: {path}:{e.lineno}: not valid JSON: {e.msg}") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    fields = {"image_id", "id", "caption"}
    if not isinstance(annotations, list) or not all(
        isinstance(a, dict) and fields <= a.keys() and isinstance(a["caption"], str)
        for a in annotations
    ):
        raise UserError(
            f"world.{key}: {path} is not an MS-COCO captions file: expected "
            '{"annotations": [{"image_id": .., "id": .., "caption": ".."}, ...]} '
            "(like annotations/captions_val2014.json)"
        )
    return data


def read_val_prompts(path: str | Path) -> list[str]:
    """The validation prompts of an MS-COCO captions file, in the module docstring's order."""
    path = Path(path)
    first: dict[int, tuple[int, str]] = {}  # image id -> (annotation id, caption)
    for a in _read_coco(path, "captions")["annotations"]:
        if a["image_id"] not in first or a["id"] < first[a["image_id"]][0]:
            first[a["image_id"]] = (a["id"], a["caption"])
    prompts = [" ".join(first[image][1].split()) for image in sorted(first)]
    return [p for p in dict.fromkeys(prompts) if p]


class CocoCaptions(Dataset):
    """Training pairs (image, caption) of an MS-COCO-format captions file: every caption of
    every image, in annotation-id order; images (3, resolution, resolution) in [-1, 1]."""

    def __init__(self, images: str | Path, captions: str | Path, resolution: int):
        images, captions = Path(images), Path(captions)
        data = _read_coco(captions, "train_captions")
        if not isinstance(data.get("images"), list):
            raise UserError(
                f"world.train_captions: {captions} has no `images` list: an MS-COCO captions "
                'file names each image as {"id": .., "file_name": ".."} under "images"'
            )
        files = {im["id"]: im["file_name"] for im in data["images"]}
        annotations = sorted(data["annotations"], key=lambda a: a["id"])
        unknown = sorted({a["image_id"] for a in annotations} - files.keys())
        if unknown:
            raise UserError(
                f"world.train_captions: {len(unknown)} caption(s) of {captions} refer to image "
                f"ids with no entry under `images` (first: {unknown[0]})"
            )
        self.items = [
            (images / files[a["image_id"]], " ".join(a["caption"].split())) for a in annotations
        ]
        missing = sorted({str(p) for p, _ in self.items if not p.is_file()})
        if missing:
            raise UserError(
                f"world.train_images: {len(missing)} image(s) named in {captions} are not in "
                f"{images} (first: {missing[0]}); put the images there or fix the captions file"
            )
        if not self.items:
            raise UserError(f"world.train_captions: {captions} has no captions to train on")
        # diffusers' train_text_to_image.py: shorter side to `resolution`, centre crop, [-1, 1]
        self.transform = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(resolution),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        path, caption = self.items[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), caption
