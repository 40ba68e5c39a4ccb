"""Backbone experts in the centre-of-mass-free space: exact log-density tracking on analytic
Gaussian backbone experts, adapter projection, frames, bad inputs (issue 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from superdiff.protein.experts import (CoMFreeBasis, CoordinateBackboneExpert, FrameExpert, backbone_expert_set,
                                       compose_backbones, helmert_basis, sample_frames, so3_exp)
from superdiff.protein.procedural import ideal_helix, ideal_strand
from superdiff.schedules import VPDiscrete, make_betas

L, V, SCALE = 8, 0.5, 0.15
SCHED = VPDiscrete(make_betas(1000), timestep_spacing="trailing")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _centred(X: np.ndarray) -> torch.Tensor:
    X = torch.as_tensor(X * SCALE)
    return X - X.reshape(-1, 3).mean(0)


def gaussian_backbone_fn(mu: torch.Tensor, leak: float = 3.0):
    """eps of N(mu, V P) on the centre-free space V (P: centring), in full coordinates, plus a
    deliberate centre-of-mass component `leak` that the adapter must project away."""
    def fn(x, tm):
        a, s = SCHED.alpha(tm), SCHED.sigma(tm)
        xc = x - x.reshape(x.shape[0], -1, 3).mean(1)[:, None, None]
        score = -(xc - a * mu) / (a**2 * V + s**2)
        return -s * score + leak
    return fn


def exact_logq(mu: torch.Tensor, y: torch.Tensor, t) -> torch.Tensor:
    """log N(y; alpha H^T mu, (alpha^2 V + sigma^2) I_d), d = 3 (4L - 1)."""
    basis = CoMFreeBasis(L)
    m = basis.from_coords(mu[None])[0]
    a, s = SCHED.alpha(t), SCHED.sigma(t)
    var = a**2 * V + s**2
    return -0.5 * ((y - a * m) ** 2).sum((-1, -2)) / var - 0.5 * basis.dim * math.log(2 * math.pi * var)


def _experts():
    muA, muB = _centred(ideal_helix(L)), _centred(ideal_strand(L))
    eA = CoordinateBackboneExpert(gaussian_backbone_fn(muA), L, coord_scale=SCALE, name="helix gaussian")
    eB = CoordinateBackboneExpert(gaussian_backbone_fn(muB), L, coord_scale=SCALE, name="strand gaussian")
    return (eA, eB), (muA, muB)


def test_helmert_basis_is_orthonormal_and_centre_free():
    H = helmert_basis(12)
    assert torch.allclose(H.T @ H, torch.eye(11, dtype=H.dtype), atol=1e-12)
    assert torch.allclose(H.sum(0), torch.zeros(11, dtype=H.dtype), atol=1e-12)
    b = CoMFreeBasis(3)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    xc = x - x.reshape(2, -1, 3).mean(1)[:, None, None]
    assert torch.allclose(b.to_coords(b.from_coords(x)), xc, atol=1e-12)
    assert b.dim == 3 * (12 - 1)


@pytest.mark.parametrize("estimator", ["ito", "kernel"])
def test_tracked_logq_matches_exact_in_com_free_space(estimator):
    (eA, eB), (muA, muB) = _experts()
    errs = {}
    for n in (100, 400):
        X, out = compose_backbones([eA, eB], SCHED, 32, n, operator="or", estimator=estimator,
                                   generator=torch.Generator().manual_seed(0), grid_end="min")
        t_end = out.trace.t[-1]
        y = eA.encode(X)
        exact = torch.stack([exact_logq(muA, y, t_end), exact_logq(muB, y, t_end)], -1)
        err = out.logq - exact
        errs[n] = err
        # the OR weights depend on log q_A - log q_B: tracked to a fraction of a nat while the
        # exact gap itself spreads over tens of nats across samples
        gap_err = err[:, 0] - err[:, 1]
        assert (exact[:, 0] - exact[:, 1]).std() > 10
        assert gap_err.abs().mean() < 0.5, gap_err
    # absolute log q (d = 93 dimensions): the remaining error is the O(h) discretisation bias,
    # common to both experts, and shrinks with the step count
    assert errs[400].abs().mean() < 0.4 * errs[100].abs().mean()
    assert errs[400].mean().abs() < 10.0


def test_adapter_projects_centre_of_mass_leak():
    (eA, _), (muA, _) = _experts()
    y = torch.randn(4, 4 * L - 1, 3, dtype=torch.float64)
    t = torch.tensor(300.0, dtype=torch.float64)
    p = eA.predict(y, t, SCHED)
    clean = CoordinateBackboneExpert(gaussian_backbone_fn(muA, leak=0.0), L, coord_scale=SCALE)
    assert torch.allclose(p, clean.predict(y, t, SCHED), atol=1e-10)


def test_or_with_equal_weights_samples_both_gaussians():
    (eA, eB), (muA, muB) = _experts()
    X, out = compose_backbones([eA, eB], SCHED, 64, 100, operator="or", generator=torch.Generator().manual_seed(1))
    y = eA.encode(X)
    closer_to_A = ((y - CoMFreeBasis(L).from_coords(muA[None])) ** 2).sum((-1, -2)) < \
        ((y - CoMFreeBasis(L).from_coords(muB[None])) ** 2).sum((-1, -2))
    assert 0.3 < closer_to_A.double().mean() < 0.7
    assert torch.isfinite(out.logq).all()


def test_and_gives_finite_equal_density_samples():
    from superdiff.operators import AndOperator

    (eA, eB), _ = _experts()
    X, out = compose_backbones([eA, eB], SCHED, 16, 100, operator=AndOperator(),
                               generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(X).all()
    gap = (out.logq[:, 0] - out.logq[:, 1]).abs()
    assert gap.mean() < 5.0  # the AND condition: equal tracked densities (within a few nats at d = 93)


def test_mismatched_experts_raise():
    (eA, _), (muA, _) = _experts()
    other = CoordinateBackboneExpert(gaussian_backbone_fn(muA), L + 2, coord_scale=SCALE, name="longer")
    with pytest.raises(ValueError, match="mismatched experts.*10 residues"):
        backbone_expert_set([eA, other])
    scaled = CoordinateBackboneExpert(gaussian_backbone_fn(muA), L, coord_scale=0.1)
    with pytest.raises(ValueError, match="coord_scale"):
        backbone_expert_set([eA, scaled])
    with pytest.raises(ValueError, match="not a CoordinateBackboneExpert"):
        backbone_expert_set([eA, object()])


def test_wrong_length_and_nan_inputs_raise():
    (eA, _), _ = _experts()
    with pytest.raises(ValueError, match=r"\[B, 31, 3\]"):
        eA.predict(torch.zeros(2, 20, 3, dtype=torch.float64), torch.tensor(10.0), SCHED)
    with pytest.raises(ValueError, match=r"\[B, 8, 4, 3\]"):
        eA.encode(torch.zeros(2, 9, 4, 3))
    bad = torch.zeros(1, L, 4, 3)
    bad[0, 2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        eA.encode(bad)


def test_so3_exp_is_a_rotation():
    w = torch.randn(5, 3, dtype=torch.float64)
    R = so3_exp(w)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(so3_exp(torch.zeros(1, 3, dtype=torch.float64)), torch.eye(3, dtype=torch.float64)[None])


def test_frame_experts_compose_translations_exactly():
    """Two frame models whose translation part is an exact Gaussian (CA only) and whose
    rotation score pulls towards the identity: OR tracks the R3 log-densities, rotations stay
    proper rotations and move towards the identity."""
    Lf = 6
    mus = [torch.randn(Lf, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in (3, 4)]
    mus = [m - m.reshape(-1, 3).mean(0) for m in mus]

    def make(mu):
        g = gaussian_backbone_fn(mu, leak=0.0)

        def fn(trans, rots, tm):
            rot_score = -torch.stack([rots[..., 2, 1] - rots[..., 1, 2], rots[..., 0, 2] - rots[..., 2, 0],
                                      rots[..., 1, 0] - rots[..., 0, 1]], -1)  # towards the identity
            return g(trans, tm), rot_score
        return fn

    experts = [FrameExpert(make(m), Lf, name=f"frame {k}") for k, m in enumerate(mus)]
    trans, rots, out = sample_frames(experts, SCHED, rot_g2=lambda t: 0.01, num_samples=8, num_steps=50,
                                     generator=torch.Generator().manual_seed(0),
                                     rot_generator=torch.Generator().manual_seed(1))
    assert trans.shape == (8, Lf, 3) and rots.shape == (8, Lf, 3, 3)
    assert torch.allclose(rots @ rots.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(rots), atol=1e-9)
    assert torch.isfinite(out.logq).all()
    tr = torch.diagonal(rots, dim1=-2, dim2=-1).sum(-1)  # 1 + 2 cos(angle); uniform SO(3) has mean 0
    assert tr.mean() > 1.0


def test_numpy_integer_lengths_and_counts_are_accepted_and_non_integers_refused():
    b = CoMFreeBasis(np.int64(8), np.int64(4))
    assert (b.length, b.atoms, b.dim) == (8, 4, 3 * 31) and type(b.length) is int
    (eA, eB), _ = _experts()
    X, _ = compose_backbones([eA, eB], SCHED, np.int64(2), 3, generator=torch.Generator().manual_seed(0))
    assert X.shape == (2, L, 4, 3)
    e = CoordinateBackboneExpert(lambda x, t: x, torch.tensor(6), np.int32(4))
    assert e.signature() == (6, 4, 1.0)
    for bad in (4.7, 8.0, True, "8", 0):
        with pytest.raises(ValueError, match=r"^length must be a positive int, got"):
            CoMFreeBasis(bad)
    for bad in (2.0, True, 0, -1):
        with pytest.raises(ValueError, match=r"^num_samples must be a positive int, got"):
            compose_backbones([eA, eB], SCHED, bad, 3)


def _still_frame_expert(Lf=5):
    def fn(trans, rots, tm):
        return torch.zeros_like(trans), torch.zeros(rots.shape[:-1], dtype=rots.dtype)
    return FrameExpert(fn, Lf, name="still")


def test_sample_frames_checks_num_samples_and_leaves_no_rotations_behind():
    fe = _still_frame_expert()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"^num_samples must be a positive int, got"):
            sample_frames([fe], SCHED, rot_g2=lambda t: 0.01, num_samples=bad, num_steps=3)
    trans, rots, _ = sample_frames([fe], SCHED, rot_g2=lambda t: 0.01, num_samples=np.int64(3), num_steps=3)
    assert trans.shape == (3, 5, 3) and rots.shape == (3, 5, 3, 3)
    assert fe.state.rots is None and fe.last_rot_score is None
    # evaluated outside sample_frames, at this run's batch size or another, it refuses (no stale rotations)
    for B in (3, 4):
        with pytest.raises(ValueError, match="needs rotations: sample it with sample_frames"):
            fe.predict(torch.zeros(B, 4, 3, dtype=torch.float64), torch.tensor(10.0), SCHED)
    # a second run with another batch size works and again clears the state
    trans, rots, _ = sample_frames([fe], SCHED, rot_g2=lambda t: 0.01, num_samples=2, num_steps=3)
    assert rots.shape == (2, 5, 3, 3) and fe.state.rots is None


def test_sample_frames_clears_the_rotations_after_an_error():
    fe = _still_frame_expert()

    def rot_g2(t):
        raise RuntimeError("rot_g2 failed")

    with pytest.raises(RuntimeError, match="rot_g2 failed"):
        sample_frames([fe], SCHED, rot_g2=rot_g2, num_samples=2, num_steps=3)
    assert fe.state.rots is None and fe.last_rot_score is None


def test_frame_expert_refuses_rotations_of_another_batch():
    fe = _still_frame_expert()
    fe.state.rots = torch.eye(3, dtype=torch.float64).expand(3, 5, 3, 3)
    with pytest.raises(ValueError, match="rotations for 3 samples but was called on 4"):
        fe.predict(torch.zeros(4, 4, 3, dtype=torch.float64), torch.tensor(10.0), SCHED)
