"""The sampling entry point: generators, trace, callbacks, progress and input validation."""

import json

import numpy as np
import pytest
import torch
from _gmm import schedules, two_mixtures

from superdiff.sampling import sample
from superdiff.trace import Trace


def test_list_of_generators_equals_separate_calls():
    ex = two_mixtures(3)
    kw = dict(operator="or", shape=None, progress=False, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    batch = sample(ex, schedules()["ve"], 20, latents=None, **{**kw, "shape": (3, 3)}, generator=gens)
    for i, s in enumerate((11, 12, 13)):
        one = sample(ex, schedules()["ve"], 20, **{**kw, "shape": (1, 3)}, generator=torch.Generator().manual_seed(s))
        assert torch.allclose(batch.samples[i], one.samples[0], atol=1e-12)
    with pytest.raises(ValueError, match="generators"):
        sample(ex, schedules()["ve"], 5, shape=(2, 3), generator=gens, progress=False)


@pytest.mark.parametrize("integrator", ["euler", "heun"])
def test_list_of_generators_equals_separate_calls_with_random_probes(integrator):
    """The ODE estimator's Hutchinson probes (d = 80 > exact_max_dim) come from each sample's
    own generator: a batch equals separate calls, AND's kappa included; two generators with
    the same seed give two equal rows, one generator object given twice two different ones."""
    ex = two_mixtures(80)
    kw = dict(operator="and", estimator="ode", integrator=integrator, progress=False, dtype=torch.float64)
    seeds = (21, 22, 23)
    batch = sample(ex, schedules()["vp"], 8, shape=(3, 80), generator=[torch.Generator().manual_seed(s) for s in seeds],
                   **kw)
    for i, s in enumerate(seeds):
        one = sample(ex, schedules()["vp"], 8, shape=(1, 80), generator=torch.Generator().manual_seed(s), **kw)
        assert torch.allclose(batch.samples[i], one.samples[0], atol=1e-10)
        assert torch.allclose(batch.logq[i], one.logq[0], atol=1e-8)
        assert np.allclose(batch.trace.kappa[:, i], one.trace.kappa[:, 0], atol=1e-8)
    lat = torch.randn(1, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).repeat(2, 1)
    twins = sample(ex, schedules()["vp"], 8, latents=lat, generator=[torch.Generator().manual_seed(5) for _ in range(2)],
                   **kw)
    assert torch.equal(twins.logq[0], twins.logq[1])
    g = torch.Generator().manual_seed(5)
    shared = sample(ex, schedules()["vp"], 8, latents=lat, generator=[g, g], **kw)
    assert not torch.equal(shared.logq[0], shared.logq[1])  # the same object draws in turn


@pytest.mark.parametrize("name,times", [("ve", [14.6, 1.0, 0.0, -1.0]), ("flow", [1.0, 0.5, 0.0, -0.5]),
                                        ("flow", [1.5, 1.0, 0.5, 0.0]), ("vp", [1500.0, 500.0, 0.0])])
def test_custom_timesteps_outside_the_schedule_are_refused(name, times):
    """Every time of a custom grid lies in [0, the schedule's time_limit] (negative times gave
    NaN samples, flow times above 1 a bare math error, VP times a silent clamp)."""
    sch, ex = schedules()[name], two_mixtures(2, "flow" if name == "flow" else "epsilon")
    with pytest.raises(ValueError, match=r"outside .* times \[0, "):
        sample(ex, sch, 3, timesteps=times, shape=(2, 2), progress=False)
    ok = sorted({min(t, sch.time_limit) for t in times if t >= 0}, reverse=True)
    out = sample(ex, sch, 3, timesteps=ok, shape=(2, 2), progress=False, dtype=torch.float64)
    assert torch.isfinite(out.samples).all()


def test_non_finite_latents_from_the_combination_are_not_returned_silently():
    """An operator whose weights turn NaN on the last step (no expert sees the result, and
    estimator 'none' is not checked): the one read after the loop names the latents."""
    from superdiff.operators import AverageOperator

    class NaNOnLastStep(AverageOperator):
        def kappa(self, state):
            k = super().kappa(state)
            return k * float("nan") if state.step == state.num_steps - 1 else k

    with pytest.raises(ValueError, match=r"sampled latents are non-finite \(NaN/inf\) after step 3 \(t=0\)"):
        sample(two_mixtures(2), schedules()["ve"], 4, operator=NaNOnLastStep([0.5, 0.5]), estimator="none",
               integrator="euler", shape=(2, 2), progress=False)


def test_trace_shapes_round_trip_and_plot(tmp_path):
    out = sample(two_mixtures(2), schedules()["vp"], 12, operator="and", shape=(5, 2),
                 generator=torch.Generator().manual_seed(0), expert_names=["a", "b"], progress=False)
    tr = out.trace
    assert tr.kappa.shape == (12, 5, 2) and tr.logq.shape == (13, 5, 2) and tr.t.shape == (13,)
    assert np.allclose(tr.kappa.sum(-1), 1.0) and tr.meta["operator"] == "and"
    assert tr.meta["forward_calls"] == 2 * 12  # two independent experts, one call each per step
    assert np.allclose(tr.logq[-1], out.logq.numpy())
    back = Trace.load(tr.save(tmp_path / "t.json"))
    assert np.array_equal(back.kappa, tr.kappa) and back.expert_names == ["a", "b"]
    fig_path = tmp_path / "trace.png"
    tr.plot(fig_path, samples=2)
    assert fig_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a superdiff trace"):
        Trace.from_dict(json.loads('{"t": []}'))


def test_single_operator_trace_keeps_untracked_experts_as_nan_through_json_and_plot(tmp_path):
    """operator "single" runs one expert: the others' log q is NaN, null in the JSON (strict
    JSON, no NaN literal), NaN again after loading, and the plot still draws the tracked one."""
    from superdiff.operators import SingleOperator

    out = sample(two_mixtures(2), schedules()["vp"], 6, operator=SingleOperator(1), shape=(3, 2),
                 generator=torch.Generator().manual_seed(0), progress=False)
    tr = out.trace
    assert np.isnan(tr.logq[:, :, 0]).all() and np.isfinite(tr.logq[:, :, 1]).all()
    path = tr.save(tmp_path / "t.json")
    assert "NaN" not in path.read_text() and "null" in path.read_text()
    back = Trace.load(path)
    assert np.array_equal(np.isnan(back.logq), np.isnan(tr.logq))
    assert np.allclose(back.logq[:, :, 1], tr.logq[:, :, 1])
    fig = tr.plot(None, samples=1)
    lines = fig.axes[1].get_lines()
    tracked = [ln for ln in lines if ln.get_label() == "expert 1"]
    assert tracked and np.isfinite(tracked[0].get_ydata()).all()
    assert any("not tracked" in ln.get_label() for ln in lines)


def test_callback_sees_every_step_and_may_replace_latents():
    seen = []

    def cb(info):
        seen.append((info.step, info.kappa.shape))
        return torch.zeros_like(info.x) if info.step == 4 else None

    out = sample(two_mixtures(2), schedules()["ve"], 5, shape=(3, 2), callback=cb, progress=False)
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4] and seen[0][1] == (3, 2)
    assert torch.equal(out.samples, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="callback returned"):
        sample(two_mixtures(2), schedules()["ve"], 2, shape=(3, 2), callback=lambda i: torch.zeros(1), progress=False)


def test_progress_bar_is_shown(capsys):
    sample(two_mixtures(2), schedules()["ve"], 3, shape=(2, 2), progress=True)
    assert "superdiff" in capsys.readouterr().err


class _NaN:
    prediction_type = "epsilon"

    def predict(self, x, t, schedule):
        return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(operator="xor"), "unknown operator"),
    (dict(operator="and", num_steps=0), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(estimator="magic"), "unknown estimator"),
    (dict(integrator="rk4"), "unknown integrator"),
    (dict(estimator="ito", integrator="ddpm"), "not valid with integrator"),
    (dict(estimator="kernel", integrator="euler"), "not valid with integrator"),
    (dict(guidance_scale=7.5), "unconditional"),
    (dict(shape=(4, 3)), "features"),
    (dict(shape=None), "shape"),
    (dict(shape=None, latents=torch.zeros(2)), r"latents must be a non-empty tensor \[B, \*S\].*latents\[None\]"),
    (dict(shape=None, latents=torch.zeros(0, 2)), r"latents must be a non-empty tensor .* got \(0, 2\)$"),
])
def test_bad_input_raises_value_error_naming_the_problem(kwargs, match):
    args = dict(num_steps=5, shape=(4, 2), progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample(two_mixtures(2), schedules()["ve"], **args)


def test_bad_experts_and_operator_parameters_are_refused():
    from superdiff.operators import OrOperator, make_operator

    with pytest.raises(ValueError, match="empty"):
        sample([], schedules()["ve"], 5, shape=(2, 2), progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        sample([_NaN()], schedules()["ve"], 5, shape=(2, 2), progress=False)
    with pytest.raises(ValueError, match="temperature"):
        OrOperator(temperature=-1.0)
    with pytest.raises(ValueError, match="one entry per expert"):
        sample(two_mixtures(2), schedules()["ve"], 5, operator=OrOperator(bias=[0.0, 1.0, 2.0]), shape=(2, 2), progress=False)
    with pytest.raises(ValueError, match="bad parameters"):
        make_operator("and", temprature=3)
    with pytest.raises(ValueError, match="latents"):
        sample(two_mixtures(2), schedules()["ve"], 5, latents=torch.full((2, 2), float("nan")), progress=False)
    with pytest.raises(ValueError, match="tracking"):
        sample(two_mixtures(2), schedules()["ve"], 5, operator="and", estimator="none", shape=(2, 2), progress=False)


def test_demo_writes_its_plots(tmp_path):
    from superdiff.demo import run_demo

    summary = run_demo(tmp_path, num_samples=300, num_steps=40, progress=False)
    for name in ["samples.png", "trace_or.png", "trace_and.png", "summary.json", "trace_and.json"]:
        assert (tmp_path / name).stat().st_size > 0
    assert summary["and"]["mode_fractions"]["top (shared)"] > 0.85
    assert 0.35 < summary["or"]["mode_fractions"]["top (shared)"] < 0.65


@pytest.mark.parametrize("integrator, estimator, calls", [("em", "ito", 1), ("ddpm", "kernel", 1), ("euler", "fd", 2),
                                                         ("heun", "fd", 4)])
def test_a_steps_network_output_is_freed_before_the_next_forward(integrator, estimator, calls):
    """Peak memory: while the network runs, nothing of an earlier step's forward is kept (the
    loop drops the step's output, which holds the prediction and the network's whole batch)."""
    import weakref

    from superdiff.estimators import ODEEstimator
    from superdiff.experts import SharedNetworkExperts

    if estimator == "fd":  # the network pipelines' JVP: a second forward of the conditional rows
        estimator = ODEEstimator(jvp="finite-difference")
    outputs: list[weakref.ref] = []
    alive: list[int] = []

    def fn(x, t, cond):  # rows [expert 0 | expert 1 | uncond]: a different linear map per row
        alive.append(sum(r() is not None for r in outputs))
        y = x * cond[:, None] + 0.1 * t.to(x.dtype)
        outputs.append(weakref.ref(y))
        return y

    es = SharedNetworkExperts(fn, [torch.tensor([0.5]), torch.tensor([0.8])], "epsilon",
                              uncond_condition=torch.tensor([0.6]))
    sample(es, schedules()["ve"], 4, operator="and", integrator=integrator, estimator=estimator,
           guidance_scale=2.0, shape=(2, 8), generator=torch.Generator().manual_seed(0), progress=False)
    firsts = alive[::calls]  # the first forward of each step (Heun's last step is Euler: 2 calls)
    assert len(firsts) == 4 and firsts == [0, 0, 0, 0], alive


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_flow_velocity_experts_sample_as_their_epsilon_twins_on_any_schedule(name):
    """u = eps - x0 converts through alpha + sigma, which is 1 only on the rectified flow: on VP
    and VE the flow-kind experts used to move x by up to 0.4 and 2.3 from their epsilon twins."""
    sched = schedules()[name]
    kw = dict(operator="or", integrator="heun", estimator="ode", shape=(4, 2), progress=False, dtype=torch.float64)
    runs = [sample(two_mixtures(2, kind), sched, 12, generator=torch.Generator().manual_seed(0), **kw)
            for kind in ("epsilon", "flow")]
    torch.testing.assert_close(runs[1].samples, runs[0].samples, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(runs[1].logq, runs[0].logq, atol=1e-9, rtol=1e-9)


def test_an_epsilon_member_behind_another_kind_is_refused_at_alpha_zero_before_any_call():
    """An expert list takes its kind from its first expert; an epsilon expert or unconditional
    branch behind it still cannot be converted at t = 1 of a flow (x0 = (x - eps) / 0), and per-
    expert unconditional branches complete no non-affine weights: refused before any call."""
    from superdiff.experts import ExpertList, GaussianMixtureExpert
    from superdiff.operators import AverageOperator
    from superdiff.schedules import RectifiedFlow

    calls = []

    class Counting(GaussianMixtureExpert):
        def predict(self, x, t, schedule):
            calls.append(1)
            return super().predict(x, t, schedule)

    flow_a, flow_b = (Counting([[c, 0.0]], 1.0, prediction_type="flow") for c in (0.0, 1.0))
    eps_b, eps_u = Counting([[1.0, 0.0]], 1.0), Counting([[0.5, 0.0]], 2.0)
    kw = dict(shape=(2, 2), progress=False)
    with pytest.raises(ValueError, match="an expert or unconditional branch predicts epsilon"):
        sample(ExpertList([flow_a, eps_b]), RectifiedFlow(), 4, operator="average", **kw)
    with pytest.raises(ValueError, match="an expert or unconditional branch predicts epsilon"):
        sample(ExpertList([flow_a, flow_b], uncond=eps_u), RectifiedFlow(), 4, operator="average",
               guidance_scale=2.0, **kw)
    flow_u = Counting([[0.5, 0.0]], 2.0, prediction_type="flow")
    with pytest.raises(ValueError, match="need not sum to one"):
        sample(ExpertList([flow_a, flow_b], uncond=[flow_u, flow_u]), RectifiedFlow(), 4,
               operator=AverageOperator([0.7, 0.7]), guidance_scale=2.0, **kw)
    assert calls == []
