"""Reverse-time integrators that own the step (superdiff-math.md, sections 1-2).

Each stochastic step from t to t' < t is a Gaussian kernel x' ~ N(mean(x, pred), var I),
with mean affine in the prediction; the ODE steps have var = 0. Exposing mean and var
(rather than hiding them in a scheduler) is what lets AND see the would-be increment before
the step and lets the kernel-ratio estimator evaluate each expert's own kernel.

    em     Euler-Maruyama of dx = (f x - g2 s) dt + g dW (dt < 0), coefficients at t:
           mean = x + (-f x + g2 s) h,   var = g2 h,   h = t - t'
           (VE form: x + 2 ds eps, var 2 sigma |ds|, the reference update); a final step
           to sigma = 0 is the noise-free denoise x' = x0_hat (the reference leaves noise of
           std sqrt(2) sigma_min in the image). On rectified flow (f_t = -1/(1 - t),
           unbounded at the noise end) the steps with alpha_t < log(alpha_t'/alpha_t) --
           always the one from t = 1 (alpha = 0, f and g infinite), where diffusers'
           FlowMatch schedulers start -- are the DDPM posterior kernel below instead, finite
           there; the estimators track those steps with the kernel ratio (3b). Automatic on
           any grid, shifted or not; see EulerMaruyama.
    ddpm   exact Gaussian posterior q(x' | x, x0_hat) of the forward process (DDPM ancestral;
           finite at alpha_t = 0, i.e. flow matching at t = 1):
           mean = (a s'^2 / s^2) x + (alpha' s2 / s^2) x0,  var = s2 s'^2 / s^2,
           with (a, s2) the forward transition t' -> t; clip_sample=c clamps x0_hat to
           [-c, c] first, as diffusers' DDPMScheduler(clip_sample=True) does for pixel models
    euler  probability-flow ODE dx/dt = v = alpha'(t) x0 + sigma'(t) eps (= f x - g2 s / 2)
    heun   the same ODE, Heun's second order (trapezoid), Euler on a step to sigma = 0
"""

from __future__ import annotations

import math

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
    """Euler-Maruyama, with DDPM posterior steps where its coefficients blow up (see below).

    On a schedule whose drift f_t = d log alpha_t / dt is unbounded as alpha_t -> 0
    (`Schedule.singular_noise_end`: rectified flow, f = -1/(1 - t)), a step t -> t' is the
    DDPM posterior kernel when alpha_t < r = log(alpha_t' / alpha_t), and Euler-Maruyama
    otherwise. This includes the step from alpha_t = 0 (r = inf), where f and g are infinite
    and the posterior is finite: x' ~ N(alpha' x0_hat, sigma'^2 I). Why: EM's local error grows
    with r, the step's change in log alpha, which on any grid uniform in t stays O(1) for the
    first steps however many steps there are (r = log((k + 1)/k) on step k), so EM alone does
    not converge there; the posterior kernel's error comes from ignoring Cov[x0 | x_t], which
    enters with weight alpha_t'^2 and vanishes at the noise end. The rule takes the kernel
    whose error scale (alpha_t vs r) is smaller; the posterior steps are those with alpha_t
    below about sqrt(h), a vanishing part of the path as h -> 0. Measured on exact mixtures in
    docs/flow.md. On VP/VE schedules (f bounded) every step is plain Euler-Maruyama.
    """

    name = "em"

    @staticmethod
    def posterior_step(schedule: Schedule, t: Tensor, t_next: Tensor) -> bool:
        """True when the step t -> t_next is taken with the DDPM posterior kernel (see class doc)."""
        if not bool(torch.isfinite(schedule.f(t)) and torch.isfinite(schedule.g2(t))):
            return True
        if not getattr(schedule, "singular_noise_end", False):
            return False
        a, a_next = float(schedule.alpha(t)), float(schedule.alpha(t_next))
        return a < math.log(a_next / a)

    def check(self, schedule: Schedule, t: Tensor, t_next: Tensor) -> None:
        finite = bool(torch.isfinite(schedule.f(t)) and torch.isfinite(schedule.g2(t)))
        if not finite and (float(schedule.alpha(t)) != 0.0 or not float(schedule.sigma(t)) > 0):
            raise ValueError(
                f"the SDE coefficients are infinite at t={float(t):g} ({type(schedule).__name__}) "
                "and this is not a pure-noise point (alpha_t = 0, sigma_t > 0) where the posterior "
                "step could start; use integrator 'ddpm', 'euler' or 'heun', or a grid that avoids it")
        if self.posterior_step(schedule, t, t_next):
            _POSTERIOR.check(schedule, t, t_next)

    def mean(self, schedule, x, t, t_next, pred, kind):
        if self.posterior_step(schedule, t, t_next):
            return _POSTERIOR.mean(schedule, x, t, t_next, pred, kind)
        if float(schedule.sigma(t_next)) == 0.0:
            return to_eps_x0(pred, kind, x, schedule.alpha(t), schedule.sigma(t))[1]
        h = (t - t_next).to(x)
        f, g2 = schedule.f(t).to(x), schedule.g2(t).to(x)
        s = to_score(pred, kind, x, schedule.alpha(t), schedule.sigma(t))
        return x + (-f * x + g2 * s) * h

    def variance(self, schedule, t, t_next):
        if self.posterior_step(schedule, t, t_next):
            return _POSTERIOR.variance(schedule, t, t_next)
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
        if kind == "epsilon" and float(schedule.alpha(t)) == 0.0:
            raise ValueError(
                f"an epsilon prediction determines no x0_hat at alpha_t = 0 (t={float(t):g}), which "
                "the posterior step from pure noise needs; use a flow, sample or v_prediction model "
                "there, or start the grid below this point")
        _, x0 = to_eps_x0(pred, kind, x, schedule.alpha(t), schedule.sigma(t))
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        if float(cx) == 0.0:  # alpha_t = 0: x carries no information about x'
            return c0.to(x) * x0
        return cx.to(x) * x + c0.to(x) * x0

    def variance(self, schedule, t, t_next):
        return torch.clamp(self._coefs(schedule, t, t_next)[2], min=0.0)


#: the kernel Euler-Maruyama takes on a step from alpha_t = 0
_POSTERIOR = DDPMAncestral()


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
