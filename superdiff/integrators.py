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

from .coefficients import (StepCoefficients, affine, eps_x0_coefficients, fdiv, score_coefficients, step_coefficients,
                           velocity_coefficients)
from .schedules import Schedule

Tensor = torch.Tensor

__all__ = ["Integrator", "EulerMaruyama", "DDPMAncestral", "EulerODE", "HeunODE", "INTEGRATORS",
           "make_integrator", "ode_velocity", "velocity"]


def velocity(c: StepCoefficients, x: Tensor, pred: Tensor, kind: str, at_next: bool = False) -> Tensor:
    """Probability-flow velocity alpha'(t) x0_hat + sigma'(t) eps_hat (forward time) at the step's
    start t, or at its end t_next (at_next=True); pred may carry a leading expert axis."""
    if at_next:
        vx, vp = velocity_coefficients(kind, c.alpha_next, c.sigma_next, c.dalpha_next, c.dsigma_next)
    else:
        vx, vp = velocity_coefficients(kind, c.alpha, c.sigma, c.dalpha, c.dsigma)
    return affine(x, vx, pred, vp)


def ode_velocity(schedule: Schedule, x: Tensor, t: Tensor, pred: Tensor, kind: str) -> Tensor:
    """`velocity` at time t of a schedule (for direct calls outside a sampling loop)."""
    return velocity(step_coefficients(schedule, t, t), x, pred, kind)


class Integrator:
    """A reverse step x -> x' ~ N(mean(x, pred), var I). Subclasses implement the `*_c` forms,
    which read the step's scalars from superdiff.coefficients.StepCoefficients (Python
    floats: no host read); the schedule-based forms below evaluate them first. mean_c
    broadcasts over a leading expert axis of pred (x [B, *S], pred [M, B, *S])."""

    name = "integrator"
    stochastic = True
    #: network evaluations per step
    evals_per_step = 1

    def check_coefficients(self, c: StepCoefficients) -> None:
        """Raise ValueError when this step cannot be taken (infinite coefficients)."""

    def mean_c(self, c: StepCoefficients, x: Tensor, pred: Tensor, kind: str) -> Tensor:
        raise NotImplementedError

    def variance_c(self, c: StepCoefficients) -> float:
        return 0.0

    def check(self, schedule: Schedule, t: Tensor, t_next: Tensor) -> None:
        self.check_coefficients(step_coefficients(schedule, t, t_next))

    def mean(self, schedule: Schedule, x: Tensor, t: Tensor, t_next: Tensor, pred: Tensor, kind: str) -> Tensor:
        return self.mean_c(step_coefficients(schedule, t, t_next), x, pred, kind)

    def variance(self, schedule: Schedule, t: Tensor, t_next: Tensor) -> Tensor:
        return torch.tensor(self.variance_c(step_coefficients(schedule, t, t_next)), dtype=torch.float64)


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
    def posterior_c(c: StepCoefficients) -> bool:
        """True when the step is taken with the DDPM posterior kernel (see the class doc)."""
        if not (math.isfinite(c.f) and math.isfinite(c.g2)):
            return True
        if not c.singular_noise_end:
            return False
        return c.alpha < math.log(fdiv(c.alpha_next, c.alpha))

    @staticmethod
    def posterior_step(schedule: Schedule, t: Tensor, t_next: Tensor) -> bool:
        """True when the step t -> t_next is taken with the DDPM posterior kernel (see class doc)."""
        return EulerMaruyama.posterior_c(step_coefficients(schedule, t, t_next))

    def check_coefficients(self, c: StepCoefficients) -> None:
        finite = math.isfinite(c.f) and math.isfinite(c.g2)
        if not finite and (c.alpha != 0.0 or not c.sigma > 0):
            raise ValueError(
                f"the SDE coefficients are infinite at t={c.t:g} ({c.schedule}) "
                "and this is not a pure-noise point (alpha_t = 0, sigma_t > 0) where the posterior "
                "step could start; use integrator 'ddpm', 'euler' or 'heun', or a grid that avoids it")
        if self.posterior_c(c):
            _POSTERIOR.check_coefficients(c)

    def mean_c(self, c, x, pred, kind):
        if self.posterior_c(c):
            return _POSTERIOR.mean_c(c, x, pred, kind)
        if c.sigma_next == 0.0:  # the noise-free final denoise: x' = x0_hat
            _, _, x0x, x0p = eps_x0_coefficients(kind, c.alpha, c.sigma)
            return affine(x, x0x, pred, x0p)
        # x + (-f x + g2 s) h with s = sx x + sp pred
        sx, sp = score_coefficients(kind, c.alpha, c.sigma)
        h = c.h
        return affine(x, 1.0 + (-c.f + c.g2 * sx) * h, pred, c.g2 * sp * h)

    def variance_c(self, c):
        if self.posterior_c(c):
            return _POSTERIOR.variance_c(c)
        if c.sigma_next == 0.0:
            return 0.0
        return max(c.g2 * c.h, 0.0)


class DDPMAncestral(Integrator):
    name = "ddpm"

    def __init__(self, clip_sample: float | None = None) -> None:
        if clip_sample is not None and not float(clip_sample) > 0:
            raise ValueError(f"clip_sample must be a positive range (e.g. 1.0) or None, got {clip_sample}")
        self.clip_sample = None if clip_sample is None else float(clip_sample)

    @staticmethod
    def _coefs(c: StepCoefficients) -> tuple[float, float, float]:
        st2, sn2 = c.sigma ** 2, c.sigma_next ** 2
        cx = fdiv(c.trans_a * sn2, st2)
        c0 = fdiv(c.alpha_next * c.trans_s2, st2)
        var = fdiv(c.trans_s2 * sn2, st2)
        return cx, c0, var

    def check_coefficients(self, c):
        if not c.sigma > 0:
            raise ValueError(f"the DDPM step needs sigma_t > 0 at its start, got t={c.t:g}")

    def mean_c(self, c, x, pred, kind):
        cx, c0, _ = self._coefs(c)
        if kind == "epsilon" and c.alpha == 0.0:
            raise ValueError(
                f"an epsilon prediction determines no x0_hat at alpha_t = 0 (t={c.t:g}), which "
                "the posterior step from pure noise needs; use a flow, sample or v_prediction model "
                "there, or start the grid below this point")
        _, _, x0x, x0p = eps_x0_coefficients(kind, c.alpha, c.sigma)
        if self.clip_sample is not None:
            x0 = affine(x, x0x, pred, x0p).clamp(-self.clip_sample, self.clip_sample)
            return c0 * x0 if cx == 0.0 else torch.add(x * cx, x0, alpha=c0)
        return affine(x, cx + c0 * x0x, pred, c0 * x0p)  # cx x + c0 x0_hat

    def variance_c(self, c):
        return max(self._coefs(c)[2], 0.0)


#: the kernel Euler-Maruyama takes on a step from alpha_t = 0
_POSTERIOR = DDPMAncestral()


class EulerODE(Integrator):
    name = "euler"
    stochastic = False

    def mean_c(self, c, x, pred, kind):
        # x + (t' - t) v with v = vx x + vp pred
        vx, vp = velocity_coefficients(kind, c.alpha, c.sigma, c.dalpha, c.dsigma)
        return affine(x, 1.0 - c.h * vx, pred, -c.h * vp)


class HeunODE(EulerODE):
    """Heun's method; the sampler evaluates the experts a second time at the Euler point."""

    name = "heun"
    evals_per_step = 2

    @staticmethod
    def needs_corrector(schedule: Schedule, t_next: Tensor) -> bool:
        return float(schedule.sigma(t_next)) > 0

    def correct_c(self, c: StepCoefficients, x: Tensor, pred: Tensor, pred_next: Tensor, x_euler: Tensor,
                  kind: str) -> Tensor:
        """Heun's corrected x': x_euler must be the Euler point of pred (mean_c), which is how
        pred enters (h v0 = x - x_euler; see correct_v)."""
        return self.correct_v(c, x, x_euler, velocity(c, x_euler, pred_next, kind, at_next=True))

    @staticmethod
    def correct_v(c: StepCoefficients, x: Tensor, x_euler: Tensor, v_next: Tensor) -> Tensor:
        """x - h/2 (v0 + v1) with h v0 = x - x_euler (the Euler predictor that made x_euler):
        the midpoint of x and x_euler - h v1, two ops and no second evaluation of v0."""
        return torch.lerp(x, torch.add(x_euler, v_next, alpha=-c.h), 0.5)

    def correct(self, schedule, x, t, t_next, pred, pred_next, x_euler, kind):
        return self.correct_c(step_coefficients(schedule, t, t_next), x, pred, pred_next, x_euler, kind)


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
