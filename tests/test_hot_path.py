"""The sampling loop's hot path (issue 16): no host reads inside the loop, non-finite values
named after the loop, the ODE estimator's JVP through forward-mode AD (one pass, no
unconditional rows), a finite-difference fallback chosen once per call, torch.compile.

Host reads are counted with torch.profiler (aten::_local_scalar_dense: .item(), float(t),
bool(t), `if t`; nonzero; equal) plus .numpy()/.tolist() through a TorchFunctionMode, as
benchmarks/speed.py counts them; per step = (count at 2n steps - count at n steps) / n.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _gmm import schedules, shared_mode_experts, two_mixtures
from torch.overrides import TorchFunctionMode

from superdiff.estimators import ODEEstimator
from superdiff.experts import ExpertList, GaussianMixtureExpert, SharedNetworkExperts
from superdiff.formula import FormulaOperator
from superdiff.sampling import sample

SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::masked_select"}


class _HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("numpy", "tolist"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _syncs(run) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, _HostReads() as reads:
        run()
    return sum(ev.name in SYNC_OPS for ev in prof.events()) + reads.n


@pytest.mark.parametrize("schedule", ["ve", "vp"])
@pytest.mark.parametrize("integrator,estimator,operator,num_experts", [
    ("em", "ito", "and", 2), ("em", "kernel", "or", 2), ("ddpm", "kernel", "and", 2),
    ("euler", "ode", "and", 2), ("heun", "ode", "and", 2), ("euler", "none", "average", 2),
    ("em", "ito", "and", 3)])  # three experts: the AND solve's Cholesky path and sorted projection
def test_no_host_read_inside_the_sampling_loop(schedule, integrator, estimator, operator, num_experts):
    sch = schedules()[schedule]
    experts = two_mixtures(6)
    if num_experts == 3:
        experts = [*experts, GaussianMixtureExpert(torch.full((1, 6), 0.5, dtype=torch.float64), 0.5)]

    def run(n):
        return lambda: sample(experts, sch, n, operator=operator, estimator=estimator, integrator=integrator,
                              shape=(3, 6), generator=torch.Generator().manual_seed(0), progress=False)

    per_step = (_syncs(run(8)) - _syncs(run(4))) / 4
    assert per_step == 0, f"{per_step} host reads per step"


@pytest.mark.parametrize("text", ['"a" & "b"', '("a" | "b"):0.5 & "b"', '"a" | "b":2'])
def test_formula_operators_make_no_host_read_inside_the_sampling_loop(text):
    """A formula's SuperDiff AND node (with and without offsets log w) and its OR node read
    nothing back per step: the node's coefficients are looked at in Python, not on the device."""
    op = FormulaOperator(text, ["a", "b"])

    def run(n):
        return lambda: sample(two_mixtures(6), schedules()["ve"], n, operator=op, estimator="ito",
                              integrator="em", shape=(3, 6), generator=torch.Generator().manual_seed(0),
                              progress=False)

    per_step = (_syncs(run(8)) - _syncs(run(4))) / 4
    assert per_step == 0, f"{per_step} host reads per step"


def test_non_finite_prediction_is_named_by_expert_and_step_after_the_loop():
    e_ok, e_bad = two_mixtures(2)

    class LateNaN:
        prediction_type = "epsilon"
        calls = 0

        def predict(self, x, t, schedule):
            LateNaN.calls += 1
            out = e_bad.predict(x, t, schedule)
            return out * float("nan") if LateNaN.calls == 4 else out

    with pytest.raises(ValueError, match=r"expert 1 returned non-finite values \(NaN/inf\) at step 3 \(t="):
        sample([e_ok, LateNaN()], schedules()["ve"], 6, operator="or", shape=(2, 2), progress=False)
    assert LateNaN.calls == 6  # detected on the device, read once after the loop


def test_ode_estimator_forward_mode_jvp_first_time_one_pass_without_unconditional_rows():
    """Rows through the network per step: the JVP carries the M conditional rows of every probe
    and returns them as the step's predictions; the unconditional row gets one plain forward."""
    experts, _ = shared_mode_experts(4, 2)
    rows: list[tuple[int, bool]] = []

    def fn(x, t, cond):  # cond: the expert of each row, in blocks of equal size (the last: unconditional)
        rows.append((x.shape[0], torch._C._functorch.is_functorch_wrapped_tensor(x)))
        k = len(set(cond.tolist()))
        n = len(cond) // k
        return torch.cat([experts[int(cond[b * n])].predict(x[b * n:(b + 1) * n], t, schedules()["ve"])
                          for b in range(k)])

    es = SharedNetworkExperts(fn, [torch.tensor([0]), torch.tensor([1])], "epsilon", uncond_condition=torch.tensor([0]))
    est = ODEEstimator(probes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the finite-difference fallback warns
        out = sample(es, schedules()["ve"], 3, operator="and", estimator=est, integrator="euler", shape=(3, 4),
                     guidance_scale=2.0, generator=torch.Generator().manual_seed(0), progress=False)
    assert est.jvp_mode == "forward-mode"
    assert rows == [(2 * 2 * 3, True), (3, False)] * 3  # M * probes * B traced rows, then the B unconditional
    assert torch.isfinite(out.logq).all()


def test_finite_difference_fallback_is_chosen_once_per_call_and_agrees_with_forward_mode():
    sch = schedules()["ve"]
    e1, e2 = two_mixtures(3)

    class NoForwardMode:
        prediction_type = "epsilon"

        def __init__(self, e):
            self.e = e

        def predict(self, x, t, schedule):
            return self.e.predict(_NoForwardAD.apply(x), t, schedule)

    kw = dict(operator="or", estimator=ODEEstimator(probes="exact"), integrator="euler", shape=(4, 3),
              generator=torch.Generator().manual_seed(0), dtype=torch.float64, progress=False)
    exact = sample([e1, e2], sch, 6, **kw)
    kw.update(estimator=ODEEstimator(probes="exact"), generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="finite-difference") as rec:
        fd = sample([NoForwardMode(e1), NoForwardMode(e2)], sch, 6, **kw)
    assert len(rec) == 1 and kw["estimator"].jvp_mode == "finite-difference"
    assert torch.allclose(fd.samples, exact.samples, atol=1e-6)
    assert torch.allclose(fd.logq, exact.logq, rtol=1e-5, atol=1e-4)


def test_float32_sampling_tracks_log_q_like_float64():
    """Latents and predictions in float32, inner products and log q in float64: the tracked
    log-densities of a float32 run match the float64 run's to float32 rounding."""
    sch = schedules()["ve"]
    x0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sch.prior_std())
    kw = dict(operator="and", estimator="ode", integrator="euler", latents=x0, grid_end="min", progress=False)
    lo = sample(two_mixtures(16), sch, 20, dtype=torch.float32, **kw)
    hi = sample(two_mixtures(16), sch, 20, dtype=torch.float64, **kw)
    assert lo.samples.dtype == torch.float32 and lo.logq.dtype == torch.float64
    assert torch.allclose(lo.samples.double(), hi.samples, atol=1e-4)
    assert torch.allclose(lo.logq, hi.logq, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("num_experts,integrator,estimator", [
    (2, "em", "ito"), (3, "em", "ito"),  # three: the AND solve's Cholesky path and sorted projection
    (2, "euler", "ode")])
def test_step_compiles_without_graph_breaks_and_matches_eager(num_experts, integrator, estimator):
    """torch.compile(fullgraph=True) of the whole step on analytic experts: no Python-side
    check breaks the graph, and the compiled step gives the eager step's numbers."""
    from superdiff.coefficients import grid_coefficients
    from superdiff.estimators import make_estimator
    from superdiff.integrators import make_integrator
    from superdiff.operators import make_operator
    from superdiff.step import FiniteMonitor, superdiff_step

    sch = schedules()["ve"]
    experts = two_mixtures(4)
    if num_experts == 3:
        experts = [*experts, GaussianMixtureExpert(torch.full((1, 4), 0.5, dtype=torch.float64), 0.5)]
    es = ExpertList(experts)
    grid = sch.grid(5)
    coefs = grid_coefficients(sch, grid)
    integ, op, est = make_integrator(integrator), make_operator("and"), make_estimator(estimator)
    op.validate(num_experts)
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)) * float(sch.prior_std())
    logq0 = torch.zeros(3, num_experts, dtype=torch.float64)

    def run(step_fn):
        x, logq = x0, logq0
        est.begin()
        mon = FiniteMonitor(num_experts, "cpu", est.name)
        for k in range(3):
            so = step_fn(es, sch, integ, op, est, x, grid[k], grid[k + 1], logq, k, 5,
                         coefficients=coefs[k], monitor=mon)
            x, logq = so.x_next, logq + so.delta_logq
        mon.check()
        return x, logq

    torch._dynamo.reset()
    compiled = torch.compile(superdiff_step, fullgraph=True, backend="aot_eager", dynamic=False)
    torch.manual_seed(0)
    xe, le = run(superdiff_step)
    torch.manual_seed(0)
    xc, lc = run(compiled)
    assert torch.allclose(xc, xe, atol=1e-5) and torch.allclose(lc, le, rtol=1e-6, atol=1e-4)


def test_single_network_rows_and_gaussian_mixture_oracle_are_untouched():
    """ExpertList splits into conditional / unconditional evaluations with the same numbers."""
    sch = schedules()["vp"]
    e = two_mixtures(3)
    u = GaussianMixtureExpert(torch.zeros(1, 3), 1.0)
    es = ExpertList(e, uncond=u)
    x, t = torch.randn(2, 3, dtype=torch.float64), torch.tensor(400.0, dtype=torch.float64)
    out = es.evaluate(x, t, sch)
    assert torch.equal(es.evaluate_conditional(x, t, sch), out.cond)
    assert torch.equal(es.evaluate_unconditional(x, t, sch), out.uncond)


def _network_experts(rows: list):
    """The two-mixture experts of _gmm behind diffusers_experts.NetworkExperts (one network,
    conditions 0 / 1, a shared unconditional condition 2 = the first expert again)."""
    from superdiff.diffusers_experts import Branch, Network, NetworkExperts

    e = two_mixtures(3)
    sch = schedules()["ve"]

    def fn(x, t, cond):
        rows.append((x.shape[0], torch._C._functorch.is_functorch_wrapped_tensor(x)))
        k = cond["expert"]
        return torch.cat([e[min(int(k[i]), 1)].predict(x[i:i + 1], t, sch) for i in range(x.shape[0])])

    branches = [Branch(0, {"expert": torch.tensor([i])}, {"expert": torch.tensor([2])}, "u", f"e{i}") for i in (0, 1)]
    return NetworkExperts([Network(fn, "epsilon")], branches, guidance=True), sch


def test_network_experts_use_a_finite_difference_jvp_from_the_step_forward_and_agree_with_forward_mode():
    """ODE estimator, jvp="auto" on network experts: the step's one forward of every row (2
    experts + the shared unconditional, B each) is f(x), and one forward of the conditional
    rows at x + eps z gives J z; no forward-mode AD. Log q agrees with forward mode."""
    rows: list = []
    es, sch = _network_experts(rows)
    kw = dict(operator="and", integrator="euler", shape=(4, 3), guidance_scale=2.0, dtype=torch.float64,
              progress=False)
    est = ODEEstimator(probes=2)
    fd = sample(es, sch, 4, estimator=est, generator=torch.Generator().manual_seed(0), **kw)
    assert est.jvp_mode == "finite-difference"
    assert rows == [(3 * 4, False), (2 * 2 * 4, False)] * 4  # (M + 1) B rows, then M * probes * B
    rows.clear()
    fwd_est = ODEEstimator(probes=2, jvp="forward-mode")
    fwd = sample(es, sch, 4, estimator=fwd_est, generator=torch.Generator().manual_seed(0), **kw)
    assert fwd_est.jvp_mode == "forward-mode" and rows[0] == (2 * 2 * 4, True)
    assert torch.allclose(fd.samples, fwd.samples, atol=1e-5)
    assert torch.allclose(fd.logq, fwd.logq, rtol=1e-4, atol=1e-3)


def test_ode_estimator_rejects_an_unknown_jvp_mode():
    with pytest.raises(ValueError, match="jvp must be one of"):
        ODEEstimator(jvp="reverse")


def test_single_evaluates_only_its_expert_and_leaves_the_others_untracked():
    """operator="single": the network sees expert i's conditional row and its unconditional row
    only (2 B rows per step, not (M + 1) B); the sample equals that expert's own run; the
    other experts' log q is NaN (not tracked). track_all=True evaluates and tracks them all."""
    import math

    from superdiff.operators import SingleOperator

    rows: list = []
    es, sch = _network_experts(rows)
    kw = dict(integrator="em", estimator="ito", shape=(4, 3), guidance_scale=2.0, dtype=torch.float64, progress=False)
    one = sample(es, sch, 5, operator=SingleOperator(1), generator=torch.Generator().manual_seed(3), **kw)
    assert rows == [(2 * 4, False)] * 5 and one.trace.meta["forward_calls"] == 5
    assert es.num_forward_calls == 5
    assert math.isnan(one.trace.logq[-1, 0, 0]) and torch.isfinite(one.logq[:, 1]).all()
    assert (one.trace.kappa[..., 1] == 1).all() and (one.trace.kappa[..., 0] == 0).all()
    rows.clear()
    full = sample(es, sch, 5, operator=SingleOperator(1, track_all=True), generator=torch.Generator().manual_seed(3), **kw)
    assert rows == [(3 * 4, False)] * 5 and torch.isfinite(full.logq).all()
    assert torch.allclose(one.samples, full.samples, atol=1e-12)
    assert torch.allclose(one.logq[:, 1], full.logq[:, 1], atol=1e-9)


def test_single_on_independent_experts_counts_only_its_own_calls():
    """ExpertList under "single": one call of the chosen expert per step, counted in the trace."""
    from superdiff.operators import SingleOperator

    kw = dict(shape=(4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64, progress=False)
    one = sample(two_mixtures(3), schedules()["vp"], 10, operator=SingleOperator(1), **kw)
    assert one.trace.meta["forward_calls"] == 10
    kw["generator"] = torch.Generator().manual_seed(0)
    both = sample(two_mixtures(3), schedules()["vp"], 10, operator=SingleOperator(1, track_all=True), **kw)
    assert both.trace.meta["forward_calls"] == 20
    assert torch.equal(one.samples, both.samples)


def test_hutchinson_probes_are_drawn_on_the_generators_device(monkeypatch):
    """A CPU generator with latents elsewhere (diffusers' usual CUDA setup, where torch refuses a
    CPU generator for a CUDA draw) draws the probes on the generator's device and moves them to
    the latents' (here the meta device, which every torch build has)."""
    seen = []
    randint = torch.randint

    def recording(*args, **kwargs):
        seen.append((kwargs.get("device"), kwargs.get("generator")))
        return randint(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", recording)
    est = ODEEstimator(probes=2)
    g = torch.Generator().manual_seed(0)
    z, exact = est._probes(torch.zeros(3, 70, device="meta"), g)
    assert seen == [(torch.device("cpu"), g)]
    assert z.device.type == "meta" and z.shape == (2, 3, 70) and not exact


def test_hutchinson_probes_follow_the_per_sample_generators_not_the_global_rng():
    """One generator per sample (diffusers' convention): the ODE estimator's random probes come
    from a generator seeded from the first one, so two calls with the same seeds agree whatever
    torch's global generator did in between, and other seeds give other probes."""
    rows: list = []
    es, sch = _network_experts(rows)
    kw = dict(operator="and", integrator="euler", shape=(2, 3), guidance_scale=2.0, dtype=torch.float64,
              progress=False)

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        gens = [torch.Generator().manual_seed(seed + b) for b in range(2)]
        return sample(es, sch, 4, estimator=ODEEstimator(probes=1), generator=gens, **kw).logq

    a, b, c = run(0, 1), run(0, 2), run(5, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("integrator,estimator", [("euler", "ode"), ("heun", "ode"), ("em", "ito")])
def test_and_takes_delta_log_q_from_its_linear_model_and_it_equals_the_inner_product(monkeypatch, dtype,
                                                                                      integrator, estimator):
    """Under AND the step is affine in kappa, so b + A kappa is the realised step's Delta log q
    for the estimators whose linear model is exact (ODE, Ito): reusing it gives the log q of the
    inner product <s_i, x' - x> that the same estimators compute without a linear model."""
    from superdiff.estimators import StepContext

    kw = dict(operator="and", integrator=integrator, estimator=estimator, shape=(16, 3), dtype=dtype,
              progress=False)
    reused = sample(two_mixtures(3), schedules()["vp"], 12, generator=torch.Generator().manual_seed(0), **kw)
    seen = []
    monkeypatch.setattr(StepContext, "linear_value", property(lambda self: None, lambda self, v: seen.append(v)))
    direct = sample(two_mixtures(3), schedules()["vp"], 12, generator=torch.Generator().manual_seed(0), **kw)
    assert len(seen) > 12 and any(v is not None for v in seen)  # the step did offer it
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(reused.samples, direct.samples, rtol=tol, atol=tol)  # AND's feedback reads log q
    torch.testing.assert_close(reused.logq, direct.logq, rtol=tol, atol=tol)
    assert not torch.equal(reused.logq, torch.zeros_like(reused.logq))


class _NoForwardAD(torch.autograd.Function):  # an old-style Function: no forward-mode derivative
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


class _LinearUNet(torch.nn.Module):
    """eps_hat(x) = x W^T over the flattened latent, computed in the module's dtype (a diffusers
    UNet's call signature and `dtype` property), through a Function without a forward-mode
    derivative (so that jvp="forward-mode" falls back to a finite difference)."""

    def __init__(self, W: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(W.to(dtype), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.W.dtype

    def forward(self, x, t, return_dict=False, **kw):
        return ((_NoForwardAD.apply(x).flatten(1) @ self.W.T).reshape(x.shape),)


@pytest.mark.parametrize("jvp", ["auto", "forward-mode"])
@pytest.mark.parametrize("net_dtype", [torch.float16, torch.bfloat16])
def test_finite_difference_step_is_sized_for_the_dtype_the_network_computes_in(net_dtype, jvp):
    """An fp16 / bf16 network fed float32 latents (model_dtype float32): the finite-difference
    step must be sized for the network's own rounding, or x + eps z rounds back to x and the
    divergence loses its network term. With exact (basis) probes on a linear network fed c_in x
    the estimate is vx d + vp c_in tr(W), up to the network dtype's rounding. Also for the
    finite-difference fallback of jvp="forward-mode" on a network without forward-mode AD."""
    from superdiff.coefficients import grid_coefficients, velocity_coefficients
    from superdiff.diffusers_experts import Branch, Network, NetworkExperts, unet_forward
    from superdiff.step import _evaluate

    d = 6
    W = torch.eye(d) * 0.5 + 0.05 * torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    sch = schedules()["ve"]
    es = NetworkExperts([Network(unet_forward(_LinearUNet(W, net_dtype), sch), "epsilon")], [Branch(0, None)],
                        guidance=False)
    assert es.compute_dtype == net_dtype
    grid = sch.grid(4)
    c = grid_coefficients(sch, grid)[1]
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(1)) * 2.0
    est = ODEEstimator(probes="exact", jvp=jvp)
    if jvp == "forward-mode":
        with pytest.warns(RuntimeWarning, match="finite-difference"):
            _, div = _evaluate(es, est, x, grid[1], False, c, sch, torch.float32, None)
    else:
        _, div = _evaluate(es, est, x, grid[1], False, c, sch, torch.float32, None)
    vx, vp = velocity_coefficients("epsilon", c.alpha, c.sigma, c.dalpha, c.dsigma)
    c_in = float(sch.input_scale(grid[1]))  # the network sees c_in x
    want = vx * d + vp * c_in * float(torch.diagonal(W.to(net_dtype).float()).sum())
    assert est.jvp_mode == "finite-difference"
    assert torch.allclose(div[:, 0], torch.full((3,), want, dtype=div.dtype), rtol=0.05), (div, want)
