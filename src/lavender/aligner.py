"""The Aligner (Sec. 4.3): a small network from the VLM's ``(C, 32, 32)`` word attention to a DM-like map.

Expand → non-linearity → squeeze to ONE channel, with 3×3 convolutions (the paper's App. F.1 finds
convolutions beat an MLP; the ``mlp`` variant is kept as that baseline and uses 1×1 convolutions,
i.e. the same per-pixel MLP over channels, with no spatial context). ``C`` is the number of heads
for the ``heads`` aggregation, else 1. The output is min–max normalised per map, exactly as the
Stage 1 maps are stored (docs/method.md, Stage 1 step 6), so the MSE compares like with like.

Sizes with the default ``hidden=64`` (C = 1 … 32 input channels): light 1.3–19 k parameters,
sim 38–56 k, deep 113–130 k, mlp 5–7 k.
"""

from __future__ import annotations

import torch
from torch import nn

from lavender.config import ALIGNER_ACTS, ALIGNER_NORMS
from lavender.maps import minmax  # noqa: F401  (re-exported)

VARIANTS = {"light": 1, "sim": 2, "deep": 4, "mlp": 2, "identity": 0}  # number of hidden (expanded) layers
NORMS = ALIGNER_NORMS
ACTS = ALIGNER_ACTS


class Aligner(nn.Module):
    """``(N, C, H, W)`` → ``(N, H, W)`` in [0, 1].

    Args:
        in_channels: C (heads for the ``heads`` aggregation, else 1).
        variant: ``light`` (1 hidden layer), ``sim`` (2), ``deep`` (4), ``mlp`` (2, 1×1 kernels), or
            ``identity``: no parameters — the channel-averaged map itself, normalised like the targets,
            so L_att can only be lowered by moving the VLM's own attention (it cannot be absorbed).
        norm: ``instance`` (per map; independent of the batch's word count) or ``batch``.
        act: ``relu6`` or ``leakyrelu``.
        hidden: expanded width.
        out_norm: ``minmax`` (like the DM maps) or ``none``.
    """

    def __init__(self, in_channels: int = 1, variant: str = "light", norm: str = "instance",
                 act: str = "relu6", hidden: int = 64, out_norm: str = "minmax") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown Aligner variant {variant!r}; choose one of {tuple(VARIANTS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown Aligner norm {norm!r}; choose one of {NORMS}")
        if act not in ACTS:
            raise ValueError(f"unknown Aligner activation {act!r}; choose one of {ACTS}")
        if out_norm not in ("minmax", "none"):
            raise ValueError(f"unknown Aligner out_norm {out_norm!r}; choose 'minmax' or 'none'")
        self.config = {"in_channels": in_channels, "variant": variant, "norm": norm, "act": act,
                       "hidden": hidden, "out_norm": out_norm}
        self.out_norm = out_norm
        if variant == "identity":
            self.net = None
            return
        kernel = 1 if variant == "mlp" else 3
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(VARIANTS[variant]):
            layers += [
                nn.Conv2d(width, hidden, kernel, padding=kernel // 2),
                nn.InstanceNorm2d(hidden, affine=True) if norm == "instance" else nn.BatchNorm2d(hidden),
                nn.ReLU6() if act == "relu6" else nn.LeakyReLU(0.1),
            ]
            width = hidden
        layers.append(nn.Conv2d(width, 1, kernel, padding=kernel // 2))  # squeeze to one map
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"Aligner expects (N, C, H, W) word maps, got shape {tuple(x.shape)}")
        if self.net is None:  # identity: nothing to learn, nothing to absorb the loss
            y = x.float().mean(dim=1)
            return minmax(y) if self.out_norm == "minmax" and y.shape[0] else y
        if x.shape[0] == 0:  # no word in the batch: an empty result still connected to the parameters
            return x.new_zeros(0, *x.shape[-2:]) + 0.0 * self.net[-1].weight.sum()
        y = self.net(x.to(self.net[0].weight.dtype)).squeeze(1)  # (N, H, W)
        return minmax(y) if self.out_norm == "minmax" else y


def apply_aligner(aligner: Aligner, maps: torch.Tensor) -> torch.Tensor:
    """``aligner(maps)``, recomputed in backward instead of keeping its activations.

    Why: each hidden layer keeps ``N × hidden × 32 × 32`` floats for backward per conv, norm and
    activation — about 1.3 MiB per aligned word for ``sim``, most of Lavender's extra training memory
    on long records (benchmarks/train_step.py at 1,000 words). Recomputing the few small convolutions
    costs one more Aligner forward and gives the same numbers (a deterministic forward run twice on
    the same input). Not done for ``identity`` (nothing kept), outside autograd, or with BatchNorm,
    whose running statistics would be updated twice.
    """
    from torch.utils.checkpoint import checkpoint

    if (aligner.net is None or not torch.is_grad_enabled() or maps.shape[0] == 0
            or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in aligner.modules())):
        return aligner(maps)
    return checkpoint(aligner, maps, use_reentrant=False)

