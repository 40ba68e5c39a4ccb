"""One SuperDiff step, written once and used by the sampler, every pipeline, the CLI, the UI
and the benchmarks (superdiff-math.md, sections 2-4).

    1. experts at (x, t): conditional c_i [M, B, *S] (+ unconditional u_i)
    2. guided per-expert predictions  p_i = u_i + w (c_i - u_i)   (p_i = c_i without guidance)
    3. the step's noise z (drawn before kappa: AND needs the would-be increment)
    4. kappa = operator(log q, linear model of Delta log q in kappa)
    5. combined prediction  p = sum_i kappa_i p_i + (1 - sum_i kappa_i) ref
       (ref = the shared unconditional prediction, else the zero-score "null" prediction;
       with a shared u this is Composable Diffusion's u + w sum_i kappa_i (c_i - u))
    6. x' = integrator mean(p) + sqrt(var) z   (Heun: corrector at the Euler point)
    7. log q_i += estimator Delta log q_i, from each expert's own (unguided) prediction
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .estimators import Estimator, HeunStage, StepContext
from .experts import ExpertOutput, ExpertSet
from .integrators import HeunODE, Integrator, ode_velocity
from .operators import Operator, StepState
from .predictions import null_prediction
from .schedules import Schedule

Tensor = torch.Tensor
_F64 = torch.float64
Generator = torch.Generator | Sequence[torch.Generator] | None

__all__ = ["StepOutput", "superdiff_step", "guided", "combine", "randn"]


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


def guided(out: ExpertOutput, guidance_scale: float) -> Tensor:
    """Per-expert classifier-free-guided predictions [M, B, *S]."""
    if out.uncond is None:
        return out.cond
    u = out.uncond if out.uncond.dim() == out.cond.dim() else out.uncond.unsqueeze(0)
    return u + guidance_scale * (out.cond - u)


def combine(preds: Tensor, kappa: Tensor, ref: Tensor | None) -> Tensor:
    """sum_i kappa_i preds_i + (1 - sum_i kappa_i) ref, in float64: preds [M, B, *S], kappa [B, M]."""
    k = kappa.to(_F64).T.reshape(kappa.shape[1], kappa.shape[0], *([1] * (preds.dim() - 2)))
    out = (k * preds.to(_F64)).sum(0)
    rest = 1.0 - kappa.to(_F64).sum(-1)
    if torch.any(rest.abs() > 1e-12):
        if ref is None:
            raise ValueError("weights that do not sum to one need a reference prediction")
        out = out + rest.reshape(-1, *([1] * (preds.dim() - 2))) * ref.to(_F64)
    return out


@dataclass
class StepOutput:
    x_next: Tensor  # [B, *S] float64
    kappa: Tensor  # [B, M] float64
    delta_logq: Tensor  # [B, M] float64
    pred: Tensor  # [B, *S] combined prediction used for the step (native kind)
    cond: Tensor  # [M, B, *S] each expert's own prediction at (x, t)


def _evaluate(experts: ExpertSet, x: Tensor, t: Tensor, schedule: Schedule, model_dtype: torch.dtype,
              step: int) -> ExpertOutput:
    out = experts.evaluate(x.to(model_dtype), t, schedule)
    for i in range(out.cond.shape[0]):
        if not torch.isfinite(out.cond[i]).all():
            raise ValueError(f"expert {i} returned non-finite values (NaN/inf) at step {step} "
                             f"(t={float(t):g}); check the model, its dtype and the schedule")
    if out.uncond is not None and not torch.isfinite(out.uncond).all():
        raise ValueError(f"the unconditional branch returned non-finite values at step {step} (t={float(t):g})")
    return out


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
) -> StepOutput:
    """Advance x [B, *S] (float64) from t to t_next; see the module docstring."""
    integrator.check(schedule, t, t_next)
    x = x.to(_F64)
    out = _evaluate(experts, x, t, schedule, model_dtype, step)
    kind = out.kind
    preds = guided(out, guidance_scale)  # [M, B, *S]

    def predict_fn_at(tt: Tensor):
        return lambda xx: experts.evaluate(xx.to(model_dtype), tt, schedule).cond.to(xx.dtype)

    ctx = StepContext(schedule, integrator, t, t_next, x, out.cond, kind,
                      predict_fn=predict_fn_at(t),
                      generator=generator if isinstance(generator, torch.Generator) else None)
    var = integrator.variance(schedule, t, t_next).to(_F64)
    noise = None
    if integrator.stochastic and float(var) > 0:
        noise = randn(x.shape, generator, noise_dtype, x.device).to(_F64) * var.sqrt()

    def proposals() -> Tensor:  # [M, B, *S]: x' if expert j alone drove the step (same noise)
        means = torch.stack([integrator.mean(schedule, x, t, t_next, p.to(_F64), kind) for p in preds])
        return means if noise is None else means + noise[None]

    def linear_model() -> tuple[Tensor, Tensor]:
        W, c = estimator.linear(ctx)
        props = proposals()
        # A[b, i, j] = <x'_j[b], W_i[b]>
        A = torch.einsum("jbd,ibd->bij", props.flatten(2).to(_F64), W.flatten(2).to(_F64))
        return A, c

    kappa = operator.kappa(StepState(logq.to(_F64), step, num_steps,
                                     linear_model if operator.needs_linear_model else None))
    ref = None
    if torch.any((1.0 - kappa.sum(-1)).abs() > 1e-12):
        if out.uncond is not None and out.uncond.dim() < out.cond.dim():
            ref = out.uncond
        else:
            ref = null_prediction(kind, x, schedule.alpha(t), schedule.sigma(t))
    pred = combine(preds, kappa, ref)
    x_next = integrator.mean(schedule, x, t, t_next, pred, kind)
    if noise is not None:
        x_next = x_next + noise

    heun = None
    if isinstance(integrator, HeunODE) and integrator.needs_corrector(schedule, t_next):
        x_e = x_next
        out2 = _evaluate(experts, x_e, t_next, schedule, model_dtype, step)
        preds2 = guided(out2, guidance_scale)
        ref2 = None
        if ref is not None:
            ref2 = out2.uncond if (out2.uncond is not None and out2.uncond.dim() < out2.cond.dim()) \
                else null_prediction(kind, x_e, schedule.alpha(t_next), schedule.sigma(t_next))
        pred2 = combine(preds2, kappa, ref2)
        x_next = integrator.correct(schedule, x, t, t_next, pred, pred2, x_e, kind)
        heun = HeunStage(x_e, out2.cond, predict_fn_at(t_next), ode_velocity(schedule, x_e, t_next, pred2, kind))

    delta = estimator.delta(ctx, x_next, heun=heun)
    if not torch.isfinite(delta).all():
        raise ValueError(f"the {estimator.name!r} estimator produced non-finite log-density changes at "
                         f"step {step} (t={float(t):g} -> {float(t_next):g}); the grid may reach a point "
                         "where this estimator is undefined (e.g. sigma = 0): end the grid at sigma_min "
                         "(grid end='min') or use another estimator")
    return StepOutput(x_next, kappa, delta, pred, out.cond)
