"""Schedules against diffusers' own schedulers and the SDE identities (superdiff-math.md 1)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from superdiff.schedules import RectifiedFlow, VESigma, VPDiscrete, make_betas, schedule_from_config

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [1, 7, 30])
def test_ve_grid_is_diffusers_euler_sigmas(spacing, karras, n):
    sched = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1, use_karras_sigmas=karras)
    sched.set_timesteps(n)
    ve = VESigma.from_config(sched.config)
    grid = ve.grid(n)
    # diffusers computes in float32 (karras: 1.3e-5 relative), we in float64
    assert torch.allclose(grid, sched.sigmas.double(), rtol=3e-5 if karras else 2e-6, atol=1e-6)
    # x~_T = x_T / alpha_T has variance 1 + sigma^2 (diffusers' init_noise_sigma drops the 1 for
    # "linspace"/"trailing" spacing; the exact prior is used here)
    assert float(ve.prior_std(grid[0])) == pytest.approx(float((sched.sigmas[0] ** 2 + 1) ** 0.5), rel=1e-6)
    # the network time of each grid sigma is diffusers' timestep (with Karras sigmas, their
    # interpolation in log sigma: linear in sigma was up to 0.02 timesteps off; what is left
    # is the grid's float32 rounding above, about 1e-5 of sigma)
    assert torch.allclose(ve.model_time(grid[:-1]), sched.timesteps.double(), atol=2e-3 if karras else 1e-3)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_vp_grid_is_diffusers_timesteps(cls, spacing):
    sched = cls(beta_schedule="linear", timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched.set_timesteps(20)
    vp = VPDiscrete.from_config(sched.config)
    grid = vp.grid(20)
    assert torch.equal(grid[:-1], sched.timesteps.double())
    assert float(grid[-1]) == -1.0 and float(vp.sigma(grid[-1])) == 0.0 and float(vp.alpha(-1)) == 1.0


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_marginals_are_alphas_cumprod(beta_schedule):
    sched = DDPMScheduler(beta_schedule=beta_schedule)
    vp = VPDiscrete.from_config(sched.config)
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(vp.alpha(t) ** 2, sched.alphas_cumprod.double(), rtol=1e-5)
    assert torch.allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones(1000, dtype=torch.float64))
    assert np.allclose(make_betas(1000, 1e-4, 0.02, beta_schedule), sched.betas.double().numpy(), rtol=1e-5)


def _finite_diff(fn, t, h=1e-6):
    return (fn(t + h) - fn(t - h)) / (2 * h)


@pytest.mark.parametrize("sch,ts", [
    (VPDiscrete(make_betas()), [3.3, 250.5, 998.7]),
    (VESigma.from_betas(make_betas(**{k: v for k, v in SD.items() if k != "num_train_timesteps"})), [0.1, 1.0, 10.0]),
    (RectifiedFlow(), [0.01, 0.5, 0.99]),
])
def test_sde_coefficients_match_their_definitions(sch, ts):
    """f = d log alpha/dt and g2 = d sigma^2/dt - 2 f sigma^2, checked by finite differences."""
    for t in ts:
        t = torch.tensor(t, dtype=torch.float64)
        f = _finite_diff(lambda u: torch.log(sch.alpha(u)), t)
        ds2 = _finite_diff(lambda u: sch.sigma(u) ** 2, t)
        assert float(sch.f(t)) == pytest.approx(float(f), rel=1e-5, abs=1e-9)
        assert float(sch.g2(t)) == pytest.approx(float(ds2 - 2 * f * sch.sigma(t) ** 2), rel=1e-5, abs=1e-9)
        assert float(sch.dalpha(t)) == pytest.approx(float(_finite_diff(sch.alpha, t)), rel=1e-5, abs=1e-9)


def test_vp_g2_is_the_ddpm_beta():
    vp = VPDiscrete(make_betas())
    t = torch.tensor(500.0, dtype=torch.float64)
    assert float(vp.g2(t)) == pytest.approx(-np.log1p(-float(vp.betas[500])), rel=1e-10)


def test_flow_coefficients_blow_up_only_where_they_must():
    fl = RectifiedFlow()
    assert torch.isinf(fl.f(1.0)) and torch.isinf(fl.g2(1.0))
    assert float(fl.dalpha(1.0)) == -1.0 and float(fl.dsigma(1.0)) == 1.0
    assert torch.allclose(fl.grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = RectifiedFlow(shift=3.0).grid(4)
    assert float(shifted[0]) == 1.0 and float(shifted[2]) == pytest.approx(0.75)


def test_schedule_from_config_picks_the_family():
    assert isinstance(schedule_from_config(EulerDiscreteScheduler(**SD)), VESigma)
    assert isinstance(schedule_from_config(DDIMScheduler()), VPDiscrete)
    assert isinstance(schedule_from_config({"_class_name": "EulerDiscreteScheduler", **SD}), VESigma)
    assert isinstance(schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}), RectifiedFlow)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        schedule_from_config({}, kind="banana")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_step_counts_are_refused(bad):
    for sch in (VPDiscrete(make_betas()), VESigma.from_betas(make_betas()), RectifiedFlow()):
        with pytest.raises(ValueError, match="num_steps"):
            sch.grid(bad)


def test_bad_schedule_parameters_are_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas(beta_schedule="cosine-ish")
    with pytest.raises(ValueError, match="timestep_spacing"):
        VPDiscrete(make_betas(), timestep_spacing="random").grid(10)
    with pytest.raises(ValueError, match="t_min"):
        RectifiedFlow(t_min=0.5, t_max=0.2)
    with pytest.raises(ValueError, match="end"):
        RectifiedFlow().grid(10, end="middle")


def test_vp_default_grid_is_a_valid_custom_grid():
    """VPDiscrete's own grid ends at t = -1 (abar = 1, the DDPM/DDIM end): its time_floor is -1,
    so sample(timesteps=grid) takes that grid back and gives what the default grid gives; a
    time below -1 is refused with the valid range named. VE and flow keep floor 0."""
    from superdiff.experts import GaussianMixtureExpert
    from superdiff.sampling import sample

    vp = VPDiscrete(make_betas(), timestep_spacing="linspace")
    assert vp.time_floor == -1.0 and VESigma.from_betas(make_betas()).time_floor == 0.0
    assert RectifiedFlow().time_floor == 0.0
    ex = [GaussianMixtureExpert([[1.0, -1.0]], 0.5), GaussianMixtureExpert([[-1.0, 0.5]], 0.3)]
    kw = dict(operator="or", integrator="ddpm", shape=(2, 2), progress=False, dtype=torch.float64)
    default = sample(ex, vp, 5, generator=torch.Generator().manual_seed(0), **kw)
    grid = vp.grid(5)
    assert float(grid[-1]) == -1.0
    custom = sample(ex, vp, None, timesteps=grid, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(custom.samples, default.samples)
    with pytest.raises(ValueError, match=r"outside .* times \[-1, 999\] .*the last one -1 or above"):
        sample(ex, vp, None, timesteps=[500.0, -1.5], **kw)
