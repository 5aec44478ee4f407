"""From a VLM's image-token grid to the attention dataset's 32×32 frame.

A family (:mod:`lavender.vlm.families`) says which keys are an image's tokens and which region of
the ORIGINAL image their grid spans (``ImageGrid.covers``). Stage 1 brought the image to the DM
in one of three frames (docs/method.md, Stage 1 step 7; ``lavender.diffusion.extract``):

- ``squash``: the whole image resized to a square (aspect ratio not kept);
- ``pad``: the image padded to a square ``max(W, H)`` with the padding centred, then resized;
- ``center-crop``: the central ``min(W, H)`` square, then resized.

:func:`to_frame` resamples the grid into that frame: each frame pixel is mapped back to
original-image coordinates, then to the grid, and read bilinearly (differentiable, so gradients
flow to the attention). Frame pixels the grid does not cover — the padding of a ``pad`` frame,
and e.g. the sides of a wide image under LLaVA's centre crop in a ``squash`` frame — are 0: the
VLM has no attention there. :func:`frame_coverage` measures how much of the frame is covered, so
the trainer can warn when the DM and VLM frames disagree (a coverage well below 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lavender.config import FRAMES  # noqa: F401  (re-exported)
from lavender.frames import frame_to_image
from lavender.vlm.families.base import ImageGrid


def gather_grid(attn_rows: torch.Tensor, grid: ImageGrid) -> torch.Tensor:
    """``(..., K)`` attention over the watched keys → ``(..., rows, cols)`` on the image's grid."""
    picked = attn_rows.index_select(-1, grid.key_index.to(attn_rows.device))  # (..., rows * cols)
    return picked.unflatten(-1, (grid.rows, grid.cols))  # row-major: key_index[r * cols + c] = cell (r, c)


def _axis_weights(g: torch.Tensor, inside: torch.Tensor, cells: int, k: int) -> torch.Tensor:
    """``(size, cells)`` weights of one axis: bilinear reads at grid positions ``g`` in ``[0, 1]``
    (cell centres at ``(i + 0.5) / cells``, clamped at the border like ``grid_sample``'s border
    padding), zero where ``inside`` is False, then averaged over groups of ``k`` sub-samples."""
    pos = (g * cells - 0.5).clamp(0, cells - 1)  # continuous cell index
    lo = pos.floor().long().clamp(max=cells - 1)
    hi = (lo + 1).clamp(max=cells - 1)
    frac = pos - lo
    w = torch.zeros(g.shape[0], cells, dtype=torch.float64)
    w.scatter_add_(1, lo[:, None], (1 - frac)[:, None])
    w.scatter_add_(1, hi[:, None], frac[:, None])
    w = w * inside[:, None]
    return w.view(-1, k, cells).mean(1)  # (size, cells)


def to_frame(grid_maps: torch.Tensor, covers: tuple[float, float, float, float], image_size: tuple[int, int],
             frame: str = "squash", size: int = 32) -> torch.Tensor:
    """Resample ``(..., rows, cols)`` grid maps into the ``size``×``size`` ``frame`` of the image.

    Args:
        grid_maps: maps on the VLM's grid, any leading dims (heads, words, …); float.
        covers: ``(x0, y0, x1, y1)`` original-image pixels spanned by the whole grid.
        image_size: ``(W, H)`` of the original image.
        frame: ``squash``, ``pad`` or ``center-crop`` (the attention dataset's manifest says which).
        size: output side (32 for the attention dataset).

    Returns:
        ``(..., size, size)``. Bilinear, differentiable; frame pixels outside the grid's coverage or
        outside the image are 0. A grid finer than the output is averaged over ``k×k`` sub-samples
        per output pixel (``k = ceil(max(rows, cols) / size)``) rather than point-sampled, so no
        token is skipped.

    Two computations of the same numbers (tested equal to 1e-6), chosen by ``k``:

    * ``k = 1`` (a grid no finer than the output: the world models, LLaVA's 24×24): one bilinear
      read per output pixel with ``grid_sample`` (border padding, then the outside mask);
    * ``k > 1`` (Mllama's 40×40 tiles, large Qwen/Idefics grids): every frame is an axis-aligned
      affine map of the image, so read-then-average is separable, ``out = A_y · G · A_xᵀ`` with
      ``(size, rows)`` and ``(size, cols)`` weights. ``grid_sample`` would build a ``k²`` times
      larger intermediate and its CPU backward is a scatter: at Mllama's 32 heads × 128 words the
      separable form is ~30× cheaper forward and backward (benchmarks/train_step.py, docs/performance.md).

    ``k = 1`` keeps ``grid_sample`` because its float32 rounding is what every miniature-world result
    in README was trained with; the separable form is equal only to rounding, and a re-trained world
    would differ in the last digits of its figures.
    """
    rows, cols = grid_maps.shape[-2:]
    width, height = float(image_size[0]), float(image_size[1])
    x0, y0, x1, y1 = (float(c) for c in covers)
    k = max(1, math.ceil(max(rows, cols) / size))
    n = size * k
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # sub-pixel centres in [0, 1]
    if k > 1:
        x, y = frame_to_image(frame, width, height, centres, centres)  # per column (x) and per row (y)
        gx, gy = (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)  # position on the grid, [0, 1] inside it
        in_x = (gx >= 0) & (gx <= 1) & (x >= 0) & (x <= width)
        in_y = (gy >= 0) & (gy <= 1) & (y >= 0) & (y <= height)
        ax = _axis_weights(gx, in_x, cols, k).to(device=grid_maps.device, dtype=grid_maps.dtype)  # (size, cols)
        ay = _axis_weights(gy, in_y, rows, k).to(device=grid_maps.device, dtype=grid_maps.dtype)  # (size, rows)
        return ay @ grid_maps @ ax.transpose(0, 1)  # (..., size, size)

    v, u = torch.meshgrid(centres, centres, indexing="ij")  # (n, n) each
    x, y = frame_to_image(frame, width, height, u, v)
    gx, gy = (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)
    inside = (gx >= 0) & (gx <= 1) & (gy >= 0) & (gy <= 1) & (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
    sample_at = torch.stack([gx * 2 - 1, gy * 2 - 1], dim=-1)  # (n, n, 2), grid_sample's (x, y) in [-1, 1]
    lead = grid_maps.shape[:-2]
    flat = grid_maps.reshape(1, -1, rows, cols)  # (1, C, rows, cols): leading dims as channels
    sample_at = sample_at.to(device=grid_maps.device, dtype=flat.dtype).unsqueeze(0)  # (1, n, n, 2)
    # border padding + explicit mask: zeros padding would fade the outer half-cells towards 0
    out = F.grid_sample(flat, sample_at, mode="bilinear", padding_mode="border", align_corners=False)
    out = out * inside.to(device=out.device, dtype=out.dtype)  # (1, C, n, n)
    return out.reshape(*lead, size, size)


def frame_coverage(covers: tuple[float, float, float, float], image_size: tuple[int, int], frame: str) -> float:
    """Fraction of the frame's area (inside the image) that the grid covers; 1.0 = the frames agree.

    E.g. LLaVA's centre crop (covers the central square) against a ``squash`` frame of a 2:1 image
    gives 0.5: half of the DM's map has no VLM counterpart. The trainer warns below ~0.95.
    """
    width, height = float(image_size[0]), float(image_size[1])
    corners_u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    (fx0, fx1), (fy0, fy1) = (t.tolist() for t in frame_to_image(frame, width, height, corners_u, corners_u))
    # the part of the frame that shows the image, and the part of it the grid spans
    ix0, ix1, iy0, iy1 = max(fx0, 0.0), min(fx1, width), max(fy0, 0.0), min(fy1, height)
    cx0, cx1 = max(ix0, covers[0]), min(ix1, covers[2])
    cy0, cy1 = max(iy0, covers[1]), min(iy1, covers[3])
    shown = max(ix1 - ix0, 0.0) * max(iy1 - iy0, 0.0)
    return max(cx1 - cx0, 0.0) * max(cy1 - cy0, 0.0) / shown if shown > 0 else 0.0
