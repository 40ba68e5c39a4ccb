"""Prediction parameterisations and their conversions (superdiff-math.md, section 1).

With x = alpha x0 + sigma eps at the current time:

    epsilon:       score = -eps / sigma                     x0 = (x - sigma eps) / alpha
    sample (x0):   score = (alpha x0 - x) / sigma^2         eps = (x - alpha x0) / sigma
    v_prediction:  v = a eps - b x0 with (a, b) = (alpha, sigma) / r, r = sqrt(alpha^2 + sigma^2)
                   (the VP variables; r = 1 for VP, sqrt(1 + sigma^2) in the VE form):
                   eps = b x/r + a v,   x0 = a x/r - b v
    flow (u = eps - x0):  x0 = (x - sigma u) / (alpha + sigma),   eps = (x + alpha u) / (alpha + sigma)
                   (alpha + sigma = 1 on the rectified flow x = (1 - t) x0 + t eps, section 7)

Every conversion is affine in the prediction, so an affine combination (weights summing
to one) of predictions of one kind equals the same combination in any other kind. That is
what lets operators mix predictions in their native kind, which stays finite where a
conversion would not (x0 from eps at alpha = 0, the flow-matching start).
"""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor

KINDS = ("epsilon", "sample", "v_prediction", "flow")

__all__ = ["KINDS", "check_kind", "to_eps_x0", "from_eps_x0", "convert", "to_score", "null_prediction"]


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction type {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def _coef(c: Any, like: Tensor) -> float | Tensor:
    """alpha or sigma as an operand for tensors like `like`: a Python number stays a number, and a
    0-d tensor stays where it is (a 0-d CPU tensor is a scalar operand of a GPU tensor, read on
    the host; moving it to the GPU would be a blocking copy every step). Only a tensor of
    per-sample values goes to like's device and dtype."""
    if isinstance(c, (int, float)):
        return float(c)
    c = torch.as_tensor(c)
    if c.dim() == 0 and c.device.type == "cpu":
        return c
    return c.to(device=like.device, dtype=like.dtype)


def to_eps_x0(pred: Tensor, kind: str, x: Tensor, alpha: Any, sigma: Any) -> tuple[Tensor, Tensor]:
    """(eps_hat, x0_hat) from a prediction of the given kind at (x, alpha, sigma)."""
    check_kind(kind)
    a, s = _coef(alpha, x), _coef(sigma, x)
    if kind == "epsilon":
        return pred, (x - s * pred) / a
    if kind == "sample":
        return (x - a * pred) / s, pred
    if kind == "v_prediction":
        r = (a * a + s * s) ** 0.5
        av, bv = a / r, s / r
        return bv * x / r + av * pred, av * x / r - bv * pred
    # flow velocity u = eps - x0: x + alpha u = (alpha + sigma) eps and x - sigma u = (alpha + sigma) x0
    r = a + s
    if isinstance(r, float) and r == 1.0:  # the rectified flow: no division
        return x + a * pred, x - s * pred
    return (x + a * pred) / r, (x - s * pred) / r


def from_eps_x0(eps: Tensor, x0: Tensor, kind: str, x: Tensor, alpha: Any, sigma: Any) -> Tensor:
    """The prediction of the given kind that corresponds to (eps_hat, x0_hat)."""
    check_kind(kind)
    a, s = _coef(alpha, x), _coef(sigma, x)
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        r = (a * a + s * s) ** 0.5
        return (a * eps - s * x0) / r
    return eps - x0


def convert(pred: Tensor, kind: str, to: str, x: Tensor, alpha: Any, sigma: Any) -> Tensor:
    """Convert between kinds; identity when kind == to (no arithmetic, no rounding).

    Goes through x0 when the target needs it and through eps otherwise, so that the
    conversions that stay finite at alpha = 0 (x0/flow -> eps) or sigma = 0 do.
    """
    check_kind(kind), check_kind(to)
    if kind == to:
        return pred
    eps, x0 = to_eps_x0(pred, kind, x, alpha, sigma)
    if to == "epsilon":
        return eps
    if to == "sample":
        return x0
    return from_eps_x0(eps, x0, to, x, alpha, sigma)


def to_score(pred: Tensor, kind: str, x: Tensor, alpha: Any, sigma: Any) -> Tensor:
    """grad_x log q_t(x) = -eps_hat / sigma."""
    if kind == "sample":
        a, s = _coef(alpha, x), _coef(sigma, x)
        return (a * pred - x) / (s * s)
    eps, _ = to_eps_x0(pred, kind, x, alpha, sigma)
    return -eps / _coef(sigma, x)


def null_prediction(kind: str, x: Tensor, alpha: Any, sigma: Any) -> Tensor:
    """The prediction whose score is zero (eps = 0), in the given kind.

    A combination whose weights do not sum to one is completed with this "null expert", so
    that sum_i w_i pred_i means sum_i w_i score_i in every kind.
    """
    eps = torch.zeros_like(x)
    if kind == "epsilon":
        return eps
    x0 = x / _coef(alpha, x)
    return from_eps_x0(eps, x0, kind, x, alpha, sigma)
