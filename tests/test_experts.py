"""The analytic Gaussian-mixture oracle and the batched expert sets."""

import math

import pytest
import torch
from _gmm import schedules, two_mixtures

from superdiff.experts import ExpertList, GaussianMixtureExpert, SharedNetworkExperts


def test_gmm_score_posterior_mean_and_laplacian_are_exact():
    sch = schedules()["vp"]
    e = two_mixtures(3)[1]
    t = torch.tensor(400.0, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    lp = e.log_prob(x, t, sch)
    (grad,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
    assert torch.allclose(e.score(x, t, sch), grad)
    lap = sum(torch.autograd.grad(grad[:, j].sum(), x, retain_graph=True)[0][:, j] for j in range(3))
    assert torch.allclose(e.laplacian_log_prob(x, t, sch), lap)
    a, s = sch.alpha(t), sch.sigma(t)  # Tweedie: E[x0|x] = (x + s^2 score) / alpha
    assert torch.allclose(e.posterior_mean(x, t, sch), (x + s**2 * grad) / a)


def test_gmm_log_prob_is_a_normalised_density():
    e = GaussianMixtureExpert([[-1.0], [2.0]], [0.2, 0.5], [1, 3])
    sch = schedules()["ve"]
    xs = torch.linspace(-12, 12, 20001, dtype=torch.float64)[:, None]
    p = e.log_prob(xs, 0.7, sch).exp()
    assert float(torch.trapezoid(p, xs[:, 0])) == pytest.approx(1.0, abs=1e-8)


def test_gmm_marginal_samples_match_its_moments():
    e = GaussianMixtureExpert([[3.0, 0.0]], [[0.5, 2.0]])
    sch = schedules()["vp"]
    x, _ = e.sample(20000, torch.Generator().manual_seed(0), t=300.0, schedule=sch)
    a, s = float(sch.alpha(300.0)), float(sch.sigma(300.0))
    assert torch.allclose(x.mean(0), torch.tensor([3 * a, 0.0], dtype=torch.float64), atol=0.05)
    assert torch.allclose(x.var(0), torch.tensor([a * a * 0.5 + s * s, a * a * 2 + s * s], dtype=torch.float64), rtol=0.05)


def test_gmm_refuses_bad_parameters():
    with pytest.raises(ValueError, match="variances"):
        GaussianMixtureExpert([[0.0, 1.0]], [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="positive"):
        GaussianMixtureExpert([[0.0]], -1.0)
    with pytest.raises(ValueError, match="features"):
        GaussianMixtureExpert([[0.0, 1.0]]).score(torch.zeros(2, 3), 1.0, schedules()["ve"])


def test_shared_network_experts_make_one_batched_call_per_chunk():
    calls = []

    def fn(x, t, cond):  # eps = cond-dependent shift, records the batch it saw
        calls.append(x.shape[0])
        return x * 0.1 + cond[:, None]

    es = SharedNetworkExperts(fn, [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])],
                              "epsilon", uncond_condition=torch.tensor([0.0]))
    x = torch.randn(5, 2)
    out = es.evaluate(x, torch.tensor(1.0), schedules()["ve"])
    assert calls == [20] and es.num_forward_calls == 1
    assert out.cond.shape == (3, 5, 2) and out.uncond.shape == (5, 2)
    assert torch.allclose(out.cond[2], x * 0.1 + 3.0) and torch.allclose(out.uncond, x * 0.1)
    es2 = SharedNetworkExperts(fn, [torch.tensor([1.0]), torch.tensor([2.0])], "epsilon", max_batch_size=4)
    calls.clear()
    es2.evaluate(x, torch.tensor(1.0), schedules()["ve"])
    assert calls == [4, 4, 2] and es2.num_forward_calls == 3


class _Replicating:
    """A network fn that builds its own input rows (fn.replicates_rows): records what it is given."""

    replicates_rows = True

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, repeats=1):
        self.calls.append((x.shape[0], repeats))
        rows = torch.cat([x] * repeats)
        return rows * 0.1 + cond[:, None]


def test_a_network_fn_that_replicates_its_rows_gets_the_batch_once_and_gives_the_same_predictions():
    """The rows [x | ... | x] of one call are built by the network fn itself (unet_forward: one op
    with the input scale), so the caller never materialises them: the fn gets x [B] and repeats;
    split calls (max_batch_size) still get their slices of the materialised rows."""
    conds = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])]
    x = torch.randn(5, 2)
    t, sch = torch.tensor(1.0), schedules()["ve"]
    fn = _Replicating()
    out = SharedNetworkExperts(fn, conds, "epsilon", uncond_condition=torch.tensor([0.0])).evaluate(x, t, sch)
    assert fn.calls == [(5, 4)]
    ref = SharedNetworkExperts(lambda x, t, c: x * 0.1 + c[:, None], conds, "epsilon",
                               uncond_condition=torch.tensor([0.0])).evaluate(x, t, sch)
    assert torch.equal(out.cond, ref.cond) and torch.equal(out.uncond, ref.uncond)
    fn.calls.clear()
    SharedNetworkExperts(fn, conds, "epsilon", max_batch_size=4).evaluate(x, t, sch)
    assert fn.calls == [(4, 1), (4, 1), (4, 1), (3, 1)]  # 15 materialised rows in slices
    fn.calls.clear()
    SharedNetworkExperts(fn, conds[:1], "epsilon").evaluate(x, t, sch)
    assert fn.calls == [(5, 1)]  # one row block: x itself

    def wrong(x, t, cond, repeats=1):
        return x

    wrong.replicates_rows = True
    with pytest.raises(ValueError, match=r"shape \(5, 2\) for x of shape \(15, 2\)"):
        SharedNetworkExperts(wrong, conds, "epsilon").evaluate(x, t, sch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5, "tensor"])
def test_network_input_is_the_scaled_replicated_rows_in_the_networks_dtype(dtype, scale):
    from superdiff.diffusers_experts import network_input

    x = torch.randn(2, 3, 4)
    c = torch.tensor(0.25, dtype=torch.float64) if scale == "tensor" else scale
    want = torch.cat([x] * 3) * (c.float() if scale == "tensor" else c)
    got = network_input(x, c, dtype, 3)
    assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want.to(dtype))
    assert torch.equal(network_input(x, c, dtype, 1), (x * (c.float() if scale == "tensor" else c)).to(dtype))


def test_expert_list_converts_to_one_kind_and_checks_shapes():
    sch = schedules()["vp"]
    e_eps, e_x0 = GaussianMixtureExpert([[1.0, 0.0]], 0.5), GaussianMixtureExpert([[1.0, 0.0]], 0.5, prediction_type="sample")
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.tensor(200.0, dtype=torch.float64)
    out = ExpertList([e_eps, e_x0]).evaluate(x, t, sch)
    assert out.kind == "epsilon" and torch.allclose(out.cond[0], out.cond[1])

    class Bad:
        prediction_type = "epsilon"

        def predict(self, x, t, schedule):
            return x[:, :1]

    with pytest.raises(ValueError, match="shape"):
        ExpertList([Bad()]).evaluate(x, t, sch)
    with pytest.raises(ValueError, match="empty"):
        ExpertList([])
