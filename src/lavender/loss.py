"""L_att: how far the VLM's (aligned) word maps are from the DM's.

Reduction (METHOD.md, the authors' code convention, so that λ ≈ 10 is meaningful): the mean over
matched words of the per-pixel mean squared error. A batch with no matched word gives exactly 0
that is still a tensor of the graph (PITFALLS #6: the authors' code returned the constant 1, with
no gradient, whenever nothing matched), so ``loss.backward()`` works unchanged.
"""

from __future__ import annotations

import torch


def attention_loss(pred: torch.Tensor, target: torch.Tensor,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over valid (matched) words of the per-pixel MSE.

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
