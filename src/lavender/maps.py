"""Per-map min–max normalisation: the one definition every stage uses (torch and numpy).

Maps are normalised over their last two dimensions (one ``S×S`` map at a time). A constant map
becomes all 0. Stage 1 stores min–max maps, the Aligner's output is min–max normalised to compare
like with like, and analysis and figures draw them the same way.
"""

from __future__ import annotations

import numpy as np
import torch


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Differentiable per-map min–max to [0, 1] over the last two dims; a constant map becomes 0.

    With ``eps > 0`` the range is clamped at ``eps`` rather than ``eps`` added: raw attention maps
    can span only ~1e-4, where ``+ 1e-6`` would already pull the maximum 1 % below 1. With
    ``eps = 0`` any positive range is divided exactly (Stage 1's stored maps).
    """
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    rng = hi - lo
    if eps > 0:
        return (x - lo) / rng.clamp_min(eps)
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    return torch.where(rng > 0, (x - lo) / safe, torch.zeros_like(x))


def minmax_np(x: np.ndarray) -> np.ndarray:
    """NumPy per-map min–max to [0, 1] over the last two axes (float64); a constant map becomes 0."""
    x = np.asarray(x, dtype=np.float64)
    lo = x.min(axis=(-2, -1), keepdims=True)
    rng = x.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(rng > 0, (x - lo) / np.where(rng > 0, rng, 1.0), 0.0)
