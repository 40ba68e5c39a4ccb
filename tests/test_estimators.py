"""Tracked log q_i against the exact log q_i of Gaussian-mixture experts (superdiff-math.md 3).

Tolerances are the measured mean |error| (nats, 32 trajectories, OR of two mixtures) with a
50% margin: a sign or factor error in any formula moves these by orders of magnitude.
"""

import pytest
import torch
from _gmm import schedules, tracked_error, two_mixtures

from superdiff.estimators import divergence
from superdiff.experts import GaussianMixtureExpert
from superdiff.schedules import RectifiedFlow

SDE_STEPS = 200
# (d, schedule, estimator, integrator): measured mean |error| in nats (scripts in the docstring)
MEASURED = {
    (2, "vp", "ito", "em"): 0.69, (2, "vp", "kernel", "em"): 0.64, (2, "vp", "kernel", "ddpm"): 2.24,
    (2, "ve", "ito", "em"): 0.41, (2, "ve", "kernel", "em"): 0.77, (2, "ve", "kernel", "ddpm"): 1.56,
    (2, "flow", "ito", "em"): 0.47, (2, "flow", "kernel", "em"): 0.89, (2, "flow", "kernel", "ddpm"): 3.68,
    (64, "vp", "ito", "em"): 7.41, (64, "vp", "kernel", "em"): 7.08, (64, "vp", "kernel", "ddpm"): 55.3,
    (64, "ve", "ito", "em"): 3.84, (64, "ve", "kernel", "em"): 9.65, (64, "ve", "kernel", "ddpm"): 27.7,
    (64, "flow", "ito", "em"): 3.79, (64, "flow", "kernel", "em"): 12.0, (64, "flow", "kernel", "ddpm"): 121.8,
}
# ODE estimators: (steps, batch) kept small because the exact divergence costs d JVPs
ODE_MEASURED = {
    (2, "vp", "euler"): 0.061, (2, "vp", "heun"): 0.019, (2, "ve", "euler"): 0.365, (2, "ve", "heun"): 0.034,
    (2, "flow", "euler"): 0.102, (2, "flow", "heun"): 0.004,
    (64, "vp", "euler"): 8.21, (64, "vp", "heun"): 1.63, (64, "ve", "euler"): 12.7, (64, "ve", "heun"): 2.46,
    (64, "flow", "euler"): 0.84, (64, "flow", "heun"): 0.24,
}


def _schedule(name, integrator):
    return schedules()[name]  # rectified flow: every sampler from t = 1 (tests/test_flow_core.py)


@pytest.mark.parametrize("case", sorted(MEASURED), ids=lambda c: "-".join(map(str, c)))
def test_sde_estimators_track_exact_log_density(case):
    d, sname, est, integ = case
    experts = two_mixtures(d, "flow" if sname == "flow" else "epsilon")
    err, out = tracked_error(experts, _schedule(sname, integ), SDE_STEPS, est, integ, d)
    assert torch.isfinite(err).all()
    assert err.abs().mean() < 1.5 * MEASURED[case] + 0.05, f"mean |error| {err.abs().mean():.3f} nats"


@pytest.mark.parametrize("case", sorted(ODE_MEASURED), ids=lambda c: "-".join(map(str, c)))
def test_ode_estimator_tracks_exact_log_density(case):
    d, sname, integ = case
    steps, batch = (25, 16) if d == 2 else (20, 4)
    experts = two_mixtures(d, "flow" if sname == "flow" else "epsilon")
    err, _ = tracked_error(experts, schedules()[sname], steps, "ode", integ, d, batch=batch)
    assert err.abs().mean() < 1.5 * ODE_MEASURED[case] + 0.01, f"mean |error| {err.abs().mean():.4f} nats"


@pytest.mark.parametrize("est,integ", [("ito", "em"), ("kernel", "em"), ("kernel", "ddpm")])
def test_sde_estimator_error_shrinks_with_steps(est, integ):
    """A consistent estimator: 4x the steps must cut the error at least in half (first order)."""
    sch = schedules()["ve"]
    experts = two_mixtures(2)
    coarse = tracked_error(experts, sch, 50, est, integ, 2, batch=64)[0].abs().mean()
    fine = tracked_error(experts, sch, 400, est, integ, 2, batch=64)[0].abs().mean()
    assert fine < 0.5 * coarse, (float(coarse), float(fine))


def test_heun_ode_estimator_is_second_order():
    sch = schedules()["ve"]
    experts = two_mixtures(2)
    e10 = tracked_error(experts, sch, 10, "ode", "heun", 2, batch=8)[0].abs().mean()
    e40 = tracked_error(experts, sch, 40, "ode", "heun", 2, batch=8)[0].abs().mean()
    assert e40 < e10 / 6, (float(e10), float(e40))


@pytest.mark.parametrize("est,integ", [("ito", "em"), ("kernel", "em"), ("kernel", "ddpm"), ("ode", "euler"),
                                       ("ode", "heun")])
def test_flow_matching_starts_at_t_equal_one_without_nan(est, integ):
    """Rectified flow from t = 1 exactly (alpha = 0): finite x, kappa, log q; error in tolerance."""
    sch = RectifiedFlow()
    assert float(sch.grid(10)[0]) == 1.0
    d = 2
    experts = two_mixtures(d, "flow")
    err, out = tracked_error(experts, sch, 25 if est == "ode" else 200, est, integ, d, batch=16)
    assert torch.isfinite(out.samples).all() and torch.isfinite(out.logq).all()
    assert torch.isfinite(torch.as_tensor(out.trace.kappa)).all()
    assert err.abs().mean() < (1.5 * ODE_MEASURED[(d, "flow", integ)] + 0.01 if est == "ode"
                               else 1.5 * MEASURED[(d, "flow", est, integ)] + 0.05)


@pytest.mark.parametrize("d", [2, 64])
def test_jvp_divergence_is_exact_laplacian(d):
    sch = schedules()["vp"]
    e = two_mixtures(d)[1]
    x = torch.randn(4, d, dtype=torch.float64)
    t = torch.tensor(300.0, dtype=torch.float64)

    def fn(xx):
        return e.score(xx, t, sch)[None]

    eye = torch.eye(d, dtype=torch.float64)[:, None, :].expand(d, 4, d)
    div = divergence(fn, x, eye, exact=True)[:, 0]
    assert torch.allclose(div, e.laplacian_log_prob(x, t, sch), rtol=1e-9, atol=1e-9)
    # Hutchinson with Rademacher probes is unbiased
    z = torch.randint(0, 2, (4000, 4, d), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    est = divergence(fn, x, z, exact=False)[:, 0]
    spread = e.laplacian_log_prob(x, t, sch).abs().mean()
    assert torch.allclose(est, e.laplacian_log_prob(x, t, sch), atol=0.1 * float(spread) + 0.05)


def test_a_batch_of_one_takes_forward_mode_like_any_batch():
    """The probe rows of one sample are a fresh tensor, not an expanded view of it (which
    forward-mode AD refuses to write through): B = 1 runs the exact JVP with no fallback
    warning and gives its row of a batch of two exactly."""
    import warnings

    from superdiff.estimators import ODEEstimator
    from superdiff.sampling import sample

    lat = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = []
    for B in (2, 1):
        est = ODEEstimator(jvp="forward-mode")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to finite differences warns
            outs.append(sample(two_mixtures(3), schedules()["vp"], 6, operator="or", estimator=est,
                               integrator="heun", latents=lat[:B], progress=False, dtype=torch.float64))
        assert est.jvp_mode == "forward-mode"
    assert torch.equal(outs[1].logq[0], outs[0].logq[0])
    e = two_mixtures(3)[1]
    t = torch.tensor(300.0, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)[:, None, :]
    div1 = divergence(lambda xx: e.score(xx, t, schedules()["vp"])[None], lat[:1], eye, exact=True)
    assert torch.allclose(div1[:, 0], e.laplacian_log_prob(lat[:1], t, schedules()["vp"]), rtol=1e-12)


def test_ito_update_matches_reference_ve_formula():
    """VE form: Delta log q = -<dx, v>/s - |ds| ||v||^2 / s (superdiff-math.md 3a)."""
    from superdiff.estimators import ItoEstimator, StepContext
    from superdiff.integrators import EulerMaruyama

    sch = schedules()["ve"]
    e = two_mixtures(3)[0]
    x = torch.randn(5, 3, dtype=torch.float64) * 3
    s, s_next = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.7, dtype=torch.float64)
    v = e.predict(x, s, sch)[None]
    ctx = StepContext(sch, EulerMaruyama(), s, s_next, x, v, "epsilon")
    dx = torch.randn_like(x)
    got = ItoEstimator().delta(ctx, x + dx)[:, 0]
    want = -(dx * v[0]).sum(-1) / s - (s - s_next) * (v[0] ** 2).sum(-1) / s
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
