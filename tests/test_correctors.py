"""The particle (Feynman-Kac / SMC) and MCMC correctors, checked against exact Gaussian mixtures.

1. Each potential of superdiff-math.md section 8 against the Feynman-Kac PDE itself,
   G = d_tau log p + div u + <u, grad log p> - (zeta^2 g^2 / 2)(lap log p + ||grad log p||^2),
   with exact scores, Laplacians and time derivatives of mixture log-densities.
2. ESS and systematic resampling.
3. The sampler: SMC's distance to the exact product of two mixtures falls as K grows; MCMC
   moves at a fixed noise level reach the exact product of Gaussians and keep log q exact.
4. The seam: K = 1 is the plain sampler bit for bit, K x (N + 1) rows go through one batched
   forward (chunked by max_batch_size), traces carry ESS and resampling with a JSON round trip.
5. Bad input is refused before any compute.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from superdiff import GaussianMixtureExpert, VESigma, make_betas
from superdiff.correctors import (Corrector, effective_sample_size, leaf_scores, make_corrector,
                                  product_potential, systematic_resample)
from superdiff.experts import ExpertOutput, SharedNetworkExperts
from superdiff.formula import gmm_product
from superdiff.operators import AverageOperator
from superdiff.sampling import sample
from superdiff.schedules import RectifiedFlow, VPDiscrete
from superdiff.trace import Trace

F64 = torch.float64
VE = VESigma.from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear"))
VP = VPDiscrete(make_betas(1000, 1e-4, 0.02, "linear"))

A = GaussianMixtureExpert([[-2.0, 0.0], [2.0, 0.5]], [[0.5, 0.8], [0.3, 0.6]], [0.6, 0.4])
B = GaussianMixtureExpert([[-1.0, 1.0], [1.5, -0.5], [0.0, 2.0]], [0.8, 0.4, 1.0], [0.2, 0.5, 0.3])


def fk_rate(sch, t: float, x, leaves, a, c: float, zeta2: float):
    """The exact FK potential G(x) of the path prod_j q_j^(a_j) for the SDE with drift
    -f x + c g^2 sum_j a_j s_j and noise zeta g (from the Fokker-Planck equation)."""
    t = torch.tensor(t, dtype=F64)
    dt = 1e-6 * float(t)
    f, g2 = sch.f(t), sch.g2(t)
    d = x.shape[1]

    def logp(tt):
        return sum(ai * e.log_prob(x, tt, sch) for ai, e in zip(a, leaves))

    dtau = -(logp(t + dt) - logp(t - dt)) / (2 * dt)
    S = sum(ai * e.score(x, t, sch) for ai, e in zip(a, leaves))
    lap = sum(ai * e.laplacian_log_prob(x, t, sch) for ai, e in zip(a, leaves))
    u = -f * x + c * g2 * S
    return dtau + (-d * f + c * g2 * lap) + (u * S).sum(-1) - 0.5 * zeta2 * g2 * (lap + (S**2).sum(-1))


POINTS = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2


@pytest.mark.parametrize("sch,t", [(VE, 1.3), (VP, 400.3)], ids=["ve", "vp"])
def test_product_potential_solves_the_feynman_kac_equation(sch, t):
    """[P] with a = (beta, beta): G = beta (beta-1) g^2/2 ||s1+s2||^2 + beta g^2 <s1,s2> (+ (2 beta - 1) d f),
    the section-8 lines for the product of experts (beta = 1) and its power."""
    tt = torch.tensor(t, dtype=F64)
    g2, f = float(sch.g2(tt)), float(sch.f(tt))
    s = torch.stack([A.score(POINTS, tt, sch), B.score(POINTS, tt, sch)])
    for beta in (1.0, 0.5, 2.0):
        exact = fk_rate(sch, t, POINTS, [A, B], [beta, beta], 1.0, 1.0)
        ours = product_potential(s, torch.full((8, 2), beta, dtype=F64), g2, fh=f)  # + (2 beta - 1) d f
        assert torch.allclose(ours, exact, rtol=1e-5, atol=1e-6 * exact.abs().max()), beta
        doc = (beta * (beta - 1) * g2 / 2 * ((s[0] + s[1]) ** 2).sum(-1) + beta * g2 * (s[0] * s[1]).sum(-1)
               + (2 * beta - 1) * 2 * f)
        assert torch.allclose(doc, exact, rtol=1e-5, atol=1e-6 * exact.abs().max()), beta


@pytest.mark.parametrize("sch,t", [(VE, 1.3), (VP, 400.3)], ids=["ve", "vp"])
@pytest.mark.parametrize("a", [0.0, 0.5])
def test_annealing_potential_and_the_wrong_line_of_section_8(sch, t, a):
    """p ~ q^beta with drift eta g^2 s and noise zeta g (eta = beta + (1-beta) a,
    zeta^2 = (beta + 2 (1-beta) a) / beta): G = (beta - 1) d f + beta (beta - 1) g^2/2 ||s||^2
    for both variants. superdiff-math.md writes beta g^2/2 ||s||^2 (no factor beta - 1): that is
    wrong except at beta = 2 (and would weight even beta = 1, the plain sampler)."""
    tt = torch.tensor(t, dtype=F64)
    g2, f = float(sch.g2(tt)), float(sch.f(tt))
    s = A.score(POINTS, tt, sch)
    for beta in (0.5, 1.0, 3.0):
        eta = beta + (1 - beta) * a
        zeta2 = (beta + 2 * (1 - beta) * a) / beta
        exact = fk_rate(sch, t, POINTS, [A], [beta], eta / beta, zeta2)
        ours = product_potential(s[None], torch.full((8, 1), beta, dtype=F64), g2, fh=f)  # + (beta - 1) d f
        assert torch.allclose(ours, exact, rtol=1e-5, atol=1e-6 * max(1.0, float(exact.abs().max()))), beta
        doc = (beta - 1) * 2 * f + g2 / 2 * beta * (s**2).sum(-1)
        assert not torch.allclose(doc, exact, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("sch,t", [(VE, 1.3), (VP, 400.3)], ids=["ve", "vp"])
def test_cfg_potential_is_the_geometric_average(sch, t):
    """q_u^(1-w) q_c^w: G = w (w - 1) g^2/2 ||s_u - s_c||^2, as leaf_scores gives it for a guided expert."""
    tt = torch.tensor(t, dtype=F64)
    g2 = float(sch.g2(tt))
    for w in (4.0, -1.0):
        exact = fk_rate(sch, t, POINTS, [A, B], [1 - w, w], 1.0, 1.0)  # A plays the unconditional model
        out = ExpertOutput(B.predict(POINTS, tt, sch)[None], A.predict(POINTS, tt, sch), "epsilon")
        leaves = leaf_scores(out, POINTS, tt, sch, w, g2)
        assert torch.allclose(leaves.potentials[:, 0], exact, rtol=1e-5, atol=1e-6 * exact.abs().max())
        # the guided score is the score of the geometric average
        geo = (1 - w) * A.score(POINTS, tt, sch) + w * B.score(POINTS, tt, sch)
        assert torch.allclose(leaves.scores[0], geo, atol=1e-9)


def test_mixture_potential_is_the_responsibility_weighted_average():
    """[M]: for p = w1 q_A q_B + w2 q_A (an OR over a product) G = pi_1 G_prod + pi_2 * 0."""
    t = 1.3
    tt = torch.tensor(t, dtype=F64)
    g2 = float(VE.g2(tt))
    x = POINTS
    lp1 = A.log_prob(x, tt, VE) + B.log_prob(x, tt, VE) + math.log(3.0)
    lp2 = A.log_prob(x, tt, VE)
    pi = torch.softmax(torch.stack([lp1, lp2], -1), -1)
    s = torch.stack([A.score(x, tt, VE), B.score(x, tt, VE)])
    ours = pi[:, 0] * product_potential(s, torch.ones(8, 2, dtype=F64), g2)
    # the exact G of the mixture path from the PDE (finite differences of log p in t and x)
    dt, h = 1e-6, 1e-4

    def logp(xx, tt_):
        return torch.logsumexp(torch.stack([A.log_prob(xx, tt_, VE) + B.log_prob(xx, tt_, VE) + math.log(3.0),
                                            A.log_prob(xx, tt_, VE)], -1), -1)

    dtau = -(logp(x, tt + dt) - logp(x, tt - dt)) / (2 * dt)
    grads, lap = [], 0.0
    for j in range(2):
        e = torch.zeros(2, dtype=F64)
        e[j] = h
        grads.append((logp(x + e, tt) - logp(x - e, tt)) / (2 * h))
        lap = lap + (logp(x + e, tt) - 2 * logp(x, tt) + logp(x - e, tt)) / h**2
    S = torch.stack(grads, -1)
    # drift u = g^2 S (VE: f = 0): G = d_tau log p + g^2 lap + g^2 |S|^2 - g^2/2 (lap + |S|^2)
    exact = dtau + g2 * lap + g2 * (S**2).sum(-1) - 0.5 * g2 * (lap + (S**2).sum(-1))
    assert torch.allclose(ours, exact, rtol=1e-4, atol=1e-4)


# --- ESS and resampling ----------------------------------------------------------------------

def test_effective_sample_size():
    lw = torch.log(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]]) + 1e-300)
    ess = effective_sample_size(lw)
    assert torch.allclose(ess, torch.tensor([4.0, 1.0, 16.0 / 6.0], dtype=F64))
    assert torch.allclose(effective_sample_size(lw + 1000.0), ess)  # shift-invariant, no overflow


def test_systematic_resampling_counts():
    """Each particle is copied floor(K w) or ceil(K w) times (systematic resampling's guarantee)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        w = torch.rand(3, 8, generator=g, dtype=F64) ** 3
        w = w / w.sum(-1, keepdim=True)
        idx = systematic_resample(w.log(), torch.rand(3, generator=g, dtype=F64))
        counts = torch.stack([torch.bincount(r, minlength=8) for r in idx]).to(F64)
        assert torch.all(counts >= torch.floor(8 * w) - 1e-9) and torch.all(counts <= torch.ceil(8 * w) + 1e-9)
    same = systematic_resample(torch.zeros(1, 5, dtype=F64), torch.tensor([0.3], dtype=F64))
    assert same.tolist() == [[0, 1, 2, 3, 4]]


# --- the sampler on the exact product of two mixtures ------------------------------------------

PA = GaussianMixtureExpert([[-2.0, 0.0], [2.0, 0.0]], [0.3, 0.3], [0.5, 0.5])
PB = GaussianMixtureExpert([[-2.0, 0.5], [2.0, 0.5]], [1.5, 1.5], [0.85, 0.15])
# in 1-D, modes whose widths differ between the experts: the product's mode weights depend on
# the overlaps N(m_a; m_b, v_a + v_b), which the plain product drift s_A + s_B does not see
QA = GaussianMixtureExpert([[-2.0], [2.0]], [0.3, 0.3], [0.5, 0.5])
QB = GaussianMixtureExpert([[-2.0], [2.0]], [2.0, 0.2], [0.5, 0.5])


def _product_errors(K: int, seed: int, n: int = 4000, steps: int = 20) -> tuple[float, float]:
    """(|P(x < 0) - exact|, |mean - exact| + |variance - exact|) of SMC-product samples of q_A q_B."""
    m, v, lw = gmm_product((QA.means, QA.variances, QA.log_weights), (QB.means, QB.variances, QB.log_weights))
    w = torch.softmax(lw, 0)
    left = float(w[m[:, 0] < 0].sum())
    mean = float((w * m[:, 0]).sum())
    var = float((w * (v[:, 0] + m[:, 0] ** 2)).sum()) - mean**2
    out = sample([QA, QB], VE, steps, operator=AverageOperator([1.0, 1.0]), integrator="em", shape=(n, 1),
                 generator=torch.Generator().manual_seed(seed), dtype=F64, progress=False,
                 corrector={"particles": K} if K > 1 else None)
    x = out.samples[:, 0]
    return abs(float((x < 0).to(F64).mean()) - left), abs(float(x.mean()) - mean) + abs(float(x.var()) - var)


def test_smc_error_falls_as_particles_grow():
    """Distance of SMC-product samples to the exact product q_A q_B (closed form) for K = 1, 4, 16
    particles (seed 0, 2000 samples, 15 steps): the mode-weight error falls with K by margins
    several times the binomial noise (about 0.01), and so does the moment error."""
    (w1, m1), (w4, m4), (w16, m16) = (_product_errors(K, 0, n=2000, steps=15) for K in (1, 4, 16))
    assert w1 > 0.1 and w4 < 0.6 * w1 and w16 < 0.35 * w1 and w16 < 0.04, (w1, w4, w16)
    assert m4 < 0.8 * m1 and m16 < 0.5 * m1, (m1, m4, m16)


@pytest.mark.slow
def test_smc_error_falls_as_particles_grow_on_every_seed():
    """The same with 4000 samples and 20 steps on seeds 0-2, each K better than the last
    (measured: mode weights 0.13 / 0.04-0.06 / 0.01, moments 0.82-0.85 / 0.21-0.47 / 0.06-0.10)."""
    for seed in (0, 1, 2):
        (w1, m1), (w4, m4), (w16, m16) = (_product_errors(K, seed) for K in (1, 4, 16))
        assert w1 > 0.1 and w4 < 0.6 * w1 and w16 < 0.5 * w4 and w16 < 0.03, (seed, w1, w4, w16)
        assert m4 < 0.7 * m1 and m16 < 0.6 * m4, (seed, m1, m4, m16)


def test_mcmc_moves_reach_the_product_at_a_fixed_noise_level_and_track_log_q():
    """ULA and HMC on the composed score at fixed t: starting from expert A's exact marginal, the
    moves reach the exact product of two Gaussians N(m_A, v_A + s^2) N(m_B, v_B + s^2), and each
    expert's tracked log q (trapezoid rule along every move) equals its exact log q_t."""
    from superdiff.correctors import CorrectorRun

    ga = GaussianMixtureExpert([[-1.0, 0.5]], 0.5)
    gb = GaussianMixtureExpert([[1.0, 1.5]], 1.0)
    t = torch.tensor(0.5, dtype=F64)
    va, vb = 0.5 + 0.25, 1.0 + 0.25
    v = 1 / (1 / va + 1 / vb)
    m = v * (torch.tensor([-1.0, 0.5]) / va + torch.tensor([1.0, 1.5]) / vb)
    for method, steps, scale in (("ula", 80, 0.2), ("hmc", 25, 0.6)):
        x, _ = ga.sample(2000, torch.Generator().manual_seed(1), t=t, schedule=VE)
        logq = torch.stack([ga.log_prob(x, t, VE), gb.log_prob(x, t, VE)], -1)
        cfg = Corrector(mcmc=method, mcmc_steps=steps, step_scale=scale)
        from superdiff.experts import ExpertList

        run = CorrectorRun(cfg, ExpertList([ga, gb]), x, logq, VE, torch.tensor([1.0, 0.5, 0.0], dtype=F64),
                           AverageOperator([1.0, 1.0]), torch.Generator().manual_seed(2), 1.0, F64, F64)
        xm, lq = run._mcmc(0, 2, t, run.x, run.logq, torch.ones(2000, 2, dtype=F64))
        exact = torch.stack([ga.log_prob(xm, t, VE), gb.log_prob(xm, t, VE)], -1)
        assert torch.allclose(lq, exact, atol=1e-8), method  # trapezoid: exact for Gaussians
        assert (xm.mean(0) - m).norm() < 0.08, (method, xm.mean(0), m)
        # unadjusted: a small step-size bias in the variance (ULA: v / (1 - eps/(2 v)))
        assert torch.allclose(xm.var(0), torch.full((2,), v, dtype=F64), rtol=0.12), (method, xm.var(0), v)


# --- the seam ----------------------------------------------------------------------------------

def _shared_net(max_batch_size=None):
    """One 'network' that serves two mixture experts and an unconditional branch by condition id."""
    experts = [PA, PB, GaussianMixtureExpert([[0.0, 0.0]], 4.0)]
    calls = []

    def fn(x, t, cond):
        calls.append(x.shape[0])
        out = torch.empty_like(x)
        for i, e in enumerate(experts):
            rows = cond == i
            if rows.any():
                out[rows] = e.predict(x[rows], t, VE)
        return out

    cond = [torch.tensor([0]), torch.tensor([1])]
    return SharedNetworkExperts(fn, cond, "epsilon", uncond_condition=torch.tensor([2]),
                                max_batch_size=max_batch_size), calls


def test_one_particle_is_the_plain_sampler_bit_for_bit():
    kw = dict(operator=AverageOperator([1.0, 1.0]), integrator="em", shape=(5, 2), dtype=F64, progress=False)
    plain = sample([PA, PB], VE, 12, generator=torch.Generator().manual_seed(3), **kw)
    one = sample([PA, PB], VE, 12, generator=torch.Generator().manual_seed(3),
                 corrector=Corrector(particles=1), **kw)
    assert torch.equal(plain.samples, one.samples)
    assert one.trace.ess is None


def test_particles_share_one_batched_forward_per_step_and_the_trace_round_trips(tmp_path):
    """K x (N + 1) rows per step in one forward (chunked by max_batch_size); the trace holds
    ESS and resampling events per step and image and survives a JSON round trip."""
    B, K, steps = 3, 4, 10
    es, calls = _shared_net()
    out = sample(es, VE, steps, operator=AverageOperator([1.0, 1.0]), guidance_scale=2.0, integrator="em",
                 shape=(B, 2), generator=[torch.Generator().manual_seed(i) for i in range(B)], dtype=F64,
                 progress=False, corrector={"particles": K, "ess_threshold": 1.0})
    assert out.samples.shape == (B, 2)
    assert calls == [K * B * 3] * steps and out.trace.meta["forward_calls"] == steps
    tr = out.trace
    assert tr.ess.shape == (steps, B) and tr.resampled.shape == (steps, B)
    assert np.all((tr.ess > 0) & (tr.ess <= 1 + 1e-12)) and tr.resampled.all()
    assert tr.kappa.shape == (steps, B, 2) and tr.logq.shape == (steps + 1, B, 2)
    back = Trace.load(tr.save(tmp_path / "t.json"))
    assert np.array_equal(back.ess, tr.ess) and np.array_equal(back.resampled, tr.resampled)
    assert back.select([0, 2]).ess.shape == (steps, 2)
    fig = tr.plot(tmp_path / "t.png", samples=2)
    assert len(fig.axes) == 6 and (tmp_path / "t.png").exists()
    es2, calls2 = _shared_net(max_batch_size=10)
    out2 = sample(es2, VE, steps, operator=AverageOperator([1.0, 1.0]), guidance_scale=2.0, integrator="em",
                  shape=(B, 2), generator=[torch.Generator().manual_seed(i) for i in range(B)], dtype=F64,
                  progress=False, corrector={"particles": K, "ess_threshold": 1.0})
    assert calls2 == [10, 10, 10, 6] * steps
    assert torch.allclose(out2.samples, out.samples, atol=1e-12)


@pytest.mark.parametrize("corrector", [{"mcmc": "ula", "mcmc_steps": 2}, {"mcmc": "hmc", "mcmc_steps": 2},
                                       {"particles": 3, "ess_threshold": 1.0, "mcmc": "ula"}])
def test_the_trace_holds_log_q_after_each_steps_corrector(corrector):
    """Trace.logq[k + 1] is the state the next step starts from, after step k's resampling and
    MCMC moves (what the callback sees): its last entry is the output's log q, and with
    particles each image's entry is one of its particles' at that step (its ancestor's)."""
    B = 2
    seen = []
    out = sample([PA, PB], VE, 8, operator="or", integrator="em", shape=(B, 2), dtype=F64, progress=False,
                 generator=[torch.Generator().manual_seed(i) for i in range(B)], corrector=corrector,
                 callback=lambda info: seen.append(info.logq.clone()))
    tr = out.trace
    assert np.array_equal(tr.logq[-1], out.logq.numpy())
    K = corrector.get("particles", 1)
    for k, lq in enumerate(seen):
        for b in range(B):
            mine = torch.as_tensor(tr.logq[k + 1, b])
            assert any(torch.equal(mine, row) for row in lq[b * K:(b + 1) * K]), (k, b)


def test_window_and_clip_control_resampling():
    """No resampling outside the window; a clip of ~0 nats keeps every weight equal (ESS = K)."""
    kw = dict(operator=AverageOperator([1.0, 1.0]), integrator="em", shape=(3, 2), dtype=F64, progress=False,
              generator=torch.Generator().manual_seed(0))
    late = sample([PA, PB], VE, 10, corrector={"particles": 4, "ess_threshold": 1.0, "window": (0.55, 1.0)}, **kw)
    assert not late.trace.resampled[:5].any() and late.trace.resampled[5:].all()
    flat = sample([PA, PB], VE, 10, corrector={"particles": 4, "clip": 1e-12}, **kw)
    assert np.allclose(flat.trace.ess, 1.0) and not flat.trace.resampled.any()


def test_each_image_is_reproducible_from_its_own_generator():
    kw = dict(operator=AverageOperator([1.0, 1.0]), integrator="em", dtype=F64, progress=False,
              corrector={"particles": 4, "mcmc": "ula"})
    both = sample([PA, PB], VE, 8, shape=(2, 2), generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **kw)
    alone = sample([PA, PB], VE, 8, shape=(1, 2), generator=[torch.Generator().manual_seed(6)], **kw)
    assert torch.allclose(both.samples[1], alone.samples[0], atol=1e-12)


def test_mcmc_costs_its_moves_in_network_evaluations():
    """n ULA moves cost n evaluations per step: the last one is handed to the next step."""
    es, calls = _shared_net()
    steps = 6
    sample(es, VE, steps, operator=AverageOperator([1.0, 1.0]), integrator="em", guidance_scale=1.5, shape=(2, 2),
           generator=torch.Generator().manual_seed(0), dtype=F64, progress=False,
           corrector={"mcmc": "ula", "mcmc_steps": 2})
    assert len(calls) == steps + 2 * (steps - 1)  # no moves after the final step to sigma = 0


@pytest.mark.parametrize("bad_call,msg", [
    (2, "during the MCMC corrector after step 0"),  # call 1: step 0; call 2: the move after it
    (1, r"expert 0 returned non-finite values \(NaN/inf\) at step 0"),  # the step's own forward comes first
])
def test_a_non_finite_mcmc_evaluation_is_reported_after_the_loop_with_its_step(bad_call, msg):
    """The MCMC moves record their evaluations on the sampler's monitor (no host read per
    move); the one read after the loop names the earliest source: the corrector after step k
    comes after step k's own experts, before step k + 1's."""
    es, calls = _shared_net()
    inner = es.fn

    def fn(x, t, cond):
        out = inner(x, t, cond)
        return out * float("nan") if len(calls) == bad_call else out

    es.fn = fn
    with pytest.raises(ValueError, match=msg):
        sample(es, VE, 4, operator=AverageOperator([1.0, 1.0]), integrator="em", shape=(2, 2),
               generator=torch.Generator().manual_seed(0), dtype=F64, progress=False, corrector="ula")
    assert len(calls) == 4 + 3  # the call ran to the end: the error comes from the one read after it


def test_the_primed_mcmc_evaluation_is_found_by_the_tensor_or_by_its_values_but_not_after_a_change():
    from superdiff.correctors import CachedExperts

    es, calls = _shared_net()
    ce = CachedExperts(es)
    t = torch.tensor(1.0)
    x = torch.randn(3, 2)
    ref = es.evaluate(x, t, VE)
    calls.clear()
    ce.prime(x, t, ref)
    assert ce.evaluate(x, t, VE) is ref and calls == []  # the same tensor: no values read
    ce.prime(x, t, ref)
    assert ce.evaluate(x.clone(), t, VE) is ref and calls == []  # an equal copy: compared by value
    ce.prime(x, t, ref)
    x.add_(1.0)  # changed in place after priming
    assert ce.evaluate(x, t, VE) is not ref and len(calls) == 1
    ce.prime(x, t, ref)
    assert ce.evaluate(x, torch.tensor(0.5), VE) is not ref and len(calls) == 2  # another time


def test_the_primed_evaluation_at_a_copy_in_the_models_dtype_is_handed_over_by_identity():
    """The MCMC end point is primed at its copy in the networks' dtype (an fp16 UNet, float32
    latents); the step asks for exactly that copy (model_input) and evaluate recognises it by
    identity: no value comparison, which on a GPU is a host read every step."""
    from superdiff.correctors import CachedExperts

    es, calls = _shared_net()
    ce = CachedExperts(es)
    t = torch.tensor(1.0)
    x = torch.randn(3, 2, dtype=F64)  # the sampler's x
    xm = x.to(torch.float32)  # the copy in the models' dtype the MCMC evaluation was made at
    ref = es.evaluate(xm, t, VE)
    calls.clear()
    ce.prime(xm, t, ref, source=x)
    got = ce.model_input(x, torch.float32)
    assert got is xm
    equal = torch.equal
    try:
        torch.equal = lambda *a: pytest.fail("the primed copy was compared by value")
        assert ce.evaluate(got, t, VE) is ref and calls == []
    finally:
        torch.equal = equal
    # used once: the next step converts afresh (a new tensor) and evaluates
    assert ce.model_input(x, torch.float32) is not xm
    ce.prime(xm, t, ref, source=x)
    x.add_(1.0)  # the sampler's x changed after priming: a fresh conversion, a forward call
    fresh = ce.model_input(x, torch.float32)
    assert fresh is not xm and ce.evaluate(fresh, t, VE) is not ref and len(calls) == 1
    ce.prime(xm, t, ref, source=x)
    assert ce.model_input(x, torch.float16) is not xm  # another dtype asked for: converted afresh


# --- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,msg", [
    ({"particles": 0}, "particles K must be an int >= 1"),
    ({"particles": 2.5}, "particles K must be an int >= 1"),
    ({"particles": 4, "window": (-0.1, 0.5)}, "outside [0, 1]"),
    ({"particles": 4, "window": (0.2, 1.5)}, "outside [0, 1]"),
    ({"particles": 4, "window": (0.8, 0.2)}, "outside [0, 1] or reversed"),
    ({"particles": 4, "ess_threshold": 0}, "ess_threshold"),
    ({"mcmc": "mala"}, "unknown MCMC corrector"),
    ({"mcmc": "ula", "mcmc_steps": 0}, "mcmc_steps"),
    ({"particle": 4}, "unknown corrector field"),
    ("smc:x", "needs an integer K"),
    ("smc:0", "particles K must be an int >= 1"),
    ("gibbs", "unknown corrector"),
    ("ula+hmc", "at most one MCMC part"),
    ("smc:2+smc:8", "at most one smc part"),
])
def test_bad_corrector_settings_are_refused(spec, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        make_corrector(spec)


def _counting_pair(prediction_type: str = "epsilon"):
    """Two 2-D experts that record each prediction in `calls` (refusals must come before any)."""
    calls = []

    class Counting(GaussianMixtureExpert):
        def predict(self, x, t, schedule):
            calls.append(1)
            return super().predict(x, t, schedule)

    kw = {} if prediction_type == "epsilon" else {"prediction_type": prediction_type}
    return [Counting([[0.0, 0.0]], 1.0, **kw), Counting([[1.0, 0.0]], 1.0, **kw)], calls


def test_smc_refusals_come_before_compute():
    e, calls = _counting_pair()
    with pytest.raises(ValueError, match="not a density"):
        sample(e, VE, 5, operator="and", shape=(2, 2), progress=False, corrector="smc:4")
    with pytest.raises(ValueError, match="stochastic integrator"):
        sample(e, VE, 5, operator=AverageOperator([1.0, 1.0]), integrator="euler", shape=(2, 2), progress=False,
               corrector="smc:4")
    from superdiff.schedules import RectifiedFlow

    flow, flow_calls = _counting_pair("flow")
    with pytest.raises(ValueError, match="potential is infinite on the first step"):
        sample(flow, RectifiedFlow(), 5, operator="or", shape=(2, 2), progress=False, corrector="smc:4")
    with pytest.raises(ValueError, match="need not sum to one"):  # the product's reference, first
        sample(flow, RectifiedFlow(), 5, operator=AverageOperator([1.0, 1.0]), shape=(2, 2), progress=False,
               corrector="smc:4")
    assert calls == [] and flow_calls == []


def test_string_specs():
    c = make_corrector("smc:8+hmc")
    assert c.particles == 8 and c.mcmc == "hmc"
    assert make_corrector("none") is None and make_corrector(None) is None
    assert make_corrector("smc").particles == 4


def test_cached_experts_send_the_jvp_rows_to_the_inner_set_alone():
    """CachedExperts.evaluate_conditional (the ODE estimator's finite-difference point): only
    the inner set's conditional rows go through the network (no unconditional rows), and
    neither the priming (the MCMC end point, for the next step's own evaluation) nor `last`
    (the evaluation at the step's x) changes."""
    from superdiff.correctors import CachedExperts

    calls = []

    def fn(x, t, cond):
        calls.append(x.shape[0])
        return torch.tanh(x * cond[:, None])

    inner = SharedNetworkExperts(fn, [torch.tensor([1.0]), torch.tensor([2.0])], "epsilon",
                                 uncond_condition=torch.tensor([0.5]))
    ce = CachedExperts(inner)
    t = torch.tensor(1.0)
    x, x2 = torch.randn(3, 4), torch.randn(3, 4)
    ref = inner.evaluate(x, t, VE)
    calls.clear()
    ce.prime(x, t, ref)
    shifted = ce.evaluate_conditional(x2, t, VE)
    assert calls == [2 * 3] and torch.equal(shifted, inner.evaluate_conditional(x2, t, VE))
    assert ce.last is None
    calls.clear()
    assert ce.evaluate(x, t, VE) is ref and calls == []  # the priming is still there
    assert ce.last[2] is ref


def test_a_callback_stopping_the_run_gets_one_particle_per_image_and_its_trace():
    """StopSampling from the callback (the pipelines' pipe._interrupt) ends the run after that
    step as a full run ends: the corrector picks one particle per image, the trace covers the
    steps taken with their ESS, and it equals the first steps of an uninterrupted run."""
    from superdiff.sampling import StopSampling

    def stop_after(k):
        def cb(info):
            if info.step == k:
                raise StopSampling()
        return cb

    kw = dict(operator="or", integrator="em", shape=(2, 2), dtype=F64, progress=False, corrector="smc:3")
    out = sample([PA, PB], VE, 8, generator=[torch.Generator().manual_seed(i) for i in range(2)], callback=stop_after(2),
                 **kw)
    assert out.samples.shape == (2, 2) and out.logq.shape == (2, 2)
    tr = out.trace
    assert tr.kappa.shape == (3, 2, 2) and tr.logq.shape == (4, 2, 2) and len(tr.t) == 4
    assert tr.ess.shape == (3, 2) and tr.meta["interrupted_after_step"] == 3 and tr.meta["num_steps"] == 3
    assert np.array_equal(tr.logq[-1], out.logq.numpy())
    full = sample([PA, PB], VE, 8, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw)
    np.testing.assert_array_equal(tr.ess, full.trace.ess[:3])


# --- guidance and the unconditional branch ---------------------------------------------------

U = GaussianMixtureExpert([[0.0, 0.0], [1.0, -1.0]], [4.0, 2.0], [0.5, 0.5])  # the unconditional model


def _fk_rate_of(logp, drift, x, t, g2, dt=1e-6):
    """The exact FK rate of the path exp(logp(x, t)) under the drift u = drift(x) (which
    includes -f x where f != 0) and noise g:
    G = d_tau log p + div u + <u, grad log p> - g^2/2 (lap log p + ||grad log p||^2), by central
    differences in t (step dt) and x. Also returns grad log p."""
    h = 1e-4
    dtau = -(logp(x, t + dt) - logp(x, t - dt)) / (2 * dt)
    grads, lap, div = [], 0.0, 0.0
    for j in range(x.shape[1]):
        e = torch.zeros(x.shape[1], dtype=F64)
        e[j] = h
        grads.append((logp(x + e, t) - logp(x - e, t)) / (2 * h))
        lap = lap + (logp(x + e, t) - 2 * logp(x, t) + logp(x - e, t)) / h**2
        div = div + (drift(x + e)[:, j] - drift(x - e)[:, j]) / (2 * h)
    S = torch.stack(grads, -1)
    u = drift(x)
    return dtau + div + (u * S).sum(-1) - 0.5 * g2 * (lap + (S**2).sum(-1)), S


def test_smc_on_an_or_under_guidance_follows_the_mixture_of_guided_leaves():
    """docs/correctors.md: under guidance w with a shared unconditional branch u each leaf is
    q_u^(1-w) q_i^w, and an OR is the mixture p = sum_c w_c q_u^(1-w) q_c^w. The step's kappa
    under SMC (CorrectorRun.step_operator) makes the drift p's score, and tree_potential's rate
    is the exact Feynman-Kac rate of p under that drift; at w = 1 the step's operator is the
    formula itself. Before: pi = softmax(log w_c + log q_c) from the unguided log q_c in both
    (rate off by 3 at w = 3)."""
    from superdiff.correctors import CorrectorRun
    from superdiff.experts import ExpertList
    from superdiff.formula import FormulaOperator, tree_potential
    from superdiff.operators import StepState

    t = torch.tensor(1.3, dtype=F64)
    g2 = float(VE.g2(t))
    x = POINTS
    wts = torch.tensor([1.0, 3.0], dtype=F64)
    op = FormulaOperator('"a":1 | "b":3')
    out = ExpertOutput(torch.stack([A.predict(x, t, VE), B.predict(x, t, VE)]), U.predict(x, t, VE), "epsilon")

    def lq(xx, tt=t):
        return torch.stack([A.log_prob(xx, tt, VE), B.log_prob(xx, tt, VE)], -1)

    for w in (3.0, 1.0):
        run = CorrectorRun(Corrector(particles=2), ExpertList([A, B], U), x, lq(x), VE,
                           torch.tensor([1.3, 1.0, 0.0], dtype=F64), op, torch.Generator().manual_seed(0), w, F64, F64)
        step_op = run.step_operator
        assert (step_op is op) == (w == 1.0)

        def logp(xx, tt):
            return torch.logsumexp(wts.log() + (1 - w) * U.log_prob(xx, tt, VE)[:, None] + w * lq(xx, tt), -1)

        def drift(xx):  # g^2 times the step's composed score sum_c kappa_c (s_u + w (s_c - s_u))
            k = step_op.kappa(StepState(lq(xx), 0, 10))
            su = U.score(xx, t, VE)
            s = torch.stack([su + w * (e.score(xx, t, VE) - su) for e in (A, B)])
            return g2 * torch.einsum("bc,cbd->bd", k, s)

        exact, score = _fk_rate_of(logp, drift, x, t, g2)
        assert torch.allclose(drift(x) / g2, score, atol=1e-6), w  # the drift is the target's score
        kappa = step_op.kappa(StepState(lq(x), 0, 10))
        G, _ = tree_potential(op.formula.root, leaf_scores(out, x, t, VE, w, g2), lq(x), kappa, g2)
        assert torch.allclose(G, exact, rtol=1e-4, atol=1e-4 * max(1.0, float(exact.abs().max()))), (w, G, exact)


@pytest.mark.parametrize("sch,t", [(VE, 1.3), (VP, 400.3), (RectifiedFlow(), 0.6)], ids=["ve", "vp", "flow"])
def test_smc_rate_of_an_or_over_a_product_and_a_leaf_is_exact_on_vp(sch, t):
    """("a" & "b") | "c" in product mode, p = q_A q_B + q_C, no unconditional branch: the
    corrector's increment (CorrectorRun._increment over one step of length h, divided by h)
    is the exact Feynman-Kac rate of p under the step's drift -f x + g^2 sum_i kappa_i s_i, at
    every point, on VE, VP and a rectified flow. [P] carries (sum a - 1) d f; under [M] it is
    weighted by pi_prod(x), so where f != 0 (VP, flows) it does not cancel between particles.
    Before, product nodes dropped it: on VP the increment was off by -pi_prod(x) d f, whose
    spread over the 8 points (9.9e-4) exceeded the rate itself (|G| <= 7.6e-4); exact now to 3e-9."""
    from superdiff.correctors import CorrectorRun
    from superdiff.experts import ExpertList
    from superdiff.formula import FormulaOperator
    from superdiff.operators import StepState

    tt = torch.tensor(t, dtype=F64)
    g2, f = float(sch.g2(tt)), float(sch.f(tt))
    assert (f == 0.0) == (sch is VE)  # f != 0 on VP and on the flow
    x, ex, h = POINTS, [A, B, U], 0.25 * t  # U plays an ordinary third expert "c" here
    op = FormulaOperator('("a" & "b") | "c"', and_mode="product")

    def lq(xx, tt_=tt):
        return torch.stack([e.log_prob(xx, tt_, sch) for e in ex], -1)

    def logp(xx, tt_):
        return torch.logsumexp(torch.stack([lq(xx, tt_)[:, :2].sum(-1), lq(xx, tt_)[:, 2]], -1), -1)

    def drift(xx):
        k = op.kappa(StepState(lq(xx), 0, 10))
        return -f * xx + g2 * torch.einsum("bc,cbd->bd", k, torch.stack([e.score(xx, tt, sch) for e in ex]))

    exact, score = _fk_rate_of(logp, drift, x, tt, g2, dt=1e-6 * t)
    assert torch.allclose((drift(x) + f * x) / g2, score, atol=1e-6)  # the drift is p's score
    run = CorrectorRun(Corrector(particles=2), ExpertList(ex), x, lq(x), sch,
                       torch.tensor([t, t - h, 0.0], dtype=F64), op, torch.Generator().manual_seed(0), 1.0, F64, F64)
    run.experts.evaluate(x, tt, sch)  # the step's own evaluation at (x, t)
    G = run._increment(1, tt, tt - h, lq(x), op.kappa(StepState(lq(x), 0, 10))) / h
    assert torch.allclose(G, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max())), (G - exact)


def _cfg_net(experts):
    """One 'network' serving the given experts by condition id and U as the shared unconditional branch."""
    calls = []

    def fn(x, t, cond):
        calls.append(x.shape[0])
        out = torch.empty_like(x)
        for i, e in enumerate([*experts, U]):
            rows = cond == i
            if rows.any():
                out[rows] = e.predict(x[rows], t, VE)
        return out

    return SharedNetworkExperts(fn, [torch.tensor([i]) for i in range(len(experts))], "epsilon",
                                uncond_condition=torch.tensor([len(experts)])), calls


def test_smc_steps_under_guidance_take_kappa_from_the_guided_leaves():
    """Through sample: each step's kappa (K = 3 particles, w = 3, a shared unconditional
    branch) is softmax(log w_c + w log q_c) of the log q the step starts from (what the
    previous step's callback saw); the plain sampler (no corrector) keeps softmax(log w_c + log q_c)."""
    from superdiff.formula import FormulaOperator

    w, wts = 3.0, torch.tensor([1.0, 3.0], dtype=F64)
    for corrector, scale in (({"particles": 3, "ess_threshold": 1.0}, w), (None, 1.0)):
        es, _ = _cfg_net([A, B])
        seen = []
        sample(es, VE, 6, operator=FormulaOperator('"a":1 | "b":3'), guidance_scale=w, integrator="em",
               shape=(2, 2), generator=torch.Generator().manual_seed(0), dtype=F64, progress=False,
               corrector=corrector, callback=lambda info: seen.append((info.kappa.clone(), info.logq.clone())))
        for (_, lq_prev), (kappa, _) in zip(seen, seen[1:]):
            assert torch.allclose(kappa, torch.softmax(wts.log() + scale * lq_prev, -1), atol=1e-12), corrector


def test_smc_refuses_an_or_whose_branches_need_log_q_u_before_compute():
    """("a" & "b") | "c" (product mode) with a shared unconditional branch u: the branches'
    kappa sums are 2 and 1, so u completes them to different powers (q_u^(2 (1-w)) q_u^(1-2) and
    q_u^(1-w)) and their responsibilities need log q_u, which is not tracked. Refused before any
    network evaluation, at any guidance (w = 1 too: the rest 1 - sum kappa goes to u), naming
    the OR; the same OR without an unconditional branch, and equal sums with one, sample."""
    from superdiff.formula import FormulaOperator

    C = GaussianMixtureExpert([[1.0, 1.0]], 1.5)
    for w in (1.0, 3.0):
        es, calls = _cfg_net([A, B, C])
        with pytest.raises(ValueError, match=r'no tracked target for the OR \("a" & "b"\) \| "c": .* \(2, 1\)'):
            sample(es, VE, 4, operator=FormulaOperator('("a" & "b") | "c"', and_mode="product"), guidance_scale=w,
                   shape=(2, 2), generator=torch.Generator().manual_seed(0), progress=False, corrector="smc:2")
        assert calls == []
    # the same OR without an unconditional branch (its rest goes to the zero-score reference), and
    # an OR whose branches have equal sums with one, sample
    sample([A, B, C], VE, 3, operator=FormulaOperator('("a" & "b") | "c"', and_mode="product"), shape=(2, 2),
           generator=torch.Generator().manual_seed(0), progress=False, corrector="smc:2")
    es, calls = _cfg_net([A, B, C])
    sample(es, VE, 3, operator=FormulaOperator('("a" & "b") | ("c" & "c")', and_mode="product"), guidance_scale=3.0,
           shape=(2, 2), generator=torch.Generator().manual_seed(0), progress=False, corrector="smc:2")
    assert len(calls) == 3


def test_smc_refuses_an_or_under_guidance_with_one_unconditional_branch_per_expert():
    """Per-expert unconditional branches: each guided leaf q_u_i^(1-w) q_i^w has its own q_u_i,
    so an OR's responsibilities are unknown: refused (at the first step's potential)."""
    from superdiff.experts import ExpertList
    from superdiff.formula import FormulaOperator

    with pytest.raises(ValueError, match="needs one unconditional branch shared by all experts"):
        sample(ExpertList([A, B], [U, U]), VE, 3, operator=FormulaOperator('"a" | "b"'), guidance_scale=3.0,
               shape=(2, 2), generator=torch.Generator().manual_seed(0), progress=False, corrector="smc:2")
    sample(ExpertList([A, B], [U, U]), VE, 3, operator=AverageOperator([1.0, 1.0]), guidance_scale=3.0,
           shape=(2, 2), generator=torch.Generator().manual_seed(0), progress=False, corrector="smc:2")


def test_logq_init_with_smc_is_refused_before_compute():
    """The K - 1 extra particles start from the prior, where the caller's log q does not hold:
    before, particle 0 kept logq_init and the others the prior value, so the initial weights
    mixed the two (ESS / K = 1 / K after the first step). One particle (MCMC alone) keeps it."""
    e, calls = _counting_pair()
    init = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"logq_init cannot be combined with SMC \(particles=4\)"):
        sample(e, VE, 4, operator=AverageOperator([1.0, 1.0]), shape=(2, 2), logq_init=init, progress=False,
               corrector="smc:4")
    assert calls == []
    out = sample(e, VE, 4, operator="or", shape=(2, 2), logq_init=init, dtype=F64, progress=False, corrector="ula")
    assert np.array_equal(out.trace.logq[0], init.numpy())
