"""What a sampling call sends between host and accelerator per step (issue 16: at most 2 host
syncs per step on every path), measured without an accelerator.

The pipelines run on PyTorch's meta device, which stands in for a GPU: tensors there have
shapes but no data. A dispatch mode counts every host read of a meta tensor (`.item()`,
`bool(t)`, `.tolist()`, a copy back to the CPU; it answers them with a dummy value) and every
copy from the CPU onto the meta device, which on a GPU blocks the host unless the memory is
pinned (`torch.tensor(...)` of Python numbers, a CPU tensor `.to(device)`). The CPU profiler
of test_hot_path cannot see such copies. Per step = (count at 4 steps - count at 2) / 2, so
set-up, the first and last steps and the one read after the loop cancel. (Every op runs
through a Python meta kernel here, about a second a step for the Heun ODE path: the counts
take as few steps as that difference needs.)

Expected per step, diffusers' conventions included: the SDE and DDPM steps copy their noise,
drawn with the caller's CPU generator, onto the device (1, as diffusers' own schedulers);
the ODE estimator copies its Hutchinson probes' random bytes (1 per evaluation: Euler 1,
Heun 2); nothing is read back. Before the prediction conversions kept alpha and sigma as
scalars, a flow model under weights that do not sum to one made 3 copies a step (alpha and
sigma made device tensors), and a formula's SuperDiff AND node read its offsets back every step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from superdiff.operators import AverageOperator  # noqa: E402
from superdiff.pipelines import SuperDiffStableDiffusion3Pipeline, SuperDiffStableDiffusionPipeline  # noqa: E402
from superdiff.pipelines._testing import tiny_sd3_components, tiny_sd_components  # noqa: E402
from _device import StandInDevice  # noqa: E402
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

def _on_meta(pipe):
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("meta")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return _on_meta(SuperDiffStableDiffusionPipeline(**tiny_sd_components(0)))


@pytest.fixture(scope="module")
def sd3():
    return _on_meta(SuperDiffStableDiffusion3Pipeline(**tiny_sd3_components(0)))


def _per_step(call) -> tuple[float, float]:
    """(host reads, copies to the device) per step; after one call that fills the process's
    caches (the probes' sign table, the solvers' constants: made once per device)."""
    with torch.no_grad(), StandInDevice():
        call(2)
    counts = []
    for steps in (2, 4):
        with torch.no_grad(), StandInDevice() as mode:
            call(steps)
        counts.append((mode.reads, mode.copies))
    (r2, c2), (r4, c4) = counts
    return (r4 - r2) / 2, (c4 - c2) / 2


@pytest.mark.parametrize("sampler,estimator,operator,copies", [
    ("sde", "ito", "and", 1), ("sde", "kernel", "or", 1), ("ddpm", "kernel", "and", 1),
    ("euler", "ode", "and", 1), ("heun", "ode", "and", 2), ("euler", "none", "average", 0),
    ("sde", "ito", AverageOperator([1.0, -0.5]), 1)])  # weights not summing to one: the null prediction
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sd_pipeline_step_reads_nothing_back_and_copies_only_its_random_draws(sd, sampler, estimator, operator,
                                                                              copies, guidance_scale):
    def call(steps):
        sd(["a circle", "something red"], num_inference_steps=steps, height=64, width=64, output_type="latent",
           generator=gen(0), guidance_scale=guidance_scale, operator=operator, sampler=sampler, estimator=estimator)

    assert _per_step(call) == (0, copies)


@pytest.mark.parametrize("sampler,estimator,operator,copies", [
    ("sde", "ito", "and", 1), ("euler", "ode", "and", 1), ("euler", "none", AverageOperator([1.0, -0.5]), 0)])
def test_flow_pipeline_step_reads_nothing_back_and_copies_only_its_random_draws(sd3, sampler, estimator, operator,
                                                                                copies):
    """Flow predictions under weights that do not sum to one are completed with the null
    prediction, which converts with alpha and sigma: scalars, not copies to the device. (The
    grid starts below t = 1, where the null prediction x / alpha is undefined and refused.)"""
    def call(steps):
        sd3(["a circle", "something red"], num_inference_steps=steps, height=16, width=16, max_sequence_length=16,
            output_type="latent", generator=gen(0), guidance_scale=1.0, operator=operator, sampler=sampler,
            estimator=estimator, sigmas=np.linspace(0.999, 0.25, steps).tolist())

    assert _per_step(call) == (0, copies)


def test_formula_step_reads_nothing_back(sd):
    def call(steps):
        sd(compose='("a circle" | "something red"):0.5 & "a square"', num_inference_steps=steps, height=64,
           width=64, output_type="latent", generator=gen(0), guidance_scale=5.0, sampler="sde")

    assert _per_step(call) == (0, 1)


@pytest.mark.parametrize("corrector,operator,copies", [
    ("smc:2", "or", 2),  # the step's noise and one uniform per image (drawn every step, used or not)
    ({"particles": 2, "ess_threshold": 1.0}, "or", 2),  # resampling at every step
    ("ula", "and", 2),  # the step's noise and the move's
    ("hmc", "or", 2),  # the step's noise and the momentum refresh (the leapfrog draws nothing)
    ("smc:2+ula", "or", 3)])
def test_correctors_read_nothing_back_inside_the_loop(sd, corrector, operator, copies):
    """The SMC corrector decides which images resample on the device (the others take an
    identity gather), the MCMC moves record their evaluations' non-finite values on the
    sampler's monitor, the composed score knows from the operator whether kappa sums to one, and
    the next step recognises the primed MCMC evaluation by the tensor itself. Before: SMC failed
    on a device (its uniforms were moved to the CPU) and every MCMC evaluation read back twice."""
    def call(steps):
        sd(["a circle", "something red"], num_inference_steps=steps, height=64, width=64, output_type="latent",
           generator=gen(0), guidance_scale=5.0, operator=operator, sampler="sde", estimator="ito",
           corrector=corrector)

    assert _per_step(call) == (0, copies)


@pytest.fixture(scope="module")
def sd_fp16():
    pipe = _on_meta(SuperDiffStableDiffusionPipeline(**tiny_sd_components(0)))
    pipe.unet.to(dtype=torch.float16)
    return pipe


@pytest.mark.parametrize("corrector", ["ula", "hmc"])
def test_an_fp16_network_with_float32_latents_reads_nothing_back_after_an_mcmc_move(sd_fp16, corrector):
    """The move's end point is primed at its fp16 copy, which the next step is handed by
    identity (CachedExperts.model_input): before, the step converted afresh and the primed
    evaluation was found by comparing values, one host read per step."""
    def call(steps):
        sd_fp16(["a circle", "something red"], num_inference_steps=steps, height=64, width=64,
                output_type="latent", generator=gen(0), guidance_scale=5.0, operator="or", sampler="sde",
                estimator="ito", corrector=corrector)

    assert _per_step(call) == (0, 2)
