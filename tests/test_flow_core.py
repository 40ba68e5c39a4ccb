"""Rectified flow (SD3, Flux) in the core, checked against exact Gaussian-mixture fields.

alpha_t = 1 - t, sigma_t = t; every sampler starts at t = 1 exactly (alpha = 0), as diffusers'
FlowMatchEulerDiscreteScheduler does. Checks superdiff-math.md section 7 line by line, then
the samplers: finite from the first step to the last, log-density tracking within the
measured error (docs/flow.md), OR proportions, AND's shared mode, refusals, and parity of
Euler + "single" with diffusers' FlowMatch Euler update.
"""

import math

import numpy as np
import pytest
import torch
from _gmm import shared_mode_experts, tracked_error, two_mixtures

from superdiff.estimators import ItoEstimator, StepContext, make_estimator
from superdiff.experts import GaussianMixtureExpert
from superdiff.integrators import EulerMaruyama, make_integrator
from superdiff.operators import OrOperator
from superdiff.predictions import to_eps_x0
from superdiff.sampling import DEFAULT_INTEGRATOR, default_estimator, default_integrator, sample
from superdiff.schedules import RectifiedFlow

F64 = torch.float64
KINDS = ["epsilon", "sample", "flow", "v_prediction"]


def _t(v):
    return torch.tensor(v, dtype=F64)


# --- the oracle at both ends ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_oracle_is_finite_and_exact_at_both_ends(kind):
    sch = RectifiedFlow()
    e = two_mixtures(3, kind)[1]
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    prior_mean = (e.log_weights.exp()[:, None] * e.means).sum(0)
    # t = 1: q_1 = N(0, I) exactly, score -x, E[x0 | x_1] = E[x0]
    gauss = -0.5 * (x**2).sum(-1) - 1.5 * math.log(2 * math.pi)
    assert torch.allclose(e.log_prob(x, 1.0, sch), gauss, atol=1e-12)
    assert torch.allclose(e.score(x, 1.0, sch), -x, atol=1e-12)
    assert torch.allclose(e.posterior_mean(x, 1.0, sch), prior_mean.expand_as(x), atol=1e-12)
    want1 = {"epsilon": x, "sample": prior_mean.expand_as(x), "flow": x - prior_mean, "v_prediction": -prior_mean.expand_as(x)}
    assert torch.allclose(e.predict(x, _t(1.0), sch), want1[kind], atol=1e-12)
    # t = 0: the data density; eps_hat = 0, x0_hat = x, velocity -x
    assert torch.isfinite(e.log_prob(x, 0.0, sch)).all()
    want0 = {"epsilon": torch.zeros_like(x), "sample": x, "flow": -x, "v_prediction": -0.0 * x}
    if kind == "v_prediction":  # (alpha eps - sigma x0) / r with alpha = 1, sigma = 0
        want0[kind] = torch.zeros_like(x)
    assert torch.allclose(e.predict(x, _t(0.0), sch), want0[kind], atol=1e-12)


@pytest.mark.parametrize("t", [0.999, 0.9, 0.5, 0.1, 0.01])
def test_section7_conversions_and_identity_hold_on_the_exact_field(t):
    """eps = x + (1 - t) v, x0 = x - t v, s = -eps / t, and f x - g2/2 s = v (superdiff-math.md 7)."""
    sch = RectifiedFlow()
    e_flow, e_eps = two_mixtures(4, "flow")[1], two_mixtures(4, "epsilon")[1]
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * 1.5
    v = e_flow.predict(x, _t(t), sch)
    assert torch.allclose(x + (1 - t) * v, e_eps.predict(x, _t(t), sch), atol=1e-10)
    assert torch.allclose(x - t * v, e_flow.posterior_mean(x, t, sch), atol=1e-10)
    s = e_flow.score(x, t, sch)
    assert torch.allclose(-(x + (1 - t) * v) / t, s, atol=1e-9)
    assert math.isclose(float(sch.f(t)), -1 / (1 - t), rel_tol=1e-12)
    assert math.isclose(float(sch.g2(t)), 2 * t / (1 - t), rel_tol=1e-12)
    assert torch.allclose(sch.f(t) * x - 0.5 * sch.g2(t) * s, v, atol=1e-8)


@pytest.mark.parametrize("t", [1.0, 0.7, 0.2])
def test_exact_velocity_transports_exact_log_density(t):
    """Continuity equation d/dt log q_t = -div v - <s, v>, with d/dt by finite differences of
    the exact log q_t and div v by autograd: the oracle's velocity and log q belong together,
    up to and including t = 1 (one-sided difference there)."""
    sch = RectifiedFlow()
    e = two_mixtures(3, "flow")[0]
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    h = 1e-5
    lo, hi = (t - 2 * h, t) if t == 1.0 else (t - h, t + h)
    dlogq = (e.log_prob(x, hi, sch) - e.log_prob(x, lo, sch)) / (hi - lo)
    if t == 1.0:  # second-order one-sided difference
        dlogq = (3 * e.log_prob(x, t, sch) - 4 * e.log_prob(x, t - h, sch) + e.log_prob(x, t - 2 * h, sch)) / (2 * h)
    xr = x.clone().requires_grad_(True)
    v = e.predict(xr, _t(t), sch)
    div = sum(torch.autograd.grad(v[:, j].sum(), xr, retain_graph=True)[0][:, j] for j in range(3))
    rhs = -div - (e.score(x, t, sch) * v.detach()).sum(-1)
    assert torch.allclose(dlogq, rhs.detach(), atol=1e-5), (dlogq, rhs)


def test_ito_estimator_is_the_section7_formula():
    """Delta log q_i = -<dx, eps_i>/t - (h/t) <v_i, eps_i> + C(t), C(t) = d f_t h (common)."""
    sch = RectifiedFlow()
    e = two_mixtures(3, "flow")[0]
    x = torch.randn(5, 3, dtype=F64)
    t, tn = _t(0.6), _t(0.55)
    v = e.predict(x, t, sch)
    eps = x + (1 - t) * v
    ctx = StepContext(sch, EulerMaruyama(), t, tn, x, v[None], "flow")
    dx = torch.randn_like(x) * 0.3
    got = ItoEstimator().delta(ctx, x + dx)[:, 0]
    h = t - tn
    want = -(dx * eps).sum(-1) / t - (h / t) * (v * eps).sum(-1) + 3 * sch.f(t) * h
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


# --- the SDE path from t = 1 ------------------------------------------------------------------


def test_euler_maruyama_uses_posterior_steps_only_near_the_noise_end():
    sch, em = RectifiedFlow(), EulerMaruyama()
    grid = sch.grid(100)
    post = [em.posterior_step(sch, a, b) for a, b in zip(grid[:-1], grid[1:])]
    assert post[0] and not post[-1]
    k = post.index(False)  # alpha_t < log(alpha_t'/alpha_t): about sqrt(h) = 0.1 of the path
    assert 5 <= k <= 15 and not any(post[k:])
    # the first step is the exact posterior from the prior: x' ~ N(alpha' E[x0], sigma'^2 I)
    e = two_mixtures(2, "flow")[0]
    x = torch.randn(7, 2, dtype=F64)
    m = em.mean(sch, x, grid[0], grid[1], e.predict(x, grid[0], sch), "flow")
    prior_mean = (e.log_weights.exp()[:, None] * e.means).sum(0)
    assert torch.allclose(m, (1 - grid[1]) * prior_mean.expand_as(x), atol=1e-12)
    assert math.isclose(float(em.variance(sch, grid[0], grid[1])), float(grid[1]) ** 2, rel_tol=1e-12)
    # VE/VP schedules (bounded drift) never take posterior steps
    from _gmm import schedules

    for name in ("ve", "vp"):
        g = schedules()[name].grid(10)
        assert not any(em.posterior_step(schedules()[name], a, b) for a, b in zip(g[:-1], g[1:]))


@pytest.mark.parametrize("shift,end", [(1.0, "zero"), (3.0, "min")])
@pytest.mark.parametrize("operator", ["or", "and"])
@pytest.mark.parametrize("est,integ", [("ito", "em"), ("kernel", "em"), ("kernel", "ddpm"), ("ode", "euler"),
                                       ("ode", "heun")])
def test_every_valid_pair_is_finite_at_every_step_from_t_equal_one(shift, end, operator, est, integ):
    sch = RectifiedFlow(shift=shift)
    for n in (1, 2, 7):
        out = sample(two_mixtures(2, "flow"), sch, n, operator=operator, estimator=est, integrator=integ,
                     grid_end=end, shape=(16, 2), generator=torch.Generator().manual_seed(n),
                     dtype=F64, progress=False)
        assert out.trace.t[0] == 1.0 and out.trace.t[-1] == (0.0 if end == "zero" else sch.grid(n, "min")[-1])
        assert np.isfinite(out.trace.kappa).all() and np.isfinite(out.trace.logq).all()
        assert torch.isfinite(out.samples).all()


def test_last_step_to_t_equal_zero_gives_x0_hat():
    """Euler-Maruyama's final step to sigma = 0 is the noise-free x' = x0_hat; log q stays finite."""
    sch = RectifiedFlow()
    e = two_mixtures(2, "flow")[0]
    seen = []
    out = sample([e], sch, 10, operator="single", callback=lambda info: seen.append(info.x.clone()),
                 shape=(8, 2), generator=torch.Generator().manual_seed(0), dtype=F64, progress=False)
    grid = sch.grid(10)
    assert torch.allclose(out.samples, e.posterior_mean(seen[-2], grid[-2], sch), atol=1e-12)
    assert np.isfinite(out.trace.logq).all()


def test_defaults_per_family():
    assert DEFAULT_INTEGRATOR["flow"] == default_integrator(RectifiedFlow()) == "em"
    assert default_estimator(make_integrator("em")) == "ito"
    out = sample(two_mixtures(2, "flow"), RectifiedFlow(), 5, shape=(4, 2), progress=False)
    assert (out.trace.meta["integrator"], out.trace.meta["estimator"]) == ("em", "ito")


# --- exact accuracy: tracked log q, OR, AND ----------------------------------------------------

# measured mean |tracked - exact log q_i| in nats (32 trajectories, 8 for ODE rows; the d = 64
# rows are in benchmarks/results/estimator_accuracy_flow.md), every trajectory from t = 1;
# tolerance 1.5x: a sign or factor error moves these by orders of magnitude
MEASURED = {
    (2, "ito", "em", 10): 0.94, (2, "ito", "em", 100): 0.66,
    (2, "kernel", "em", 100): 0.90, (2, "kernel", "ddpm", 100): 4.70,
    (2, "ode", "euler", 10): 0.27, (2, "ode", "heun", 10): 0.024,
    (64, "ito", "em", 10): 31.3, (64, "ito", "em", 100): 6.47, (64, "kernel", "em", 30): 25.8,
}


@pytest.mark.parametrize("case", sorted(MEASURED), ids=lambda c: "-".join(map(str, c)))
def test_tracked_log_density_from_t_equal_one_matches_exact(case):
    d, est, integ, n = case
    batch = 8 if est == "ode" else 32
    err, out = tracked_error(two_mixtures(d, "flow"), RectifiedFlow(), n, est, integ, d, batch=batch)
    assert torch.isfinite(err).all()
    assert err.abs().mean() < 1.5 * MEASURED[case] + 0.02, f"mean |error| {err.abs().mean():.3f} nats"


def test_ito_error_converges_from_t_equal_one():
    """With the posterior start the Ito error keeps shrinking with the steps (EM from the first
    step alone would stall at an O(1) error: its relative step near t = 1 never shrinks)."""
    experts = two_mixtures(64, "flow")
    e30 = tracked_error(experts, RectifiedFlow(), 30, "ito", "em", 64, batch=8)[0].abs().mean()
    e300 = tracked_error(experts, RectifiedFlow(), 300, "ito", "em", 64, batch=8)[0].abs().mean()
    assert e300 < 0.4 * e30, (float(e30), float(e300))


def _two_modes(d):
    g = torch.Generator().manual_seed(5)
    a, b = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=F64))[0].T * 4
    return GaussianMixtureExpert(a[None], 0.25, prediction_type="flow"), \
        GaussianMixtureExpert(b[None], 0.25, prediction_type="flow"), a, b


@pytest.mark.parametrize("d,n,est", [(2, 30, "ito"), (2, 100, "ito"), (2, 100, "kernel")])
def test_or_proportions_on_rectified_flow(d, n, est):
    e1, e2, a, b = _two_modes(d)
    out = sample([e1, e2], RectifiedFlow(), n, operator=OrOperator(weights=[0.3, 0.7]), estimator=est,
                 shape=(4000, d), generator=torch.Generator().manual_seed(0), dtype=F64, progress=False)
    frac = ((out.samples - a).norm(dim=1) < (out.samples - b).norm(dim=1)).double().mean()
    assert abs(float(frac) - 0.3) < 0.03, float(frac)


@pytest.mark.parametrize("d,m,n", [(2, 2, 10), (2, 2, 100), (2, 3, 30), (64, 2, 10), (64, 2, 100)])
def test_and_finds_the_shared_mode_on_rectified_flow(d, m, n):
    experts, centres = shared_mode_experts(d, m, "flow")
    out = sample(experts, RectifiedFlow(), n, operator="and", shape=(400 if d == 2 else 200, d),
                 generator=torch.Generator().manual_seed(0), dtype=F64, progress=False)
    comp = torch.cat([e.component_log_prob(out.samples, 0.0, RectifiedFlow()) for e in experts], -1)
    in_shared = torch.isin(comp.argmax(-1), torch.tensor([2 * i + 1 for i in range(m)])).double().mean()
    assert in_shared >= 0.9, float(in_shared)
    assert np.isfinite(out.trace.kappa).all()


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("est,integ", [("ito", "ddpm"), ("ito", "euler"), ("ito", "heun"), ("kernel", "euler"),
                                       ("kernel", "heun"), ("ode", "em"), ("ode", "ddpm")])
def test_invalid_pairs_are_refused_naming_the_valid_ones(est, integ):
    with pytest.raises(ValueError, match="not valid with integrator") as info:
        sample(two_mixtures(2, "flow"), RectifiedFlow(), 5, estimator=est, integrator=integ, shape=(2, 2),
               progress=False)
    valid = {"em": ["'ito'", "'kernel'"], "ddpm": ["'kernel'"], "euler": ["'ode'"], "heun": ["'ode'"]}[integ]
    assert all(v in str(info.value) for v in valid)


@pytest.mark.parametrize("integ", ["em", "ddpm", "euler", "heun"])
def test_epsilon_experts_are_refused_at_pure_noise_before_any_call(integ):
    from superdiff.experts import ExpertList

    es = ExpertList(two_mixtures(2, "epsilon"))
    with pytest.raises(ValueError, match="alpha_t = 0"):
        sample(es, RectifiedFlow(), 5, integrator=integ, shape=(2, 2), progress=False)
    assert es.num_forward_calls == 0
    # below t = 1 the same experts are fine
    out = sample(es, RectifiedFlow(t_max=0.99), 5, integrator=integ, shape=(2, 2), progress=False)
    assert torch.isfinite(out.samples).all()


@pytest.mark.parametrize("operator", ["average", "formula"])
def test_weights_not_summing_to_one_are_refused_at_pure_noise_without_an_unconditional_branch(operator):
    """A product of experts (average weights [1, 1], a product-mode formula) is completed by the
    zero-score prediction x / alpha, undefined at t = 1: refused before any call, saying how to
    go on; from t = 0.999 it runs."""
    from superdiff.experts import ExpertList
    from superdiff.formula import FormulaOperator
    from superdiff.operators import AverageOperator

    def op():
        return AverageOperator([1.0, 1.0]) if operator == "average" else \
            FormulaOperator("a & b", names=["a", "b"], and_mode="product")

    es = ExpertList(two_mixtures(2, "flow"))
    with pytest.raises(ValueError, match="need not sum to one.*undefined at t=1.*start the grid below"):
        sample(es, RectifiedFlow(), 5, operator=op(), shape=(2, 2), progress=False)
    assert es.num_forward_calls == 0
    with pytest.raises(ValueError, match="undefined at t=1"):  # a custom grid from t = 1 as well
        sample(es, RectifiedFlow(), 5, operator=op(), timesteps=[1.0, 0.5, 0.0], shape=(2, 2), progress=False)
    out = sample(es, RectifiedFlow(t_max=0.999), 5, operator=op(), shape=(2, 2), progress=False)
    assert torch.isfinite(out.samples).all()


# --- parity with diffusers' FlowMatch Euler -----------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_single_is_the_flowmatch_euler_update(shift):
    """x <- x + (sigma_next - sigma) v(x, sigma) on the scheduler's own sigmas, written by hand
    and by diffusers' FlowMatchEulerDiscreteScheduler.step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double()
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    e = two_mixtures(3, "flow")[1]
    sch = RectifiedFlow(shift=shift)
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    hand, lib = x0.clone(), x0.clone().float()
    for k in range(len(sigmas) - 1):
        hand = hand + (sigmas[k + 1] - sigmas[k]) * e.predict(hand, sigmas[k], sch)
        v = e.predict(lib.double(), sigmas[k], sch).float()
        lib = sched.step(v, sched.timesteps[k], lib).prev_sample
    ours = sample([e], sch, timesteps=sigmas, operator="single", integrator="euler", estimator="none",
                  latents=x0, dtype=F64, progress=False)
    assert torch.allclose(ours.samples, hand, atol=1e-12)
    assert torch.allclose(ours.samples.float(), lib, atol=1e-5)
    # and the single expert's velocity went through unchanged: to_eps_x0 of it is the exact x0
    x = torch.randn(3, 3, dtype=F64)
    assert torch.allclose(to_eps_x0(e.predict(x, _t(0.4), sch), "flow", x, 0.6, 0.4)[1],
                          e.posterior_mean(x, 0.4, sch), atol=1e-12)
