"""The shared `__call__` machinery of every SuperDiff pipeline: the pre-compute checks, the
method plan, and the sampling loop -- one call to `superdiff.sampling.sample`, whose every
step is `superdiff.step.superdiff_step` (nothing here re-implements the step)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from superdiff.diffusers_experts import NetworkExperts
from superdiff.estimators import check_pair
from superdiff.integrators import Integrator
from superdiff.operators import Operator
from superdiff.sampling import SampleOutput, StepInfo, StopSampling, sample
from superdiff.schedules import Schedule

from ._inputs import apply_compose, check_common, check_generator, check_height_width
from ._method import (DiffusersTimesteps, MethodPlan, attach_corrector, build_operator, init_noise_sigma, make_flow_schedule,
                      make_schedule, prepare_latents, resolve_estimator, resolve_sampler)

Tensor = torch.Tensor

__all__ = ["CALLBACK_TENSOR_INPUTS", "SuperDiffPipelineMixin"]

#: what `callback_on_step_end_tensor_inputs` may ask for
CALLBACK_TENSOR_INPUTS = ["latents", "kappa", "logq", "noise_pred"]


class SuperDiffPipelineMixin:
    """Shared `__call__` machinery; mixed into each DiffusionPipeline subclass."""

    _callback_tensor_inputs = CALLBACK_TENSOR_INPUTS

    #: experts and trace of the last call (for inspection: forward-call counters, names)
    last_experts: NetworkExperts | None = None
    #: the denoiser component ("unet"; "transformer" for the flow pipelines)
    _denoiser_name = "unet"
    #: rectified-flow pipelines (SD3, Flux): FlowMatch schedulers, velocity predictions
    _flow_matching = False
    #: the prompt_embeds layout the pipeline takes ("sd", "sdxl"), None: prompts only (_conventions.py)
    _embeds_kind: str | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # `pipe.scheduler = X.from_config(...)` after loading: remembered, so that the call maps X to a
        # sampler or refuses it (pipelines/_conventions.py) instead of silently ignoring it
        if name == "scheduler" and "scheduler" in self.__dict__ and value is not self.__dict__["scheduler"]:
            object.__setattr__(self, "_swapped_scheduler", type(value).__name__)
        super().__setattr__(name, value)

    @property
    def interrupt(self) -> bool:
        """diffusers' flag: set `pipe._interrupt = True` in a callback to stop after that step."""
        return bool(self.__dict__.get("_interrupt", False))

    # diffusers' call-state properties, set by each call (callbacks read them, e.g. PipelineCallback's
    # cutoff_step_ratio reads num_timesteps); None before the first call
    @property
    def num_timesteps(self) -> int | None:
        """Number of sampling steps of the current (or last) call."""
        return self.__dict__.get("_num_timesteps")

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the current (or last) call, as given (Flux: the embedded guidance of a
        guidance-distilled transformer, else true_cfg_scale)."""
        return self.__dict__.get("_guidance_scale")

    @property
    def do_classifier_free_guidance(self) -> bool | None:
        """Whether the current (or last) call guides against an unconditional branch (scale > 1)."""
        return self.__dict__.get("_do_classifier_free_guidance")

    @property
    def _denoiser(self) -> torch.nn.Module:
        return getattr(self, self._denoiser_name)

    def _size_check(self, height: int, width: int) -> None:
        """Image sizes the latent space can take (the VAE factor; Flux also packs 2x2)."""
        check_height_width(height, width, self.vae_scale_factor)

    def _latents_shape(self, batch: int, height: int, width: int) -> tuple[tuple[int, ...], str]:
        """(shape of x_T, its layout in words): [B, C, H/f, W/f]."""
        f = self.vae_scale_factor
        c = self._denoiser.config.in_channels
        return (batch, c, height // f, width // f), f"[batch, {c} channels, height/{f}, width/{f}]"

    def _check_latents(self, latents: Any, batch: int, height: int, width: int) -> None:
        """Given `latents` must have the shape of x_T for this batch and size (before any compute)."""
        if latents is None:
            return
        shape, layout = self._latents_shape(batch, height, width)
        got = tuple(getattr(latents, "shape", ()))
        if got != shape:
            raise ValueError(f"`latents` has shape {got}, but {height}x{width} images with a batch of {batch} "
                             f"(num_images_per_prompt) take {shape}: {layout}; pass latents of that shape, or set "
                             "num_images_per_prompt / height / width to match them")

    def _initial_latents(self, batch: int, height: int, width: int, latents: Tensor | None, generator: Any,
                         sigma0: float) -> Tensor:
        """x_T [B, C, H/f, W/f] drawn as diffusers draws it (or the given latents), times sigma0."""
        shape, _ = self._latents_shape(batch, height, width)
        return prepare_latents(shape, generator, self._execution_device, self._denoiser.dtype, latents, sigma0)

    def _callback_inputs(self, callback_on_step_end: Any, tensor_inputs: Sequence[str] | None) -> list[str]:
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"`callback_on_step_end` must be callable (pipe, step, timestep, callback_kwargs) -> "
                             f"dict, or a diffusers PipelineCallback; got {type(callback_on_step_end).__name__}")
        try:
            from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                return list(callback_on_step_end.tensor_inputs)
        except ImportError:  # pragma: no cover - older diffusers
            pass
        return list(tensor_inputs) if tensor_inputs is not None else ["latents"]

    def _check_call(self, height: int, width: int, num_inference_steps: Any, batch: Any, output_type: str,
                    guidance_scale: Any, max_batch_size: Any, generator: Any, sampler: str | Integrator,
                    callback_on_step_end: Any, tensor_inputs: Sequence[str] | None,
                    latents: Any = None) -> tuple[list[str], Integrator]:
        """The checks every pipeline makes before any compute; (callback tensor inputs, integrator).
        Records the call's guidance_scale (the `guidance_scale` property)."""
        self._size_check(height, width)
        callback_inputs = self._callback_inputs(callback_on_step_end, tensor_inputs)
        check_common(num_inference_steps, batch, output_type, callback_inputs, self._callback_tensor_inputs,
                     guidance_scale, max_batch_size)
        check_generator(generator, int(batch))
        self._check_latents(latents, int(batch), height, width)
        integrator = resolve_sampler(sampler, self.scheduler.config)
        self._guidance_scale = guidance_scale
        return callback_inputs, integrator

    @staticmethod
    def _apply_compose(prompt: Any, operator: Any, compose: str | None, and_mode: str = "superdiff"):
        """(prompt, operator) of a `compose=` formula (see _inputs.apply_compose)."""
        return apply_compose(prompt, operator, compose, and_mode)

    def _plan_method(self, operator: str | Operator, num_experts: int, op_params: Mapping[str, Any],
                     estimator: Any, integrator: Integrator, schedule: Any, num_inference_steps: int,
                     time_grid: Any, grid_end: str, corrector: Any = None,
                     has_uncond: bool | None = None) -> MethodPlan:
        """Operator, estimator, schedule and time grid of one call, each checked; a corrector
        (superdiff.correctors) rides on the operator into superdiff.sampling.sample.

        has_uncond: whether the experts will have an unconditional branch (None: `_plans_uncond`,
        from the guidance scale _check_call recorded), so that the corrector's check refuses
        what needs it before any text encoding."""
        if has_uncond is None:
            has_uncond = self._plans_uncond()
        op = attach_corrector(build_operator(operator, num_experts, **op_params), corrector, integrator, num_experts,
                              has_uncond=has_uncond)
        est = resolve_estimator(estimator, op, integrator)
        check_pair(est, integrator)
        if self._flow_matching:
            sched = make_flow_schedule(self.scheduler.config, schedule)
        else:
            sched = make_schedule(self.scheduler.config, integrator, schedule)
        grid, sigma0 = self._grid_and_sigma(sched, num_inference_steps, time_grid, grid_end, self.scheduler.config)
        corr = getattr(op, "corrector", None)
        if corr is not None:
            corr.check_grid(sched, grid)  # before any text encoding, not at the first step
        return MethodPlan(op, est, integrator, sched, grid, sigma0)

    def _run(self, method: MethodPlan, experts: NetworkExperts, names: Sequence[str], batch: int, height: int,
             width: int, latents: Tensor | None, generator: Any, guidance_scale: float, num_inference_steps: int,
             time_grid: Any, grid_end: str, callback_on_step_end: Callable | None,
             callback_inputs: Sequence[str]) -> SampleOutput:
        """Draw the initial latents as diffusers does and sample; the trace records the
        pipeline and the forward calls per network. Sets num_timesteps and do_classifier_free_guidance
        (the properties callbacks read)."""
        self._num_timesteps = len(method.grid) - 1
        self._do_classifier_free_guidance = bool(experts.has_uncond)
        x = self._initial_latents(batch, height, width, latents, generator, method.sigma0)
        out = self._superdiff_sample(experts, method.schedule, num_inference_steps, method.operator,
                                     method.estimator, method.integrator, x, generator, guidance_scale,
                                     method.grid if time_grid is not None else None, grid_end, self._denoiser.dtype,
                                     callback_on_step_end, callback_inputs, names)
        out.trace.meta.update(pipeline=type(self).__name__,
                              forward_calls_per_network=experts.forward_calls_per_network())
        return out

    def _superdiff_sample(
        self,
        experts: NetworkExperts,
        schedule: Schedule,
        num_inference_steps: int,
        operator: Operator,
        estimator: Any,
        integrator: Integrator,
        latents: Tensor,
        generator: Any,
        guidance_scale: float,
        timesteps: Any,
        grid_end: str,
        model_dtype: torch.dtype,
        callback_on_step_end: Callable | None,
        callback_inputs: Sequence[str],
        expert_names: Sequence[str],
    ) -> SampleOutput:
        self.last_experts = experts
        n_steps = num_inference_steps if timesteps is None else len(timesteps) - 1
        bar = self.progress_bar(total=n_steps)

        # a later composition of a batch whose first interrupted one stopped after that many steps
        # (_conventions._batch), so that the whole batch stops at one step, as diffusers' does
        stop_after = self.__dict__.get("_stop_after_steps")

        def on_step(info: StepInfo):
            new = user_step(info)
            if self.__dict__.get("_interrupt") or (stop_after is not None and info.step + 1 >= stop_after):
                raise StopSampling(new)  # the latents reached, the trace of the steps taken
            return new

        def user_step(info: StepInfo):
            bar.update()
            if callback_on_step_end is None:
                return None
            lat = info.x.to(torch.float32)
            orig = lat.clone() if "latents" in callback_inputs else None
            available = {"latents": lat, "kappa": info.kappa, "logq": info.logq, "noise_pred": info.output.pred}
            kwargs = {k: available[k] for k in callback_inputs}
            t_model = schedule.model_time(torch.tensor(info.t, dtype=torch.float64))
            out = callback_on_step_end(self, info.step, t_model, kwargs)
            if not out or "latents" not in out:
                return None
            new = out["latents"]
            if new is lat and orig is not None and torch.equal(lat, orig):
                return None  # handed back unchanged: keep the float64 latents
            return new

        try:
            return sample(experts, schedule, num_inference_steps, operator=operator, estimator=estimator,
                          integrator=integrator, latents=latents, generator=generator,
                          guidance_scale=guidance_scale, timesteps=timesteps, grid_end=grid_end,
                          dtype=torch.float32, model_dtype=model_dtype, expert_names=list(expert_names),
                          progress=False, callback=on_step)
        finally:
            bar.close()

    def _postprocess(self, image: Tensor, output_type: str, do_denormalize: list[bool] | None = None):
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

    def _plans_uncond(self) -> bool:
        """Whether this call's experts will have an unconditional branch, known before any text
        encoding: classifier-free guidance on the guidance scale _check_call recorded, decided by
        `_guidance` as every pipeline decides its do_cfg (the experts get one exactly then:
        NetworkExperts(guidance=do_cfg)). A guidance-distilled Flux transformer records its
        embedded guidance there and has no unconditional branch."""
        if getattr(self, "guidance_distilled", False):
            return False
        g = self.__dict__.get("_guidance_scale")
        return g is not None and self._guidance(g)[0]

    @staticmethod
    def _guidance(guidance_scale: float) -> tuple[bool, float]:
        """(do_cfg, scale for the core): as diffusers, guidance applies when the scale is > 1."""
        g = float(guidance_scale)
        return (g > 1.0, g if g > 1.0 else 1.0)

    @staticmethod
    def _grid_and_sigma(schedule: Schedule, num_inference_steps: int, timesteps: Any, grid_end: str,
                        scheduler_config: Mapping[str, Any]) -> tuple[Tensor, float]:
        if isinstance(timesteps, DiffusersTimesteps):  # diffusers' timesteps=, mapped by _conventions
            grid = timesteps.grid(schedule, grid_end)
        elif timesteps is not None:
            grid = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
            if len(grid) < 2 or not bool(torch.all(grid[1:] < grid[:-1])) or not bool(torch.isfinite(grid).all()):
                raise ValueError("`time_grid` must be a strictly decreasing list of at least 2 finite schedule "
                                 "times (sigmas for the 've' schedule, DDPM timesteps for 'vp')")
        else:
            grid = schedule.grid(int(num_inference_steps), end=grid_end)
        return grid, init_noise_sigma(schedule, grid, scheduler_config)
