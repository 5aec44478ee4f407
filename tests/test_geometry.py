"""Geometry of every family, checked against the REAL processor with index images.

An index image encodes its own pixel coordinates in its colours (R = x, G = y, B = 1 inside the
image). It goes through the family's real processor; for every image token the family places at
grid cell (r, c), we decode the colours of the ``pixel_values`` patch that feeds that token (undoing
the processor's normalisation) and compare the mean (x, y) they encode with the centre of the cell's
region of the ORIGINAL image, computed from the image size and ``covers`` alone. A grid sheared by
one column, a wrong tile layout or uncropped padding is off by at least one cell; we allow 0.3.

How a token maps to a ``pixel_values`` patch is the model's own vision pipeline, written here from
the model code (not from the family): Mllama tiles = CLS + patches row-major; LLaVA/CLIP patches
row-major; Qwen2-VL (14 px) and Qwen3-VL (16 px) patches in 2×2 merge windows; Idefics3 crops row-major + global, pixel shuffle
keeping k×k row-major. Self-attention models fill the n-th placeholder with the n-th feature.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.vlm.families import families
from lavender.vlm.grid import frame_coverage, gather_grid, to_frame

TOL = 0.3  # of a cell


def index_image(width: int, height: int) -> Image.Image:
    x = (np.arange(width) + 0.5) / width
    y = (np.arange(height) + 0.5) / height
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.ones((height, width))), axis=-1)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def decode(patch: np.ndarray, image_processor, width: int, height: int) -> tuple[float, float] | None:
    """Mean original-image (x, y) encoded by a normalised (3, h, w) patch; None when all padding."""
    mean = np.asarray(image_processor.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(image_processor.image_std, dtype=np.float64)[:, None, None]
    rgb = patch.astype(np.float64) * std + mean
    inside = rgb[2] > 0.5
    if not inside.any():
        return None
    return float(rgb[0][inside].mean() * width), float(rgb[1][inside].mean() * height)


def expected_centre(grid, r: int, c: int) -> tuple[float, float, float, float]:
    """Centre of cell (r, c)'s region, clipped to the image, and the cell's size; from covers alone."""
    x0, y0, x1, y1 = grid.covers
    width, height = grid.image_size
    cw, ch = (x1 - x0) / grid.cols, (y1 - y0) / grid.rows
    lo_x, hi_x = max(x0 + c * cw, 0), min(x0 + (c + 1) * cw, width)
    lo_y, hi_y = max(y0 + r * ch, 0), min(y0 + (r + 1) * ch, height)
    return (lo_x + hi_x) / 2, (lo_y + hi_y) / 2, cw, ch


def check_grid(grid, patch_of_key, image_processor) -> int:
    """Compare every cell; returns the number of cells checked."""
    width, height = grid.image_size
    keys = grid.key_index.view(grid.rows, grid.cols)
    checked = 0
    for r in range(grid.rows):
        for c in range(grid.cols):
            got = decode(patch_of_key(int(keys[r, c])), image_processor, width, height)
            ex, ey, cw, ch = expected_centre(grid, r, c)
            assert got is not None, f"cell ({r}, {c}) reads only padding"
            assert abs(got[0] - ex) < TOL * cw and abs(got[1] - ey) < TOL * ch, (
                f"cell ({r}, {c}) of {grid.rows}x{grid.cols}: patch shows ({got[0]:.1f}, {got[1]:.1f}), "
                f"expected ({ex:.1f}, {ey:.1f}) ± ({TOL * cw:.1f}, {TOL * ch:.1f})")
            checked += 1
    return checked


def load(tiny_vlm, arch: str):
    from transformers import AutoConfig

    path = tiny_vlm(arch)
    fam = families()[arch]
    return fam, fam.load_processor(path), AutoConfig.from_pretrained(path)


def chat(processor, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "what is it?"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# --- Mllama --------------------------------------------------------------------------------------
# (rows, cols) of tiles for each aspect-ratio id 1..8, and an image size that the processor tiles so
MLLAMA_CASES = [((1, 1), (50, 40)), ((1, 2), (100, 50)), ((1, 3), (160, 50)), ((1, 4), (210, 50)),
                ((2, 1), (50, 100)), ((2, 2), (100, 90)), ((3, 1), (50, 160)), ((4, 1), (50, 210))]


@pytest.mark.parametrize("layout,size", MLLAMA_CASES, ids=[f"{r}x{c}" for (r, c), _ in MLLAMA_CASES])
def test_mllama_all_aspect_ratios(tiny_vlm, layout, size):
    fam, processor, config = load(tiny_vlm, "mllama")
    width, height = size
    inputs = processor(images=[[index_image(width, height)]], text=[chat(processor)], return_tensors="pt")
    aspect_ids = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert aspect_ids[int(inputs["aspect_ratio_ids"][0, 0]) - 1] == layout  # the test's premise
    (grid,) = fam.image_grids(inputs, [[(width, height)]], config, processor)
    pv = inputs["pixel_values"][0, 0].numpy()  # (num_tiles, 3, 56, 56)
    patch, side = 14, 4
    per_tile = side * side + 1

    def patch_of_key(key: int) -> np.ndarray:
        tile, p = divmod(key, per_tile)
        assert p != 0, "a CLS token was placed on the grid"
        pr, pc = divmod(p - 1, side)
        return pv[tile, :, pr * patch:(pr + 1) * patch, pc * patch:(pc + 1) * patch]

    # the grid must cover the resized image exactly up to whole patches: nothing beyond one patch of padding
    assert grid.rows <= layout[0] * side and grid.cols <= layout[1] * side
    assert check_grid(grid, patch_of_key, processor.image_processor) == grid.rows * grid.cols


def test_mllama_padded_non_square_and_batch(tiny_vlm):
    """A 100×60 image sits on a 2×2 canvas with padding right and below: the grid is 5×8, not 8×8."""
    fam, processor, config = load(tiny_vlm, "mllama")
    images = [[index_image(100, 60)], [index_image(50, 160)]]
    inputs = processor(images=images, text=[chat(processor), chat(processor)], return_tensors="pt", padding=True)
    grids = fam.image_grids(inputs, [[(100, 60)], [(50, 160)]], config, processor)
    assert (grids[0].rows, grids[0].cols) == (5, 8)
    assert grids[0].covers[2] >= 100 and grids[0].covers[3] >= 60  # whole patches span a little padding
    for grid in grids:
        pv = inputs["pixel_values"][grid.batch_index, 0].numpy()

        def patch_of_key(key: int, pv=pv) -> np.ndarray:
            tile, p = divmod(key, 17)
            pr, pc = divmod(p - 1, 4)
            return pv[tile, :, pr * 14:(pr + 1) * 14, pc * 14:(pc + 1) * 14]

        check_grid(grid, patch_of_key, processor.image_processor)


def test_mllama_first_text_row(tiny_vlm):
    fam, processor, config = load(tiny_vlm, "mllama")
    inputs = processor(images=[[index_image(50, 40)]], text=[chat(processor)], return_tensors="pt")
    first = int(fam.first_text_row(inputs["input_ids"], config)[0])
    assert inputs["input_ids"][0, first] == config.image_token_id
    assert not (inputs["input_ids"][0, :first] == config.image_token_id).any()


# --- self-attention families: the n-th placeholder gets the n-th vision feature ---------------------
def rank_of(input_ids: torch.Tensor, token: int):
    positions = (input_ids == token).nonzero().flatten().tolist()
    return {pos: n for n, pos in enumerate(positions)}


@pytest.mark.parametrize("size", [(100, 40), (40, 100), (60, 60)])
def test_llava_centre_crop(tiny_vlm, size):
    fam, processor, config = load(tiny_vlm, "llava")
    width, height = size
    inputs = processor(images=[index_image(width, height)], text=[chat(processor)], return_tensors="pt")
    (grid,) = fam.image_grids(inputs, [[size]], config, processor)
    assert (grid.rows, grid.cols) == (4, 4)
    side = min(width, height)
    x0, y0, x1, y1 = grid.covers
    assert abs((x1 - x0) - side) <= 2 and abs((y1 - y0) - side) <= 2  # the central square
    assert abs((x0 + x1) / 2 - width / 2) <= 1 and abs((y0 + y1) / 2 - height / 2) <= 1
    rank = rank_of(inputs["input_ids"][0], config.image_token_id)
    pv = inputs["pixel_values"][0].numpy()  # (3, 56, 56)

    def patch_of_key(key: int) -> np.ndarray:
        pr, pc = divmod(rank[key], 4)  # CLIP: patches row-major (CLS dropped by the 'default' strategy)
        return pv[:, pr * 14:(pr + 1) * 14, pc * 14:(pc + 1) * 14]

    check_grid(grid, patch_of_key, processor.image_processor)


@pytest.mark.parametrize("size", [(100, 40), (40, 100), (61, 30)])
def test_llava_padded_square(tiny_vlm, size):
    """``LlavaImageProcessor(do_pad=True)`` (the original LLaVA-1.5 recipe) pads to a centred square
    first: the grid covers that square; cells wholly in the padding read only padding, the others
    read their own region of the image."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    fam, processor, config = load(tiny_vlm, "llava")
    ip = processor.image_processor
    processor.image_processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": ip.crop_size["height"]}, crop_size=dict(ip.crop_size),
        image_mean=ip.image_mean, image_std=ip.image_std)
    width, height = size
    inputs = processor(images=[index_image(width, height)], text=[chat(processor)], return_tensors="pt")
    (grid,) = fam.image_grids(inputs, [[size]], config, processor)
    x0, y0, x1, y1 = grid.covers
    assert x1 - x0 == y1 - y0 == max(size) and (x0 < 0 or y0 < 0)
    rank = rank_of(inputs["input_ids"][0], config.image_token_id)
    pv = inputs["pixel_values"][0].numpy()
    keys = grid.key_index.view(grid.rows, grid.cols)
    padding_only = 0
    for r in range(grid.rows):
        for c in range(grid.cols):
            pr, pc = divmod(rank[int(keys[r, c])], 4)
            got = decode(pv[:, pr * 14:(pr + 1) * 14, pc * 14:(pc + 1) * 14], processor.image_processor, width, height)
            ex, ey, cw, ch = expected_centre(grid, r, c)
            inside_x = min(x0 + (c + 1) * cw, width) - max(x0 + c * cw, 0)
            inside_y = min(y0 + (r + 1) * ch, height) - max(y0 + r * ch, 0)
            if inside_x <= 0 or inside_y <= 0:
                assert got is None, (r, c, got)
                padding_only += 1
            elif inside_x >= cw / 2 and inside_y >= ch / 2:  # a sliver of image is blurred by the resize
                assert got is not None and abs(got[0] - ex) < TOL * cw and abs(got[1] - ey) < TOL * ch, (r, c, got, ex, ey)
    assert padding_only > 0


@pytest.mark.parametrize("size", [(150, 60), (60, 170)])
def test_qwen2_vl_non_square(tiny_vlm, size):
    fam, processor, config = load(tiny_vlm, "qwen2_vl")
    width, height = size
    text = [chat(processor), "hello there " + chat(processor)]  # padding shifts the second sample
    inputs = processor(images=[index_image(*size), index_image(*size)], text=text, return_tensors="pt",
                       padding=True)
    grids = fam.image_grids(inputs, [[size], [size]], config, processor)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (grids[0].rows, grids[0].cols) == (h // 2, w // 2) and grids[0].rows != grids[0].cols
    tp = processor.image_processor.temporal_patch_size
    patches = inputs["pixel_values"].numpy().reshape(-1, 3, tp, 14, 14)[:, :, 0]  # (N, 3, 14, 14)
    for b, grid in enumerate(grids):
        rank = rank_of(inputs["input_ids"][b], config.image_token_id)
        offset = b * t * h * w

        def patch_of_key(key: int, rank=rank, offset=offset) -> np.ndarray:
            # merged token n = patches 4n .. 4n+3, a 2×2 window (row-major inside it)
            window = patches[offset + 4 * rank[key]: offset + 4 * rank[key] + 4]  # (4, 3, 14, 14)
            top, bottom = np.concatenate(window[:2], axis=2), np.concatenate(window[2:], axis=2)
            return np.concatenate([top, bottom], axis=1)  # (3, 28, 28)

        check_grid(grid, patch_of_key, processor.image_processor)


@pytest.mark.parametrize("size", [(150, 40), (40, 170), (20, 24), (56, 56)])
def test_gemma3_squashed_whole_image_pooled(tiny_vlm, size):
    """Gemma 3: the whole image resized to 56×56 (squashed), SigLIP 7-px patches pooled 2×2 into 4×4
    soft tokens, row-major; two images in one sample (multi-image records)."""
    fam, processor, config = load(tiny_vlm, "gemma3")
    inputs = processor(images=[[index_image(*size), index_image(*size)]], text=[chat(processor, 2)],
                       return_tensors="pt")
    grids = fam.image_grids(inputs, [[size, size]], config, processor)
    assert [(g.rows, g.cols) for g in grids] == [(4, 4), (4, 4)]
    assert grids[0].covers == (0.0, 0.0, float(size[0]), float(size[1]))
    assert int(grids[1].key_index.min()) > int(grids[0].key_index.max())  # the second image's own tokens
    rank = rank_of(inputs["input_ids"][0], config.image_token_id)
    pv = inputs["pixel_values"].numpy()  # (2, 3, 56, 56)
    for j, grid in enumerate(grids):
        def patch_of_key(key: int, j=j) -> np.ndarray:
            pr, pc = divmod(rank[key] - 16 * j, 4)  # pooled token = a 14-px block (2×2 patches of 7 px)
            return pv[j, :, pr * 14:(pr + 1) * 14, pc * 14:(pc + 1) * 14]

        assert check_grid(grid, patch_of_key, processor.image_processor) == 16


@pytest.mark.parametrize("size", [(150, 60), (300, 40), (40, 300), (20, 24), (64, 64)])
def test_qwen3_vl_merged_16px_patches(tiny_vlm, size):
    """Qwen3-VL: the whole image resized to multiples of 32 px (very wide / tall kept, small scaled up),
    16-px patches in 2×2 merge windows → one token each, row-major; two images in the second sample,
    which is padded (its keys shift)."""
    fam, processor, config = load(tiny_vlm, "qwen3_vl")
    other = (56, 90)
    text = [chat(processor), "hello there " + chat(processor, 2)]
    inputs = processor(images=[[index_image(*size)], [index_image(*size), index_image(*other)]], text=text,
                       return_tensors="pt", padding=True)
    grids = fam.image_grids(inputs, [[size], [size, other]], config, processor)
    thw = inputs["image_grid_thw"].tolist()
    assert [(g.rows, g.cols) for g in grids] == [(h // 2, w // 2) for _, h, w in thw]
    if size[0] > 2 * size[1]:
        assert grids[0].cols > 2 * grids[0].rows  # a very wide image keeps its shape (no tiling, no crop)
    tp, patch = processor.image_processor.temporal_patch_size, 16
    patches = inputs["pixel_values"].numpy().reshape(-1, 3, tp, patch, patch)[:, :, 0]  # (N, 3, 16, 16)
    starts = np.cumsum([0] + [t * h * w for t, h, w in thw])
    ranks = [rank_of(inputs["input_ids"][b], config.image_token_id) for b in range(2)]
    for k, grid in enumerate(grids):  # grids are in batch order, as image_grid_thw
        rank, first = ranks[grid.batch_index], int(grid.key_index.min())

        def patch_of_key(key: int, rank=rank, first=first, offset=int(starts[k])) -> np.ndarray:
            n = offset + 4 * (rank[key] - rank[first])  # merged token n = patches 4n .. 4n+3 of its image
            window = patches[n: n + 4]
            return np.concatenate([np.concatenate(window[:2], axis=2), np.concatenate(window[2:], axis=2)], axis=1)

        assert check_grid(grid, patch_of_key, processor.image_processor) == grid.rows * grid.cols


@pytest.mark.parametrize("size", [(150, 40), (40, 170), (300, 30), (20, 24), (56, 56)])
def test_paligemma_squashed_whole_image(tiny_vlm, size):
    """PaliGemma: the whole image resized to 56×56 (squashed: no tiling, no crop, whatever the aspect
    ratio), SigLIP 14-px patches → 4×4 tokens, row-major, before <bos>; two images in one sample
    (multi-image records), processed through the family's prefix/suffix call."""
    fam, processor, config = load(tiny_vlm, "paligemma")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                       {"type": "text", "text": "what is it?"}]}],
                                         add_generation_prompt=True)
    inputs = fam.encode(processor, [text], [[index_image(*size), index_image(*size)]], return_tensors="pt")
    grids = fam.image_grids(inputs, [[size, size]], config, processor)
    assert [(g.rows, g.cols) for g in grids] == [(4, 4), (4, 4)]
    assert grids[0].covers == (0.0, 0.0, float(size[0]), float(size[1]))
    assert int(grids[1].key_index.min()) > int(grids[0].key_index.max())  # the second image's own tokens
    rank = rank_of(inputs["input_ids"][0], config.image_token_id)
    pv = inputs["pixel_values"].numpy()  # (2, 3, 56, 56)
    for j, grid in enumerate(grids):
        def patch_of_key(key: int, j=j) -> np.ndarray:
            pr, pc = divmod(rank[key] - 16 * j, 4)  # token = one 14-px patch, no pooling
            return pv[j, :, pr * 14:(pr + 1) * 14, pc * 14:(pc + 1) * 14]

        assert check_grid(grid, patch_of_key, processor.image_processor) == 16


@pytest.mark.parametrize("size,layout", [((150, 60), None), ((300, 30), None), ((20, 24), None),
                                         ((200, 200), (2, 2)), ((60, 250), (3, 1)), ((260, 90), (1, 3))])
def test_minicpmv_slices_stitched_thumbnail_dropped(tiny_vlm, size, layout):
    """MiniCPM-V 4.6: slices of the whole image stitched onto one grid, the thumbnail dropped; an unsliced
    image (small, or wide/tall but small in area) is its thumbnail. Token → pixels from the model's own
    pipeline: NaViT patches row-major per view, the ViT's 2×2 window merger (its window index), then the
    2×2 MLP merger over the row-major window grid. Two images in the second sample of a padded batch."""
    from transformers.vision_utils import get_vision_window_index

    fam, processor, config = load(tiny_vlm, "minicpmv")
    other = (120, 130)
    text = [chat(processor), "hello there " + chat(processor, 2)]
    inputs = fam.encode(processor, text, [[index_image(*size)], [index_image(*size), index_image(*other)]],
                        return_tensors="pt", padding=True)
    grids = fam.image_grids(inputs, [[size], [size, other]], config, processor)
    views = inputs["target_sizes"].tolist()
    sliced = processor.image_processor.get_sliced_grid((size[1], size[0]), 4, 112)
    assert (tuple(sliced) if sliced else None) == layout  # the test's premise: the processor's own slicing
    if layout:
        (sr, sc) = views[1]
        assert (grids[0].rows, grids[0].cols) == (layout[0] * sr // 4, layout[1] * sc // 4)
    else:
        assert (grids[0].rows, grids[0].cols) == (views[0][0] // 4, views[0][1] // 4)
    p = processor.image_processor.patch_size
    pv = inputs["pixel_values"][0].numpy()  # (3, p, total_patches * p)
    # per view: its first patch (column block) and its token run; the model fills the runs in view order
    starts = np.cumsum([0] + [h * w for h, w in views])
    ranks = [rank_of(inputs["input_ids"][b], config.image_token_id) for b in range(2)]
    per_sample = [0, 0]
    first_view = {}  # grid index -> its first view index
    v = 0
    for gi, (b, (w, h)) in enumerate([(0, size), (1, size), (1, other)]):
        grid = processor.image_processor.get_sliced_grid((h, w), 4, 112)
        first_view[gi] = (v, per_sample[b])
        n = 1 + (grid[0] * grid[1] if grid else 0)
        per_sample[b] += sum(views[v + i][0] * views[v + i][1] // 16 for i in range(n))
        v += n

    def token_pixels(view: int, j: int) -> np.ndarray:
        h, w = views[view]
        window = get_vision_window_index(torch.tensor([[1, h, w]]), 1, 2, 1)[0]  # post-merger token -> 4 patches
        r, c = divmod(j, w // 4)
        post = [(2 * r + dr) * (w // 2) + 2 * c + dc for dr in (0, 1) for dc in (0, 1)]
        patches = [int(starts[view]) + int(q) for t in post for q in window[4 * t: 4 * t + 4]]
        return np.concatenate([pv[:, :, q * p:(q + 1) * p] for q in patches], axis=2)

    for gi, grid in enumerate(grids):
        v0, run0 = first_view[gi]
        rank = ranks[grid.batch_index]
        sizes_tok = [views[v0 + i][0] * views[v0 + i][1] // 16 for i in range(len(views) - v0)]

        def patch_of_key(key: int, rank=rank, v0=v0, run0=run0, sizes_tok=sizes_tok, gi=gi) -> np.ndarray:
            j, view = rank[key] - run0, v0
            while j >= sizes_tok[view - v0]:
                j, view = j - sizes_tok[view - v0], view + 1
            if gi < 2 and layout:
                assert view > v0, "a thumbnail token was placed on the grid"
            return token_pixels(view, j)

        assert check_grid(grid, patch_of_key, processor.image_processor) == grid.rows * grid.cols


@pytest.mark.parametrize("size,layout", [((100, 40), (1, 2)), ((90, 100), (2, 2)), ((30, 100), (2, 1)),
                                         ((40, 40), (2, 2))])
def test_idefics3_split_image(tiny_vlm, size, layout):
    fam, processor, config = load(tiny_vlm, "idefics3")
    inputs = processor(images=[[index_image(*size)]], text=[chat(processor)], return_tensors="pt")
    (grid,) = fam.image_grids(inputs, [[size]], config, processor)
    k = 4  # 56-px views, 7-px patches, pixel shuffle 2 → 4×4 tokens per view
    assert (grid.rows, grid.cols) == (layout[0] * k, layout[1] * k)
    assert inputs["pixel_values"].shape[1] == layout[0] * layout[1] + 1  # crops + the global view
    rank = rank_of(inputs["input_ids"][0], config.image_token_id)
    pv = inputs["pixel_values"][0].numpy()  # (views, 3, 56, 56)

    def patch_of_key(key: int) -> np.ndarray:
        view, n = divmod(rank[key], k * k)
        assert view < layout[0] * layout[1], "a global-view token was placed on the grid"
        tr, tc = divmod(n, k)
        return pv[view, :, tr * 14:(tr + 1) * 14, tc * 14:(tc + 1) * 14]

    check_grid(grid, patch_of_key, processor.image_processor)


def test_idefics3_unsplit_image_is_the_global_view(tiny_vlm):
    fam, processor, config = load(tiny_vlm, "idefics3")
    processor.image_processor.do_image_splitting = False
    try:
        inputs = processor(images=[[index_image(100, 40)]], text=[chat(processor)], return_tensors="pt")
        (grid,) = fam.image_grids(inputs, [[(100, 40)]], config, processor)
    finally:
        processor.image_processor.do_image_splitting = True
    assert (grid.rows, grid.cols) == (4, 4) and grid.covers == (0.0, 0.0, 100.0, 40.0)


# --- LLaVA-OneVision / LLaVA-NeXT: anyres crops, unpadding, newlines, base view ----------------------
def _anyres_packed(arch: str, config, inputs, image_processor) -> list[np.ndarray]:
    """Per image, what the MODEL puts at each of its placeholders, from the model's own packing code.

    Each view's patches (row-major; NeXT's CLS already dropped) become fake 5-channel features
    ``(Σx, Σy, n, is_base, is_newline)`` over the patch's image pixels; the model's
    ``pack_image_features`` then unpads, shrinks (OneVision) and adds newlines exactly as it does to
    real features, so the n-th row of the result is what fills the image's n-th placeholder."""
    from types import SimpleNamespace

    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionModel,
        image_size_to_num_patches,
    )

    mean = np.asarray(image_processor.image_mean)[:, None, None]
    std = np.asarray(image_processor.image_std)[:, None, None]
    patch = config.vision_config.patch_size
    nums = [int(n) for n in inputs.get("batch_num_images", [1] * len(inputs["image_sizes"]))]
    single = [n == 1 for n in nums for _ in range(n)]
    feats = []
    for i, (h, w) in enumerate(inputs["image_sizes"].tolist()):
        n_views = image_size_to_num_patches((h, w), config.image_grid_pinpoints, config.vision_config.image_size) \
            if (single[i] or arch == "llava_next") else 1
        pv = inputs["pixel_values"][i, :n_views].numpy() * std + mean  # (views, 3, S, S) in [0, 1]
        v, _, s, _ = pv.shape
        k = s // patch
        pv = pv[:, :, : k * patch, : k * patch]  # the patch conv reads k·patch px; it drops the last s % patch
        cells = pv.reshape(v, 3, k, patch, k, patch).transpose(0, 2, 4, 1, 3, 5)
        # image pixels only: OneVision pads multi-image views with the mean colour (x ≈ 0.48·W), which
        # the resize blends into the border pixels; B > 0.95 keeps pixels that are ≥ 90 % image
        inside = cells[:, :, :, 2] > 0.95  # (v, r, c, p, p)
        f = np.stack([(cells[:, :, :, 0] * w * inside).sum((-1, -2)), (cells[:, :, :, 1] * h * inside).sum((-1, -2)),
                      inside.sum((-1, -2)), np.zeros(inside.shape[:3]), np.zeros(inside.shape[:3])], -1)
        f[0, ..., 3] = 1.0  # the first view is the base view
        feats.append(torch.tensor(f.reshape(v, -1, 5), dtype=torch.float32))
    model = SimpleNamespace(config=config)
    newline = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    if arch == "llava_onevision":
        packed, _ = LlavaOnevisionModel.pack_image_features(model, feats, inputs["image_sizes"], newline,
                                                            config.vision_aspect_ratio)
    else:
        packed, _ = LlavaNextModel.pack_image_features(model, feats, inputs["image_sizes"], "default", newline)
    return [p.numpy() for p in packed]


def check_packed_grid(grid, feats: np.ndarray, rank: dict[int, int], tol: float = TOL) -> float:
    """Every grid cell's placeholder holds an image feature (no newline; no base view when the model
    kept a high-res grid) whose mean (x, y) is the cell's centre, from ``covers`` alone (within ``tol``
    of a cell); returns the worst error, in cells."""
    worst = 0.0
    assert len(rank) == feats.shape[0], "processor and model disagree on the number of image tokens"
    has_grid = ((feats[:, 3] == 0) & (feats[:, 4] == 0)).any()
    keys = grid.key_index.view(grid.rows, grid.cols)
    for r in range(grid.rows):
        for c in range(grid.cols):
            sx, sy, n, is_base, is_newline = feats[rank[int(keys[r, c])]]
            assert is_newline == 0, f"cell ({r}, {c}) is an image_newline token"
            assert not (has_grid and is_base > 0), f"cell ({r}, {c}) is a base-view token"
            assert n > 0, f"cell ({r}, {c}) reads only padding"
            ex, ey, cw, ch = expected_centre(grid, r, c)
            assert abs(sx / n - ex) < tol * cw and abs(sy / n - ey) < tol * ch, (
                f"cell ({r}, {c}) of {grid.rows}x{grid.cols}: holds ({sx / n:.1f}, {sy / n:.1f}), expected "
                f"({ex:.1f}, {ey:.1f}) ± ({tol * cw:.1f}, {tol * ch:.1f})")
            worst = max(worst, abs(sx / n - ex) / cw, abs(sy / n - ey) / ch)
    return worst


# (size, expected grid): small (1 crop), wide/tall (1×3, 3×1), 2×3 and 3×3 crops shrunk by anyres_max_4,
# square 2×2; 300×20: unpadding leaves no grid row, the model keeps only the base view
ANYRES_CASES = {
    "llava_onevision": [((20, 24), (4, 4)), ((150, 40), (4, 12)), ((40, 170), (12, 2)), ((70, 40), (6, 12)),
                        ((90, 100), (8, 7)), ((56, 56), (8, 8)), ((300, 20), (4, 4))],
    "llava_next": [((20, 24), (4, 4)), ((150, 40), (4, 12)), ((40, 170), (12, 2)), ((70, 40), (4, 8)),
                   ((90, 100), (8, 8)), ((300, 20), (4, 4))],
}


@pytest.mark.parametrize("arch,size,shape", [(a, s, g) for a, cases in ANYRES_CASES.items() for s, g in cases],
                         ids=[f"{a}-{s[0]}x{s[1]}" for a, cases in ANYRES_CASES.items() for s, _ in cases])
def test_anyres_crops_unpadded_onto_one_grid(tiny_vlm, arch, size, shape):
    """LLaVA-OneVision / NeXT: crops stitched, unpadded (and shrunk) by the model, newlines and the base
    view skipped; the same image twice in a padded batch of two samples (the second one's keys shift)."""
    fam, processor, config = load(tiny_vlm, arch)
    text = [chat(processor), "hello there " + chat(processor)]
    inputs = processor(images=[[index_image(*size)], [index_image(*size)]], text=text, return_tensors="pt",
                       padding=True)
    grids = fam.image_grids(inputs, [[size], [size]], config, processor)
    assert [(g.rows, g.cols) for g in grids] == [shape, shape]
    packed = _anyres_packed(arch, config, inputs, processor.image_processor)
    for grid in grids:
        check_packed_grid(grid, packed[grid.batch_index], rank_of(inputs["input_ids"][grid.batch_index],
                                                                  config.image_token_id))


def _crop_not_a_multiple_of_the_patch(tiny_vlm, arch: str, crop: int = 30):
    """The tiny model's family, processor and config with ``crop``-px crops over 7-px patches: 4 tokens
    read 28 px of each crop and the conv drops the last ``crop - 28`` (released OneVision: SigLIP-384/14,
    27 tokens over 378 px, 6 dropped)."""
    fam, processor, config = load(tiny_vlm, arch)
    scale = [[crop * p // config.vision_config.image_size for p in pp] for pp in config.image_grid_pinpoints]
    config.vision_config.image_size = crop
    config.image_grid_pinpoints = scale
    ip = processor.image_processor
    ip.image_grid_pinpoints = scale
    if arch == "llava_next":
        ip.size, ip.crop_size = {"shortest_edge": crop}, {"height": crop, "width": crop}
    else:
        ip.size = {"height": crop, "width": crop}
    return fam, processor, config


# worst centre error (cells) of a uniform grid whose crops are 30 px over 4 tokens of 7 px: measured 0.125
# (the per-crop 2-px gap a uniform grid cannot hold); the crop-wide pitch the family used before: 0.25
GAP_TOL = 0.15


@pytest.mark.parametrize("arch,size", [(a, s) for a in ANYRES_CASES for s in
                                       [(20, 24), (150, 40), (40, 170), (70, 40), (90, 100), (56, 56)]])
def test_anyres_crop_not_a_multiple_of_the_patch(tiny_vlm, arch, size):
    """The grid covers what the tokens read (4·7 px of each 30-px crop, the last 2 px dropped by the
    patch conv), so the cell centres stay within ``GAP_TOL`` of a cell; also one multi-image view
    (OneVision) and a thin image whose grid is the base view."""
    fam, processor, config = _crop_not_a_multiple_of_the_patch(tiny_vlm, arch)
    inputs = processor(images=[[index_image(*size)]], text=[chat(processor)], return_tensors="pt")
    (grid,) = fam.image_grids(inputs, [[size]], config, processor)
    packed = _anyres_packed(arch, config, inputs, processor.image_processor)
    check_packed_grid(grid, packed[0], rank_of(inputs["input_ids"][0], config.image_token_id), GAP_TOL)


@pytest.mark.parametrize("arch", list(ANYRES_CASES))
def test_anyres_single_views_cover_only_what_the_tokens_read(tiny_vlm, arch):
    """A one-view grid (OneVision's multi-image view; the base view of a very thin image) spans
    28 of the view's 30 px: exact, no gap inside one view."""
    fam, processor, config = _crop_not_a_multiple_of_the_patch(tiny_vlm, arch)
    sizes = [[(60, 40), (36, 50)], [(320, 20)]]
    inputs = processor(images=[[index_image(*s) for s in ss] for ss in sizes],
                       text=[chat(processor, 2), chat(processor)], return_tensors="pt", padding=True)
    grids = fam.image_grids(inputs, sizes, config, processor)
    packed = _anyres_packed(arch, config, inputs, processor.image_processor)
    ranks = [rank_of(inputs["input_ids"][b], config.image_token_id) for b in range(2)]
    if arch == "llava_onevision":
        assert [(g.rows, g.cols) for g in grids] == [(4, 4), (4, 4), (4, 4)]
        assert grids[0].covers == pytest.approx((0.0, -10.0, 56.0, 46.0))
        for j, grid in enumerate(grids[:2]):
            rank = {k: n - 17 * j for k, n in ranks[0].items() if 17 * j <= n < 17 * j + 17}
            assert check_packed_grid(grid, packed[j], rank, 0.1) < 0.1
    assert grids[2].covers == pytest.approx((0.0, 0.0, 320 * 28 / 30, 20 * 28 / 30))
    check_packed_grid(grids[2], packed[len(grids) - 1], ranks[1], 0.1)


def test_onevision_multi_image_sample_is_one_padded_view_each(tiny_vlm):
    """Two images in one sample: OneVision does not crop them; each is padded to a square (centred) and
    resized to one 4×4 view + a newline. A one-image sample beside it is cropped as usual."""
    fam, processor, config = load(tiny_vlm, "llava_onevision")
    sizes = [[(60, 40), (36, 50)], [(70, 40)]]
    inputs = processor(images=[[index_image(*s) for s in ss] for ss in sizes],
                       text=[chat(processor, 2), chat(processor)], return_tensors="pt", padding=True)
    grids = fam.image_grids(inputs, sizes, config, processor)
    assert [(g.rows, g.cols) for g in grids] == [(4, 4), (4, 4), (6, 12)]
    assert grids[0].covers == (0.0, -10.0, 60.0, 50.0) and grids[1].covers == (-7.0, 0.0, 43.0, 50.0)
    packed = _anyres_packed("llava_onevision", config, inputs, processor.image_processor)
    ranks = [rank_of(inputs["input_ids"][b], config.image_token_id) for b in range(2)]
    check_packed_grid(grids[2], packed[2], ranks[1])
    for j, grid in enumerate(grids[:2]):  # the sample's placeholders: image 0's 17, then image 1's 17
        first = 17 * j
        rank = {k: n - first for k, n in ranks[0].items() if first <= n < first + 17}
        check_packed_grid(grid, packed[j], rank)


# --- InternVL: dynamic tiles + thumbnail, pixel shuffle ------------------------------------------------
def placeholder_runs(input_ids: torch.Tensor, token: int) -> list[list[int]]:
    """Per sample, per image: the positions of its contiguous run of ``token`` (InternVL: one per image)."""
    out = []
    for row in input_ids:
        edges = np.diff(np.r_[0, (row == token).int().numpy(), 0])
        out.append([list(range(s, e)) for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))])
    return out


def internvl_packed(config, inputs, image_processor, runs) -> list[np.ndarray]:
    """Per image (batch order), ``(Σx, Σy, n, is_thumbnail)`` of what the MODEL puts at each placeholder.

    Each view's patches (row-major; CLS dropped) become fake features over the patch's image pixels,
    folded by the model's OWN ``pixel_shuffle``; a token's 4 channel groups (its 2×2 patches) are summed.
    The thumbnail is the last view of an image with more than one."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    mean = np.asarray(image_processor.image_mean)[:, None, None]
    std = np.asarray(image_processor.image_std)[:, None, None]
    patch = config.vision_config.patch_size[0]
    pv = inputs["pixel_values"].numpy() * std + mean  # (all views, 3, T, T)
    v, _, t, _ = pv.shape
    cells = pv.reshape(v, 3, t // patch, patch, t // patch, patch).transpose(0, 2, 4, 1, 3, 5)
    inside = cells[:, :, :, 2] > 0.95  # image pixels only (resampling blends the borders)
    sizes = inputs["_sizes"]
    out, start = [], 0
    for (w, h), run in zip([s for ss in sizes for s in ss], [r for rr in runs for r in rr]):
        views = len(run) // config.image_seq_length
        c, m = cells[start:start + views], inside[start:start + views]
        f = np.stack([(c[:, :, :, 0] * w * m).sum((-1, -2)), (c[:, :, :, 1] * h * m).sum((-1, -2)), m.sum((-1, -2)),
                      np.zeros(m.shape[:3])], -1)  # (views, rows, cols, 4)
        if views > 1:
            f[-1, ..., 3] = 1.0
        shuffled = InternVLModel.pixel_shuffle(None, torch.tensor(f), config.downsample_ratio)
        out.append(shuffled.reshape(views, -1, 4, 4).sum(2).reshape(-1, 4).numpy())
        start += views
    assert start == v, "the views of the batch's images do not add up to pixel_values"
    return out


INTERNVL_CASES = [((20, 24), (1, 1)), ((56, 56), (1, 1)), ((70, 40), (1, 2)), ((150, 40), (1, 4)),
                  ((40, 170), (4, 1)), ((90, 100), (2, 2)), ((300, 20), (1, 6))]


@pytest.mark.parametrize("size,tiles", INTERNVL_CASES, ids=[f"{w}x{h}" for (w, h), _ in INTERNVL_CASES])
def test_internvl_tiles_stitched_thumbnail_dropped(tiny_vlm, size, tiles):
    """InternVL: small/square = one tile (no thumbnail); wide, tall, very wide and 2×2 tilings; tiles
    stitched row-major, pixel shuffle 2×2 → 4×4 tokens per tile, thumbnail last and dropped; the second
    sample holds two images and is padded (left: InternVL's processor default)."""
    fam, processor, config = load(tiny_vlm, "internvl")
    sizes = [[size], [size, (60, 30)]]
    inputs = processor(images=[[index_image(*s) for s in ss] for ss in sizes],
                       text=[chat(processor), "hello there " + chat(processor, 2)], return_tensors="pt", padding=True)
    grids = fam.image_grids(inputs, sizes, config, processor)
    assert [(g.rows, g.cols) for g in grids] == [(tiles[0] * 4, tiles[1] * 4)] * 2 + [(4, 8)]
    assert grids[0].covers == (0.0, 0.0, float(size[0]), float(size[1]))
    runs = placeholder_runs(inputs["input_ids"], config.image_token_id)
    packed = internvl_packed(config, {**inputs, "_sizes": sizes}, processor.image_processor, runs)
    for grid, feats, run in zip(grids, packed, [r for rr in runs for r in rr]):
        rank = {p: n for n, p in enumerate(run)}
        assert len(rank) == feats.shape[0]
        keys = grid.key_index.view(grid.rows, grid.cols)
        for r in range(grid.rows):
            for c in range(grid.cols):
                sx, sy, n, thumb = feats[rank[int(keys[r, c])]]
                assert thumb == 0 and n > 0, f"cell ({r}, {c}) is a thumbnail token or reads only padding"
                ex, ey, cw, ch = expected_centre(grid, r, c)
                assert abs(sx / n - ex) < TOL * cw and abs(sy / n - ey) < TOL * ch, (
                    f"cell ({r}, {c}) of {grid.rows}x{grid.cols}: holds ({sx / n:.1f}, {sy / n:.1f}), "
                    f"expected ({ex:.1f}, {ey:.1f})")


# --- to_frame against hand-made cases ---------------------------------------------------------------
def one_hot(rows: int, cols: int, r: int, c: int) -> torch.Tensor:
    g = torch.zeros(rows, cols)
    g[r, c] = 1.0
    return g


def frame_pixels_of_region(frame: str, width: int, height: int, region, size: int = 32) -> np.ndarray:
    """Boolean (size, size): frame pixels whose centre falls in ``region`` of the original image."""
    x0, y0, x1, y1 = region
    centres = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(centres, centres)
    if frame == "squash":
        x, y = u * width, v * height
    elif frame == "pad":
        s = max(width, height)
        x, y = u * s - (s - width) / 2, v * s - (s - height) / 2
    else:
        s = min(width, height)
        x, y = (width - s) / 2 + u * s, (height - s) / 2 + v * s
    return (x > x0) & (x < x1) & (y > y0) & (y < y1)


@pytest.mark.parametrize("frame", ["squash", "pad", "center-crop"])
def test_to_frame_one_hot_cell_lands_in_its_region(frame):
    """A 4×8 grid over a 160×80 image; each one-hot cell's mass lies in the frame pixels of its region."""
    width, height, rows, cols = 160, 80, 4, 8
    covers = (0.0, 0.0, float(width), float(height))
    for r, c in [(0, 0), (1, 3), (3, 7), (2, 4)]:
        out = to_frame(one_hot(rows, cols, r, c), covers, (width, height), frame).numpy()
        cell = (c * 20, r * 20, (c + 1) * 20, (r + 1) * 20)
        core = frame_pixels_of_region(frame, width, height, (cell[0] + 4, cell[1] + 4, cell[2] - 4, cell[3] - 4))
        near = frame_pixels_of_region(frame, width, height, (cell[0] - 20, cell[1] - 20, cell[2] + 20, cell[3] + 20))
        if frame == "center-crop" and not core.any():
            assert out.max() < 1e-6, "a cell outside the central square must not appear"
            continue
        assert core.any() and out[core].min() > 0.6, f"cell ({r},{c}) core not lit in {frame}"
        assert np.all(out[~near] == 0), f"cell ({r},{c}) leaks beyond its neighbours in {frame}"
    if frame == "pad":  # centred padding: the top and bottom quarter of the frame are padding → 0
        full = to_frame(torch.ones(rows, cols), covers, (width, height), frame)
        assert full[:7].abs().max() == 0 and full[-7:].abs().max() == 0 and full[9:23].min() > 0.99


def test_to_frame_partial_coverage_is_zero_outside():
    """LLaVA-style centre crop of a 2:1 image in a squash frame: only the middle half of columns is covered."""
    out = to_frame(torch.ones(4, 4), (40.0, 0.0, 120.0, 80.0), (160, 80), "squash")
    assert torch.all(out[:, :7] == 0) and torch.all(out[:, -7:] == 0) and torch.all(out[:, 9:23] > 0.99)
    assert frame_coverage((40.0, 0.0, 120.0, 80.0), (160, 80), "squash") == pytest.approx(0.5)
    assert frame_coverage((40.0, 0.0, 120.0, 80.0), (160, 80), "center-crop") == pytest.approx(1.0)
    assert frame_coverage((0.0, 0.0, 160.0, 80.0), (160, 80), "pad") == pytest.approx(1.0)


def test_to_frame_is_differentiable_and_keeps_leading_dims():
    g = torch.rand(2, 3, 40, 40, requires_grad=True)  # finer than 32: averaged, every token used
    out = to_frame(g, (0.0, 0.0, 100.0, 50.0), (100, 50), "pad")
    assert out.shape == (2, 3, 32, 32)
    out.sum().backward()
    assert g.grad is not None and (g.grad > 0).float().mean() > 0.99


def test_gather_grid_picks_keys_row_major():
    from lavender.vlm.families import ImageGrid

    grid = ImageGrid(0, torch.tensor([5, 6, 9, 10]), 2, 2, (0, 0, 1, 1), (1, 1))
    attn = torch.arange(12.0).expand(3, 12)  # (..., K)
    out = gather_grid(attn, grid)
    assert out.shape == (3, 2, 2) and out[0].tolist() == [[5.0, 6.0], [9.0, 10.0]]


def _grid_sample_reference(g, covers, image, frame, size=32):
    """to_frame as one grid_sample at k×k sub-samples per pixel, then k×k average pooling."""
    import math

    import torch.nn.functional as F

    from lavender.frames import frame_to_image

    rows, cols = g.shape[-2:]
    k = max(1, math.ceil(max(rows, cols) / size))
    n = size * k
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    v, u = torch.meshgrid(c, c, indexing="ij")
    x, y = frame_to_image(frame, float(image[0]), float(image[1]), u, v)
    gx, gy = (x - covers[0]) / (covers[2] - covers[0]), (y - covers[1]) / (covers[3] - covers[1])
    inside = (gx >= 0) & (gx <= 1) & (gy >= 0) & (gy <= 1) & (x >= 0) & (x <= image[0]) & (y >= 0) & (y <= image[1])
    at = torch.stack([gx * 2 - 1, gy * 2 - 1], -1).unsqueeze(0).to(g.dtype)
    ref = F.grid_sample(g.reshape(1, -1, rows, cols), at, mode="bilinear", padding_mode="border",
                        align_corners=False) * inside.to(g.dtype)
    ref = F.avg_pool2d(ref, k) if k > 1 else ref
    return ref.reshape(*g.shape[:-2], size, size)


@pytest.mark.parametrize("frame", ["squash", "pad", "center-crop"])
@pytest.mark.parametrize("rows,cols,covers,image", [(4, 4, (0, 0, 100, 40), (100, 40)),
                                                     (40, 40, (0, 0, 560, 560), (560, 560)),
                                                     (80, 40, (0, 0, 560, 1120), (560, 1120)),
                                                     (24, 24, (30, 0, 70, 40), (100, 40)),
                                                     (6, 10, (0, 0, 80, 60), (70, 60)),
                                                     (36, 50, (10, 5, 90, 65), (100, 70))])
def test_to_frame_equals_grid_sample_values_and_gradients(frame, rows, cols, covers, image):
    """Both computations (grid_sample at k = 1, separable at k > 1) give grid_sample's numbers and
    gradients: border padding, the outside mask and the k×k average."""
    g = torch.rand(3, 2, rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.rand(3, 2, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a, b = g.clone().requires_grad_(), g.clone().requires_grad_()
    out, ref = to_frame(a, covers, image, frame, 32), _grid_sample_reference(b, covers, image, frame)
    torch.testing.assert_close(out, ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_to_frame_at_k1_is_grid_sample_bit_for_bit():
    """A grid no finer than the output keeps grid_sample's exact float32 numbers (the world's results)."""
    g = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_frame(g, (0, 0, 64, 64), (64, 64)), _grid_sample_reference(g, (0, 0, 64, 64), (64, 64),
                                                                                   "squash"))
