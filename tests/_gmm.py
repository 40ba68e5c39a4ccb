"""Shared fixtures for the exact (analytic Gaussian-mixture) tests."""

from __future__ import annotations

import torch

from superdiff.experts import GaussianMixtureExpert
from superdiff.sampling import sample
from superdiff.schedules import RectifiedFlow, VESigma, VPDiscrete, make_betas


def schedules() -> dict:
    return {
        "vp": VPDiscrete(make_betas(1000, 1e-4, 0.02, "linear"), timestep_spacing="linspace"),
        "ve": VESigma.from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear")),
        "flow": RectifiedFlow(),
    }


def two_mixtures(d: int, kind: str = "epsilon", seed: int = 1) -> list[GaussianMixtureExpert]:
    """Two experts: a 2-component isotropic and a 3-component diagonal mixture in R^d."""
    g = torch.Generator().manual_seed(seed)
    e1 = GaussianMixtureExpert(torch.randn(2, d, generator=g) * 1.5, [0.3, 0.5], [0.4, 0.6], prediction_type=kind)
    v2 = 0.2 + 0.4 * torch.rand(3, d, generator=g)
    e2 = GaussianMixtureExpert(torch.randn(3, d, generator=g) * 1.5, v2, prediction_type=kind)
    return [e1, e2]


def shared_mode_experts(d: int, m: int, kind: str = "epsilon", seed: int = 3):
    """m experts in R^d, expert i with modes {P_i, S}; all private modes P_i and the shared
    mode S lie on a circle of radius 4 in a random plane (each P_i as far from S as from
    the others' private modes would allow). Returns (experts, centres [m + 1, d]) with the
    shared mode last."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0] if d > 2 else torch.eye(2, dtype=torch.float64)
    angles = torch.tensor([180.0, 0.0, 270.0][:m] + [90.0], dtype=torch.float64) * torch.pi / 180
    pts = 4.0 * torch.stack([angles.cos(), angles.sin()], -1) @ q.T  # [m + 1, d]
    experts = [GaussianMixtureExpert(torch.stack([pts[i], pts[-1]]), 0.25, prediction_type=kind) for i in range(m)]
    return experts, pts


def tracked_error(experts, schedule, num_steps, estimator, integrator, d, batch=32, seed=0, **kw):
    """Tracked minus exact log q_i at the end of an OR trajectory started from the exact values."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, d, generator=g, dtype=torch.float64) * float(schedule.prior_std())
    grid = schedule.grid(num_steps, end="min")
    init = torch.stack([e.log_prob(x0, grid[0], schedule) for e in experts], -1)
    out = sample(experts, schedule, num_steps, operator="or", estimator=estimator, integrator=integrator,
                 latents=x0, grid_end="min", logq_init=init, generator=g, dtype=torch.float64,
                 progress=False, **kw)
    exact = torch.stack([e.log_prob(out.samples, grid[-1], schedule) for e in experts], -1)
    return out.logq - exact, out
