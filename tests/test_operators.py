"""OR, AND, average and single on exact Gaussian-mixture experts (superdiff-math.md 4)."""

import numpy as np
import pytest
import torch
from _gmm import schedules, shared_mode_experts, two_mixtures

from superdiff.experts import GaussianMixtureExpert
from superdiff.integrators import make_integrator
from superdiff.operators import AndOperator, OrOperator, SingleOperator, project_capped_simplex, solve_and
from superdiff.sampling import sample
from superdiff.schedules import VESigma, make_betas


def _two_modes(d):
    g = torch.Generator().manual_seed(5)
    a, b = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0].T * 4
    return GaussianMixtureExpert(a[None], 0.25), GaussianMixtureExpert(b[None], 0.25), a, b


@pytest.mark.parametrize("sname,est,integ", [("ve", "kernel", "em"), ("vp", "ito", "em"), ("vp", "kernel", "ddpm")])
def test_or_with_log_weight_bias_reproduces_mixture_weights(sname, est, integ):
    e1, e2, a, b = _two_modes(2)
    out = sample([e1, e2], schedules()[sname], 100, operator=OrOperator(weights=[0.3, 0.7]), estimator=est,
                 integrator=integ, shape=(4000, 2), generator=torch.Generator().manual_seed(0),
                 dtype=torch.float64, progress=False)
    frac = ((out.samples - a).norm(dim=1) < (out.samples - b).norm(dim=1)).double().mean()
    assert abs(float(frac) - 0.3) < 0.03, float(frac)


def test_or_weights_in_high_dimension():
    e1, e2, a, b = _two_modes(64)
    out = sample([e1, e2], schedules()["ve"], 100, operator=OrOperator(bias=np.log([0.6, 0.4])),
                 shape=(4000, 64), generator=torch.Generator().manual_seed(1), dtype=torch.float64, progress=False)
    frac = ((out.samples - a).norm(dim=1) < (out.samples - b).norm(dim=1)).double().mean()
    assert abs(float(frac) - 0.6) < 0.03, float(frac)


@pytest.mark.parametrize("temperature", [float("inf"), 1e6])
def test_or_large_temperature_assigns_each_sample_to_one_expert(temperature):
    e1, e2, a, b = _two_modes(2)
    out = sample([e1, e2], schedules()["ve"], 100, operator=OrOperator(temperature=temperature),
                 shape=(500, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64, progress=False)
    k = out.trace.kappa[1:]  # after the first step, where all log q are equal
    assert np.all(np.isclose(k.max(-1), 1.0, atol=1e-6))
    # the samples end in one expert's mode, both experts used
    near_a = ((out.samples - a).norm(dim=1) < 1.5).double().mean()
    near_b = ((out.samples - b).norm(dim=1) < 1.5).double().mean()
    assert near_a + near_b > 0.99 and 0.2 < near_a < 0.8


@pytest.mark.parametrize("logq0", [0.0, -93.8, -3.7e5, -1e7])  # -3.7e5: the prior at d = 16 * 128 * 128
def test_or_infinite_temperature_breaks_exact_ties_by_the_bias_at_any_scale(logq0):
    """T = inf: each row follows its largest log q; among experts exactly tied for it the largest
    bias wins, then the lowest index. A log q ahead by one rounding step still beats any bias."""
    from superdiff.operators import StepState

    ahead = float(np.nextafter(logq0, 1.0))
    logq = torch.tensor([[logq0, logq0, logq0],  # three-way tie: the largest bias (expert 1)
                         [logq0, logq0, logq0 - 1.0],  # experts 0, 1 tied, 1 has the larger bias
                         [logq0, logq0 - 1.0, logq0],  # experts 0, 2 tied, 0 has the larger bias
                         [ahead, logq0, logq0]], dtype=torch.float64)  # expert 0 ahead, despite its bias
    op = OrOperator(float("inf"), weights=[0.3, 0.4, 0.3 - 1e-6])
    op.validate(3)
    k = op.kappa(StepState(logq, 0, 10))
    assert k.tolist() == [[0, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]]
    # without a bias (or with an equal one) ties go to the lowest index
    for unbiased in (OrOperator(float("inf")), OrOperator(float("inf"), weights=[1, 1, 1])):
        unbiased.validate(3)
        assert unbiased.kappa(StepState(logq, 0, 10)).argmax(-1).tolist() == [0, 0, 0, 0]


def test_or_infinite_temperature_first_step_follows_the_heavier_expert_at_image_size():
    """The first step of an image-sized latent (d = 16 * 128 * 128): every expert is at the shared
    prior log q (about -3.7e5), so the tie goes to the expert of the larger mixture weight."""
    from superdiff.operators import StepState
    from superdiff.sampling import prior_log_prob
    from superdiff.schedules import RectifiedFlow

    x = torch.randn(2, 16 * 128 * 128, generator=torch.Generator().manual_seed(0))
    lq = prior_log_prob(x, RectifiedFlow(), 1.0)[:, None].expand(2, 2).clone()
    for weights, want in (([0.49, 0.51], 1), ([0.51, 0.49], 0)):
        op = OrOperator(float("inf"), weights=weights)
        op.validate(2)
        assert op.kappa(StepState(lq, 0, 10)).argmax(-1).tolist() == [want, want]


@pytest.mark.parametrize("temperature", [float("inf"), 1.0])
def test_or_with_weights_steps_without_host_device_traffic(temperature):
    """After the first step, OR's kappa reads nothing back and copies nothing onto the device
    (the bias goes there once), on the stand-in accelerator of test_device_traffic."""
    from _device import StandInDevice

    from superdiff.operators import StepState

    op = OrOperator(temperature, weights=[0.49, 0.51])
    op.validate(2)
    with StandInDevice() as mode:
        logq = torch.zeros(2, 2, dtype=torch.float64, device="meta")
        op.kappa(StepState(logq, 0, 10))
        first = (mode.reads, mode.copies)
        for step in range(1, 5):
            op.kappa(StepState(logq, step, 10))
        assert (mode.reads, mode.copies) == first


def test_or_length_errors_name_the_argument_the_user_gave():
    with pytest.raises(ValueError, match=r"OR mixture weights must have one entry per expert \(2\), got shape \(3,\)"):
        OrOperator(weights=[1, 2, 3]).validate(2)
    with pytest.raises(ValueError, match=r"OR bias must have one entry per expert \(2\), got shape \(3,\)"):
        OrOperator(bias=[0.0, 0.0, 0.0]).validate(2)


def test_or_zero_temperature_is_fixed_softmax_of_bias():
    e1, e2, *_ = _two_modes(2)
    out = sample([e1, e2], schedules()["ve"], 10, operator=OrOperator(temperature=0.0, weights=[1, 3]),
                 shape=(8, 2), progress=False)
    assert np.allclose(out.trace.kappa, [0.25, 0.75])


@pytest.mark.parametrize("d", [2, 64])
@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("sname,est,integ", [("ve", "kernel", "em"), ("vp", "ito", "em"), ("flow", "kernel", "ddpm")])
def test_and_puts_samples_in_the_shared_mode(d, m, sname, est, integ):
    experts, centres = shared_mode_experts(d, m, "flow" if sname == "flow" else "epsilon")
    out = sample(experts, schedules()[sname], 100, operator="and", estimator=est, integrator=integ,
                 shape=(400 if d == 2 else 200, d), generator=torch.Generator().manual_seed(0), dtype=torch.float64, progress=False)
    # assign every sample to its most likely component over all experts' components
    comp = torch.cat([e.component_log_prob(out.samples, 0.0, schedules()["vp"]) for e in experts], -1)
    shared_ids = [2 * i + 1 for i in range(m)]  # the shared mode is component 1 of every expert
    in_shared = torch.isin(comp.argmax(-1), torch.tensor(shared_ids)).double().mean()
    assert in_shared >= 0.9, float(in_shared)
    assert np.isfinite(out.trace.kappa).all()


def test_and_beats_or_at_finding_the_shared_mode():
    experts, centres = shared_mode_experts(2, 2)
    kw = dict(shape=(400, 2), generator=None, dtype=torch.float64, progress=False)
    res = {}
    for op in ["and", "or"]:
        out = sample(experts, schedules()["ve"], 100, operator=op, **{**kw, "generator": torch.Generator().manual_seed(0)})
        res[op] = float(((out.samples - centres[-1]).norm(dim=1) < 1.5).double().mean())
    assert res["and"] > res["or"] + 0.3, res


@pytest.mark.parametrize("offsets,want", [(None, 0.0), ([1.0, -1.0], 2.0)])
def test_and_offsets_set_the_final_log_density_gap(offsets, want):
    """Two overlapping Gaussians N(-e1, I), N(e1, I): log q1 - log q2 = -2 x_0, so AND lands on
    x_0 = 0 and AND with offsets (1, -1) on the set where the exact gap is 2 nats."""
    e1 = GaussianMixtureExpert([[-1.0, 0.0]], 1.0)
    e2 = GaussianMixtureExpert([[1.0, 0.0]], 1.0)
    out = sample([e1, e2], schedules()["ve"], 100, operator=AndOperator(offsets=offsets), shape=(400, 2),
                 generator=torch.Generator().manual_seed(0), dtype=torch.float64, progress=False)
    sch = schedules()["ve"]
    exact_gap = e1.log_prob(out.samples, 1e-3, sch) - e2.log_prob(out.samples, 1e-3, sch)
    tracked_gap = out.logq[:, 0] - out.logq[:, 1]
    assert abs(float(exact_gap.median()) - want) < 0.3, float(exact_gap.median())
    assert abs(float(tracked_gap.median()) - want) < 0.3, float(tracked_gap.median())


class _Scaled:
    """An expert returning another's prediction, optionally rounded to fp16 or scaled."""

    def __init__(self, inner, fp16=False):
        self.inner, self.fp16, self.prediction_type = inner, fp16, inner.prediction_type

    def predict(self, x, t, schedule):
        out = self.inner.predict(x, t, schedule)
        return out.half().to(out.dtype) if self.fp16 else out


@pytest.mark.parametrize("fp16", [False, True])
def test_and_never_nan_for_identical_experts(fp16):
    e = two_mixtures(4)[0]
    out = sample([_Scaled(e, fp16), _Scaled(e)], schedules()["ve"], 30, operator=AndOperator(clamp=None),
                 shape=(64, 4), generator=torch.Generator().manual_seed(0), progress=False)
    k = out.trace.kappa
    assert np.isfinite(k).all() and torch.isfinite(out.samples).all()
    if not fp16:  # exactly identical experts: equal weights
        assert np.allclose(k, 0.5)
    else:  # fp16 rounding differences must not blow kappa up
        assert np.abs(k).max() < 5


def test_and_never_nan_at_huge_sigma():
    sch = VESigma.from_betas(make_betas(1000, 1e-5, 0.2, "linear"))  # sigma_max ~ 1e10-ish
    assert float(sch.t_max) > 1e4
    experts, _ = shared_mode_experts(2, 2)
    out = sample(experts, sch, 30, operator=AndOperator(clamp=None), shape=(32, 2),
                 generator=torch.Generator().manual_seed(0), dtype=torch.float64, progress=False)
    assert np.isfinite(out.trace.kappa).all() and torch.isfinite(out.samples).all()


def test_solve_and_exact_for_well_posed_systems_and_equal_for_singular():
    torch.manual_seed(0)
    A = torch.randn(5, 3, 3, dtype=torch.float64)
    b = torch.randn(5, 3, dtype=torch.float64)
    k = solve_and(A, b, ridge=0.0, floor=0.0)
    r = b + (A @ k[..., None])[..., 0]
    assert torch.allclose(k.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(r - r.mean(-1, keepdim=True), torch.zeros_like(r), atol=1e-9)
    # identical rows (experts that agree): no information, equal weights, no NaN
    A1 = A[:, :1].expand(5, 3, 3)
    k1 = solve_and(A1, torch.zeros(5, 3, dtype=torch.float64))
    assert torch.allclose(k1, torch.full_like(k1, 1 / 3))
    k2 = solve_and(torch.full((2, 2, 2), float("nan"), dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    assert torch.allclose(k2, torch.full_like(k2, 0.5))


def test_two_expert_and_closed_form_is_the_general_solve_then_projection():
    """M = 2 takes a closed form for the solve and the clamp; it equals the general path (the
    regularised least squares, then the sort-based projection) for ridge/floor/clamp choices,
    badly scaled systems included, and non-finite rows still fall back to equal weights."""
    from superdiff.operators import _project_sorted, _solve_general, _solve_pair

    g = torch.Generator().manual_seed(1)
    A = torch.randn(2000, 2, 2, generator=g, dtype=torch.float64)
    A = A * torch.rand(2000, 1, 1, generator=g, dtype=torch.float64).mul(8).sub(4).exp()
    c = torch.randn(2000, 2, generator=g, dtype=torch.float64) * 3
    for ridge, floor in [(1e-3, 1e-8), (0.5, 0.1)]:
        general = _solve_general(A, c, ridge, floor)
        torch.testing.assert_close(_solve_pair(A, c, ridge, floor, None), general, rtol=1e-9, atol=1e-9)
        for lo, hi in [(-1.0, 2.0), (0.2, 0.8)]:
            torch.testing.assert_close(_solve_pair(A, c, ridge, floor, (lo, hi)),
                                       _project_sorted(general, lo, hi), rtol=1e-9, atol=1e-9)
    bad = torch.tensor([[[float("nan"), 1.0], [0.0, 1.0]], [[float("inf"), 1.0], [0.0, -1.0]]], dtype=torch.float64)
    assert torch.equal(solve_and(bad, torch.zeros(2, 2, dtype=torch.float64)), torch.full((2, 2), 0.5, dtype=torch.float64))


def test_capped_simplex_projection():
    k = torch.tensor([[5.0, -3.0, -1.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    p = project_capped_simplex(k, -1.0, 2.0)
    assert torch.allclose(p.sum(-1), torch.ones(2, dtype=torch.float64))
    assert (p >= -1 - 1e-12).all() and (p <= 2 + 1e-12).all()
    assert torch.allclose(p[1], k[1])  # already feasible: unchanged
    with pytest.raises(ValueError, match="admits no weights"):
        project_capped_simplex(k, 0.5, 0.9)


def test_capped_simplex_projection_of_two_weights_is_the_general_projection():
    """M = 2 takes a closed form (project onto k_1 + k_2 = 1, clamp on the segment); it equals
    the sort-based projection for any input, feasible or not, and is closest among feasible points."""
    from superdiff.operators import _project_sorted

    g = torch.Generator().manual_seed(0)
    k = torch.randn(500, 2, generator=g, dtype=torch.float64) * 3
    for lo, hi in [(-1.0, 2.0), (0.0, 1.0), (0.2, 0.8), (-0.5, 0.6)]:
        p = project_capped_simplex(k, lo, hi)
        torch.testing.assert_close(p, _project_sorted(k, lo, hi), rtol=0, atol=1e-12)
        u = torch.linspace(max(lo, 1 - hi), min(hi, 1 - lo), 201, dtype=torch.float64)
        cand = torch.stack([u, 1 - u], -1)  # feasible points
        best = ((k[:, None] - cand[None]) ** 2).sum(-1).min(-1).values
        assert (((k - p) ** 2).sum(-1) <= best + 1e-12).all()


def test_capped_simplex_projection_equals_bisection_on_the_shift_for_any_number_of_experts():
    """The projection is clip(k + tau, lo, hi) with tau the root of sum_i clip(k_i + tau) = 1:
    the closed form over the sorted breakpoints agrees with 200 bisection steps on tau for
    M = 3..8, ties and rows already feasible included (those come back unchanged)."""
    from superdiff.operators import _project_sorted

    g = torch.Generator().manual_seed(3)
    for M in (3, 4, 6, 8):
        for lo, hi in [(-1.0, 2.0), (0.0, 1.0), (0.05, 0.5), (-0.3, 0.9)]:
            if not M * lo <= 1.0 <= M * hi:
                continue
            k = torch.randn(2000, M, generator=g, dtype=torch.float64) * 2
            k[:5] = 1.0 / M  # feasible
            k[5:10, 0] = k[5:10, 1]  # ties between breakpoints
            k[10:15] = torch.tensor([lo] + [(1.0 - lo) / (M - 1)] * (M - 1), dtype=torch.float64)  # on the boundary
            a, b = torch.full((2000, 1), -100.0, dtype=torch.float64), torch.full((2000, 1), 100.0, dtype=torch.float64)
            for _ in range(200):
                m = (a + b) / 2
                below = (k + m).clamp(lo, hi).sum(-1, keepdim=True) < 1
                a, b = torch.where(below, m, a), torch.where(below, b, m)
            p = _project_sorted(k, lo, hi)
            torch.testing.assert_close(p, (k + (a + b) / 2).clamp(lo, hi), rtol=0, atol=1e-12)
            feasible = torch.cat([k[:5], k[10:15]])
            torch.testing.assert_close(torch.cat([p[:5], p[10:15]]), feasible, rtol=0, atol=1e-14)


def test_single_operator_reproduces_the_experts_own_sampler_exactly():
    e1, e2 = two_mixtures(3)
    for integ in ["em", "ddpm", "euler", "heun"]:
        kw = dict(integrator=integ, shape=(16, 3), dtype=torch.float64, progress=False)
        alone = sample([e2], schedules()["vp"], 20, operator="single", generator=torch.Generator().manual_seed(7), **kw)
        both = sample([e1, e2], schedules()["vp"], 20, operator=SingleOperator(1),
                      generator=torch.Generator().manual_seed(7), **kw)
        assert torch.equal(alone.samples, both.samples), integ


@pytest.mark.parametrize("clip", [None, 1.0])
def test_single_ddpm_matches_diffusers_ddpm_scheduler(clip):
    """Our DDPM integrator with the VP schedule is diffusers' DDPMScheduler (same generator),
    with and without its x0 clipping (clip_sample)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="leading",
                          clip_sample=clip is not None, clip_sample_range=clip or 1.0)
    sched.set_timesteps(25)
    from superdiff.schedules import VPDiscrete

    vp = VPDiscrete.from_config(sched.config)
    e = two_mixtures(4)[0]
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ref = x.clone()
    for t in sched.timesteps:
        eps = e.predict(ref.double(), torch.tensor(float(t), dtype=torch.float64), vp).float()
        ref = sched.step(eps, t, ref, generator=g).prev_sample
    ours = sample([e], vp, 25, operator="single", integrator=make_integrator("ddpm", clip_sample=clip),
                  latents=x, grid_end="zero", generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.allclose(ours.samples, ref, atol=1e-4), (ours.samples - ref).abs().max()


def test_em_in_ve_form_is_the_reference_update():
    """x <- x + 2 ds v + sqrt(2 |ds| s) z (superdiff-math.md 2), same generator draws."""
    sch = schedules()["ve"]
    e = two_mixtures(2)[1]
    grid = sch.grid(30, end="min")
    x0 = torch.randn(6, 2, dtype=torch.float64) * float(sch.prior_std())
    g = torch.Generator().manual_seed(3)
    x = x0.clone()
    for s, s2 in zip(grid[:-1], grid[1:]):
        v = e.predict(x, s, sch)
        ds = s2 - s
        x = x + 2 * ds * v + torch.sqrt(2 * ds.abs() * s) * torch.randn(x.shape, generator=g, dtype=torch.float32).double()
    ours = sample([e], sch, timesteps=grid, operator="single", integrator="em", latents=x0, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.allclose(ours.samples, x, atol=1e-10)


def test_average_is_composable_diffusion():
    """One step of average(weights) with guidance equals u + w sum_i k_i (c_i - u)."""
    from superdiff.experts import ExpertList
    from superdiff.operators import AverageOperator

    e1, e2 = two_mixtures(2)
    u = GaussianMixtureExpert(torch.zeros(1, 2), 1.0)
    es = ExpertList([e1, e2], uncond=u)
    sch = schedules()["ve"]
    x = torch.randn(5, 2, dtype=torch.float64) * 3
    grid = sch.grid(10)
    out = sample(es, sch, timesteps=grid[:2], operator=AverageOperator([1.0, -0.5]), integrator="euler",
                 latents=x, guidance_scale=3.0, dtype=torch.float64, progress=False)
    t = grid[0]
    c1, c2, uu = e1.predict(x, t, sch), e2.predict(x, t, sch), u.predict(x, t, sch)
    eps = uu + 3.0 * (1.0 * (c1 - uu) - 0.5 * (c2 - uu))
    want = x + (grid[1] - grid[0]) * eps
    assert torch.allclose(out.samples, want, atol=1e-10)


@pytest.mark.parametrize("kw,msg", [
    (dict(ridge=-1.0), "ridge must be a finite number >= 0"),
    (dict(floor=float("nan")), "floor must be a finite number >= 0"),
    (dict(feedback=5.0), r"feedback must be in \[0, 1\]"),
    (dict(clamp=(2.0, 1.0)), "kappa clamp must be"),
])
def test_formula_and_nodes_refuse_the_and_operators_bad_settings(kw, msg):
    """One check (operators.and_settings) for AndOperator and a formula's SuperDiff AND nodes;
    before, FormulaOperator took these and failed (if at all) mid-sampling."""
    from superdiff.formula import FormulaOperator

    with pytest.raises(ValueError, match=msg):
        AndOperator(**kw)
    with pytest.raises(ValueError, match=msg):
        FormulaOperator('"a" & "b"', **kw)


def test_formula_validate_checks_the_clamp_for_each_and_nodes_children():
    """A SuperDiff AND node over C children needs C lo <= 1 <= C hi, C its own child count
    (not the number of experts); before, validate passed and the first step raised."""
    from superdiff.formula import FormulaOperator

    with pytest.raises(ValueError, match="admits no weights"):
        AndOperator(clamp=(0.4, 0.9)).validate(3)
    with pytest.raises(ValueError, match=r'the 3 children of the AND "a" & "b" & "c" \(3 lo <= 1 <= 3 hi fails\)'):
        FormulaOperator('"a" & "b" & "c"', clamp=(0.4, 0.9)).validate(3)
    FormulaOperator('"a" & ("b" | "c")', clamp=(0.4, 0.9)).validate(3)  # one AND of 2 children: feasible
    with pytest.raises(ValueError, match=r'the 2 children of the AND "b" & "c"'):
        FormulaOperator('"a" | ("b" & "c")', clamp=(0.55, 0.9)).validate(3)
    FormulaOperator('"a" & "b" & "c"', clamp=None).validate(3)
    FormulaOperator('("a" & "b") | "c"', and_mode="product", clamp=(0.55, 0.9)).validate(3)  # no SuperDiff AND
