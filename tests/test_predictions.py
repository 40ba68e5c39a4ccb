"""Parameterisation conversions (superdiff-math.md 1)."""

import pytest
import torch

from _device import StandInDevice
from superdiff.predictions import KINDS, convert, null_prediction, to_eps_x0, to_score


@pytest.mark.parametrize("alpha,sigma", [(0.8, 0.6), (1.0, 3.0), (0.3, 0.7)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_every_kind_round_trips_through_every_other(alpha, sigma, as_tensor):
    """On any schedule (VP, VE, rectified flow), also the flow velocity u = eps - x0, whose
    inverse divides by alpha + sigma (1 only on the rectified flow; it was taken to be 1)."""
    from superdiff.coefficients import eps_x0_coefficients
    from superdiff.predictions import from_eps_x0

    torch.manual_seed(0)
    x0, eps = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    a, s = (torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)) if as_tensor \
        else (alpha, sigma)
    for kind in KINDS:
        p = from_eps_x0(eps, x0, kind, x, a, s)
        e2, x02 = to_eps_x0(p, kind, x, a, s)
        assert torch.allclose(e2, eps) and torch.allclose(x02, x0), kind
        ex, ep, x0x, x0p = eps_x0_coefficients(kind, alpha, sigma)  # the hot path's affine form
        assert torch.allclose(ex * x + ep * p, eps) and torch.allclose(x0x * x + x0p * p, x0), kind
        assert torch.allclose(to_score(p, kind, x, a, s), -eps / sigma), kind
        for to in KINDS:
            back = convert(convert(p, kind, to, x, a, s), to, kind, x, a, s)
            assert torch.allclose(back, p), (kind, to)


def test_v_prediction_matches_the_vp_definition_and_diffusers_euler():
    a, s = 0.6, 0.8  # VP: v = alpha eps - sigma x0
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    v = a * eps - s * x0
    assert torch.allclose(convert(v, "v_prediction", "epsilon", a * x0 + s * eps, a, s), eps)
    # VE form (alpha = 1, sigma = s~): diffusers' Euler computes x0 = v * (-s/sqrt(s^2+1)) + x/(s^2+1)
    sv = 2.5
    x = torch.randn(3, 2, dtype=torch.float64)
    want = v * (-sv / (sv**2 + 1) ** 0.5) + x / (sv**2 + 1)
    assert torch.allclose(convert(v, "v_prediction", "sample", x, 1.0, sv), want)


def test_flow_conversions_are_finite_at_alpha_zero():
    x = torch.randn(3, 2, dtype=torch.float64)
    u = torch.randn(3, 2, dtype=torch.float64)
    eps, x0 = to_eps_x0(u, "flow", x, 0.0, 1.0)
    assert torch.isfinite(eps).all() and torch.allclose(x0, x - u) and torch.allclose(eps, x)


def test_null_prediction_has_zero_score_and_unknown_kinds_are_refused():
    x = torch.randn(3, 2, dtype=torch.float64)
    for kind in ("epsilon", "sample", "v_prediction"):
        assert torch.allclose(to_score(null_prediction(kind, x, 0.7, 0.5), kind, x, 0.7, 0.5), torch.zeros_like(x))
    with pytest.raises(ValueError, match="unknown prediction type"):
        convert(x, "score-ish", "epsilon", x, 1.0, 1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scalar", [float, lambda v: torch.tensor(v, dtype=torch.float64)])
def test_scalar_alpha_sigma_are_not_copied_to_the_latents_device(kind, scalar):
    """alpha and sigma given as Python numbers or 0-d CPU tensors (what the step and the experts
    pass every step) stay scalar operands: nothing is copied onto the latents' device (the meta
    device stands in for a GPU), and the values are those of the same call on the CPU."""
    x = torch.randn(2, 3, dtype=torch.float64)
    pred = torch.randn(2, 3, dtype=torch.float64)
    a, s = scalar(0.8), scalar(0.6)
    with StandInDevice() as device:
        outs = [convert(pred.to("meta"), kind, to, x.to("meta"), a, s) for to in KINDS]
        outs += [to_score(pred.to("meta"), kind, x.to("meta"), a, s), null_prediction(kind, x.to("meta"), a, s)]
    assert device.copies == 2 * (len(KINDS) + 1) + 1  # the test's own pred.to / x.to, nothing else
    assert device.reads == 0
    assert all(o.device.type == "meta" and o.shape == x.shape for o in outs)
    for to in KINDS:
        ref = convert(pred, kind, to, x, torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64))
        torch.testing.assert_close(convert(pred, kind, to, x, a, s), ref, rtol=0, atol=1e-15)
