"""Reverse-time integrators that own the step (superdiff-math.md, sections 1-2).

Each stochastic step from t to t' < t is a Gaussian kernel x' ~ N(mean(x, pred), var I),
with mean affine in the prediction; the ODE steps have var = 0. Exposing mean and var
(rather than hiding them in a scheduler) is what lets AND see the would-be increment before
the step and lets the kernel-ratio estimator evaluate each expert's own kernel.

    em     Euler-Maruyama of dx = (f x - g2 s) dt + g dW (dt < 0), coefficients at t:
           mean = x + (-f x + g2 s) h,   var = g2 h,   h = t - t'
           (VE form: x + 2 ds eps, var 2 sigma |ds|, the reference update); a final step
           to sigma = 0 is the noise-free denoise x' = x0_hat (the reference leaves noise of
           std sqrt(2) sigma_min in the image)
    ddpm   exact Gaussian posterior q(x' | x, x0_hat) of the forward process (DDPM ancestral;
           finite at alpha_t = 0, i.e. flow matching at t = 1):
           mean = (a s'^2 / s^2) x + (alpha' s2 / s^2) x0,  var = s2 s'^2 / s^2,
           with (a, s2) the forward transition t' -> t; clip_sample=c clamps x0_hat to
           [-c, c] first, as diffusers' DDPMScheduler(clip_sample=True) does for pixel models
    euler  probability-flow ODE dx/dt = v = alpha'(t) x0 + sigma'(t) eps (= f x - g2 s / 2)
    heun   the same ODE, Heun's second order (trapezoid), Euler on a step to sigma = 0
"""

from __future__ import annotations

import torch

from .predictions import to_eps_x0, to_score
from .schedules import Schedule

Tensor = torch.Tensor

__all__ = ["Integrator", "EulerMaruyama", "DDPMAncestral", "EulerODE", "HeunODE", "INTEGRATORS",
           "make_integrator", "ode_velocity"]


def ode_velocity(schedule: Schedule, x: Tensor, t: Tensor, pred: Tensor, kind: str) -> Tensor:
    """Probability-flow velocity alpha'(t) x0_hat + sigma'(t) eps_hat (forward time)."""
    eps, x0 = to_eps_x0(pred, kind, x, schedule.alpha(t), schedule.sigma(t))
    da, ds = schedule.dalpha(t), schedule.dsigma(t)
    if float(da) == 0.0:  # VE: avoid 0 * x0_hat (x0_hat may be inf where alpha = 0 is not)
        return ds.to(x) * eps
    return da.to(x) * x0 + ds.to(x) * eps


class Integrator:
    name = "integrator"
    stochastic = True
    #: network evaluations per step
    evals_per_step = 1

    def check(self, schedule: Schedule, t: Tensor, t_next: Tensor) -> None:
        """Raise ValueError when this step cannot be taken (infinite coefficients)."""

    def mean(self, schedule: Schedule, x: Tensor, t: Tensor, t_next: Tensor, pred: Tensor, kind: str) -> Tensor:
        raise NotImplementedError

    def variance(self, schedule: Schedule, t: Tensor, t_next: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.float64)


class EulerMaruyama(Integrator):
    name = "em"

    def check(self, schedule: Schedule, t: Tensor, t_next: Tensor) -> None:
        f, g2 = schedule.f(t), schedule.g2(t)
        if not (torch.isfinite(f) and torch.isfinite(g2)):
            raise ValueError(
                f"the SDE coefficients are infinite at t={float(t):g} ({type(schedule).__name__}); "
                "Euler-Maruyama cannot start there. Use integrator='ddpm' (exact posterior step) "
                "or an ODE integrator, or start the grid below t=1 (e.g. RectifiedFlow(t_max=0.999))"
            )

    def mean(self, schedule, x, t, t_next, pred, kind):
        if float(schedule.sigma(t_next)) == 0.0:
            return to_eps_x0(pred, kind, x, schedule.alpha(t), schedule.sigma(t))[1]
        h = (t - t_next).to(x)
        f, g2 = schedule.f(t).to(x), schedule.g2(t).to(x)
        s = to_score(pred, kind, x, schedule.alpha(t), schedule.sigma(t))
        return x + (-f * x + g2 * s) * h

    def variance(self, schedule, t, t_next):
        if float(schedule.sigma(t_next)) == 0.0:
            return torch.zeros((), dtype=torch.float64)
        return torch.clamp(schedule.g2(t) * (t - t_next), min=0.0)


class DDPMAncestral(Integrator):
    name = "ddpm"

    def __init__(self, clip_sample: float | None = None) -> None:
        if clip_sample is not None and not float(clip_sample) > 0:
            raise ValueError(f"clip_sample must be a positive range (e.g. 1.0) or None, got {clip_sample}")
        self.clip_sample = None if clip_sample is None else float(clip_sample)

    def _coefs(self, schedule: Schedule, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, s2 = schedule.transition(t_next, t)
        st2, sn2 = schedule.sigma(t) ** 2, schedule.sigma(t_next) ** 2
        cx = a * sn2 / st2
        c0 = schedule.alpha(t_next) * s2 / st2
        var = s2 * sn2 / st2
        return cx, c0, var

    def check(self, schedule, t, t_next):
        if not float(schedule.sigma(t)) > 0:
            raise ValueError(f"the DDPM step needs sigma_t > 0 at its start, got t={float(t):g}")

    def mean(self, schedule, x, t, t_next, pred, kind):
        cx, c0, _ = self._coefs(schedule, t, t_next)
        _, x0 = to_eps_x0(pred, kind, x, schedule.alpha(t), schedule.sigma(t))
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        if float(cx) == 0.0:  # alpha_t = 0: x carries no information about x'
            return c0.to(x) * x0
        return cx.to(x) * x + c0.to(x) * x0

    def variance(self, schedule, t, t_next):
        return torch.clamp(self._coefs(schedule, t, t_next)[2], min=0.0)


class EulerODE(Integrator):
    name = "euler"
    stochastic = False

    def mean(self, schedule, x, t, t_next, pred, kind):
        return x + (t_next - t).to(x) * ode_velocity(schedule, x, t, pred, kind)


class HeunODE(EulerODE):
    """Heun's method; the sampler evaluates the experts a second time at the Euler point."""

    name = "heun"
    evals_per_step = 2

    @staticmethod
    def needs_corrector(schedule: Schedule, t_next: Tensor) -> bool:
        return float(schedule.sigma(t_next)) > 0

    def correct(self, schedule, x, t, t_next, pred, pred_next, x_euler, kind):
        v0 = ode_velocity(schedule, x, t, pred, kind)
        v1 = ode_velocity(schedule, x_euler, t_next, pred_next, kind)
        return x + (t_next - t).to(x) * 0.5 * (v0 + v1)


INTEGRATORS: dict[str, type[Integrator]] = {
    "em": EulerMaruyama,
    "ddpm": DDPMAncestral,
    "euler": EulerODE,
    "heun": HeunODE,
}
#: convenient aliases: the SDE/ODE names used by the pipelines and CLI
ALIASES = {"sde": "em", "ode": "euler", "euler_maruyama": "em", "ancestral": "ddpm"}


def make_integrator(name: str | Integrator, **kwargs) -> Integrator:
    """An integrator by name (or alias); kwargs go to its constructor (ddpm: clip_sample)."""
    if isinstance(name, Integrator):
        return name
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in INTEGRATORS:
        raise ValueError(f"unknown integrator {name!r}; expected one of "
                         f"{', '.join(list(INTEGRATORS) + list(ALIASES))}")
    try:
        return INTEGRATORS[key](**kwargs)
    except TypeError:
        raise ValueError(f"integrator {key!r} takes no options {sorted(kwargs)}") from None
