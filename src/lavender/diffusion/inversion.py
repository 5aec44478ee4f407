"""DDIM inversion and null-text inversion, batched, with attention capture only where it belongs.

Both recipes take ``eps(latents, t, text_emb) -> noise`` (the UNet; latents float32 (B, C, h, w),
``text_emb`` (B, 77, D)) and an :class:`~lavender.diffusion.capture.AttentionAccumulator` that is
switched on only for the passes whose attention is the target.

DDIM (eta = 0) moves a latent between noise levels with one formula in both directions::

    x0  = (x - sqrt(1 - a_from) · eps) / sqrt(a_from)
    x'  = sqrt(a_to) · x0 + sqrt(1 - a_to) · eps

Denoising uses eps at the current level; inversion (Song et al.; Mokady et al. 2022) uses the eps
predicted at the *target* level from the current latent, the usual approximation.

Cost in UNet evaluations per image (n = ``steps``, m = ``inversion_steps``, k = ``inner_steps``,
g = guidance; a "backward" costs about two forward evaluations):

- ``ddim``:     m (inversion, text) + n · (1 if g == 1 else 2)        → 15 with the defaults (g = 1)
- ``noise``:    one conditional evaluation per read timestep (1 with the default ``timesteps``): the
  image is noised to each timestep with a fixed per-image noise and read once, with no inversion and
  no denoising (the single noise-and-read pass of training-free diffusion segmenters).
- ``nulltext``: n (inversion) + n · (1 cond + ≤k (uncond fwd + bwd) + 1 uncond) → ≤ 80 forward + ≤ 50
  backward with the defaults (g = 7.5). The attention is read from the conditional evaluation made at
  each step of the optimised trajectory, which IS the conditional branch of the guided denoising pass
  (same latent, same step, same text), so no third pass is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lavender.diffusion.capture import AttentionAccumulator

EpsFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class NoiseSchedule:
    """The checkpoint's noise schedule: cumulative alphas, the clean end, the timestep grid's rule.

    ``alpha(-1)`` is the clean end of the chain: 1.0 when the scheduler config sets
    ``set_alpha_to_one``, else ``alphas_cumprod[0]`` (SD's DDIM config; also what schedulers without
    that option, e.g. Euler and DPM-Solver, start from).
    """

    alphas_cumprod: torch.Tensor
    final_alpha: float
    num_train_timesteps: int
    spacing: str = "leading"
    steps_offset: int = 1

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        """From any diffusers scheduler with a DDPM-style schedule (DDIM, PNDM, Euler, DPM-Solver, ...):
        the training betas (as the scheduler computed ``alphas_cumprod`` from its config), the final
        alpha, ``timestep_spacing`` and ``steps_offset`` of its config. Flow-matching schedulers have
        no ``alphas_cumprod`` and get a clear error."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        name = type(scheduler).__name__
        if ac is None:
            raise ValueError(f"{name} has no alphas_cumprod: Stage 1's recipes need a DDPM-style noise schedule "
                             "(DDIM, PNDM, Euler, DPM-Solver, ...)")
        cfg = scheduler.config
        spacing = cfg.get("timestep_spacing", "leading")
        if spacing not in SPACINGS:
            raise ValueError(f"{name}: timestep_spacing {spacing!r} is not supported; one of {', '.join(SPACINGS)}")
        ac = torch.as_tensor(ac).double()
        final = 1.0 if cfg.get("set_alpha_to_one", False) else float(ac[0])
        return cls(ac, final, int(cfg.num_train_timesteps), spacing, int(cfg.get("steps_offset", 0) or 0))

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha

    def denoising_grid(self, steps: int) -> list[int]:
        """Descending timesteps of a ``steps``-step grid by the scheduler config's rule (as diffusers'
        ``DDIMScheduler.set_timesteps`` builds it), followed by -1 (clean). SD-1.x's config ("leading",
        offset 1) at 10 steps: 901, 801, …, 1."""
        n = self.num_train_timesteps
        if self.spacing == "leading":
            grid = [i * (n // steps) + self.steps_offset for i in reversed(range(steps))]
        elif self.spacing == "trailing":
            grid = [int(t) - 1 for t in np.round(np.arange(n, 0, -n / steps))]
        else:  # linspace
            grid = [int(t) for t in np.linspace(0, n - 1, steps).round()[::-1]]
        return grid + [-1]

    def inversion_grid(self, steps: int, t_max: int) -> list[int]:
        """-1 then ``steps`` ascending timesteps evenly up to ``t_max`` (where denoising will start)."""
        return [-1] + [round(t_max * (i + 1) / steps) for i in range(steps)]


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """Deterministic DDIM update of ``x`` from cumulative alpha ``a_from`` to ``a_to``."""
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def guided_eps(eps: EpsFn, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance: float) -> torch.Tensor:
    """Classifier-free guidance in ONE UNet call on ``[uncond, cond]`` (the order the capture expects)."""
    if guidance == 1.0 or uncond is None:
        return eps(x, t, cond)
    e_u, e_c = eps(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
    return e_u + guidance * (e_c - e_u)


@torch.no_grad()  # not inference_mode: null-text optimisation feeds these latents to autograd
def ddim_invert(eps: EpsFn, x0: torch.Tensor, cond: torch.Tensor, grid: list[int], sched: NoiseSchedule
                ) -> list[torch.Tensor]:
    """Invert clean latents along ascending ``grid`` (starting at -1) with the text; returns all latents."""
    xs = [x0]
    x = x0
    for t_from, t_to in zip(grid[:-1], grid[1:]):
        x = ddim_move(x, eps(x, t_to, cond), sched.alpha(t_from), sched.alpha(t_to))
        xs.append(x)
    return xs


@torch.inference_mode()
def ddim_denoise(eps: EpsFn, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, grid: list[int],
                 sched: NoiseSchedule, guidance: float, store: AttentionAccumulator | None) -> torch.Tensor:
    """Denoise along descending ``grid`` (ending at -1) with guidance, capturing into ``store``."""
    if store is not None:
        store.active = True
    try:
        for t, t_prev in zip(grid[:-1], grid[1:]):
            x = ddim_move(x, guided_eps(eps, x, t, cond, uncond, guidance), sched.alpha(t), sched.alpha(t_prev))
    finally:
        if store is not None:
            store.active = False
    return x


def run_ddim(eps: EpsFn, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, sched: NoiseSchedule,
             store: AttentionAccumulator | None, steps: int = 10, inversion_steps: int = 5,
             guidance: float = 1.0) -> torch.Tensor:
    """The ``ddim`` recipe: invert in ``inversion_steps`` to the top of the ``steps`` grid, then denoise
    in ``steps`` capturing attention. Returns the reconstructed clean latents."""
    grid = sched.denoising_grid(steps)
    xs = ddim_invert(eps, x0, cond, sched.inversion_grid(inversion_steps, grid[0]), sched)
    return ddim_denoise(eps, xs[-1], cond, uncond, grid, sched, guidance, store)


@torch.inference_mode()
def run_noise(eps: EpsFn, x0: torch.Tensor, cond: torch.Tensor, sched: NoiseSchedule,
              store: AttentionAccumulator | None, timesteps: list[int], noise: torch.Tensor) -> torch.Tensor:
    """The ``noise`` recipe: ``x_t = sqrt(a_t)·x0 + sqrt(1 - a_t)·noise`` at each of ``timesteps``, one
    conditional UNet call each, capturing attention. ``noise`` (same shape as ``x0``) is drawn per image
    by the caller, so an image's maps do not depend on the rest of its batch. Returns the clean latents
    predicted at the first timestep (their distance to ``x0`` says how much the model read from the text)."""
    if not timesteps:
        raise ValueError("the noise recipe needs at least one timestep")
    if store is not None:
        store.active = True
    first = None
    try:
        for t in timesteps:
            a = sched.alpha(int(t))
            x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
            e = eps(x_t, int(t), cond)
            if first is None:
                first = (x_t - (1 - a) ** 0.5 * e) / a**0.5
    finally:
        if store is not None:
            store.active = False
    return first


def run_nulltext(eps: EpsFn, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, sched: NoiseSchedule,
                 store: AttentionAccumulator | None, steps: int = 10, inner_steps: int = 5,
                 guidance: float = 7.5, lr: float = 1e-2, tol: float = 1e-5) -> torch.Tensor:
    """The ``nulltext`` recipe (Mokady et al. 2022), batched with per-image early stopping.

    DDIM-invert with the text on the ``steps`` grid (the pivots), then walk back down: at each step
    optimise the null-text embedding (≤ ``inner_steps`` Adam steps, lr ``lr·(1 - i/100)``) so that the
    guided DDIM step lands on the next pivot; an image stops when its loss falls under ``tol + 2e-5·i``
    (its embedding is then held fixed, so results do not depend on the other images of the batch).
    Attention is captured from the conditional evaluation of each step. Returns the reconstruction.
    """
    grid = sched.denoising_grid(steps)
    pivots = ddim_invert(eps, x0, cond, list(reversed(grid)), sched)  # pivots[j] at ascending grid[j]
    x = pivots[-1]
    u = uncond.detach().float().clone()
    n = x.shape[0]
    for i, (t, t_prev) in enumerate(zip(grid[:-1], grid[1:])):
        a_t, a_prev = sched.alpha(t), sched.alpha(t_prev)
        target = pivots[len(grid) - 2 - i]
        with torch.no_grad():
            if store is not None:
                store.active = True
            try:
                e_c = eps(x, t, cond).clone()
            finally:
                if store is not None:
                    store.active = False
        u = u.detach().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(inner_steps):
            with torch.enable_grad():
                e_u = eps(x, t, u.to(cond.dtype))
                x_prev = ddim_move(x, e_u + guidance * (e_c - e_u), a_t, a_prev)
                per_image = ((x_prev - target) ** 2).flatten(1).mean(1)  # (B,)
                loss = per_image[~done].sum()  # a sum, so each image's gradient is its own
                opt.zero_grad(set_to_none=True)
                loss.backward()
            keep = u.detach().clone()
            opt.step()
            with torch.no_grad():
                u[done] = keep[done]
            done |= per_image.detach() < tol + 2e-5 * i
            if bool(done.all()):
                break
        with torch.no_grad():
            u_final = u.detach().to(cond.dtype)
            e_u = eps(x, t, u_final)
            x = ddim_move(x, e_u + guidance * (e_c - e_u), a_t, a_prev)
        u = u_final.float()
    return x
