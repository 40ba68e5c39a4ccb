"""The method of one call, settled and checked before any compute: the operator from its
arguments, the sampler (integrator), the density estimator, the core schedule for a
diffusers scheduler config, and the initial latents x_T ~ N(0, sigma_0^2 I) as diffusers
draws them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from superdiff.diffusers_experts import NullEstimator
from superdiff.estimators import make_estimator
from superdiff.integrators import Integrator, make_integrator
from superdiff.operators import Operator, make_operator
from superdiff.sampling import default_estimator
from superdiff.schedules import RectifiedFlow, Schedule, VESigma, VPDiscrete, schedule_from_config

Tensor = torch.Tensor

__all__ = ["SAMPLERS", "MethodPlan", "build_operator", "resolve_sampler", "resolve_estimator", "make_schedule",
           "make_flow_schedule", "flow_time_grid", "flow_grid", "init_noise_sigma", "prepare_latents",
           "DiffusersTimesteps"]

SAMPLERS = ("sde", "em", "ode", "euler", "heun", "ddpm")


def build_operator(operator: str | Operator, num_experts: int, *, weights: Sequence[float] | None = None,
                   bias: Sequence[float] | None = None, temperature: float | None = None,
                   lift: float | Sequence[float] | None = None, offsets: Sequence[float] | None = None,
                   kappa_clamp: Any = None, ridge: float | None = None, feedback: float | None = None,
                   operator_kwargs: Mapping[str, Any] | None = None) -> Operator:
    """The core operator from the pipeline's arguments (validated before any compute).

    or:      temperature, weights (mixture weights) or bias (log-weights)
    and:     lift (scalar for 2 experts: offsets (lift, 0); or one per expert) / offsets,
             kappa_clamp ((lo, hi); False disables; None keeps the default), ridge, feedback
    average: weights (default 1/N; negative = NOT)
    single:  operator_kwargs={"index": i} (optionally "track_all": True)
    """
    if isinstance(operator, Operator):
        given = [k for k, v in dict(weights=weights, bias=bias, temperature=temperature, lift=lift, offsets=offsets,
                                    kappa_clamp=kappa_clamp, ridge=ridge, feedback=feedback).items() if v is not None]
        if (given or operator_kwargs) and operator.name == "formula":
            raise ValueError(f"{given or sorted(operator_kwargs)}: a compose formula carries its own weights and "
                             "offsets (':w' on its terms); remove these arguments")
        if given or operator_kwargs:
            raise ValueError(f"operator parameters {given or sorted(operator_kwargs)} were given together with an "
                             "Operator instance; set them on the instance")
        op = operator
    else:
        if not isinstance(operator, str):
            raise ValueError(f"`operator` must be a name or an Operator, got {type(operator).__name__}")
        name = operator.lower()
        params: dict[str, Any] = dict(operator_kwargs or {})
        if temperature is not None:
            params["temperature"] = temperature
        if bias is not None:
            params["bias"] = bias
        if weights is not None:
            params["weights"] = weights
        if lift is not None and offsets is not None:
            raise ValueError("give either `lift` or `offsets`, not both")
        if lift is not None:
            if np.ndim(lift) == 0:
                if num_experts != 2:
                    raise ValueError(f"a scalar `lift` is defined for 2 experts (offsets (lift, 0)); with "
                                     f"{num_experts} experts give one offset per expert")
                offsets = [float(lift), 0.0]
            else:
                offsets = list(lift)
        if offsets is not None:
            params["offsets"] = offsets
        if kappa_clamp is not None:
            params["clamp"] = None if kappa_clamp is False else tuple(kappa_clamp)
        if ridge is not None:
            params["ridge"] = ridge
        if feedback is not None:
            params["feedback"] = feedback
        op = make_operator(name, **params)
    op.validate(num_experts)
    return op


def resolve_sampler(sampler: str | Integrator, scheduler_config: Mapping[str, Any] | None = None) -> Integrator:
    """The integrator; the ddpm sampler follows the scheduler's x0 clipping (clip_sample and
    clip_sample_range, as diffusers' DDPMScheduler), so pixel models keep their behaviour."""
    if isinstance(sampler, Integrator):
        return sampler
    integrator = make_integrator(sampler)
    cfg = scheduler_config or {}
    if integrator.name == "ddpm" and cfg.get("clip_sample"):
        integrator = make_integrator("ddpm", clip_sample=float(cfg.get("clip_sample_range", 1.0)))
    return integrator


def resolve_estimator(estimator: Any, operator: Operator, integrator: Integrator):
    """The density estimator; None: the core's default for the integrator, except that an
    ODE integrator with an operator that ignores log q ("single", "average") tracks nothing
    (the divergence would cost a Jacobian-vector product per step for no effect)."""
    if estimator is None:
        if not integrator.stochastic and operator.name in ("single", "average"):
            return NullEstimator()
        return make_estimator(default_estimator(integrator))
    if isinstance(estimator, str) and estimator.lower() == "none":
        if operator.needs_logq:
            raise ValueError(f"estimator 'none' cannot drive the {operator.name!r} operator, which needs "
                             "log-density changes; use 'kernel', 'ito' or 'ode'")
        return NullEstimator()
    return make_estimator(estimator)


_UNSUPPORTED = {
    "rescale_betas_zero_snr": "zero-terminal-SNR schedules (rescale_betas_zero_snr=True)",
    "use_exponential_sigmas": "exponential sigmas",
    "use_beta_sigmas": "beta sigmas",
    "thresholding": "dynamic thresholding (thresholding=True)",
}
#: scheduler options whose other values change the grid or the step (key -> the values taken, the
#: diffusers defaults); any other value is refused rather than silently sampled without
_ONLY = {
    "variance_type": ((None, "fixed_small", "fixed_small_log"), "DDPM's posterior variance"),
    "final_sigmas_type": ((None, "zero"), "the grid's last sigma"),
    "interpolation_type": ((None, "linear"), "the sigma interpolation"),
    "sigma_min": ((None,), "a custom sigma range (sigma_min / sigma_max)"),
    "sigma_max": ((None,), "a custom sigma range (sigma_min / sigma_max)"),
}


def make_schedule(scheduler_config: Mapping[str, Any], integrator: Integrator,
                  schedule: str | Schedule | None = None) -> Schedule:
    """The core schedule for a diffusers scheduler config.

    schedule=None: "vp" (DDPM/DDIM timesteps) for the ddpm sampler, "ve" (the sigma grid of
    diffusers' Euler schedulers) for the others; "vp"/"ve" force one; a Schedule is used as is.
    """
    if isinstance(schedule, Schedule):
        return schedule
    cfg = dict(scheduler_config)
    if "FlowMatch" in str(cfg.get("_class_name", "")):
        raise ValueError(f"{cfg.get('_class_name')} is a flow-matching scheduler; these pipelines compose "
                         "DDPM-family (epsilon / v / x0) models")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"the scheduler config uses {what}, which superdiff's schedules do not support; "
                             "load the pipeline with a scheduler config without it")
    for key, (taken, what) in _ONLY.items():
        if cfg.get(key) not in taken:
            raise ValueError(f"the scheduler config sets {key}={cfg[key]!r} ({what}), which superdiff's schedules do "
                             f"not follow (they take {' / '.join(repr(v) for v in taken)}); load the pipeline with "
                             "a scheduler config without it")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"timestep_type={cfg['timestep_type']!r} is not supported (only 'discrete')")
    if schedule is None:
        schedule = "vp" if integrator.name == "ddpm" else "ve"
    if schedule not in ("vp", "ve"):
        raise ValueError(f"unknown schedule {schedule!r}; expected 'vp', 've' or a superdiff Schedule")
    return schedule_from_config(cfg, kind=schedule)


#: FlowMatchEulerDiscreteScheduler options that change the step itself, not only the grid
_FLOW_UNSUPPORTED = {
    "stochastic_sampling": "stochastic sampling (stochastic_sampling=True; use sampler='sde' or 'ddpm' instead)",
    "invert_sigmas": "inverted sigmas (invert_sigmas=True)",
}


def make_flow_schedule(scheduler_config: Mapping[str, Any], schedule: str | Schedule | None = None) -> Schedule:
    """The rectified-flow schedule x_t = (1 - t) x0 + t eps for a FlowMatch scheduler config;
    the network is fed t * num_train_timesteps. The time grid itself is the scheduler's own
    (`flow_time_grid`), so its shift, dynamic shifting and sigma spacing all carry over."""
    cfg = dict(scheduler_config)
    if "FlowMatch" not in str(cfg.get("_class_name", "FlowMatch")):
        raise ValueError(f"a rectified-flow transformer needs a FlowMatchEulerDiscreteScheduler, got "
                         f"{cfg.get('_class_name')}; load the checkpoint's own scheduler")
    for key, what in _FLOW_UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"the scheduler config uses {what}, which the SuperDiff step does not support")
    if isinstance(schedule, Schedule):
        if schedule.name != "flow":
            raise ValueError(f"a flow-matching model predicts velocities of x_t = (1 - t) x0 + t eps; the "
                             f"{type(schedule).__name__} schedule is a different process (give a RectifiedFlow "
                             "or leave `schedule` unset)")
        return schedule
    if schedule not in (None, "flow"):
        raise ValueError(f"schedule {schedule!r} is not a flow-matching schedule; flow models use 'flow' "
                         "(the default) or a superdiff RectifiedFlow")
    return schedule_from_config(cfg, kind="flow")


def flow_time_grid(scheduler: Any, num_inference_steps: int, mu: float | None = None,
                   sigmas: Sequence[float] | None = None) -> Tensor:
    """The FlowMatch scheduler's own grid of sigmas = schedule times t (shift, dynamic shift
    exp(mu), terminal value, ending at 0), from `set_timesteps` as diffusers' pipelines call it,
    in float64. A FlowMatch scheduler of another update rule (e.g. FlowMatchHeunDiscreteScheduler,
    whose sigmas repeat its interior points) gives its config to FlowMatchEulerDiscreteScheduler,
    which lays out the plain grid. Zero-length steps are dropped: diffusers appends a terminal 0
    to custom sigmas, so sigmas ending in 0 (or repeating a value) give steps of length 0, which
    leave x where it is."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if type(scheduler) is not FlowMatchEulerDiscreteScheduler:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    kw: dict[str, Any] = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        given = torch.as_tensor(np.asarray(sigmas, dtype=np.float64)).flatten()
        if len(given) < 1 or not bool(torch.isfinite(given).all()) or bool((given[1:] > given[:-1]).any()) \
                or not (0.0 <= float(given.min()) and float(given.max()) <= 1.0):
            raise ValueError(f"`sigmas` must be a non-increasing list of flow times in [0, 1] (diffusers' "
                             f"FlowMatch sigmas, e.g. numpy.linspace(1, 1 / N, N)), got {given.tolist()}")
        scheduler.set_timesteps(sigmas=list(map(float, given)), device="cpu", **kw)
    else:
        scheduler.set_timesteps(int(num_inference_steps), device="cpu", **kw)
    grid = torch.unique_consecutive(scheduler.sigmas.detach().to("cpu", torch.float64))
    if len(grid) < 2:
        raise ValueError(f"`sigmas` give no step to take (the grid is {grid.tolist()}); give at least one sigma above 0")
    return grid


def flow_grid(scheduler: Any, num_inference_steps: int, schedule: Any, time_grid: Any, sigmas: Any, mu: float | None,
              default_mu: float | None) -> Any:
    """A flow pipeline's time grid, from exactly one source: `time_grid` as given (checked by
    the plan), else the grid of a `RectifiedFlow` given as `schedule` (its shift and range, as
    the UNet pipelines use a given Schedule's own grid), else the FlowMatch scheduler's own
    (flow_time_grid, with `sigmas` and the dynamic shift `mu`, default `default_mu`).
    Two sources at once are refused, not one silently dropped."""
    given = [n for n, v in (("sigmas", sigmas), ("mu", mu)) if v is not None]
    if time_grid is not None and given:
        raise ValueError(f"give either time_grid= (the whole grid) or {' / '.join(n + '=' for n in given)} (the "
                         "scheduler's grid), not both")
    if time_grid is not None:
        return time_grid
    if isinstance(schedule, Schedule):
        if given:
            raise ValueError(f"schedule={type(schedule).__name__}(...) lays out its own grid (its shift, t_min and "
                             f"t_max); give either it or {' / '.join(n + '=' for n in given)}, not both")
        return schedule.grid(int(num_inference_steps))
    return flow_time_grid(scheduler, num_inference_steps, default_mu if mu is None else mu, sigmas)


@dataclass(frozen=True)
class DiffusersTimesteps:
    """Custom timesteps as diffusers' pipelines take them (`timesteps=`, e.g. Align Your Steps'
    [999, 845, ..., 13]): one per step, decreasing, on the training scale [0, T - 1]. They
    become the schedule's grid once the call's schedule is known (`grid`), with the end point
    that diffusers' schedulers append."""

    values: tuple[float, ...]

    def grid(self, schedule: Schedule, end: str) -> Tensor:
        """VE ("sigma", Euler/Heun): sigma_k = np.interp(t_k, arange(T), training sigmas), as
        EulerDiscreteScheduler.set_timesteps(timesteps=...), then 0 (end="zero") or the smallest
        trained sigma (end="min", their final_sigmas_type="sigma_min"); the network is fed t_k
        again (VESigma.model_time inverts the interpolation). VP (DDPM): the timesteps
        themselves, then -1 (abar = 1) or 0."""
        if not isinstance(schedule, (VESigma, VPDiscrete)):
            raise ValueError(f"timesteps= are diffusers' training timesteps, for the 've' and 'vp' schedules; this "
                             f"call's schedule is {type(schedule).__name__}: give time_grid= instead")
        ts, T = np.asarray(self.values, dtype=np.float64), schedule.num_train_timesteps
        if len(ts) < 1 or not np.all(np.isfinite(ts)) or np.any(np.diff(ts) >= 0) or ts[-1] < 0 or ts[0] > T - 1:
            raise ValueError(f"timesteps must be a strictly decreasing list of training timesteps in [0, {T - 1}] "
                             f"(one per step, e.g. [999, 845, 730, ...]), got {list(self.values)}")
        if isinstance(schedule, VESigma):
            if schedule.use_karras_sigmas:
                raise ValueError("timesteps= cannot be combined with Karras sigmas (use_karras_sigmas=True), as in "
                                 "diffusers: give sigmas= or drop one of the two")
            grid = np.interp(ts, np.arange(T, dtype=np.float64), schedule.sigmas_train)
            last = 0.0 if end == "zero" else float(schedule.sigmas_train[0])
        else:
            grid, last = ts, (-1.0 if end == "zero" else 0.0)
        if not grid[-1] > last:
            raise ValueError(f"timesteps: the last one ({ts[-1]:g}) is already the end point of grid_end={end!r}; "
                             "leave it out (one timestep per step)")
        return torch.as_tensor(np.concatenate([grid, [last]]), dtype=torch.float64)


def init_noise_sigma(schedule: Schedule, grid: Tensor, scheduler_config: Mapping[str, Any]) -> float:
    """Std of the initial latents, as diffusers' schedulers set it.

    VP: 1. VE: sqrt(1 + sigma_max^2), except that diffusers' Euler schedulers use sigma_max
    itself for "linspace"/"trailing" spacing; that convention is followed so that a seed gives
    the image diffusers gives. Flow: 1, as diffusers' FlowMatch schedulers, also for custom
    sigmas that start below 1.
    """
    if isinstance(schedule, RectifiedFlow):
        return 1.0
    if isinstance(schedule, VESigma):
        smax = float(grid[0])
        if schedule.timestep_spacing in ("linspace", "trailing"):
            return smax
        return math.sqrt(smax**2 + 1.0)
    return float(schedule.prior_std(grid[0]))


def prepare_latents(shape: tuple[int, ...], generator: Any, device: torch.device, dtype: torch.dtype,
                    latents: Tensor | None, sigma: float) -> Tensor:
    """Initial latents as diffusers draws them (randn_tensor, per-sample generators), times sigma."""
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    else:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {tuple(shape)}")
        latents = latents.to(device=device)
    return latents * sigma


@dataclass
class MethodPlan:
    """What `_plan_method` settled for one call."""

    operator: Operator
    estimator: Any
    integrator: Integrator
    schedule: Schedule
    grid: Tensor
    sigma0: float


def attach_corrector(op: Operator, corrector: Any, integrator: Any, num_experts: int,
                     has_uncond: bool = False) -> Operator:
    """The operator with a particle / MCMC corrector on it (superdiff.correctors.Corrected),
    checked against the operator and sampler before any compute; `op` itself when none.

    has_uncond: the call's experts will have an unconditional branch (classifier-free
    guidance): SMC then refuses an OR whose branches need the untracked log q_u
    (Corrector.check), here rather than after the text encoding."""
    from superdiff.correctors import Corrected, split_corrected

    op, corr = split_corrected(op, corrector)
    if corr is None:
        return op
    corr.check(op, integrator, num_experts, has_uncond=has_uncond)
    return Corrected(op, corr)
