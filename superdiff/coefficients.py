"""The schedule's scalars for every step of a time grid, computed once per sampling call.

A step t -> t' needs alpha, sigma, f = d log alpha / dt, g2, alpha'(t), sigma'(t) at t (and
at t' for Heun's corrector) and the forward kernel x_t | x_t' ~ N(a x_t', s2 I) (schedules.py,
superdiff-math.md section 1). Evaluating the schedule inside the loop costs tensor ops on
0-d tensors and host reads (`float(...)`, table lookups with 0-d indices) in every step.
`grid_coefficients` evaluates every coefficient on the whole grid in one vectorised call
per function and hands the loop plain Python floats (float64 arithmetic): inside the loop
the integrators and estimators multiply tensors by Python numbers and branch on Python
numbers only, so a step needs no host-device synchronisation for its schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .schedules import Schedule

Tensor = torch.Tensor
_F64 = torch.float64

__all__ = ["StepCoefficients", "grid_coefficients", "step_coefficients", "eps_x0_coefficients",
           "score_coefficients", "velocity_coefficients", "affine", "fdiv"]


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one step from t to t_next < t (Python floats; inf where a coefficient is)."""

    t: float
    t_next: float
    alpha: float
    sigma: float
    alpha_next: float
    sigma_next: float
    f: float  # d log alpha / dt at t
    g2: float  # squared forward diffusion at t
    dalpha: float  # alpha'(t)
    dsigma: float  # sigma'(t)
    dalpha_next: float  # alpha'(t_next)
    dsigma_next: float  # sigma'(t_next)
    trans_a: float  # forward kernel x_t | x_t_next ~ N(trans_a x_t_next, trans_s2 I)
    trans_s2: float
    #: the schedule's f is unbounded as alpha -> 0 (rectified flow; Schedule.singular_noise_end)
    singular_noise_end: bool = False
    schedule: str = "schedule"  # the schedule's class name, for messages

    @property
    def h(self) -> float:
        """The step length t - t_next > 0."""
        return self.t - self.t_next


def _values(fn: Any, t: Tensor) -> list[float]:
    with torch.no_grad():
        v = torch.as_tensor(fn(t), dtype=_F64)
    return v.expand_as(t).tolist()


def grid_coefficients(schedule: Schedule, grid: Tensor) -> list[StepCoefficients]:
    """One StepCoefficients per step of a decreasing grid [n + 1] (one host read per function)."""
    g = torch.as_tensor(grid, dtype=_F64).detach().cpu().flatten()
    if g.numel() < 2:
        raise ValueError("a time grid needs at least 2 points")
    with torch.no_grad():
        alpha, sigma = _values(schedule.alpha, g), _values(schedule.sigma, g)
        f, g2 = _values(schedule.f, g), _values(schedule.g2, g)
        da, ds = _values(schedule.dalpha, g), _values(schedule.dsigma, g)
        a, s2 = schedule.transition(g[1:], g[:-1])
        a = torch.as_tensor(a, dtype=_F64).expand(len(g) - 1).tolist()
        s2 = torch.as_tensor(s2, dtype=_F64).expand(len(g) - 1).tolist()
    ts = g.tolist()
    sing = bool(getattr(schedule, "singular_noise_end", False))
    name = type(schedule).__name__
    return [StepCoefficients(ts[k], ts[k + 1], alpha[k], sigma[k], alpha[k + 1], sigma[k + 1], f[k], g2[k],
                             da[k], ds[k], da[k + 1], ds[k + 1], a[k], s2[k], sing, name)
            for k in range(len(ts) - 1)]


def step_coefficients(schedule: Schedule, t: Any, t_next: Any) -> StepCoefficients:
    """The coefficients of one step (for direct calls outside a sampling loop)."""
    return grid_coefficients(schedule, torch.stack([torch.as_tensor(t, dtype=_F64).reshape(()),
                                                    torch.as_tensor(t_next, dtype=_F64).reshape(())]))[0]


# --------------------------------------------------------------------------------------
# every prediction kind is affine in (x, pred): the step's formulas as two numbers each
# --------------------------------------------------------------------------------------


def fdiv(p: float, q: float) -> float:
    """p / q with IEEE semantics (inf or nan where q = 0) instead of ZeroDivisionError."""
    if q != 0.0:
        return p / q
    if p == 0.0 or math.isnan(p):
        return math.nan
    return math.copysign(math.inf, p) * math.copysign(1.0, q)


def eps_x0_coefficients(kind: str, alpha: float, sigma: float) -> tuple[float, float, float, float]:
    """(ex, ep, x0x, x0p) with eps_hat = ex x + ep pred and x0_hat = x0x x + x0p pred
    (predictions.to_eps_x0, superdiff-math.md section 1)."""
    a, s = alpha, sigma
    if kind == "epsilon":
        return 0.0, 1.0, fdiv(1.0, a), fdiv(-s, a)
    if kind == "sample":
        return fdiv(1.0, s), fdiv(-a, s), 0.0, 1.0
    if kind == "v_prediction":
        r = math.sqrt(a * a + s * s)
        av, bv = a / r, s / r
        return bv / r, av, av / r, -bv
    if kind == "flow":  # eps = (x + a u) / (a + s), x0 = (x - s u) / (a + s); a + s = 1 on the rectified flow
        r = a + s
        return fdiv(1.0, r), fdiv(a, r), fdiv(1.0, r), fdiv(-s, r)
    raise ValueError(f"unknown prediction type {kind!r}; expected epsilon, sample, v_prediction or flow")


def score_coefficients(kind: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(sx, sp) with score = grad log q_t = -eps_hat / sigma = sx x + sp pred."""
    if kind == "sample":  # (alpha x0 - x) / sigma^2, finite wherever sigma > 0
        return fdiv(-1.0, sigma * sigma), fdiv(alpha, sigma * sigma)
    ex, ep, _, _ = eps_x0_coefficients(kind, alpha, sigma)
    return -fdiv(ex, sigma) if ex else 0.0, -fdiv(ep, sigma)


def velocity_coefficients(kind: str, alpha: float, sigma: float, dalpha: float, dsigma: float) -> tuple[float, float]:
    """(vx, vp) with the probability-flow velocity alpha' x0_hat + sigma' eps_hat = vx x + vp pred
    (alpha' = 0, the VE form: sigma' eps_hat alone, so that an infinite x0_hat never enters)."""
    ex, ep, x0x, x0p = eps_x0_coefficients(kind, alpha, sigma)
    if dalpha == 0.0:
        return dsigma * ex, dsigma * ep
    return dalpha * x0x + dsigma * ex, dalpha * x0p + dsigma * ep


def affine(x: Tensor, a: float, pred: Tensor, b: float) -> Tensor:
    """a x + b pred (x broadcasts over a leading expert axis of pred) in at most two ops."""
    if a == 0.0:
        return pred * b
    if a == 1.0:
        return torch.add(x, pred, alpha=b)  # broadcasts x over pred's expert axis
    return torch.add(x * a, pred, alpha=b)
