"""The sampling entry point: loop(integrator, operator, estimator) over a time grid.

    out = sample(experts, schedule, num_steps=100, operator="or", estimator="kernel",
                 integrator="em", shape=(B, d), generator=torch.Generator().manual_seed(0))
    out.samples   # [B, *S]
    out.trace     # kappa and log q per step, sample and expert (superdiff.trace.Trace)

Every step is `superdiff.step.superdiff_step`, the same code the pipelines use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .coefficients import grid_coefficients
from .correctors import split_corrected
from .estimators import Estimator, check_pair, make_estimator
from .experts import Expert, ExpertSet, as_expert_set
from .integrators import Integrator, make_integrator
from .operators import Operator, SingleOperator, StepState, make_operator
from .schedules import Schedule
from .step import FiniteMonitor, Generator, StepOutput, null_reference_error, randn, superdiff_step
from .trace import Trace, stack_steps

Tensor = torch.Tensor
_F64 = torch.float64

__all__ = ["SampleOutput", "StepInfo", "StopSampling", "sample", "prior_log_prob", "probe_generator", "DEFAULT_ESTIMATOR", "default_estimator",
           "DEFAULT_INTEGRATOR", "default_integrator"]

#: chosen from benchmarks/estimator_accuracy (README; flow rows: docs/flow.md): with
#: Euler-Maruyama the Ito estimator had the smaller error at every step count measured on
#: the VE schedule and on the rectified flow from t = 1; the kernel ratio is the one valid
#: choice for the DDPM step (and stays finite at alpha = 0); ODE integrators need "ode"
DEFAULT_ESTIMATOR = {"em": "ito", "ddpm": "kernel", "euler": "ode", "heun": "ode"}

#: per schedule family (Schedule.name): Euler-Maruyama with the Ito estimator everywhere.
#: On the rectified flow from t = 1 (docs/flow.md) Ito + EM was the most accurate of the pairs
#: that need only network evaluations, at every step count (kernel + EM 1.5-3x, DDPM + kernel
#: 20-2000x its error). The ODE estimator was more accurate still, on flows and on VE alike,
#: even with one Hutchinson probe (d = 64), but needs a Jacobian-vector product through the
#: network every step, and its probe noise at image sizes is not measured; it stays opt-in.
DEFAULT_INTEGRATOR = {"vp": "em", "ve": "em", "flow": "em"}


def default_estimator(integrator: Integrator) -> str:
    """The measured-best valid estimator for an integrator (see DEFAULT_ESTIMATOR)."""
    return DEFAULT_ESTIMATOR.get(integrator.name, "ode" if not integrator.stochastic else "kernel")


def default_integrator(schedule: Schedule) -> str:
    """The measured-best integrator for a schedule family (see DEFAULT_INTEGRATOR)."""
    return DEFAULT_INTEGRATOR.get(getattr(schedule, "name", ""), "em")


@dataclass
class SampleOutput:
    samples: Tensor  # [B, *S]
    trace: Trace
    logq: Tensor  # [B, M] float64, tracked log q_i at the final sample


@dataclass
class StepInfo:
    """Passed to `callback` after every step. kappa and logq are the tensors the trace keeps (and
    kappa may be reused by the next step): read them, do not modify them in place. Under the
    operator "single" (one expert evaluated) kappa and logq are widened to all M experts, while
    `output` is that one expert's step."""

    step: int
    t: float
    t_next: float
    x: Tensor  # [B, *S] after the step (float64)
    kappa: Tensor  # [B, M]
    logq: Tensor  # [B, M] after the step
    output: StepOutput


class StopSampling(Exception):
    """Raised by a `sample` callback to end sampling after the current step (diffusers'
    `pipe._interrupt`): `sample` returns the latents reached (`latents`, when given, replace
    them) with the trace of the steps taken, correctors finished as after a full run."""

    def __init__(self, latents: Tensor | None = None) -> None:
        super().__init__("sampling stopped by the callback")
        self.latents = latents


def probe_generator(generator: Generator) -> torch.Generator | list[torch.Generator] | None:
    """The generator(s) of the ODE estimator's random probes for one call, seeded from the
    call's generators (nothing is drawn from those, whose streams stay as they are).

    One generator gives one probe generator (the batch's probes in one draw); a list (one per
    sample, diffusers' convention) gives one per sample, drawing that sample's probes alone,
    so that a batch equals separate calls with the same generators: sample b's probe
    generator is seeded from its generator's initial seed and from how many earlier rows
    share that same generator object (a generator repeated in the list, or an image's
    particles, then draw in turn as the generator itself would). None: torch's global generator."""
    if generator is None:
        return None
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    out, seen = [], {}
    for g in gens:
        j = seen.get(id(g), 0)
        seen[id(g)] = j + 1
        seed = ((g.initial_seed() + 0x9E3779B97F4A7C15 * j) * 6364136223846793005 + 1442695040888963407) % (2**63)
        out.append(torch.Generator(device=g.device).manual_seed(seed))
    return out if isinstance(generator, (list, tuple)) else out[0]


def prior_log_prob(x: Tensor, schedule: Schedule, t: Any = None) -> Tensor:
    """log N(x; 0, prior_std^2 I) per sample: the shared starting value of every log q_i."""
    std = float(schedule.prior_std(t))
    d = x[0].numel()
    xf = x.to(_F64).reshape(x.shape[0], -1)
    return -0.5 * (xf**2).sum(-1) / std**2 - 0.5 * d * math.log(2 * math.pi * std**2)


def sample(
    experts: ExpertSet | Expert | Sequence[Expert],
    schedule: Schedule,
    num_steps: int = 100,
    *,
    operator: str | Operator = "or",
    estimator: str | Estimator | None = None,
    integrator: str | Integrator | None = None,
    shape: Sequence[int] | None = None,
    latents: Tensor | None = None,
    generator: Generator = None,
    guidance_scale: float = 1.0,
    timesteps: Tensor | Sequence[float] | None = None,
    grid_end: str = "zero",
    logq_init: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    expert_names: Sequence[str] | None = None,
    progress: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
    corrector: Any = None,
) -> SampleOutput:
    """Sample a superposition of experts.

    experts: an ExpertSet (M experts evaluated together) or a list of Experts.
    operator: "or", "and", "average", "single" or an Operator instance with its parameters.
    estimator: default "ito" with "em", "kernel" with "ddpm", "ode" with "euler"/"heun".
    integrator: "em" (alias "sde"), "ddpm", "euler" (alias "ode"), "heun"; default per
        schedule family, DEFAULT_INTEGRATOR ("em" for all three). On a rectified flow "em"
        starts at t = 1 with posterior steps (integrators.EulerMaruyama).
    shape / latents: the batch shape [B, *S], or x_T itself (in the schedule's coordinates:
        x_T ~ N(0, prior_std^2 I), e.g. sqrt(1 + sigma_max^2) in the VE form).
    generator: a torch.Generator, or one per sample (row b uses generator b).
    timesteps: a custom decreasing time grid (overrides num_steps and grid_end).
    grid_end: "zero" (end noise-free, as diffusers) or "min" (end at the smallest trained
        noise level, where every estimator is defined).
    logq_init: [B, M] starting log-densities (default: the shared prior for every expert); not
        with SMC (particles > 1), whose extra particles start from the prior.
    dtype: dtype of the noise draws and of the returned samples; model_dtype: what the
        experts are fed (default dtype). Kappa and log q arithmetic is always float64.
    callback: called with a StepInfo after every step; it may return a tensor that replaces
        x (the latents) for the next step, or None.
    corrector: particle (SMC / Feynman-Kac) and MCMC correctors after each step
        (superdiff.correctors.make_corrector: "smc:8", "ula", "smc:8+hmc", a dict or a Corrector);
        K particles per sample go through the same batched forward, one is returned per sample.
    """
    es = as_expert_set(experts)
    M = es.num_experts
    op, corr = split_corrected(make_operator(operator), corrector)  # an operator may carry its corrector
    op.validate(M)
    integ = make_integrator(integrator if integrator is not None else default_integrator(schedule))
    est = make_estimator(estimator if estimator is not None else default_estimator(integ))
    check_pair(est, integ)
    if corr is not None:
        corr.check(op, integ, M, has_uncond=es.has_uncond)
        if corr.smc and logq_init is not None:
            raise ValueError(f"logq_init cannot be combined with SMC (particles={corr.particles}): the K - 1 extra "
                             "particles per sample are fresh draws from the prior, where the given log q values "
                             "do not hold, and the initial weights would mix the two conventions. Leave "
                             "logq_init out (every particle starts from the shared prior), or use particles=1")
    if est.name == "none" and op.needs_logq:
        raise ValueError(f"operator {op.name!r} needs log-density tracking; estimator 'none' tracks nothing. "
                         "Use 'ito', 'kernel' or 'ode'")
    if not math.isfinite(float(guidance_scale)):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    if guidance_scale != 1.0 and not es.has_uncond:
        raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional branch, and these "
                         "experts have none; use guidance_scale=1.0 or add an unconditional condition")
    if timesteps is not None:
        grid = torch.as_tensor(timesteps, dtype=_F64).flatten()
        if len(grid) < 2 or not torch.all(grid[1:] < grid[:-1]):
            raise ValueError("timesteps must be a strictly decreasing grid of at least 2 times")
        lo, hi = float(getattr(schedule, "time_floor", 0.0)), schedule.time_limit
        if not (float(grid[-1]) >= lo and float(grid[0]) <= hi):
            below = "" if lo >= 0 else f" (its trained times [0, {hi:g}], and down to {lo:g} for a noise-free end)"
            raise ValueError(f"timesteps run from {float(grid[0]):g} to {float(grid[-1]):g}, outside {schedule!r}'s "
                             f"times [{lo:g}, {hi:g}]{below}; give times in that range (the last one {lo:g} or "
                             "above)")
    else:
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        grid = schedule.grid(int(num_steps), end=grid_end)
    n = len(grid) - 1
    model_dtype = model_dtype or dtype
    # the schedule's scalars for every step, once (the loop reads Python floats), and every
    # step checked before any compute
    coefs = grid_coefficients(schedule, grid)
    for c in coefs:
        integ.check_coefficients(c)
    if "epsilon" in (es.prediction_type, *es.member_kinds) and float(schedule.alpha(grid[0])) == 0.0:
        who = "these experts predict" if es.prediction_type == "epsilon" else \
            "an expert or unconditional branch predicts"
        raise ValueError(
            f"the grid starts at t={float(grid[0]):g}, where alpha_t = 0 (pure noise), and {who} epsilon, "
            "which determines no x0_hat or velocity there; use experts that predict the "
            "flow velocity, x0 or v, or start the grid below that point")
    if not op.affine and not es.has_shared_uncond and float(schedule.alpha(grid[0])) == 0.0:
        raise ValueError(null_reference_error(op.name, float(grid[0])))

    if latents is not None:
        if not isinstance(latents, torch.Tensor) or latents.dim() < 2 or latents.numel() == 0:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            hint = "; for one sample add the batch axis: latents[None]" if getattr(latents, "dim", lambda: 2)() < 2 else ""
            raise ValueError(f"latents must be a non-empty tensor [B, *S] (a batch axis first), got {got}{hint}")
        if shape is not None and tuple(shape) != tuple(latents.shape):
            raise ValueError(f"shape {tuple(shape)} does not match latents of shape {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf")
        device = latents.device if device is None else torch.device(device)
        x = latents.to(device=device, dtype=dtype)
    else:
        if shape is None or len(shape) < 2 or any(int(s) < 1 for s in shape):
            raise ValueError(f"give latents or a shape [B, *S] with positive sizes, got shape={shape!r}")
        device = torch.device(device or "cpu")
        x = randn(tuple(int(s) for s in shape), generator, dtype, device) * float(schedule.prior_std(grid[0]))
    B = x.shape[0]
    if logq_init is None:
        logq = prior_log_prob(x, schedule, grid[0])[:, None].expand(B, M).clone()
    else:
        logq = torch.as_tensor(logq_init, dtype=_F64, device=x.device).clone()  # never the caller's tensor
        if logq.shape != (B, M):
            raise ValueError(f"logq_init must have shape [B, M] = [{B}, {M}], got {tuple(logq.shape)}")

    run = None
    step_op = op  # what the steps take kappa from
    if corr is not None:  # K particles per sample: rows b * K + k
        run = corr.start(es, x, logq, schedule, grid, op, generator, guidance_scale, model_dtype, dtype)
        es, x, logq, generator, step_op = run.experts, run.x, run.logq, run.row_generator, run.step_operator
    only = None  # "single": the selected expert alone goes through the network (SingleOperator)
    if isinstance(op, SingleOperator) and not op.track_all and M > 1 and run is None:
        sub = es.subset(op.index)
        if sub is not None:
            only, full_op, full_logq = op.index, op, logq
            es, op, logq = sub, SingleOperator(0), logq[:, op.index:op.index + 1]
            step_op = op
            one_hot = full_op.kappa(StepState(full_logq, 0, n, None))  # [B, M], every step

            def widen(lq: Tensor) -> Tensor:
                """[B, 1] log q of the selected expert -> [B, M], NaN for the experts not evaluated."""
                w = torch.full((B, M), math.nan, dtype=_F64, device=lq.device)
                w[:, only] = lq[:, 0]
                return w
    # log q is never updated in place (each step makes a new tensor), so the trace keeps the
    # step's tensors themselves
    kappas, logqs = [], [logq]
    calls0 = es.num_forward_calls
    est.begin()
    monitor = FiniteMonitor(es.num_experts, x.device, est.name, expert_ids=None if only is None else [only])
    # the grid's times as 0-d tensors, made once: the experts precompute what their networks
    # are fed at each (timestep, input scale) and every step passes these same tensors
    times = grid.unbind(0)
    es.set_grid(times, x.device)
    tracks = est.name != "none"
    probes = probe_generator(generator)
    taken = n  # steps taken: fewer when the callback raises StopSampling
    t0 = time.perf_counter()
    for k in tqdm(range(n), desc="superdiff", disable=not progress, leave=False):
        t, t_next = times[k], times[k + 1]
        es.begin_step(k)
        so = superdiff_step(es, schedule, integ, step_op, est, x, t, t_next, logq, k, n, generator,
                            guidance_scale, noise_dtype=dtype, model_dtype=model_dtype,
                            coefficients=coefs[k], monitor=monitor, probe_generator=probes)
        x = so.x_next
        if tracks:
            logq = logq + so.delta_logq
        kappas.append(so.kappa)
        if run is not None:  # reweight / resample / MCMC moves (superdiff.correctors)
            x, logq = run.after_step(k, n, t, t_next, x, logq, so, monitor=monitor)
        logqs.append(logq)  # after the corrector: the state the next step (and the callback) sees
        if callback is not None:
            info_k, info_lq = (so.kappa, logq) if only is None else (one_hot, widen(logq))
            try:
                new_x = callback(StepInfo(k, coefs[k].t, coefs[k].t_next, x, info_k, info_lq, so))
            except StopSampling as stop:  # end after this step, finishing as after the last one
                new_x, taken = stop.latents, k + 1
            if new_x is not None:  # a callback may replace the latents (diffusers' callback_on_step_end)
                if not isinstance(new_x, torch.Tensor) or new_x.shape != x.shape:
                    raise ValueError(f"callback returned {type(new_x).__name__} "
                                     f"{tuple(getattr(new_x, 'shape', ()))}; expected None or a tensor "
                                     f"of shape {tuple(x.shape)}")
                x = new_x.to(device=x.device, dtype=x.dtype)
        del so  # its prediction and the network's output are not kept through the next forward
        if taken < n:
            break
    if taken < n:  # stopped by the callback: the trace covers the steps taken
        grid = grid[:taken + 1]
    if taken:
        monitor.output(x, taken - 1)
    monitor.check()  # the one host read of the loop: NaN/inf anywhere names its expert and step
    if only is not None:  # back to all M experts: one-hot kappa, log q of the others not tracked
        op = full_op
        kappas = [one_hot] * len(kappas)
        logqs = [widen(v) for v in logqs]
        logq = logqs[-1]

    extra: dict[str, Any] = {}
    if run is not None:  # one particle per sample, with the trace of its ancestry
        x, logq, kappas, logqs, extra = run.finish(x, logq, kappas, logqs)
    trace = Trace(
        t=grid.numpy().copy(),
        sigma=schedule.sigma(grid).numpy().copy(),
        kappa=stack_steps(kappas),
        logq=stack_steps(logqs),
        expert_names=list(expert_names) if expert_names is not None else [f"expert {i}" for i in range(M)],
        meta={
            "operator": op.name,
            "operator_params": op.params(),
            "estimator": est.name,
            "integrator": integ.name,
            "schedule": repr(schedule),
            "guidance_scale": float(guidance_scale),
            "num_steps": taken,
            **({"interrupted_after_step": taken} if taken < n else {}),
            "forward_calls": es.num_forward_calls - calls0,
            "seconds": time.perf_counter() - t0,
            **({"corrector": corr.params(), **extra.get("meta", {})} if corr is not None else {}),
        },
        ess=extra.get("ess"),
        resampled=extra.get("resampled"),
    )
    return SampleOutput(x.to(dtype), trace, logq)
