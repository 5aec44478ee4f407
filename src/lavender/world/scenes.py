"""Scenes of the miniature world: coloured shapes on a plain background, with exact per-word masks.

A scene is 1–4 flat-coloured shapes (no anti-aliasing, no overlap) on a white 64×64 canvas, so every
object's mask is exact and every pixel of it has the object's colour. The caption names the objects
left to right ("a red circle and a blue square"); each colour or shape word of the caption gets the
mask of the object it names, keyed by its character offsets from :func:`lavender.words.split_words`,
the same words Stage 1 reads. Function words ("a", "and") have no mask.

Everything is drawn from a ``numpy.random.Generator``: the same generator state gives the same bytes.
Shapes are drawn as vectorised numpy masks over pixel centres, so 1,000 scenes take a fraction of a
second (no per-pixel Python, no PIL drawing, whose anti-aliasing/rounding would blur the masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lavender.words import split_words

SIZE = 64  # image side in pixels
BACKGROUND = (255, 255, 255)

# Distinct hues (0°, 30°, 55°, 130°, 225°, 275°) so a colour is one unambiguous region of RGB space.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 25),
    "green": (30, 165, 50),
    "blue": (30, 80, 230),
    "purple": (140, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Side of an object's bounding box in pixels (inclusive ranges). Large enough for a 16×16 or 8×8
# attention grid to see (a small object still covers ~2×2 cells of a 16×16 map).
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (14, 18), "large": (22, 28)}
GAP = 2  # minimum empty pixels between two objects' bounding boxes (on x or on y)

# Colour–shape pairs that never appear in train/validation/test (images, captions or questions):
# colour i is held out with shape i mod 4, so every colour and every shape is still seen in training
# with other partners, and the OOD split tests the combination, not an unknown word.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS)
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

# split -> (contains held-out colour–shape pairs, uses unseen question templates)
SPLITS: dict[str, tuple[bool, bool]] = {
    "train": (False, False),
    "validation": (False, False),
    "test": (False, False),
    "ood": (True, True),  # the OOD test: unseen combinations AND unseen templates
    "ood_combo": (True, False),  # diagnostics: each shift alone
    "ood_template": (False, True),
}

CAPTION_WORDS: tuple[str, ...] = ("a", "an", "and", *COLOURS, *SHAPES)


def article(word: str) -> str:
    """English indefinite article for the word that follows it ("an orange", "a red")."""
    return "an" if word[:1] in "aeiou" else "a"

# Pixel-centre coordinates, shaped to broadcast to (SIZE, SIZE).
_X = (np.arange(SIZE, dtype=np.float32) + 0.5)[None, :]  # (1, W)
_Y = (np.arange(SIZE, dtype=np.float32) + 0.5)[:, None]  # (H, 1)


@dataclass(frozen=True)
class SceneObject:
    """One shape: its words, size class, and bounding box ``[x0, x0+side) × [y0, y0+side)``."""

    colour: str
    shape: str
    size: str  # "small" | "large"
    x0: int
    y0: int
    side: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.side / 2, self.y0 + self.side / 2)

    def to_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "size": self.size,
                "box": [self.x0, self.y0, self.side]}


class WordMasks(NamedTuple):
    """Ground truth of one text: its grounded words, their ``(start, end)`` offsets, and masks.

    ``masks[i]`` (bool, (SIZE, SIZE)) holds the pixels of the object ``words[i]`` names. Only words
    that name something are listed; ``offsets`` locate them in the text (as ``split_words`` does).
    """

    words: list[str]
    offsets: list[tuple[int, int]]
    masks: np.ndarray  # (n_words, SIZE, SIZE) bool


@dataclass(frozen=True)
class Scene:
    """A drawn scene: its objects (caption order = left to right), image, masks and caption."""

    objects: tuple[SceneObject, ...]
    image: np.ndarray  # (SIZE, SIZE, 3) uint8
    object_masks: np.ndarray  # (n_objects, SIZE, SIZE) bool, in ``objects`` order
    caption: str
    word_masks: WordMasks


class Batch(NamedTuple):
    """In-memory scenes for training loops: images, captions and per-caption word masks."""

    images: np.ndarray  # (n, SIZE, SIZE, 3) uint8
    captions: list[str]
    word_masks: list[WordMasks]


def shape_mask(shape: str, x0: int, y0: int, side: int) -> np.ndarray:
    """Boolean (SIZE, SIZE) mask of a shape whose bounding box is ``[x0, x0+side) × [y0, y0+side)``.

    A pixel belongs to the shape when its centre does. Areas: circle π·side²/4, square side²,
    triangle (apex up) side²/2, cross (arms side/3 thick) 5·side²/9.
    """
    h = side / 2
    dx = np.abs(_X - (x0 + h))  # (1, W)
    dy = np.abs(_Y - (y0 + h))  # (H, 1)
    if shape == "circle":
        return dx**2 + dy**2 <= h * h
    if shape == "square":
        return (dx < h) & (dy < h)
    if shape == "triangle":
        depth = _Y - y0  # distance below the apex, (H, 1)
        return (depth >= 0) & (depth < side) & (dx <= depth / 2)
    if shape == "cross":
        t = side / 6  # half the arm thickness
        return ((dx < h) & (dy < t)) | ((dx < t) & (dy < h))
    raise ValueError(f"unknown shape {shape!r}; the world's shapes are {SHAPES}")


def place_objects(rng: np.random.Generator, sides: list[int]) -> list[tuple[int, int]]:
    """Top-left corners for boxes of the given sides, no two closer than ``GAP`` pixels.

    Rejection sampling (64 candidates per object at once, largest object first); if a layout gets
    stuck, the objects go into distinct quadrants, which always fits (side ≤ 28 < 32 - GAP).
    """
    for _attempt in range(8):
        boxes: list[tuple[int, int, int]] = []
        for side in sides:
            hi = SIZE - side - 1  # keep 1 px from the border
            cand = rng.integers(1, hi + 1, size=(64, 2))  # (64, [x0, y0])
            ok = np.ones(64, dtype=bool)
            for bx, by, bs in boxes:
                apart_x = (cand[:, 0] >= bx + bs + GAP) | (cand[:, 0] + side + GAP <= bx)
                apart_y = (cand[:, 1] >= by + bs + GAP) | (cand[:, 1] + side + GAP <= by)
                ok &= apart_x | apart_y
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                break
            x0, y0 = cand[hits[0]]
            boxes.append((int(x0), int(y0), side))
        else:
            return [(x, y) for x, y, _ in boxes]
    cells = rng.permutation(4)[: len(sides)]
    half = SIZE // 2
    out = []
    for cell, side in zip(cells, sides):
        cx, cy = int(cell % 2) * half, int(cell // 2) * half
        free = half - side - GAP  # >= 2 for side <= 28
        out.append((cx + 1 + int(rng.integers(0, free)), cy + 1 + int(rng.integers(0, free))))
    return out


def _pick_pairs(rng: np.random.Generator, n: int, held_out: bool) -> list[tuple[str, str]]:
    """``n`` distinct colour–shape pairs; with ``held_out`` the first is a held-out pair, else none is."""
    if not held_out:
        idx = rng.choice(len(SEEN_PAIRS), size=n, replace=False)
        return [SEEN_PAIRS[i] for i in idx]
    ood = sorted(HELD_OUT_PAIRS)
    first = ood[int(rng.integers(len(ood)))]
    rest = [p for p in ALL_PAIRS if p != first]
    idx = rng.choice(len(rest), size=n - 1, replace=False)
    return [first] + [rest[i] for i in idx]


def make_scene(rng: np.random.Generator, split: str = "train", objects: tuple[int, int] = (1, 4)) -> Scene:
    """Draw one scene.

    Args:
        rng: the source of all randomness (same state → identical scene).
        split: a key of :data:`SPLITS`; splits with held-out pairs put at least one held-out
            colour–shape pair in the scene, the others never do.
        objects: inclusive range of the number of objects (at most 4, so quadrants always fit).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLITS)}")
    lo, hi = objects
    if not 1 <= lo <= hi <= 4:
        raise ValueError(f"objects={objects!r}: need 1 <= min <= max <= 4")
    n = int(rng.integers(lo, hi + 1))
    pairs = _pick_pairs(rng, n, SPLITS[split][0])
    sizes = [("small", "large")[int(b)] for b in rng.integers(0, 2, size=n)]
    sides = [int(rng.integers(SIZE_RANGES[s][0], SIZE_RANGES[s][1] + 1)) for s in sizes]
    order = np.argsort([-s for s in sides], kind="stable")  # place the largest first
    corners = [None] * n
    for i, xy in zip(order, place_objects(rng, [sides[i] for i in order])):
        corners[i] = xy
    objs = [SceneObject(c, s, size, x, y, side)
            for (c, s), size, side, (x, y) in zip(pairs, sizes, sides, corners)]
    objs.sort(key=lambda o: (o.centre[0], o.centre[1]))  # caption order: left to right
    return render_scene(tuple(objs))


def render_scene(objs: tuple[SceneObject, ...]) -> Scene:
    masks = np.stack([shape_mask(o.shape, o.x0, o.y0, o.side) for o in objs])  # (n, H, W)
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for o, m in zip(objs, masks):
        image[m] = COLOURS[o.colour]
    caption, word_masks = _caption(objs, masks)
    return Scene(objs, image, masks, caption, word_masks)


def _caption(objs: tuple[SceneObject, ...], masks: np.ndarray) -> tuple[str, WordMasks]:
    """"a red circle and an orange square": each colour/shape word gets its own object's mask."""
    tokens: list[tuple[str, int | None]] = []
    for k, o in enumerate(objs):
        if k:
            tokens.append(("and", None))
        tokens += [(article(o.colour), None), (o.colour, k), (o.shape, k)]
    caption = " ".join(t for t, _ in tokens)
    words = split_words(caption)
    if [w.text for w in words] != [t for t, _ in tokens]:  # guard: the splitter must see our tokens
        raise AssertionError(f"split_words disagrees with the caption's tokens: {caption!r}")
    grounded = [(w, k) for w, (_, k) in zip(words, tokens) if k is not None]
    return caption, WordMasks(
        [w.text for w, _ in grounded],
        [(w.start, w.end) for w, _ in grounded],
        masks[[k for _, k in grounded]] if grounded else np.zeros((0, SIZE, SIZE), bool),
    )


def union_mask(objects: tuple[SceneObject, ...] | list[SceneObject], object_masks: np.ndarray,
               word: str) -> np.ndarray:
    """Pixels of every object a colour or shape ``word`` names (e.g. "red" → all red objects).

    For words of a question or answer, which do not point at one caption occurrence. A word that
    names no object (or is not a colour/shape) gives an all-False mask.
    """
    w = word.lower()
    out = np.zeros((SIZE, SIZE), dtype=bool)
    for o, m in zip(objects, object_masks):
        if w in (o.colour, o.shape):
            out |= m
    return out


def sample_batch(rng: np.random.Generator, n: int, split: str = "train",
                 objects: tuple[int, int] = (1, 4)) -> Batch:
    """``n`` fresh scenes in memory (no disk I/O): the DM/VLM training loops' data source."""
    scenes = [make_scene(rng, split, objects) for _ in range(n)]
    images = np.stack([s.image for s in scenes]) if scenes else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return Batch(images, [s.caption for s in scenes], [s.word_masks for s in scenes])


def downsample_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Area-average (…, SIZE, SIZE) bool masks to (…, size, size) float32 coverage in [0, 1].

    E.g. the 32×32 "oracle teacher" maps, or masks at a UNet's 16×16/8×8 attention grid.
    """
    if SIZE % size:
        raise ValueError(f"size={size} must divide the scene size {SIZE}")
    f = SIZE // size
    lead = masks.shape[:-2]
    blocks = masks.reshape(*lead, size, f, size, f)  # (..., size, f, size, f)
    return blocks.mean(axis=(-3, -1), dtype=np.float32)
