"""Composition operators: per-step expert weights kappa [B, M] (superdiff-math.md, section 4).

The combined prediction of a step is

    pred = sum_i kappa_i (u_i + w (c_i - u_i)) + (1 - sum_i kappa_i) ref

(c_i: expert i's conditional prediction, u_i its unconditional one, w the guidance scale;
see combine.py). Operators only choose kappa:

    OR      kappa = softmax(T * log q + l)                   mixture sum_i w_i q_i with l = log w
    AND     kappa with sum 1 such that every Delta log q_i - l_i / N is equal; for M experts the
            (M+1)x(M+1) system [A -1; 1^T 0][kappa; lambda] = [-b + l/N; 1], with A, b the
            estimator's linear model Delta log q_i = b_i + sum_j A_ij kappa_j (+ a term common to
            all experts). Solved in the sum-to-one subspace with a ridge term so that agreeing
            experts (singular A) fall back to equal weights and no NaN/inf ever comes out.
    average fixed kappa (Composable Diffusion: eps = u + w sum_i kappa_i (c_i - u); a negative
            kappa_i is NOT). kappa = 1/M is the paper's averaging baseline.
    single  one-hot: reproduces that expert's own sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

Tensor = torch.Tensor
_F64 = torch.float64

__all__ = [
    "StepState",
    "Operator",
    "OrOperator",
    "AndOperator",
    "and_settings",
    "check_clamp",
    "AverageOperator",
    "SingleOperator",
    "OPERATORS",
    "make_operator",
    "project_capped_simplex",
    "solve_and",
]


@dataclass
class StepState:
    """What an operator may look at when choosing kappa for one step."""

    logq: Tensor  # [B, M] float64: tracked log q_i(x_t) at the start of the step
    step: int
    num_steps: int
    #: lazily computes (A [B, M, M], b [B, M]) of Delta log q = b + A kappa (up to a common term)
    linear_model: Callable[[], tuple[Tensor, Tensor]] | None = None


def _vector(values: Any, m: int, what: str) -> Tensor:
    v = torch.as_tensor(values, dtype=_F64)
    if v.ndim == 0:
        v = v.expand(m)
    if v.shape != (m,):
        raise ValueError(f"{what} must have one entry per expert ({m}), got shape {tuple(v.shape)}")
    if not torch.all(torch.isfinite(v)):
        raise ValueError(f"{what} must be finite, got {v.tolist()}")
    return v.clone()


class Operator:
    name = "operator"
    #: whether kappa depends on the step's linear model (AND) and so needs the proposals
    needs_linear_model = False
    #: whether kappa sums to one (then the combination is affine in the predictions)
    affine = True

    @property
    def needs_logq(self) -> bool:
        """Whether kappa depends on log q, which an estimator must then track (not 'none')."""
        return self.needs_linear_model

    def kappa(self, state: StepState) -> Tensor:
        raise NotImplementedError

    def validate(self, num_experts: int) -> None:
        if num_experts < 1:
            raise ValueError("no experts given: every operator needs at least one expert")

    def params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


class OrOperator(Operator):
    """kappa = softmax(T log q + l). T = 1, l = log w samples the mixture sum w_i q_i; T = inf is
    an argmax (each sample follows one expert), T = 0 plain averaging with weights softmax(l)."""

    name = "or"

    def __init__(self, temperature: float = 1.0, bias: Sequence[float] | Tensor | None = None,
                 weights: Sequence[float] | Tensor | None = None) -> None:
        t = float(temperature)
        if math.isnan(t) or t < 0:
            raise ValueError(f"temperature T must be >= 0 (inf allowed), got {temperature}")
        if bias is not None and weights is not None:
            raise ValueError("give either bias (log-weights) or weights, not both")
        #: what the user gave, for messages: the bias is log(weights / sum weights) when weights were given
        self._bias_from = "bias"
        if weights is not None:
            w = torch.as_tensor(weights, dtype=_F64)
            if not torch.all(w > 0):
                raise ValueError(f"OR mixture weights must be positive, got {w.tolist()}")
            bias = torch.log(w / w.sum())
            self._bias_from = "weights"
        self.temperature = t
        self.bias = None if bias is None else torch.as_tensor(bias, dtype=_F64)
        self._bias_cache: tuple | None = None  # (bias, device, bias there): see _bias_on

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature,
                "bias": None if self.bias is None else self.bias.tolist()}

    @property
    def needs_logq(self) -> bool:  # type: ignore[override]
        return self.temperature > 0  # T = 0 averages with fixed weights

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.bias is not None:
            what = "OR mixture weights" if self._bias_from == "weights" else "OR bias"
            self.bias = _vector(self.bias, num_experts, what)

    def _bias_on(self, device: torch.device) -> Tensor | None:
        """The bias on the step's device, copied there once (not a host-to-device copy a step)."""
        if self.bias is None:
            return None
        cached = self._bias_cache
        if cached is None or cached[0] is not self.bias or cached[1] != device:
            cached = self._bias_cache = (self.bias, device, self.bias.to(device))
        return cached[2]

    def kappa(self, state: StepState) -> Tensor:
        logq = state.logq.to(_F64)
        B, M = logq.shape
        bias = self._bias_on(logq.device)
        if math.isinf(self.temperature):
            # argmax of log q, exact ties (e.g. the first step, every expert at the shared prior)
            # broken by the bias, then by index. Lexicographic rather than argmax(log q + eps bias):
            # at image sizes |log q| ~ 1e5..1e6, whose float64 spacing swallows any small eps bias
            if bias is None:
                idx = logq.argmax(-1)
            else:
                tied = logq == logq.amax(-1, keepdim=True)
                # (a -inf bias, i.e. weight 0, still ranks above the experts not tied)
                idx = torch.where(tied, bias.clamp_min(torch.finfo(_F64).min), -math.inf).argmax(-1)
            return torch.nn.functional.one_hot(idx, M).to(_F64)
        logits = self.temperature * logq if self.temperature > 0 else torch.zeros_like(logq)
        return torch.softmax(logits if bias is None else logits + bias, dim=-1)


def project_capped_simplex(k: Tensor, lo: float, hi: float) -> Tensor:
    """Euclidean projection of each row of k [B, M] onto {sum = 1, lo <= k_i <= hi}.

    The projection is clip(k + tau, lo, hi) with tau the root of S(tau) = sum_i clip(k_i +
    tau, lo, hi) = 1. S is piecewise linear and non-decreasing with breakpoints lo - k_i and
    hi - k_i: evaluate it at the sorted breakpoints and interpolate on the segment that
    crosses 1 (exact, no iteration, no host read). Rows already feasible come back unchanged
    (up to rounding for three or more experts).
    """
    M = k.shape[-1]
    _check_clamp(M, lo, hi)
    if M == 2:
        return _project_pair(k, lo, hi)
    return _project_sorted(k, lo, hi)


def _check_clamp(M: int, lo: float, hi: float) -> None:
    if not (M * lo <= 1.0 <= M * hi):
        raise ValueError(f"kappa clamp [{lo}, {hi}] admits no weights summing to one for {M} experts")


def _pair_bounds(lo: float, hi: float) -> tuple[float, float]:
    """The range of kappa_1 on {(kappa_1, 1 - kappa_1): lo <= kappa_i <= hi}."""
    return max(lo, 1.0 - hi), min(hi, 1.0 - lo)


def _project_pair(k: Tensor, lo: float, hi: float) -> Tensor:
    """M = 2: the feasible set is the segment {(u, 1 - u): max(lo, 1 - hi) <= u <= min(hi, 1 - lo)}
    of the line k_1 + k_2 = 1, so the projection is the orthogonal projection onto the line,
    u = (k_1 - k_2 + 1) / 2, clamped to the segment."""
    u = (torch.sub(k[..., :1], k[..., 1:]) + 1.0).mul(0.5).clamp(*_pair_bounds(lo, hi))
    return torch.cat([u, 1.0 - u], -1)


def _project_sorted(k: Tensor, lo: float, hi: float) -> Tensor:
    """Any M: tau from the sorted breakpoints (see project_capped_simplex) in about 20 ops. With
    S_0 <= ... <= S_2M-1 the values of S at the sorted breakpoints b_0 <= ... <= b_2M-1
    (S_0 = M lo <= 1 <= M hi = S_2M-1), S is linear on each segment, so

        tau = b_0 + sum_j (b_j+1 - b_j) clip((1 - S_j) / (S_j+1 - S_j), 0, 1)

    (segments wholly below 1 count in full, those above not at all, the crossing one in part; a
    flat segment at S = 1, 0 / 0, counts as 0). Rows already feasible come back unchanged up to
    rounding."""
    Bn, M = k.shape
    lohi = _const(("project", str(k.device), lo, hi), lambda: torch.tensor([[lo], [hi]], dtype=_F64, device=k.device))
    kk = k.unsqueeze(-2)  # [B, 1, M]
    bp = (lohi - kk).reshape(Bn, 2 * M).sort(-1).values  # [B, 2M]: lo - k_i, hi - k_i, sorted
    S = (kk + bp.unsqueeze(-1)).clamp_(lo, hi).sum(-1)  # [B, 2M]: S at each breakpoint
    frac = torch.nan_to_num_((1.0 - S[:, :-1]) / S.diff(dim=-1), nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
    tau = torch.add(bp[:, :1], torch.linalg.vecdot(frac, bp.diff(dim=-1)).unsqueeze(-1))
    return (k + tau).clamp_(lo, hi)


_CONSTANTS: dict[tuple, Any] = {}


def _const(key: tuple, make: Callable[[], Any]) -> Any:
    """Constant tensors of the solvers, made once per key (a plain dict, which torch.compile
    traces, rather than functools.lru_cache)."""
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make()
    return _CONSTANTS[key]


def _sum_zero_basis(m: int) -> Tensor:
    """Orthonormal basis [m, m - 1] of {sum = 0} (QR of the centring matrix), float64 on the CPU."""
    P = torch.eye(m, dtype=_F64) - 1.0 / m
    return torch.linalg.qr(P[:, : m - 1])[0]


def solve_and(A: Tensor, b: Tensor, offsets: Tensor | None = None, ridge: float = 1e-3,
              floor: float = 1e-8, clamp: tuple[float, float] | None = None) -> Tensor:
    """kappa [B, M] with sum 1 making b + A kappa - offsets equal across experts (least squares).

    Parametrise kappa = 1/M + Q z with Q an orthonormal basis of {sum = 0} and minimise
    ||P (A kappa + b - offsets)||^2 + rho ||z||^2, P the centring projector. The ridge
    rho = ridge * mean((A Q)^2) is relative to how strongly kappa moves the log-densities at
    all, so experts that agree to within sqrt(ridge) get (nearly) equal weights instead of
    a division by ||s_1 - s_2||^2 ~ 0. That alone is not enough when the experts differ only
    by rounding (fp16 networks): then A Q itself is rounding noise and so is the relative
    ridge. The absolute floor adds floor * mean(A^2): a differential authority ||P A Q|| below
    sqrt(floor) ||A|| (scores agreeing to about 1%) is treated as agreement. Non-finite rows
    fall back to equal weights. clamp=(lo, hi): the result projected onto {sum 1, lo <= kappa_i
    <= hi} (project_capped_simplex).

    Two experts (the common case) take the closed form of the same problem (`_solve_pair`).
    """
    A = A if A.dtype == _F64 else A.to(_F64)
    b = b if b.dtype == _F64 else b.to(_F64)
    Bn, M = b.shape
    if clamp is not None:
        _check_clamp(M, *clamp)
    if M == 1:
        return torch.ones((Bn, 1), dtype=_F64, device=b.device)
    c = b if offsets is None else b - offsets.to(b)
    if M == 2:
        return _solve_pair(A, c, ridge, floor, clamp)
    k = _solve_general(A, c, ridge, floor)
    return k if clamp is None else _project_sorted(k, *clamp)


def _general_maps(M: int, device: torch.device, ridge: float, floor: float) -> tuple[Tensor, ...]:
    """The constants of _solve_general, once per (M, device, ridge, floor)."""
    def make() -> tuple[Tensor, ...]:
        Q = _sum_zero_basis(M)
        Qx = torch.zeros(M + 1, M, dtype=_F64)  # [A | c] @ Qx = [A Q | A 1/M + c]
        Qx[:M, : M - 1], Qx[:M, M - 1], Qx[M, M - 1] = Q, 1.0 / M, 1.0
        P = torch.eye(M, dtype=_F64) - 1.0 / M  # the centring projector
        # rho = ridge mean((A Q)^2) + floor mean(A^2) as weights on the squares of [A Q | A]
        w = torch.cat([torch.full((M - 1,), ridge / (M * (M - 1)), dtype=_F64),
                       torch.full((M,), floor / (M * M), dtype=_F64)]).repeat(M)
        out = (Qx, P, w, torch.eye(M - 1, dtype=_F64), torch.tensor(torch.finfo(_F64).tiny, dtype=_F64),
               torch.full((1, M), 1.0 / M, dtype=_F64), -Q.T.contiguous())
        return tuple(t.to(device) for t in out)

    return _const(("general", M, str(device), ridge, floor), make)


def _solve_general(A: Tensor, c: Tensor, ridge: float, floor: float) -> Tensor:
    """solve_and for any M (no clamp): the regularised least squares in the sum-zero basis,
    kappa = 1/M - Q H^-1 g with H = (P A Q)^T P A Q + rho I and g = (P A Q)^T P r0, r0 = c + A 1/M
    (about 15 ops: both blocks from one product with [A | c], H and g from one more)."""
    Bn, M = c.shape
    Qx, P, w, eye, tiny, mean, neg_qt = _general_maps(M, c.device, ridge, floor)
    Y = torch.cat([A, c.unsqueeze(-1)], -1) @ Qx  # [B, M, M]: [A Q | r0]
    T = P @ Y  # [P A Q | P r0]
    rho = torch.addmv(tiny, torch.cat([Y[..., :-1], A], -1).square().reshape(Bn, -1), w)  # [B]
    G = T[..., :-1].mT @ T  # [B, M-1, M]: [H - rho I | g]
    H = torch.addcmul(G[..., :-1], rho[:, None, None], eye)
    # H is symmetric positive definite (rho > 0): Cholesky and two triangular solves, which,
    # unlike linalg.solve / solve_ex / cholesky_solve, read nothing back to the host; bad
    # rows are caught below
    L = torch.linalg.cholesky_ex(H)[0]
    z = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, G[..., -1:], upper=False), upper=True)
    k = torch.addmm(mean, z.squeeze(-1), neg_qt)  # 1/M - Q z
    return torch.where(torch.isfinite(k.sum(-1, keepdim=True)), k, 1.0 / M)  # a row with any non-finite entry: equal weights


def _pair_maps(device: torch.device, ridge: float, floor: float) -> tuple[Tensor, ...]:
    """The constants of _solve_pair, once per device and (ridge, floor)."""
    def make() -> tuple[Tensor, ...]:
        def t(v: Any) -> Tensor:
            return torch.tensor(v, dtype=_F64, device=device)

        return (
            # rows: A11, A12, A21, A22, c1, c2; columns: D, R, e1, e2, A11, A12, A21, A22
            t([[1, 0.5, 1, 0, 1, 0, 0, 0], [-1, 0.5, -1, 0, 0, 1, 0, 0], [-1, -0.5, 0, 1, 0, 0, 1, 0],
               [1, -0.5, 0, -1, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0], [0, -1, 0, 0, 0, 0, 0, 0]]),
            # (D^2, R^2, e1^2, e2^2, A11^2, A12^2, A21^2, A22^2) -> D^2 + 4 rho
            t([[1], [0], [ridge], [ridge], [floor], [floor], [floor], [floor]]),
            t(4 * torch.finfo(_F64).tiny), t(0.5), t([0.0, 1.0]), t([1.0, -1.0]))

    return _const(("pair", str(device), ridge, floor), make)


def _solve_pair(A: Tensor, c: Tensor, ridge: float, floor: float, clamp: tuple[float, float] | None) -> Tensor:
    """solve_and for M = 2 in closed form. With Q = (1, -1) / sqrt 2, the one unknown's normal
    equation gives

        kappa_1 = 1/2 - D R / (D^2 + 4 rho),   kappa_2 = 1 - kappa_1
        D = A11 - A12 - A21 + A22,   R = c1 - c2 + (A11 + A12 - A21 - A22) / 2
        4 rho = ridge (e1^2 + e2^2) + floor sum_ij A_ij^2 + 4 tiny,   e_i = A_i1 - A_i2

    and the capped-simplex projection of (kappa_1, 1 - kappa_1) is a clamp of kappa_1 to
    [max(lo, 1 - hi), min(hi, 1 - lo)] (see _project_pair): nine ops on [B, <= 8] tensors
    where the general path takes thirty."""
    lin, den_w, tiny, half, e1, d12 = _pair_maps(c.device, ridge, floor)
    L = torch.cat([A.reshape(c.shape[0], 4), c], -1) @ lin  # [B, 8]: D, R, e1, e2 and A itself
    den = torch.addmm(tiny, L.square(), den_w)  # [B, 1]: D^2 + 4 rho
    k1 = torch.addcdiv(half, L[:, :2].prod(-1, keepdim=True), den, value=-1.0)  # 1/2 - D R / den
    k1 = torch.nan_to_num(k1, nan=0.5, posinf=0.5, neginf=0.5)  # non-finite rows: equal weights
    if clamp is not None:
        k1 = k1.clamp(*_pair_bounds(*clamp))
    return torch.addcmul(e1, k1, d12)  # (kappa_1, 1 - kappa_1)


def and_settings(ridge: float, floor: float, clamp: tuple[float, float] | None,
                 feedback: float) -> tuple[float, float, tuple[float, float] | None, float]:
    """The equal-density AND's solver settings (solve_and's ridge, floor and clamp, and the
    feedback of the tracked imbalance), checked and as floats: (ridge, floor, clamp, feedback).
    One check for AndOperator and for the SuperDiff AND nodes of superdiff.formula.FormulaOperator."""
    for name, v in (("ridge", ridge), ("floor", floor)):
        if not (float(v) >= 0 and math.isfinite(float(v))):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if not (0.0 <= float(feedback) <= 1.0):
        raise ValueError(f"feedback must be in [0, 1] (the fraction of the tracked imbalance corrected each "
                         f"step), got {feedback}")
    if clamp is not None:
        lo, hi = (float(v) for v in clamp)
        if not lo < hi:
            raise ValueError(f"kappa clamp must be (lo, hi) with lo < hi, got {clamp}")
        clamp = (lo, hi)
    return float(ridge), float(floor), clamp, float(feedback)


def check_clamp(clamp: tuple[float, float] | None, count: int, what: str) -> None:
    """Refuse a kappa clamp (lo, hi) that admits no weights summing to one over `count`
    children (C lo <= 1 <= C hi fails); what: the children, for the message."""
    if clamp is None:
        return
    lo, hi = clamp
    if not (count * lo <= 1.0 <= count * hi):
        raise ValueError(f"kappa clamp {clamp} admits no weights summing to one for {what} "
                         f"({count} lo <= 1 <= {count} hi fails); widen it, e.g. clamp=({min(lo, 1.0 / count):g}, "
                         f"{max(hi, 1.0 / count):g}), or clamp=None")


class AndOperator(Operator):
    """Equal-density AND for N >= 1 experts via the linear system (see module docstring).

    offsets l: final log q_i - log q_j = l_i - l_j (spread evenly over the steps).
    feedback: the fraction of the tracked imbalance log q_i - mean_j log q_j (minus the offset
        schedule) corrected in each step, i.e. b_i += feedback * log q_i. With exact kappa this
        imbalance is zero and feedback changes nothing (the paper's per-step condition); when
        the ridge or clamp had to hold kappa back, it steers the densities back to equality
        instead of letting the error stay. Measured (benchmarks/estimator_accuracy): fewer
        samples stranded off the shared mode.
    ridge, floor: see solve_and (both 0: the exact least-squares solution). clamp=(lo, hi): project kappa onto {sum 1, lo <= kappa_i <= hi};
        the default (-1, 2) bounds the extrapolation of one step, where the linearised
        estimator stops being accurate; None disables it.
    """

    name = "and"
    needs_linear_model = True

    def __init__(self, offsets: Sequence[float] | Tensor | None = None, ridge: float = 1e-3,
                 clamp: tuple[float, float] | None = (-1.0, 2.0), feedback: float = 1.0,
                 floor: float = 1e-8) -> None:
        self.ridge, self.floor, self.clamp, self.feedback = and_settings(ridge, floor, clamp, feedback)
        self.offsets = None if offsets is None else torch.as_tensor(offsets, dtype=_F64)

    def params(self) -> dict[str, Any]:
        return {"offsets": None if self.offsets is None else self.offsets.tolist(),
                "ridge": self.ridge, "floor": self.floor,
                "clamp": self.clamp, "feedback": self.feedback}

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.offsets is not None:
            self.offsets = _vector(self.offsets, num_experts, "AND offsets")
        check_clamp(self.clamp, num_experts, f"{num_experts} experts")

    def kappa(self, state: StepState) -> Tensor:
        if state.linear_model is None:
            raise ValueError("the AND operator needs the step's linear model; use it through superdiff.sample")
        B, M = state.logq.shape
        if M == 1:  # one expert: kappa = 1 whatever the step does (no linear model needed)
            return torch.ones((B, 1), dtype=_F64, device=state.logq.device)
        A, b = state.linear_model()
        if self.feedback:
            b = torch.add(b, state.logq.to(b), alpha=self.feedback)
        off = None
        if self.offsets is not None:
            # target after this step: log q_i - l_i (k + 1) / N equal; the per-step share is
            # l_i / N, plus (with feedback) the part of the schedule not yet reached
            frac = (1.0 / state.num_steps) + (self.feedback * state.step / state.num_steps)
            off = (self.offsets * frac).to(b.device)[None].expand_as(b)
        return solve_and(A, b, off, self.ridge, self.floor, self.clamp)


class AverageOperator(Operator):
    """Fixed weights: kappa = weights (default 1/M). With guidance this is Composable Diffusion,
    eps = u + w sum_i kappa_i (c_i - u); a negative weight negates (NOT) that expert."""

    name = "average"

    def __init__(self, weights: Sequence[float] | Tensor | None = None) -> None:
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=_F64)

    @property
    def affine(self) -> bool:  # type: ignore[override]
        return self.weights is None or abs(float(self.weights.sum()) - 1.0) < 1e-12

    def params(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else self.weights.tolist()}

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.weights is not None:
            self.weights = _vector(self.weights, num_experts, "average weights")

    def kappa(self, state: StepState) -> Tensor:
        """The same [B, M] weights every step: built on the first step of a call, then reused
        (callers never modify kappa in place)."""
        B, M = state.logq.shape
        key = (B, M, state.logq.device)
        cached = getattr(self, "_cached", None)  # (key, kappa), replaced as one object
        if cached is None or cached[0] != key or state.step == 0:
            w = torch.full((M,), 1.0 / M, dtype=_F64) if self.weights is None else self.weights
            cached = self._cached = (key, w.to(state.logq.device)[None].expand(B, M).clone())
        return cached[1]


class SingleOperator(Operator):
    """Only expert `index` drives the sample.

    track_all=False (default): `sample` evaluates expert `index` alone (its conditional and
    unconditional rows: the cost of the model by itself) and the other experts' log q is not
    tracked (NaN in the trace). track_all=True: every expert is evaluated each step and its
    log q tracked along the single expert's trajectory."""

    name = "single"

    def __init__(self, index: int = 0, track_all: bool = False) -> None:
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"single operator index must be an int >= 0, got {index!r}")
        self.index = index
        self.track_all = bool(track_all)

    def params(self) -> dict[str, Any]:
        return {"index": self.index, "track_all": self.track_all}

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.index >= num_experts:
            raise ValueError(f"single operator index {self.index} is out of range for {num_experts} experts")

    def kappa(self, state: StepState) -> Tensor:
        """One-hot [B, M], built on the first step of a call and reused (as AverageOperator)."""
        B, M = state.logq.shape
        key = (B, M, state.logq.device)
        cached = getattr(self, "_cached", None)  # (key, kappa), replaced as one object
        if cached is None or cached[0] != key or state.step == 0:
            k = torch.zeros(B, M, dtype=_F64, device=state.logq.device)
            k[:, self.index] = 1.0
            cached = self._cached = (key, k)
        return cached[1]


OPERATORS: dict[str, type[Operator]] = {
    "or": OrOperator,
    "and": AndOperator,
    "average": AverageOperator,
    "single": SingleOperator,
}


def make_operator(op: str | Operator, **params: Any) -> Operator:
    """An operator from its name and parameters ("or", "and", "average", "single")."""
    if isinstance(op, Operator):
        if params:
            raise ValueError("parameters were given together with an Operator instance; set them on the instance")
        return op
    if not isinstance(op, str) or op.lower() not in OPERATORS:
        raise ValueError(f"unknown operator {op!r}; expected one of {', '.join(OPERATORS)}")
    cls = OPERATORS[op.lower()]
    try:
        return cls(**params)
    except TypeError as e:
        import inspect

        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"bad parameters {sorted(params)} for operator {op!r} ({e}); "
                         f"allowed: {', '.join(allowed)}") from None
