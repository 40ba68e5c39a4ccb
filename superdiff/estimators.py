"""Per-expert log-density tracking along a sampling trajectory (superdiff-math.md, section 3).

For a step x (time t) -> x' (time t' < t), h = t - t' > 0, each estimator returns
Delta log q_i ~ log q_i(x', t') - log q_i(x, t), shape [B, M], and a linear model

    Delta log q_i = <x', W_i> + c_i  (+ a term common to all experts)

that AND uses to choose kappa before the step (x' is affine in kappa).

    ito     (3a, Theorem 1) for any drift, when the injected noise is exactly g_t:
            Delta log q_i = <x' - x, s_i> + (d f + <f x - g2/2 s_i, s_i>) h
            W_i = s_i
            On the steps Euler-Maruyama takes with the DDPM posterior kernel (rectified flow
            near t = 1, including the step from alpha_t = 0 where d f h is infinite) it is the
            kernel ratio below, which is finite there.
    kernel  (3b) detailed balance of one step with the exact forward kernel k(x | x') and
            expert i's own reverse kernel r_i = N(mean_i, var) (the integrator's):
            Delta log q_i = log r_i(x' | x) - log k(x | x')
            W_i = mean_i / var  (the quadratic term in x' is common to all experts)
    ode     (3c) along dx/dt = u: d/dt log q_i = -div v_i - <s_i, v_i - u>,
            v_i = f x - g2/2 s_i (expert i's probability-flow velocity); Euler or trapezoid
            (Heun). div v_i by Jacobian-vector products: exact (basis probes) for small d,
            Hutchinson with Rademacher probes otherwise. W_i = s_i

All inner products and accumulators are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .integrators import DDPMAncestral, EulerMaruyama, EulerODE, HeunODE, Integrator, ode_velocity
from .predictions import to_score
from .schedules import Schedule

Tensor = torch.Tensor
_F64 = torch.float64

__all__ = ["StepContext", "Estimator", "ItoEstimator", "KernelEstimator", "ODEEstimator",
           "ESTIMATORS", "make_estimator", "check_pair", "divergence", "HeunStage", "NullEstimator"]


@dataclass
class StepContext:
    """Everything an estimator needs about one step; cached quantities are computed lazily."""

    schedule: Schedule
    integrator: Integrator
    t: Tensor  # 0-d float64
    t_next: Tensor
    x: Tensor  # [B, *S] float64
    cond: Tensor  # [M, B, *S] each expert's own (unguided) prediction
    kind: str
    #: x -> [M, B, *S] unguided predictions at time t (for JVPs); set by the sampler
    predict_fn: Callable[[Tensor], Tensor] | None = None
    generator: torch.Generator | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def feat_dims(self) -> int:
        return self.x.dim() - 1

    @property
    def dim(self) -> int:
        return self.x[0].numel()

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """<a, b> over the feature dims, float64; broadcasts a leading expert axis."""
        return (a.to(_F64) * b.to(_F64)).sum(dim=tuple(range(-self.feat_dims, 0)))

    @property
    def h(self) -> Tensor:
        return self.t - self.t_next

    @property
    def scores(self) -> Tensor:  # [M, B, *S]
        if "scores" not in self._cache:
            s = self.schedule
            self._cache["scores"] = to_score(self.cond.to(_F64), self.kind, self.x, s.alpha(self.t), s.sigma(self.t))
        return self._cache["scores"]

    @property
    def variance(self) -> Tensor:
        if "var" not in self._cache:
            self._cache["var"] = self.integrator.variance(self.schedule, self.t, self.t_next).to(_F64)
        return self._cache["var"]

    @property
    def kernel_means(self) -> Tensor:  # [M, B, *S]: mean of expert i's own reverse kernel
        if "means" not in self._cache:
            self._cache["means"] = torch.stack([
                self.integrator.mean(self.schedule, self.x, self.t, self.t_next, c.to(_F64), self.kind)
                for c in self.cond])
        return self._cache["means"]


class Estimator:
    name = "estimator"
    #: integrators this estimator is valid for
    integrators: tuple[type[Integrator], ...] = ()

    def linear(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(W [M, B, *S], c [B, M]) with Delta log q_i = <x', W_i> + c_i + common."""
        raise NotImplementedError

    def delta(self, ctx: StepContext, x_next: Tensor, **kw) -> Tensor:
        """Delta log q [B, M] for the realised step x -> x_next."""
        raise NotImplementedError


def _posterior_step(ctx: StepContext) -> bool:
    """A step Euler-Maruyama takes with the DDPM posterior kernel (integrators.EulerMaruyama)."""
    return isinstance(ctx.integrator, EulerMaruyama) and ctx.integrator.posterior_step(ctx.schedule, ctx.t, ctx.t_next)


class ItoEstimator(Estimator):
    name = "ito"
    integrators = (EulerMaruyama,)

    def _c(self, ctx: StepContext) -> Tensor:
        sch, t = ctx.schedule, ctx.t
        f, g2 = sch.f(t), sch.g2(t)
        s = ctx.scores
        drift = f * ctx.x - 0.5 * g2 * s  # [M, B, *S]
        return ((ctx.dim * f + ctx.dot(drift, s)) * ctx.h).T  # [B, M]

    def linear(self, ctx):
        if _posterior_step(ctx):
            return KernelEstimator().linear(ctx)
        return self.formula_linear(ctx)

    def formula_linear(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """The linear model of 3a itself; where f_t is infinite (alpha_t = 0) only its finite
        expert-dependent part <x' - x, s_i> (the rest is common or O(h))."""
        if not bool(torch.isfinite(ctx.schedule.f(ctx.t)) and torch.isfinite(ctx.schedule.g2(ctx.t))):
            return ctx.scores, -ctx.dot(ctx.x, ctx.scores).T
        return ctx.scores, self._c(ctx) - ctx.dot(ctx.x, ctx.scores).T

    def delta(self, ctx, x_next, **kw):
        if _posterior_step(ctx):
            return KernelEstimator().delta(ctx, x_next)
        if not float(ctx.variance) > 0:  # the noise-free final denoise: log q at sigma = 0 is not tracked
            return torch.zeros(ctx.x.shape[0], ctx.cond.shape[0], dtype=_F64, device=ctx.x.device)
        return ctx.dot(x_next.to(_F64) - ctx.x, ctx.scores).T + self._c(ctx)


class KernelEstimator(Estimator):
    name = "kernel"
    integrators = (EulerMaruyama, DDPMAncestral)

    def linear(self, ctx):
        var = ctx.variance
        if not float(var) > 0:  # deterministic final step: no kernel; use the score direction
            return ItoEstimator().formula_linear(ctx)
        m = ctx.kernel_means
        return m / var, (-0.5 * ctx.dot(m, m) / var).T

    def delta(self, ctx, x_next, **kw):
        var = ctx.variance
        if not float(var) > 0:
            # a step to sigma = 0 has no Gaussian kernel: log q is left where it was
            return torch.zeros(ctx.x.shape[0], ctx.cond.shape[0], dtype=_F64, device=ctx.x.device)
        xn = x_next.to(_F64)
        d = ctx.dim
        log_r = -0.5 * ctx.dot(xn - ctx.kernel_means, xn - ctx.kernel_means) / var - 0.5 * d * torch.log(2 * math.pi * var)
        a, s2 = ctx.schedule.transition(ctx.t_next, ctx.t)
        r = ctx.x - a * xn
        log_k = -0.5 * ctx.dot(r, r) / s2 - 0.5 * d * torch.log(2 * math.pi * s2)
        return (log_r - log_k).T


def divergence(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor, exact: bool) -> Tensor:
    """sum/mean over probes of <z, J_fn(x) z>: fn maps [N, *S] -> [M, N, *S]; probes [P, B, *S].

    Returns [B, M]. exact=True sums over a basis (trace of J), else averages (Hutchinson).
    All probes go through ONE forward-mode JVP on a batch of P * B rows.
    """
    P, B = probes.shape[:2]
    xr = x.unsqueeze(0).expand(P, *x.shape).reshape(P * B, *x.shape[1:])
    zr = probes.reshape(P * B, *x.shape[1:]).to(x)
    try:
        _, jz = torch.func.jvp(fn, (xr,), (zr,))
    except (RuntimeError, NotImplementedError):  # no forward-mode AD for some op: double-backward
        _, jz = torch.autograd.functional.jvp(fn, xr, zr)
    M = jz.shape[0]
    jz = jz.reshape(M, P, B, -1).to(_F64)
    quad = (jz * probes.reshape(1, P, B, -1).to(_F64)).sum(-1)  # [M, P, B]
    red = quad.sum(1) if exact else quad.mean(1)
    return red.T


class ODEEstimator(Estimator):
    """Continuous-change-of-variables estimator for probability-flow ODE samplers.

    probes: "exact" (d JVPs batched; default when d <= 64) or an int number of Rademacher
    probes for Hutchinson's trace estimator.
    """

    name = "ode"
    integrators = (EulerODE, HeunODE)

    def __init__(self, probes: int | str = "auto", exact_max_dim: int = 64) -> None:
        if not (probes in ("auto", "exact") or (isinstance(probes, int) and probes >= 1)):
            raise ValueError(f"probes must be 'auto', 'exact' or an int >= 1, got {probes!r}")
        self.probes = probes
        self.exact_max_dim = exact_max_dim

    def _probes(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, bool]:
        B, d = x.shape[0], x[0].numel()
        exact = self.probes == "exact" or (self.probes == "auto" and d <= self.exact_max_dim)
        if exact:
            eye = torch.eye(d, dtype=x.dtype, device=x.device)  # [d, d]
            return eye[:, None, :].expand(d, B, d).reshape(d, B, *x.shape[1:]), True
        n = 1 if self.probes == "auto" else int(self.probes)
        z = torch.randint(0, 2, (n, *x.shape), generator=generator, device=x.device).to(x.dtype) * 2 - 1
        return z, False

    def velocities(self, schedule: Schedule, x: Tensor, t: Tensor, preds: Tensor, kind: str) -> Tensor:
        return torch.stack([ode_velocity(schedule, x, t, p.to(x.dtype), kind) for p in preds])

    def rate(self, ctx: StepContext, x: Tensor, t: Tensor, preds: Tensor, predict_fn: Callable[[Tensor], Tensor],
             u: Tensor) -> Tensor:
        """d/dt log q_i at (x, t) when moving with velocity u: [B, M]."""
        sch = ctx.schedule
        v = self.velocities(sch, x, t, preds, ctx.kind)  # [M, B, *S]
        s = to_score(preds.to(_F64), ctx.kind, x, sch.alpha(t), sch.sigma(t))

        def vel(xx: Tensor) -> Tensor:
            return torch.stack([ode_velocity(sch, xx, t, p, ctx.kind) for p in predict_fn(xx)])

        probes, exact = self._probes(x, ctx.generator)
        div = divergence(vel, x, probes, exact)  # [B, M]
        return -div - ctx.dot(s, v - u.to(_F64)[None]).T

    def linear(self, ctx):
        sch = ctx.schedule
        v = self.velocities(sch, ctx.x, ctx.t, ctx.cond, ctx.kind)
        s = ctx.scores
        div = self._div(ctx)
        c = (-ctx.h) * (-div - ctx.dot(s, v).T) - ctx.dot(s, ctx.x).T
        return s, c

    def _div(self, ctx: StepContext) -> Tensor:
        if "div" not in ctx._cache:
            sch, t = ctx.schedule, ctx.t

            def vel(xx: Tensor) -> Tensor:
                return torch.stack([ode_velocity(sch, xx, t, p, ctx.kind) for p in ctx.predict_fn(xx)])

            probes, exact = self._probes(ctx.x, ctx.generator)
            ctx._cache["div"] = divergence(vel, ctx.x, probes, exact)
        return ctx._cache["div"]

    def delta(self, ctx, x_next, heun: "HeunStage | None" = None, **kw):
        """Euler: -h * rate(x, t, u), u = (x' - x)/(t' - t). Heun: the trapezoid of the rates at
        (x, t) and at the Euler point (x_e, t'), each with the velocity actually used there."""
        sch = ctx.schedule
        x_first = x_next if heun is None else heun.x_euler
        u0 = (x_first.to(_F64) - ctx.x) / (ctx.t_next - ctx.t)
        v = self.velocities(sch, ctx.x, ctx.t, ctx.cond, ctx.kind)
        r0 = -self._div(ctx) - ctx.dot(ctx.scores, v - u0[None]).T
        if heun is None:
            return -ctx.h * r0
        r1 = self.rate(ctx, heun.x_euler.to(_F64), ctx.t_next, heun.cond, heun.predict_fn, heun.velocity)
        return -ctx.h * 0.5 * (r0 + r1)


@dataclass
class HeunStage:
    """The second evaluation of a Heun step: experts at the Euler point (x_e, t')."""

    x_euler: Tensor  # [B, *S]
    cond: Tensor  # [M, B, *S] unguided predictions at (x_e, t')
    predict_fn: Callable[[Tensor], Tensor]  # x -> [M, B, *S] at t'
    velocity: Tensor  # [B, *S] combined velocity used at (x_e, t')


class NullEstimator(Estimator):
    """No log-density tracking: Delta log q = 0 (valid with every integrator).

    For operators whose kappa ignores log q ("single", "average"); the trace then keeps
    the shared prior value for every expert.
    """

    name = "none"
    integrators = (Integrator,)

    def linear(self, ctx):
        raise ValueError("estimator 'none' cannot drive the AND operator, which needs log-density "
                         "changes; use 'kernel', 'ito' or 'ode'")

    def delta(self, ctx, x_next, **kw):
        return torch.zeros(ctx.x.shape[0], ctx.cond.shape[0], dtype=torch.float64, device=ctx.x.device)


ESTIMATORS: dict[str, type[Estimator]] = {
    "ito": ItoEstimator,
    "kernel": KernelEstimator,
    "ode": ODEEstimator,
    "none": NullEstimator,
}


def make_estimator(name: str | Estimator) -> Estimator:
    if isinstance(name, Estimator):
        return name
    key = str(name).lower()
    if key not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[key]()


def check_pair(estimator: Estimator, integrator: Integrator) -> None:
    """Refuse estimator/integrator pairs whose assumptions do not hold."""
    if not isinstance(integrator, estimator.integrators):
        ok = ", ".join(sorted(c.name for c in estimator.integrators))
        fits = sorted(e for e, cls in ESTIMATORS.items() if isinstance(integrator, cls.integrators))
        raise ValueError(
            f"estimator {estimator.name!r} is not valid with integrator {integrator.name!r} "
            f"(it needs one of: {ok}); with {integrator.name!r} use estimator "
            f"{' or '.join(repr(f) for f in fits)}"
        )
