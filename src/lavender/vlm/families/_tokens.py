"""Shared by the self-attention families: image placeholder positions in ``input_ids``, per image.

In LLaVA, Qwen2-VL and Idefics3 the processor expands each image into a known number of
placeholder tokens (all with ``config.image_token_id``), in the image's order; the key positions
of the watched self-attention are those token positions. Each family knows how many tokens each
image gets; this module only finds them and cuts them per image, loudly when counts disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lavender.vlm.families.base import ImageGrid


def image_token_positions(input_ids: torch.Tensor, token_id: int, counts: Sequence[Sequence[int]]
                          ) -> list[list[torch.Tensor]]:
    """Per sample, per image: the positions of that image's ``counts[b][j]`` placeholder tokens.

    Args:
        input_ids: ``(B, T)`` token ids (left or right padding both fine: positions are absolute).
        token_id: the image placeholder id.
        counts: per sample, the number of placeholder tokens of each of its images, in order.
    """
    out = []
    for b, sample_counts in enumerate(counts):
        positions = (input_ids[b] == token_id).nonzero().flatten()  # (n_tokens,) ascending
        if positions.numel() != sum(sample_counts):
            raise ValueError(f"sample {b}: {positions.numel()} image placeholder tokens (id {token_id}) in "
                             f"input_ids, but its images need {sum(sample_counts)} ({list(sample_counts)}); "
                             f"was the text truncated, or do image_sizes not match the images?")
        out.append(list(torch.split(positions, list(sample_counts))))
    return out


def square_grids(input_ids: torch.Tensor, image_sizes: Sequence[Sequence[tuple[int, int]]], token_id: int,
                 side: int, covers: Callable[[int, int], tuple[float, float, float, float]]) -> list[ImageGrid]:
    """One ``side``×``side`` grid per image, its ``side²`` placeholders row-major (LLaVA, Gemma 3);
    ``covers(W, H)`` is the region of the original image the grid spans."""
    from lavender.vlm.families.base import ImageGrid

    counts = [[side * side] * len(sizes) for sizes in image_sizes]
    positions = image_token_positions(input_ids, token_id, counts)
    return [ImageGrid(b, pos, side, side, covers(int(w), int(h)), (int(w), int(h)))
            for b, sizes in enumerate(image_sizes) for pos, (w, h) in zip(positions[b], sizes)]
