"""One SuperDiff step, written once and used by the sampler, every pipeline, the CLI, the UI
and the benchmarks (superdiff-math.md, sections 2-4).

    1. experts at (x, t): conditional c_i [M, B, *S] (+ unconditional u_i); with the ODE
       estimator the conditional rows go through ONE forward-mode JVP whose primal output is
       c_i (the unconditional rows, which no estimator uses, go through a plain forward)
    2. guided per-expert predictions  p_i = u_i + w (c_i - u_i)   (p_i = c_i without guidance)
    3. the step's noise z (drawn before kappa: AND needs the would-be increment)
    4. kappa = operator(log q, linear model of Delta log q in kappa)
    5. combined prediction  p = sum_i kappa_i p_i + (1 - sum_i kappa_i) ref
       (ref = the shared unconditional prediction, else the zero-score "null" prediction;
       with a shared u this is Composable Diffusion's u + w sum_i kappa_i (c_i - u))
    6. x' = integrator mean(p) + sqrt(var) z   (Heun: corrector at the Euler point)
    7. log q_i += estimator Delta log q_i, from each expert's own (unguided) prediction

The hot path has no host-device synchronisation: the schedule's scalars come precomputed
as Python floats (superdiff.coefficients), Python branches only look at those and at the
operator's static properties, and non-finite values are recorded on the device by a
`FiniteMonitor` that `sample` reads once, after the loop. Latents and predictions stay in
the sampling dtype; the per-sample scalars (inner products, log q, kappa) are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .coefficients import StepCoefficients, step_coefficients
from .estimators import Estimator, HeunStage, StepContext
from .experts import ExpertOutput, ExpertSet, coarsest_dtype
from .integrators import HeunODE, Integrator, velocity
from .operators import Operator, StepState
from .predictions import null_prediction
from .schedules import Schedule

Tensor = torch.Tensor
_F64 = torch.float64
Generator = torch.Generator | Sequence[torch.Generator] | None

__all__ = ["StepOutput", "FiniteMonitor", "superdiff_step", "guided", "combine", "randn", "null_reference_error"]

def randn(shape: Sequence[int], generator: Generator, dtype: torch.dtype = torch.float32,
          device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise; a list of generators draws row b with generator b (diffusers'
    convention, so that a batch equals separate calls with the same generators)."""
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per sample")
        rows = [randn((1, *shape[1:]), g, dtype, device) for g in generator]
        return torch.cat(rows, 0)
    gen_dev = generator.device if generator is not None else device
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=gen_dev)
    return z.to(device)


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in dtype, without an op when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


def guided(out: ExpertOutput, guidance_scale: float) -> Tensor:
    """Per-expert classifier-free-guided predictions p_i = u_i + w (c_i - u_i), [M, B, *S] (a
    shared u [B, *S] broadcasts over the expert axis)."""
    if out.uncond is None:
        return out.cond
    return torch.lerp(out.uncond, out.cond, guidance_scale)  # u + w (c - u) in one op


def combine(preds: Tensor, kappa: Tensor, ref: Tensor | None) -> Tensor:
    """sum_i kappa_i preds_i + (1 - sum_i kappa_i) ref: preds [M, B, *S], kappa [B, M].

    ref=None: the weights sum to one (an affine operator) and the rest term is dropped.
    In the predictions' dtype (kappa is cast to it)."""
    # one bmm: [B, 1, M] by [B, M, d]
    out = torch.bmm(kappa.to(preds.dtype)[:, None], preds.flatten(2).transpose(0, 1)).reshape(preds.shape[1:])
    if ref is None:
        return out
    rest = (1.0 - kappa.sum(-1)).to(preds.dtype).reshape(-1, *([1] * (preds.dim() - 2)))
    return out + rest * _as(ref, preds.dtype)


class FiniteMonitor:
    """Records on the device whether each source produced NaN/inf, and reads it once at the end.

    Sources: experts 0..M-1, the unconditional branch, the estimator, the experts'
    evaluations of an MCMC corrector after the step (superdiff.correctors), and the latents
    after the last step. Per step and source one
    sum of its values is kept (a device tensor: nothing is read back; the sum is non-finite
    when a value is). `check` concatenates them, makes the one host read, and raises the error
    naming the first source and step.
    """

    def __init__(self, num_experts: int, device: torch.device | str, estimator: str = "estimator",
                 expert_ids: Sequence[int] | None = None) -> None:
        self.num_experts = num_experts
        self.estimator = estimator
        self.expert_ids = list(expert_ids) if expert_ids is not None else None  # names in the errors
        self._sums: list[Tensor] = []
        self._where: list[tuple[int, int, int]] = []  # (step, first source, number of sources)
        self.times: dict[int, tuple[float, float]] = {}

    def _record(self, lo: int, sums: Tensor, step: int) -> None:
        self._sums.append(sums)
        self._where.append((step, lo, 1 if sums.dim() == 0 else sums.shape[0]))

    def experts(self, out: ExpertOutput, step: int, t: float, t_next: float) -> None:
        """One op per tensor: the sum over all but the expert axis (a 0-d sum for a shared uncond)."""
        self.times[step] = (t, t_next)
        if out.stacked is not None:  # [experts | shared uncond] in one tensor: one sum
            self._record(0, out.stacked.sum(dim=tuple(range(1, out.stacked.dim()))), step)
            return
        self._record(0, out.cond.sum(dim=tuple(range(1, out.cond.dim()))), step)
        if out.uncond is not None:
            u = out.uncond
            self._record(self.num_experts, u.sum(), step)

    def delta(self, delta: Tensor, step: int) -> None:
        self._record(self.num_experts + 1, delta.sum(), step)

    def output(self, x: Tensor, step: int) -> None:
        """The latents after the last step (once per call): non-finite values that no expert or
        estimator produced (e.g. from the combination itself) are not returned silently."""
        self._record(self.num_experts + 3, x.sum(dtype=torch.promote_types(x.dtype, torch.float32)), step)

    def corrector(self, cond: Tensor, step: int) -> None:
        """An MCMC corrector's evaluation of the experts at the end of step `step` (at t_next)."""
        self._record(self.num_experts + 2, cond.sum(), step)

    def check(self) -> None:
        """Raise ValueError for the earliest non-finite value recorded (one host read)."""
        if not self._sums:
            return
        finite = torch.isfinite(torch.cat([v.reshape(-1) for v in self._sums])).tolist()  # dtypes promote
        self._sums = []
        bad, pos = [], 0
        for step, lo, n in self._where:
            bad += [(step, lo + i) for i in range(n) if not finite[pos + i]]
            pos += n
        self._where = []
        if not bad:
            return
        step, src = min(bad)
        t, tn = self.times.get(step, (float("nan"), float("nan")))
        if src < self.num_experts:
            src = self.expert_ids[src] if self.expert_ids is not None else src
            raise ValueError(f"expert {src} returned non-finite values (NaN/inf) at step {step} "
                             f"(t={t:g}); check the model, its dtype and the schedule")
        if src == self.num_experts:
            raise ValueError(f"the unconditional branch returned non-finite values at step {step} (t={t:g})")
        if src == self.num_experts + 3:
            raise ValueError(f"the sampled latents are non-finite (NaN/inf) after step {step} (t={tn:g}), although "
                             "the experts' outputs were finite: the combination of their predictions is undefined "
                             "on this grid; check the operator's weights and the time grid")
        if src == self.num_experts + 2:
            raise ValueError(f"an expert returned non-finite values during the MCMC corrector after step {step} "
                             f"(t={tn:g}); lower the corrector's step_scale or check the model")
        raise ValueError(f"the {self.estimator!r} estimator produced non-finite log-density changes at "
                         f"step {step} (t={t:g} -> {tn:g}); the grid may reach a point "
                         "where this estimator is undefined (e.g. sigma = 0): end the grid at sigma_min "
                         "(grid end='min') or use another estimator")


@dataclass
class StepOutput:
    x_next: Tensor  # [B, *S] in the sampling dtype
    kappa: Tensor  # [B, M] float64
    delta_logq: Tensor  # [B, M] float64
    pred: Tensor  # [B, *S] combined prediction used for the step (native kind)
    cond: Tensor  # [M, B, *S] each expert's own prediction at (x, t)


def _forward(experts: ExpertSet, x: Tensor, t: Tensor, schedule: Schedule, model_dtype: torch.dtype) -> ExpertOutput:
    """Every row (conditional and unconditional) in one forward, back in x's dtype."""
    out = experts.evaluate(experts.model_input(x, model_dtype), t, schedule)
    if out.cond.dtype == x.dtype and (out.uncond is None or out.uncond.dtype == x.dtype):
        return out
    if out.stacked is not None:
        s = _as(out.stacked, x.dtype)
        return ExpertOutput(s[:-1], s[-1], out.kind, s)
    return ExpertOutput(_as(out.cond, x.dtype), None if out.uncond is None else _as(out.uncond, x.dtype), out.kind)


def _evaluate(experts: ExpertSet, estimator: Estimator, x: Tensor, t: Tensor, at_next: bool,
              c: StepCoefficients, schedule: Schedule, model_dtype: torch.dtype,
              generator: torch.Generator | None) -> tuple[ExpertOutput, Tensor | None]:
    """The experts at (x, t) and, when the estimator needs it, the divergence of each expert's
    ODE velocity there ([B, M]): by finite differences around the step's own forward, or from
    the primal output of one forward-mode JVP (ODEEstimator.choose_jvp)."""
    if not estimator.needs_divergence:
        return _forward(experts, x, t, schedule, model_dtype), None

    def fn(xx: Tensor) -> Tensor:
        return _as(experts.evaluate_conditional(_as(xx, model_dtype), t, schedule), xx.dtype)

    fd_dtype = coarsest_dtype(model_dtype, experts.compute_dtype)  # what a finite difference's step is sized for
    if estimator.choose_jvp(experts) == "finite-difference":
        # the step's own forward (every row) is f(x); one more forward of the conditional rows
        # at x + eps z gives the directional derivative
        out = _forward(experts, x, t, schedule, model_dtype)
        return out, estimator.divergence_fd(fn, x, out.cond, c, at_next, out.kind, generator, fd_dtype)
    cond, div = estimator.divergence_at(fn, x, c, at_next, experts.prediction_type, generator, fd_dtype)
    uncond = None
    if experts.has_uncond:
        uncond = experts.evaluate_unconditional(_as(x, model_dtype), t, schedule)
        uncond = None if uncond is None else _as(uncond, x.dtype)
    return ExpertOutput(cond, uncond, experts.prediction_type), div


def null_reference_error(operator: str, t: float) -> str:
    return (f"operator {operator!r} weighs the experts with weights that need not sum to one, completed by "
            f"the zero-score prediction, which is undefined at t={t:g}, where alpha_t = 0 (pure noise), "
            "without a shared unconditional branch: start the grid below that point (e.g. timesteps from "
            "0.999, RectifiedFlow(t_max=0.999)), use weights that sum to one, or add a shared unconditional "
            "branch (classifier-free guidance)")


def _reference(operator: Operator, out: ExpertOutput, kind: str, x: Tensor, alpha: float, sigma: float,
               t: float) -> Tensor | None:
    """The prediction completing weights that need not sum to one (None for affine operators):
    the shared unconditional prediction, else the zero-score one (undefined at alpha = 0)."""
    if operator.affine:
        return None
    if out.uncond is not None and out.uncond.dim() < out.cond.dim():
        return out.uncond
    if alpha == 0.0 and kind != "epsilon":
        raise ValueError(null_reference_error(operator.name, t))
    return null_prediction(kind, x, alpha, sigma)


def superdiff_step(
    experts: ExpertSet,
    schedule: Schedule,
    integrator: Integrator,
    operator: Operator,
    estimator: Estimator,
    x: Tensor,
    t: Tensor,
    t_next: Tensor,
    logq: Tensor,
    step: int,
    num_steps: int,
    generator: Generator = None,
    guidance_scale: float = 1.0,
    noise_dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype = torch.float32,
    *,
    coefficients: StepCoefficients | None = None,
    monitor: FiniteMonitor | None = None,
    probe_generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    """Advance x [B, *S] from t to t_next; see the module docstring.

    probe_generator: draws the ODE estimator's Hutchinson probes (sampling.probe_generator: one
    per sample with a list of generators); without it the one generator does, if one was given.
    coefficients: this step's schedule scalars (superdiff.coefficients.grid_coefficients, as
    `sample` passes them); computed and checked here when not given. monitor: where non-finite
    values are recorded; without one, they are checked (one host read) before returning.
    """
    c = coefficients
    if c is None:
        c = step_coefficients(schedule, t, t_next)
        integrator.check_coefficients(c)
    own = monitor is None
    if own:
        monitor = FiniteMonitor(experts.num_experts, x.device, estimator.name)
    # the estimator's random probes: the call's probe generator(s), else its one generator
    gen1 = probe_generator if probe_generator is not None else (
        generator if isinstance(generator, torch.Generator) else None)
    out, div = _evaluate(experts, estimator, x, t, False, c, schedule, model_dtype, gen1)
    monitor.experts(out, step, c.t, c.t_next)
    kind = out.kind
    preds = guided(out, guidance_scale)  # [M, B, *S]

    def predict_fn_at(tt: Tensor):
        return lambda xx: experts.evaluate_conditional(xx.to(model_dtype), tt, schedule).to(xx.dtype)

    ctx = StepContext(schedule, integrator, t, t_next, x, out.cond, kind, predict_fn=predict_fn_at(t),
                      generator=gen1, coefficients=c, divergence=div)
    var = integrator.variance_c(c)
    noise = None
    if integrator.stochastic and var > 0:
        noise = _as(randn(x.shape, generator, noise_dtype, x.device), x.dtype) * math.sqrt(var)

    model: list[tuple[Tensor, Tensor]] = []

    def linear_model() -> tuple[Tensor, Tensor]:
        W, b = estimator.linear(ctx)
        props = integrator.mean_c(c, x, preds, kind)  # [M, B, *S]: x' if expert j alone drove the step
        if noise is not None:
            props = props + noise
        # A[b, i, j] = <x'_j[b], W_i[b]>: one float64 bmm of [B, M, d] by [B, d, M]
        A = torch.bmm(W.flatten(2).transpose(0, 1).to(_F64), props.flatten(2).permute(1, 2, 0).to(_F64))
        model.append((A, b))
        return A, b

    kappa = operator.kappa(StepState(logq.to(_F64), step, num_steps,
                                     linear_model if operator.needs_linear_model else None))
    if model and operator.affine:
        # the step is affine in kappa (x' = sum_j kappa_j x'_j): the linear model at the chosen
        # kappa is Delta log q (up to the common term) of the step actually taken, one [B, M] op
        A, b = model[0]
        ctx.linear_value = torch.baddbmm(b.unsqueeze(-1), A, kappa.unsqueeze(-1)).squeeze(-1)
    ref = _reference(operator, out, kind, x, c.alpha, c.sigma, c.t)
    pred = combine(preds, kappa, ref)
    x_next = integrator.mean_c(c, x, pred, kind)
    if noise is not None:
        x_next = x_next + noise

    heun = None
    if isinstance(integrator, HeunODE) and c.sigma_next > 0:
        x_e = x_next
        out2, div2 = _evaluate(experts, estimator, x_e, t_next, True, c, schedule, model_dtype, gen1)
        monitor.experts(out2, step, c.t, c.t_next)
        ref2 = None if ref is None else _reference(operator, out2, kind, x_e, c.alpha_next, c.sigma_next, c.t_next)
        pred2 = combine(guided(out2, guidance_scale), kappa, ref2)
        v_next = velocity(c, x_e, pred2, kind, at_next=True)
        x_next = integrator.correct_v(c, x, x_e, v_next)
        heun = HeunStage(x_e, out2.cond, predict_fn_at(t_next), v_next, divergence=div2)

    delta = estimator.delta(ctx, x_next, heun=heun)
    if estimator.needs_check:
        monitor.delta(delta, step)
    if own:
        monitor.check()
    return StepOutput(x_next, kappa, delta, pred, out.cond)
