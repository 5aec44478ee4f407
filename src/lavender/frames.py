"""The three frames: how an image of any aspect ratio becomes the DM's square, both ways.

Stage 1 brings each image into a square ``frame`` before the DM sees it (``frame_image``); Stage 2
maps each VLM's image grid back into that same frame (``frame_to_image``, used by
:mod:`lavender.vlm.grid`), so a VLM map and a DM map describe the same pixels. This module is the
one place the geometry lives:

- ``squash``: the whole image resized to the square (aspect ratio not kept, nothing lost);
- ``pad``: the longer side fitted, the image centred, the rest padded with black (``PAD_FILL``);
- ``center-crop``: the shorter side fitted, the central square kept (HF LLaVA's view).
"""

from __future__ import annotations

from typing import Any

from lavender.config import FRAMES

PAD_FILL = (0, 0, 0)


def frame_image(img: Any, size: int, frame: str) -> Any:
    """A PIL RGB image in the ``size``×``size`` ``frame`` (bicubic resizing)."""
    from PIL import Image

    w, h = img.size
    if frame == "squash":
        return img.resize((size, size), Image.BICUBIC)
    if frame == "pad":
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("RGB", (size, size), PAD_FILL)
        canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    if frame == "center-crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise ValueError(f"unknown --frame {frame!r}; choose one of {', '.join(FRAMES)}")


def frame_to_image(frame: str, width: float, height: float, u: Any, v: Any) -> tuple[Any, Any]:
    """Frame coordinates ``u, v`` in ``[0, 1]`` → original-image pixel coordinates ``x, y``."""
    if frame == "squash":
        return u * width, v * height
    if frame == "pad":
        side = max(width, height)
        return u * side - (side - width) / 2, v * side - (side - height) / 2
    if frame == "center-crop":
        side = min(width, height)
        return (width - side) / 2 + u * side, (height - side) / 2 + v * side
    raise ValueError(f"unknown frame {frame!r}; choose one of {', '.join(FRAMES)}")
