"""The tiny world's data: procedurally drawn, captioned 32x32 images of coloured shapes.

A scene holds one shape ("a red circle on the left") or two in a relation ("a red circle
above a blue square"). Everything is a pure function of a seed, so a dataset is reproducible
without storing it: item i of a split is drawn from its own random stream.

Captions that describe the same scene ("A above B" and "B below A") share a *key*; the key
is what the train/validation split holds out (so no phrasing of a validation scene is seen in
training) and what retrieval counts as a match.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from search_spaces import UserError

SIZE = 32  # image side in pixels

# RGB in [0, 1]; every pair differs by >= 0.6 in some channel, so that a tiny CLIP and a
# briefly trained UNet tell them apart (with an orange between red and yellow, and a violet
# purple near blue, generated colours mixed)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.75, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
# single-shape positions: phrase -> centre (x, y) in pixels (y grows downwards)
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (9.0, 16.0),
    "on the right": (23.0, 16.0),
    "at the top": (16.0, 9.0),
    "at the bottom": (16.0, 23.0),
    "in the center": (16.0, 16.0),
}
# relation phrase -> (axis, whether the first-named shape comes first along it)
RELATIONS: dict[str, tuple[str, bool]] = {
    "above": ("vertical", True),
    "below": ("vertical", False),
    "to the left of": ("horizontal", True),
    "to the right of": ("horizontal", False),
}
BACKGROUND = (0.0, 0.0, 0.0)  # plain black: the shapes carry all the content
P_SINGLE = 0.4  # share of one-shape scenes among the scenes drawn for training
VAL_FRACTION = 0.1  # share of scene keys held out for validation


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    x: float  # centre, pixels
    y: float
    r: float  # half extent, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # drawn in order
    caption: str
    key: str  # the same for every caption of the same scene


# -- captions and keys ---------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object(colour: str, kind: str) -> str:
    return f"{_article(colour)} {colour} {kind}"


def single_caption(colour: str, kind: str, position: str) -> str:
    return f"{_object(colour, kind)} {position}"


def pair_caption(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    return f"{_object(*first)} {relation} {_object(*second)}"


def single_key(colour: str, kind: str, position: str) -> str:
    return f"{colour} {kind} | {position}"


def pair_key(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    """'top-or-left object | axis | bottom-or-right object': both phrasings map to it."""
    axis, first_leads = RELATIONS[relation]
    lead, follow = (first, second) if first_leads else (second, first)
    return f"{' '.join(lead)} | {axis} | {' '.join(follow)}"


_OBJ = r"an? (\w+) (\w+)"
_SINGLE_RE = re.compile(rf"^{_OBJ} ({'|'.join(POSITIONS)})$")
_PAIR_RE = re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}$")


def caption_key(caption: str) -> str | None:
    """The scene key of a caption of this world's grammar, or None for any other text."""
    text = " ".join(caption.lower().split())
    if m := _SINGLE_RE.match(text):
        colour, kind, position = m.groups()
        if colour in COLOURS and kind in SHAPES:
            return single_key(colour, kind, position)
    if m := _PAIR_RE.match(text):
        c1, k1, relation, c2, k2 = m.groups()
        if {c1, c2} <= COLOURS.keys() and {k1, k2} <= set(SHAPES) and (c1, k1) != (c2, k2):
            return pair_key((c1, k1), relation, (c2, k2))
    return None


@lru_cache(maxsize=1)
def all_captions() -> tuple[str, ...]:
    """Every caption of the grammar: 90 one-shape and 1,224 two-shape captions."""
    objects = [(c, k) for c in COLOURS for k in SHAPES]
    singles = [single_caption(c, k, p) for c, k in objects for p in POSITIONS]
    pairs = [
        pair_caption(a, rel, b) for a in objects for b in objects if a != b for rel in RELATIONS
    ]
    return tuple(singles + pairs)


@lru_cache(maxsize=8)
def split_keys(seed: int) -> tuple[frozenset[str], frozenset[str]]:
    """(train keys, validation keys): VAL_FRACTION of the one-shape and of the two-shape keys
    are held out, drawn by `seed`. Every colour, shape, position and relation still occurs in
    training; what validation tests is new combinations of them."""
    keys = sorted({caption_key(c) for c in all_captions()})
    singles = [k for k in keys if k.count("|") == 1]
    pairs = [k for k in keys if k.count("|") == 2]
    rng = random.Random(f"split-{seed}")
    val = set(rng.sample(singles, round(VAL_FRACTION * len(singles))))
    val |= set(rng.sample(pairs, round(VAL_FRACTION * len(pairs))))
    return frozenset(keys) - val, frozenset(val)


def val_prompts(seed: int) -> list[str]:
    """One caption per held-out key (the phrasing drawn by `seed`), in a fixed shuffled order,
    so that any prefix of the list mixes one- and two-shape prompts."""
    _, val = split_keys(seed)
    by_key: dict[str, list[str]] = {}
    for caption in all_captions():
        if (key := caption_key(caption)) in val:
            by_key.setdefault(key, []).append(caption)
    rng = random.Random(f"val-prompts-{seed}")
    prompts = [rng.choice(by_key[k]) for k in sorted(by_key)]
    rng.shuffle(prompts)
    return prompts


def train_prompts(seed: int) -> list[str]:
    """Every caption whose scene is in training (both phrasings of a two-shape scene)."""
    train, _ = split_keys(seed)
    return [c for c in all_captions() if caption_key(c) in train]


# -- scenes --------------------------------------------------------------------------------------


def _place_single(rng: random.Random, colour: str, kind: str, position: str) -> tuple[Shape]:
    # little variation in size and place: captions do not name sizes, and a world with
    # few ways to draw a caption is learnt in the few steps a CPU build affords
    x, y = POSITIONS[position]
    r = rng.uniform(5.5, 6.5)
    # jitter along the free axis more than along the named one: "on the left" stays left
    jx, jy = (1.0, 2.5) if position in ("on the left", "on the right") else (2.5, 1.0)
    if position == "in the center":
        jx = jy = 1.0
    return (Shape(colour, kind, x + rng.uniform(-jx, jx), y + rng.uniform(-jy, jy), r),)


def _place_pair(
    rng: random.Random, lead: tuple[str, str], follow: tuple[str, str], axis: str
) -> tuple[Shape, Shape]:
    """`lead` is the top (vertical) or left (horizontal) object."""
    r1, r2 = rng.uniform(4.8, 5.6), rng.uniform(4.8, 5.6)
    across = 16.0 + rng.uniform(-3.0, 3.0)  # both shapes near one line across the axis
    a1, a2 = across + rng.uniform(-1.0, 1.0), across + rng.uniform(-1.0, 1.0)
    p1, p2 = rng.uniform(8.0, 10.0), rng.uniform(22.0, 24.0)  # along the axis: apart
    if axis == "vertical":
        return Shape(*lead, a1, p1, r1), Shape(*follow, a2, p2, r2)
    return Shape(*lead, p1, a1, r1), Shape(*follow, p2, a2, r2)


def scene_for_caption(caption: str, rng: random.Random) -> Scene:
    """A random scene that `caption` (of this world's grammar) describes."""
    text = " ".join(caption.lower().split())
    key = caption_key(text)
    if key is None:
        raise UserError(
            f"{caption!r} is not a caption of the shapes world; captions look like "
            "'a red circle on the left' or 'a red circle above a blue square'"
        )
    if m := _SINGLE_RE.match(text):
        colour, kind, position = m.groups()
        return Scene(_place_single(rng, colour, kind, position), text, key)
    c1, k1, relation, c2, k2 = _PAIR_RE.match(text).groups()
    axis, first_leads = RELATIONS[relation]
    lead, follow = ((c1, k1), (c2, k2)) if first_leads else ((c2, k2), (c1, k1))
    shapes = _place_pair(rng, lead, follow, axis)
    return Scene(shapes if rng.random() < 0.5 else shapes[::-1], text, key)  # random overlap


def sample_scene(rng: random.Random, keys: frozenset[str]) -> Scene:
    """A random scene whose key is in `keys`, with a random phrasing of its caption."""
    colours, shapes = list(COLOURS), list(SHAPES)
    while True:
        first = (rng.choice(colours), rng.choice(shapes))
        if rng.random() < P_SINGLE:
            caption = single_caption(*first, rng.choice(list(POSITIONS)))
        else:
            second = (rng.choice(colours), rng.choice(shapes))
            if second == first:
                continue
            caption = pair_caption(first, rng.choice(list(RELATIONS)), second)
        if caption_key(caption) in keys:
            return scene_for_caption(caption, rng)


# -- drawing -------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (x, y), in pixels."""
    c = torch.arange(SIZE, dtype=torch.float32) + 0.5
    return c[None, :].expand(SIZE, SIZE), c[:, None].expand(SIZE, SIZE)


KIND_INDEX = {kind: i for i, kind in enumerate(SHAPES)}
# the triangle (apex up) relative to its centre, in units of r: apex height, base height, half
# base width; its slanted edges' normal, for the signed distance
_TOP, _BOTTOM, _HALF = -1.15, 0.85, 1.15
_EDGE = (_BOTTOM - _TOP, _HALF, ((_BOTTOM - _TOP) ** 2 + _HALF**2) ** 0.5)


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """The scenes as (B, 3, 32, 32) float images in [0, 1], in one vectorised pass.

    Each shape is a signed distance d (pixels, negative inside); a pixel's coverage is
    clamp(0.5 - d, 0, 1): anti-aliased edges without supersampling.
    """
    if not scenes:
        return torch.zeros(0, 3, SIZE, SIZE)
    k = max(len(s.shapes) for s in scenes)
    geometry = torch.zeros(len(scenes), k, 3)  # x, y, r
    kind = torch.full((len(scenes), k), -1)  # -1: no shape in this place
    colour = torch.zeros(len(scenes), k, 3)
    for b, scene in enumerate(scenes):
        for j, shape in enumerate(scene.shapes):
            geometry[b, j] = torch.tensor([shape.x, shape.y, shape.r])
            kind[b, j] = KIND_INDEX[shape.kind]
            colour[b, j] = torch.tensor(COLOURS[shape.colour])
    x, y = _grid()
    cx, cy, r = (geometry[..., i, None, None] for i in range(3))  # (B, k, 1, 1)
    dx, dy = x - cx, y - cy  # (B, k, 32, 32)
    circle = (dx * dx + dy * dy).sqrt() - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.88 * r  # about the circle's area
    height, half, norm = _EDGE
    slanted = (height * dx.abs() - half * (dy - _TOP * r)) / norm
    triangle = torch.maximum(slanted, dy - _BOTTOM * r)
    kind = kind[..., None, None]
    distance = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    coverage = ((0.5 - distance).clamp(0, 1) * (kind >= 0))[:, :, None]  # (B, k, 1, 32, 32)
    image = torch.tensor(BACKGROUND)[None, :, None, None].expand(len(scenes), 3, SIZE, SIZE)
    for j in range(k):  # in drawing order: a later shape covers an earlier one
        image = image * (1 - coverage[:, j]) + colour[:, j, :, None, None] * coverage[:, j]
    return image


def render(scene: Scene) -> torch.Tensor:
    """The scene as a (3, 32, 32) float image in [0, 1]."""
    return render_batch([scene])[0]


# -- datasets ------------------------------------------------------------------------------------


def item_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of item `index` of a split: independent of every other item."""
    state = np.random.SeedSequence([seed, {"train": 0, "val": 1}[split], index]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


class ShapesDataset(Dataset):
    """`length` captioned scenes of one split; item i is (image (3, 32, 32) in [0, 1], caption).

    Training items are drawn from the training keys; validation items from the held-out keys.
    Items are drawn when read (a few hundred microseconds each), so any length costs nothing.
    """

    def __init__(self, length: int, seed: int = 0, split: str = "train", split_seed: int = 0):
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', not {split!r}")
        if length < 1:
            raise UserError(f"a dataset needs at least one item, not length={length}")
        self.length, self.seed, self.split = length, seed, split
        train, val = split_keys(split_seed)
        self.keys = train if split == "train" else val

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return sample_scene(item_rng(self.seed, self.split, index), self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return render(scene), scene.caption


def scenes_for_prompts(prompts: list[str], seed: int) -> list[Scene]:
    """One scene per prompt (drawn by `seed`), e.g. the reference images of validation."""
    return [scene_for_caption(p, random.Random(f"{seed}-{i}-{p}")) for i, p in enumerate(prompts)]
