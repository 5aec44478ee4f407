"""L_att: how far the VLM's (aligned) word maps are from the DM's — three losses, one reduction.

Every loss is a MEAN OVER MATCHED WORDS of a per-word value, so λ means the same whatever the
batch's word count (state this wherever λ is quoted):

- ``mse`` (the paper's; default): the per-pixel mean squared error between the Aligner's output
  and the DM map, both min–max normalised to [0, 1]. With this reduction the authors' λ ≈ 10 is
  meaningful.
- ``kl``: ``KL(target ‖ prediction)`` between distributions over the S×S pixels: the target
  normalised to sum 1; the prediction strictly positive — the raw aggregated attention
  renormalised to sum 1 (``--aligner identity``) or the Aligner's output through a softmax over
  pixels. Never a min–max map: its exact zeros make the KL infinite.
- ``mass``: the target thresholded into a region (``target >= threshold``; the DM maps are min–max
  normalised, so 0.5 is half their range; a true mask is its own region) and the loss is
  ``−log`` of the share of the aligned rows' attention — head- and layer-averaged, over ALL keys
  the row sees, so mass on CLS tokens, padding tiles, separators or a text sink counts as outside —
  that falls inside the region. It acts on the RAW attention and bypasses the Aligner (which then
  gets no gradient from L_att).

A batch with no matched word gives exactly 0 that is still a tensor of the graph (docs/pitfalls.md
#6: the authors' code returned the constant 1, with no gradient, whenever nothing matched), so
``loss.backward()`` works unchanged.
"""

from __future__ import annotations

import torch

#: floor of a probability before its log
_EPS = 1e-12


def attention_loss(pred: torch.Tensor, target: torch.Tensor,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``mse``: mean over valid (matched) words of the per-pixel MSE.

    Args:
        pred: ``(N, 32, 32)`` the Aligner's output, one per VLM word.
        target: ``(N, 32, 32)`` the matched DM maps (anything, even NaN, where not valid).
        valid: ``(N,)`` bool, True where the word matched a DM word (default: all).
    Returns:
        ``(loss, match_rate)``: a scalar connected to ``pred`` (0 when nothing matches) and the
        fraction of the N words that matched (0 for N = 0), detached.
    """
    if pred.shape != target.shape:
        raise ValueError(f"attention_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    n = pred.shape[0]
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=pred.device)
    valid = valid.to(device=pred.device, dtype=torch.bool)
    matched = int(valid.sum())
    rate = torch.tensor(matched / n if n else 0.0, device=pred.device)
    if matched == 0:
        return pred.sum() * 0.0, rate  # zero, but backward() still reaches pred's graph
    p = pred[valid].float()
    t = target[valid].to(device=p.device, dtype=torch.float32)
    per_word = (p - t).pow(2).flatten(1).mean(dim=1)  # (M,) per-pixel MSE
    return per_word.mean(), rate


def kl_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``kl``: mean over words of ``Σ t · (log t − log p)`` with ``t = target / Σ target``.

    Args:
        prob: ``(N, S, S)`` a strictly positive prediction (renormalised here to sum 1 per word).
        target: ``(N, S, S)`` non-negative DM maps (a word whose map is all zero is skipped).
    """
    if prob.shape != target.shape:
        raise ValueError(f"kl_loss: prediction {tuple(prob.shape)} and target {tuple(target.shape)} differ")
    if prob.shape[0] == 0:
        return prob.sum() * 0.0
    p = prob.float().flatten(1)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(_EPS)
    t = target.to(p.device, torch.float32).clamp_min(0).flatten(1)
    mass = t.sum(dim=1, keepdim=True)
    keep = mass.squeeze(1) > 0
    if not keep.any():
        return prob.sum() * 0.0
    t = t / mass.clamp_min(_EPS)
    per_word = torch.where(t > 0, t * (t.clamp_min(_EPS).log() - p.clamp_min(_EPS).log()), t.new_zeros(()))
    return per_word.sum(dim=1)[keep].mean()


def softmax_map(x: torch.Tensor) -> torch.Tensor:
    """``(N, S, S)`` → a distribution over the S×S pixels (the Aligner's output for ``kl``)."""
    return torch.softmax(x.float().flatten(1), dim=1).view_as(x)


def mass_loss(frame_maps: torch.Tensor, grid_mass: torch.Tensor, target: torch.Tensor,
              threshold: float = 0.5) -> torch.Tensor:
    """``mass``: mean over words of ``−log(share of the row's attention inside the target's region)``.

    Args:
        frame_maps: ``(N, S, S)`` the raw head- and layer-averaged attention of each word on the image
            grid, resampled into the frame (non-negative).
        grid_mass: ``(N,)`` the share of the word's rows' attention that is on the image grid at all
            (≤ 1; the rest went to CLS/padding/separators/text).
        target: ``(N, S, S)`` DM maps in [0, 1] (min–max) or true masks.
        threshold: region = ``target >= threshold``; words with an empty region are skipped.
    The share inside = ``grid_mass · Σ_region frame / Σ frame``: the frame resampling keeps where the
    grid's attention is, and ``grid_mass`` says how much of the row it is.
    """
    if frame_maps.shape != target.shape:
        raise ValueError(f"mass_loss: maps {tuple(frame_maps.shape)} and target {tuple(target.shape)} differ")
    if frame_maps.shape[0] == 0:
        return frame_maps.sum() * 0.0
    region = (target.to(frame_maps.device) >= threshold).flatten(1)
    keep = region.any(dim=1)
    if not keep.any():
        return frame_maps.sum() * 0.0
    f = frame_maps.float().flatten(1).clamp_min(0)
    inside = (f * region).sum(dim=1) / f.sum(dim=1).clamp_min(_EPS)
    share = inside * grid_mass.float().to(f.device)
    return -(share.clamp_min(_EPS).log()[keep]).mean()
