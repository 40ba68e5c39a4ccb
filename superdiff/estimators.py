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

Inner products are accumulated in float64 (products in the sampling dtype), and so are the
log q accumulators; scalars come from superdiff.coefficients (Python floats, no host read).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .coefficients import StepCoefficients, affine, score_coefficients, step_coefficients, velocity_coefficients
from .integrators import DDPMAncestral, EulerMaruyama, EulerODE, HeunODE, Integrator, velocity
from .schedules import Schedule

Tensor = torch.Tensor
_F64 = torch.float64

__all__ = ["StepContext", "Estimator", "ItoEstimator", "KernelEstimator", "ODEEstimator",
           "ESTIMATORS", "make_estimator", "check_pair", "divergence", "HeunStage", "NullEstimator",
           "rademacher", "fd_step"]


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


@dataclass
class StepContext:
    """Everything an estimator needs about one step; cached quantities are computed lazily."""

    schedule: Schedule
    integrator: Integrator
    t: Tensor  # 0-d float64
    t_next: Tensor
    x: Tensor  # [B, *S] in the sampling dtype
    cond: Tensor  # [M, B, *S] each expert's own (unguided) prediction
    kind: str
    #: x -> [M, B, *S] unguided predictions at time t (for JVPs); set by the sampler
    predict_fn: Callable[[Tensor], Tensor] | None = None
    generator: torch.Generator | list[torch.Generator] | None = None  # the probes' (one per sample)
    #: the step's schedule scalars (computed from schedule, t, t_next when not given)
    coefficients: StepCoefficients | None = None
    #: [B, M] divergence of each expert's ODE velocity at (x, t), when the sampler computed it
    #: together with the experts' forward (ODEEstimator.divergence_at)
    divergence: Tensor | None = None
    #: [B, M] b + A kappa: the estimator's linear model at the step's kappa, when the operator
    #: used it and the step is affine in kappa (then x' = sum_j kappa_j x'_j exactly, and an
    #: estimator whose model is exact may take its Delta log q from it without an inner product)
    linear_value: Tensor | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def c(self) -> StepCoefficients:
        if self.coefficients is None:
            self.coefficients = step_coefficients(self.schedule, self.t, self.t_next)
        return self.coefficients

    @property
    def feat_dims(self) -> int:
        return self.x.dim() - 1

    @property
    def dim(self) -> int:
        return math.prod(self.x.shape[1:])

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """<a, b> over the feature dims, accumulated in float64; broadcasts a leading expert axis."""
        return (a * b).sum(dim=tuple(range(-self.feat_dims, 0)), dtype=_F64)

    @property
    def h(self) -> float:
        return self.c.h

    @property
    def scores(self) -> Tensor:  # [M, B, *S]
        if "scores" not in self._cache:
            sx, sp = score_coefficients(self.kind, self.c.alpha, self.c.sigma)
            self._cache["scores"] = affine(self.x, sx, self.cond, sp)
        return self._cache["scores"]

    def dot_cached(self, name: str, a: Callable[[], Tensor], b: Callable[[], Tensor]) -> Tensor:
        if name not in self._cache:
            self._cache[name] = self.dot(a(), b())
        return self._cache[name]

    @property
    def variance(self) -> float:
        return self.integrator.variance_c(self.c)

    @property
    def kernel_means(self) -> Tensor:  # [M, B, *S]: mean of expert i's own reverse kernel
        if "means" not in self._cache:
            self._cache["means"] = self.integrator.mean_c(self.c, self.x, self.cond, self.kind)
        return self._cache["means"]


class Estimator:
    name = "estimator"
    #: integrators this estimator is valid for
    integrators: tuple[type[Integrator], ...] = ()
    #: whether delta needs the divergence of the experts' velocities (a JVP through the network)
    needs_divergence = False
    #: whether its Delta log q can be non-finite (the step's FiniteMonitor watches it)
    needs_check = True

    def begin(self) -> None:
        """Called by `sample` before the first step of a call (per-call choices reset here)."""

    def linear(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(W [M, B, *S], c [B, M]) with Delta log q_i = <x', W_i> + c_i + common."""
        raise NotImplementedError

    def delta(self, ctx: StepContext, x_next: Tensor, **kw) -> Tensor:
        """Delta log q [B, M] for the realised step x -> x_next."""
        raise NotImplementedError


def _posterior_step(ctx: StepContext) -> bool:
    """A step Euler-Maruyama takes with the DDPM posterior kernel (integrators.EulerMaruyama)."""
    return isinstance(ctx.integrator, EulerMaruyama) and EulerMaruyama.posterior_c(ctx.c)


def _zeros(ctx: StepContext) -> Tensor:
    return torch.zeros(ctx.x.shape[0], ctx.cond.shape[0], dtype=_F64, device=ctx.x.device)


class ItoEstimator(Estimator):
    name = "ito"
    integrators = (EulerMaruyama,)

    def _c(self, ctx: StepContext) -> Tensor:
        # (d f + <f x - g2/2 s_i, s_i>) h = (d f + f <x, s_i> - g2/2 <s_i, s_i>) h
        c = ctx.c
        xs = ctx.dot_cached("xs", lambda: ctx.x, lambda: ctx.scores)
        ss = ctx.dot_cached("ss", lambda: ctx.scores, lambda: ctx.scores)
        return ((ctx.dim * c.f + c.f * xs - 0.5 * c.g2 * ss) * c.h).T  # [B, M]

    def linear(self, ctx):
        if _posterior_step(ctx):
            return KernelEstimator().linear(ctx)
        return self.formula_linear(ctx)

    def formula_linear(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """The linear model of 3a itself; where f_t is infinite (alpha_t = 0) only its finite
        expert-dependent part <x' - x, s_i> (the rest is common or O(h))."""
        xs = ctx.dot_cached("xs", lambda: ctx.x, lambda: ctx.scores)
        if not (math.isfinite(ctx.c.f) and math.isfinite(ctx.c.g2)):
            return ctx.scores, -xs.T
        return ctx.scores, self._c(ctx) - xs.T

    def delta(self, ctx, x_next, **kw):
        if _posterior_step(ctx):
            return KernelEstimator().delta(ctx, x_next)
        if not ctx.variance > 0:  # the noise-free final denoise: log q at sigma = 0 is not tracked
            return _zeros(ctx)
        if ctx.linear_value is not None and math.isfinite(ctx.c.f) and math.isfinite(ctx.c.g2):
            return ctx.linear_value  # formula_linear at the step's kappa: the same formula, exactly
        return ctx.dot(x_next.to(ctx.x.dtype) - ctx.x, ctx.scores).T + self._c(ctx)


class KernelEstimator(Estimator):
    name = "kernel"
    integrators = (EulerMaruyama, DDPMAncestral)

    def linear(self, ctx):
        var = ctx.variance
        if not var > 0:  # deterministic final step: no kernel; use the score direction
            return ItoEstimator().formula_linear(ctx)
        m = ctx.kernel_means
        return m / var, (-0.5 * ctx.dot(m, m) / var).T

    def delta(self, ctx, x_next, **kw):
        var = ctx.variance
        if not var > 0:
            # a step to sigma = 0 has no Gaussian kernel: log q is left where it was
            return _zeros(ctx)
        xn = x_next.to(ctx.x.dtype)
        d = ctx.dim
        r_i = xn - ctx.kernel_means
        log_r = -0.5 * ctx.dot(r_i, r_i) / var - 0.5 * d * _log(2 * math.pi * var)
        a, s2 = ctx.c.trans_a, ctx.c.trans_s2
        r = torch.add(ctx.x, xn, alpha=-a)
        log_k = -0.5 * ctx.dot(r, r) / s2 - 0.5 * d * _log(2 * math.pi * s2)
        return (log_r - log_k).T


def divergence(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor, exact: bool) -> Tensor:
    """sum/mean over probes of <z, J_fn(x) z>: fn maps [N, *S] -> [M, N, *S]; probes [P, B, *S].

    Returns [B, M]. exact=True sums over a basis (trace of J), else averages (Hutchinson).
    All probes go through ONE forward-mode JVP on a batch of P * B rows.
    """
    P = probes.shape[0]
    xr = _probe_rows(x, P)
    zr = _as_rows(probes, x)
    try:
        _, jz = torch.func.jvp(fn, (xr,), (zr,))
    except (RuntimeError, NotImplementedError):  # no forward-mode AD for some op: double-backward
        _, jz = torch.autograd.functional.jvp(fn, xr, zr)
    red = _probe_products(jz, zr, P)  # [M, B]
    return (red if exact else red / P).T


def _probe_rows(x: Tensor, P: int) -> Tensor:
    """x [B, *S] once per probe, probe-major [P * B, *S]: x itself for one probe, else a fresh
    tensor (an expanded view would alias its rows at B = 1, which forward-mode AD refuses)."""
    return x if P == 1 else torch.cat([x] * P)


def _as_rows(probes: Tensor, x: Tensor) -> Tensor:
    """The probes [P, B, *S] as probe-major rows [P * B, *S] in x's dtype (a view when they are)."""
    zr = probes.reshape(-1, *x.shape[1:])
    return zr if zr.dtype == x.dtype else zr.to(x.dtype)


def _probe_products(jz: Tensor, zr: Tensor, P: int) -> Tensor:
    """sum over the P probes of <z_p, (J z)_p> [M, B] (float64 sums) from jz [M, P * B, *S]
    and the probes zr [P * B, *S], both probe-major rows (two ops for one probe)."""
    q = (jz * zr).sum(dim=tuple(range(2, jz.dim())), dtype=_F64)  # [M, P * B]
    return q if P == 1 else q.view(q.shape[0], P, -1).sum(1)


_SIGN_TABLES: dict[tuple[str, torch.dtype], Tensor] = {}


def rademacher(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype,
               device: torch.device | str) -> Tensor:
    """Independent +-1 entries with probability 1/2 each (Hutchinson's probes).

    One random byte per 8 entries, looked up in a [256, 8] table of the +-1 patterns of its
    bits (one index_select): about 60% of the time of one integer draw per entry. The bytes
    are drawn on the generator's device (a CPU generator with CUDA latents, diffusers' usual
    setup) and moved to `device`."""
    n = math.prod(shape)
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (bits * 2 - 1).to(device=device, dtype=dtype)
    dev = generator.device if generator is not None else device
    byte = torch.randint(0, 256, (-(-n // 8),), generator=generator, device=dev)
    if byte.device != device:
        byte = byte.to(device)
    signs = _SIGN_TABLES[key].index_select(0, byte)  # [ceil(n / 8), 8]
    return signs.view(shape) if n % 8 == 0 else signs.reshape(-1)[:n].reshape(shape)


def fd_step(model_dtype: torch.dtype, alpha: float, sigma: float) -> float:
    """The finite-difference step sqrt(machine eps of the network's dtype) (1 + sqrt(alpha^2 +
    sigma^2)): the classic sqrt(eps) relative step, scaled by the typical size of an entry of
    x_t = alpha x0 + sigma eps for unit-scale data (a Python number: no tensor op, no host read)."""
    return math.sqrt(torch.finfo(model_dtype).eps) * (1.0 + math.sqrt(alpha * alpha + sigma * sigma))


def _finite_difference_jvp(fn: Callable[[Tensor], Tensor], x: Tensor, z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(fn(x), (fn(x + eps z) - fn(x)) / eps): one extra forward, no autograd."""
    y = fn(x)
    return y, (fn(torch.add(x, z, alpha=eps)) - y) / eps


class ODEEstimator(Estimator):
    """Continuous-change-of-variables estimator for probability-flow ODE samplers.

    probes: "exact" (d JVPs batched; default when d <= 64) or an int number of Rademacher
    probes for Hutchinson's trace estimator.

    The divergence needs J_i z for each expert's network. jvp chooses how, once per sampling
    call (never per step):

    "forward-mode"       one torch.func.jvp over the experts' conditional rows, whose primal
                         output is the step's prediction (no second forward); exact to
                         rounding. Where a network has no forward-mode derivative, the first
                         step says so (a warning) and the call goes on with finite differences.
    "finite-difference"  J z ~ (f(x + eps z) - f(x)) / eps, eps = sqrt(eps_model) (1 + sqrt(alpha^2 + sigma^2))
                         with eps_model the machine epsilon of the coarser of the dtype the
                         experts are fed and the one their networks compute in
                         (ExpertSet.compute_dtype): f(x) is the step's own forward (every row,
                         unconditional included, in one batch)
                         and f(x + eps z) one more forward of the conditional rows. The memory of
                         a forward, and a relative error of O(sqrt(eps_model)), far below the
                         Hutchinson estimator's own noise at image sizes.
    "auto" (default)     finite differences for network experts (ExpertSet.
                         prefers_finite_difference_jvp: NetworkExperts), forward mode otherwise
                         (analytic experts, the exact tests). Measured on a diffusers UNet at
                         4x64x64 (benchmarks/speed.py, docs/performance.md): forward mode took
                         about 10x the network time of a plain forward and 46x diffusers' peak
                         memory, because fused attention kernels have no forward-mode
                         derivative and the math kernel materialises every attention matrix.
    """

    name = "ode"
    integrators = (EulerODE, HeunODE)
    needs_divergence = True
    JVP_MODES = ("auto", "forward-mode", "finite-difference")

    def __init__(self, probes: int | str = "auto", exact_max_dim: int = 64, jvp: str = "auto") -> None:
        if not (probes in ("auto", "exact") or (isinstance(probes, int) and probes >= 1)):
            raise ValueError(f"probes must be 'auto', 'exact' or an int >= 1, got {probes!r}")
        if jvp not in self.JVP_MODES:
            raise ValueError(f"jvp must be one of {', '.join(self.JVP_MODES)}, got {jvp!r}")
        self.probes = probes
        self.exact_max_dim = exact_max_dim
        self.jvp = jvp
        self.jvp_mode: str | None = None  # "forward-mode" or "finite-difference", chosen per call
        self._forward_ok = False

    def begin(self) -> None:
        self.jvp_mode = None
        self._forward_ok = False

    def choose_jvp(self, experts: object) -> str:
        """The call's JVP mode for these experts (see the class docstring); fixed at the first step."""
        if self.jvp_mode is None:
            if self.jvp != "auto":
                self.jvp_mode = self.jvp
            else:
                fd = bool(getattr(experts, "prefers_finite_difference_jvp", False))
                self.jvp_mode = "finite-difference" if fd else "forward-mode"
        return self.jvp_mode

    def divergence_fd(self, fn: Callable[[Tensor], Tensor], x: Tensor, primal: Tensor, c: StepCoefficients,
                      at_next: bool, kind: str, generator: torch.Generator | list[torch.Generator] | None,
                      fd_dtype: torch.dtype) -> Tensor:
        """div [B, M] of each expert's ODE velocity by forward finite differences of fn (x ->
        conditional predictions [M, N, *S]) around its value `primal` [M, B, *S] at x: one
        forward of P * B rows at x + eps z, eps = fd_step(fd_dtype, ...) (a Python number)."""
        probes, exact = self._probes(x, generator)
        P = probes.shape[0]
        zr = _as_rows(probes, x)
        alpha, sigma = (c.alpha_next, c.sigma_next) if at_next else (c.alpha, c.sigma)
        eps = fd_step(fd_dtype, alpha, sigma)
        f1 = fn(torch.add(_probe_rows(x, P), zr, alpha=eps))  # [M, P * B, *S]
        if P == 1:
            diff = f1 - primal  # eps J z
        else:
            M = primal.shape[0]
            diff = (f1.view(M, P, *primal.shape[1:]) - primal[:, None]).view(f1.shape)
        return self._quadratic(diff, zr, P, exact, c, at_next, kind, 1.0 / eps)

    def _quadratic(self, jz: Tensor, zr: Tensor, P: int, exact: bool, c: StepCoefficients, at_next: bool,
                   kind: str, scale: float = 1.0) -> Tensor:
        """[B, M]: the sum (basis probes) or mean (Hutchinson) over the P probes of
        <z, J_v z> = vx |z|^2 + vp <z, J_pred z>, with J_pred z = scale jz (scale = 1 / eps for a
        finite difference's eps J z) and |z|^2 1 for a basis vector, d for a Rademacher probe:
        two ops on [M, B] once the products are summed."""
        if at_next:
            vx, vp = velocity_coefficients(kind, c.alpha_next, c.sigma_next, c.dalpha_next, c.dsigma_next)
        else:
            vx, vp = velocity_coefficients(kind, c.alpha, c.sigma, c.dalpha, c.dsigma)
        red = _probe_products(jz, zr, P)  # [M, B]
        if exact:  # the trace: sum over the d basis vectors, each |z|^2 = 1
            return torch.add(red * (vp * scale), vx * P).T
        return torch.add(red * (vp * scale / P), vx * math.prod(zr.shape[1:])).T

    def _probes(self, x: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> tuple[Tensor, bool]:
        """[P, B, *S] probes: a basis (exact) or Rademacher draws, sample b's from generator[b]
        when a list is given (sampling.probe_generator), else the batch's in one draw."""
        B, d = x.shape[0], math.prod(x.shape[1:])
        exact = self.probes == "exact" or (self.probes == "auto" and d <= self.exact_max_dim)
        if exact:
            eye = torch.eye(d, dtype=x.dtype, device=x.device)  # [d, d]
            return eye[:, None, :].expand(d, B, d).reshape(d, B, *x.shape[1:]), True
        n = 1 if self.probes == "auto" else int(self.probes)
        if isinstance(generator, (list, tuple)):
            return torch.cat([rademacher((n, 1, *x.shape[1:]), g, x.dtype, x.device) for g in generator], 1), False
        return rademacher((n, *x.shape), generator, x.dtype, x.device), False

    def _jvp(self, fn: Callable[[Tensor], Tensor], x: Tensor, z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        if self.jvp_mode != "finite-difference":
            try:
                out = torch.func.jvp(fn, (x,), (z,))
                self.jvp_mode, self._forward_ok = "forward-mode", True
                return out
            except (RuntimeError, NotImplementedError) as e:
                if self._forward_ok:  # it worked earlier in this call: a real error
                    raise
                warnings.warn(f"the ODE estimator's forward-mode JVP is not available for this network "
                              f"({type(e).__name__}: {str(e)[:200]}); using a finite-difference JVP for "
                              "this sampling call", RuntimeWarning, stacklevel=3)
                self.jvp_mode = "finite-difference"
        return _finite_difference_jvp(fn, x, z, eps)

    def divergence_at(self, fn: Callable[[Tensor], Tensor], x: Tensor, c: StepCoefficients, at_next: bool, kind: str,
                      generator: torch.Generator | list[torch.Generator] | None, fd_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(predictions [M, B, *S], div [B, M]) from ONE JVP of fn (x -> the experts' conditional
        predictions [M, N, *S]): the primal output is the predictions at x; the velocity
        v_i = vx x + vp pred_i is affine, so <z, J_v z> = vx |z|^2 + vp <z, J_pred z>.
        fd_dtype: the dtype the finite-difference fallback's step is sized for (default x's)."""
        probes, exact = self._probes(x, generator)
        P = probes.shape[0]
        zr = _as_rows(probes, x)
        alpha, sigma = (c.alpha_next, c.sigma_next) if at_next else (c.alpha, c.sigma)
        primal, jz = self._jvp(fn, _probe_rows(x, P), zr, fd_step(fd_dtype or x.dtype, alpha, sigma))
        cond = primal if P == 1 else primal[:, : x.shape[0]]  # the first probe's rows: x itself
        return cond, self._quadratic(jz, zr, P, exact, c, at_next, kind)

    def velocities(self, c: StepCoefficients, x: Tensor, preds: Tensor, kind: str, at_next: bool = False) -> Tensor:
        return velocity(c, x, preds if preds.dtype == x.dtype else preds.to(x.dtype), kind, at_next)

    def _neg_rate(self, ctx: StepContext, x: Tensor, at_next: bool, preds: Tensor,
                  predict_fn: Callable[[Tensor], Tensor] | None, u: Tensor, div: Tensor | None = None) -> Tensor:
        """div_i + <s_i, v_i - u> [B, M]: minus d/dt log q_i at (x, t) (t_next when at_next)
        moving with velocity u."""
        c = ctx.c
        v = self.velocities(c, x, preds, ctx.kind, at_next)  # [M, B, *S]
        a, s_ = (c.alpha_next, c.sigma_next) if at_next else (c.alpha, c.sigma)
        sx, sp = score_coefficients(ctx.kind, a, s_)
        s = affine(x, sx, preds.to(x.dtype), sp)
        if div is None:
            if predict_fn is None:
                raise ValueError("the ODE estimator needs the experts' predictions as a function of x (predict_fn)")
            _, div = self.divergence_at(predict_fn, x, c, at_next, ctx.kind, ctx.generator)
        return torch.add(ctx.dot(s, v.sub_(u.to(x.dtype))).T, div)

    def _hv_minus_x(self, ctx: StepContext) -> Tensor:
        """h v_i - x [M, B, *S] at (x, t) (v_i = vx x + vp pred_i: one affine map), once per step."""
        if "hv-x" not in ctx._cache:
            c = ctx.c
            vx, vp = velocity_coefficients(ctx.kind, c.alpha, c.sigma, c.dalpha, c.dsigma)
            ctx._cache["hv-x"] = affine(ctx.x, c.h * vx - 1.0, ctx.cond, c.h * vp)
        return ctx._cache["hv-x"]

    def linear(self, ctx):
        # -h rate at (x, t) with u = (x' - x) / (-h):  h div_i + <s_i, h v_i - x> + <s_i, x'>
        # (one inner product over the latent for h <s_i, v_i> - <s_i, x>)
        return ctx.scores, torch.add(ctx.dot(ctx.scores, self._hv_minus_x(ctx)).T, self._div(ctx), alpha=ctx.h)

    def _div(self, ctx: StepContext) -> Tensor:
        if ctx.divergence is None:
            if ctx.predict_fn is None:
                raise ValueError("the ODE estimator needs the experts' predictions as a function of x (predict_fn)")
            _, ctx.divergence = self.divergence_at(ctx.predict_fn, ctx.x, ctx.c, False, ctx.kind, ctx.generator)
        return ctx.divergence

    def delta(self, ctx, x_next, heun: "HeunStage | None" = None, **kw):
        """Euler: -h * rate(x, t, u), u = (x' - x)/(t' - t). Heun: the trapezoid of the rates at
        (x, t) and at the Euler point (x_e, t'), each with the velocity actually used there."""
        x_first = x_next if heun is None else heun.x_euler
        x_first = x_first if x_first.dtype == ctx.x.dtype else x_first.to(ctx.x.dtype)
        # -h r0 with r0 = -div - <s, v - u0>, u0 = (x_first - x) / (-h):
        #   h div + <s, h v + (x_first - x)>   (linear's model at x' = x_first; the increment is
        #   formed before the inner product, which would otherwise cancel two large ones)
        if ctx.linear_value is not None:  # linear()'s model at x' = x_first, which it is exact for
            d0 = ctx.linear_value
        else:
            d0 = torch.add(ctx.dot(ctx.scores, self._hv_minus_x(ctx) + x_first).T, self._div(ctx), alpha=ctx.h)
        if heun is None:
            return d0
        # the trapezoid (-h r0 - h r1) / 2 with -h r0 = d0
        neg_r1 = self._neg_rate(ctx, heun.x_euler.to(ctx.x.dtype), True, heun.cond, heun.predict_fn, heun.velocity,
                                heun.divergence)
        return torch.add(d0, neg_r1, alpha=ctx.h).mul_(0.5)


@dataclass
class HeunStage:
    """The second evaluation of a Heun step: experts at the Euler point (x_e, t')."""

    x_euler: Tensor  # [B, *S]
    cond: Tensor  # [M, B, *S] unguided predictions at (x_e, t')
    predict_fn: Callable[[Tensor], Tensor] | None  # x -> [M, B, *S] at t'
    velocity: Tensor  # [B, *S] combined velocity used at (x_e, t')
    divergence: Tensor | None = None  # [B, M] at (x_e, t'), when computed with the forward


class NullEstimator(Estimator):
    """No log-density tracking: Delta log q = 0 (valid with every integrator).

    For operators whose kappa ignores log q ("single", "average"); the trace then keeps
    the shared prior value for every expert.
    """

    name = "none"
    integrators = (Integrator,)
    needs_check = False

    def linear(self, ctx):
        raise ValueError("estimator 'none' cannot drive the AND operator, which needs log-density "
                         "changes; use 'kernel', 'ito' or 'ode'")

    def begin(self) -> None:
        self._zero = None

    def delta(self, ctx, x_next, **kw):
        """Zeros [B, M], made once per call (nothing updates them in place)."""
        z = getattr(self, "_zero", None)
        if z is None or z.shape != (ctx.x.shape[0], ctx.cond.shape[0]) or z.device != ctx.x.device:
            z = self._zero = _zeros(ctx)
        return z


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
