"""Experts: anything that maps (x_t, t) to a prediction of known parameterisation.

An `Expert` evaluates one model under one condition. An `ExpertSet` evaluates M experts
(and, for classifier-free guidance, their unconditional branches) at one (x, t) and returns
them stacked in one common prediction kind:

    cond:   [M, B, *S]        expert i's conditional prediction
    uncond: [B, *S] | [M, B, *S] | None   shared or per-expert unconditional branch

`SharedNetworkExperts` puts all branches that share a network into ONE batched forward
call (chunked by max_batch_size). `GaussianMixtureExpert` is the analytic oracle: exact
score, posterior mean and log q_t(x) of a Gaussian mixture under any schedule, finite at both
ends of a rectified flow (alpha_t = 0 at t = 1: q_1 = N(0, sigma_1^2 I); sigma_t = 0 at t = 0),

    q_t(x) = sum_k pi_k N(x; alpha_t mu_k, alpha_t^2 diag(v_k) + sigma_t^2 I).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from .predictions import check_kind, convert, from_eps_x0
from .schedules import Schedule

Tensor = torch.Tensor

__all__ = [
    "Expert",
    "ExpertOutput",
    "ExpertSet",
    "ExpertList",
    "SharedNetworkExperts",
    "GaussianMixtureExpert",
    "as_expert_set",
]


@runtime_checkable
class Expert(Protocol):
    """One model under one condition: predict(x [B, *S], t (0-d), schedule) -> [B, *S]."""

    prediction_type: str

    def predict(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor: ...


@dataclass
class ExpertOutput:
    cond: Tensor  # [M, B, *S]
    uncond: Tensor | None  # [B, *S] (shared) or [M, B, *S] (per expert) or None
    kind: str
    #: [M + 1, B, *S] when cond and a shared uncond are views of this one tensor (one forward
    #: of every row): the step's finite check sums it in one op
    stacked: Tensor | None = None


def coarsest_dtype(*dtypes: torch.dtype | None) -> torch.dtype | None:
    """The floating dtype with the largest machine epsilon among those given (None ignored)."""
    known = [d for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return max(known, key=lambda d: torch.finfo(d).eps) if known else None


class ExpertSet:
    """M experts evaluated together; subclasses implement `evaluate`."""

    prediction_type: str = "epsilon"
    num_experts: int = 0
    has_uncond: bool = False
    #: number of forward calls made so far (one batched call counts once)
    num_forward_calls: int = 0
    #: the ODE estimator's JVP by finite differences rather than forward mode (ODEEstimator,
    #: jvp="auto"): True for neural networks, where forward mode is slow and memory-hungry
    prefers_finite_difference_jvp: bool = False
    #: the dtype the networks compute in, when known (an fp16 UNet fed float32 latents computes
    #: in float16): the finite-difference JVP sizes its step for the coarser of this and the
    #: dtype the experts are fed. None: they compute in what they are fed
    compute_dtype: torch.dtype | None = None

    def evaluate(self, x: Tensor, t: Tensor, schedule: Schedule) -> ExpertOutput:
        raise NotImplementedError

    @property
    def member_kinds(self) -> tuple[str, ...]:
        """The prediction kinds the members return before the set converts them to
        `prediction_type` (a conversion from epsilon is undefined where alpha_t = 0)."""
        return (self.prediction_type,)

    @property
    def has_shared_uncond(self) -> bool:
        """Whether the unconditional branch is one prediction shared by every expert (what
        completes weights that need not sum to one) rather than one per expert."""
        return self.has_uncond

    def model_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """x as the step hands it to `evaluate`: in `dtype` (the models' dtype), without an op
        when it already is. A set that primed an evaluation at a converted copy of the sampler's
        x (superdiff.correctors.CachedExperts) returns that very copy, so that `evaluate`
        recognises it by identity instead of comparing values (a host read)."""
        return x if x.dtype == dtype else x.to(dtype)

    def set_grid(self, times: Sequence[Tensor], device: torch.device | str | None = None) -> None:
        """Called by `sample` once before its loop with the grid's times (the 0-d tensors every
        step will pass as t): experts may precompute what they feed their networks at each one
        (superdiff.diffusers_experts.TimeInputs). Optional; the default does nothing."""

    def begin_step(self, step: int) -> None:
        """Called by `sample` before step `step` (both evaluations of a Heun step, and a
        corrector's moves after it, belong to it): experts whose network changes from step
        to step (pipelines.adapters' LoRA switch) follow the step index, not the time.
        Optional; the default does nothing."""

    def subset(self, index: int) -> "ExpertSet | None":
        """Expert `index` alone (with its own unconditional branch), sharing this set's networks
        and forward-call counts, for operators that need only it ("single"); None when this
        set cannot evaluate one expert without the others (then all are evaluated)."""
        return None

    def evaluate_conditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        """The experts' conditional predictions [M, B, *S] alone: what the ODE estimator's JVP
        differentiates (subclasses skip the unconditional rows, which it never uses)."""
        return self.evaluate(x, t, schedule).cond

    def evaluate_unconditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor | None:
        """The unconditional branch alone ([B, *S] shared or [M, B, *S]); None without one."""
        return self.evaluate(x, t, schedule).uncond if self.has_uncond else None

    def __len__(self) -> int:
        return self.num_experts


def _check_pred(out: Tensor, x: Tensor, who: str, rows: int | None = None) -> Tensor:
    """out, checked to have x's shape (rows: x's shape with that many rows instead)."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{who} returned {type(out).__name__}, expected a tensor")
    want = x.shape if rows is None else torch.Size((rows, *x.shape[1:]))
    if out.shape != want:
        raise ValueError(
            f"{who} returned a prediction of shape {tuple(out.shape)} for x of shape "
            f"{tuple(want)}; experts must return the shape of their input"
        )
    return out


class ExpertList(ExpertSet):
    """Independent experts, each evaluated by its own call, converted to a common kind."""

    def __init__(self, experts: Sequence[Expert], uncond: Sequence[Expert] | Expert | None = None,
                 prediction_type: str | None = None) -> None:
        experts = list(experts)
        if not experts:
            raise ValueError("the expert list is empty: give at least one expert")
        for i, e in enumerate(experts):
            if not hasattr(e, "predict") or not hasattr(e, "prediction_type"):
                raise ValueError(
                    f"expert {i} ({type(e).__name__}) is not an Expert: it needs a "
                    "`prediction_type` attribute and a `predict(x, t, schedule)` method"
                )
            check_kind(e.prediction_type)
        self.experts = experts
        if isinstance(uncond, Sequence) and len(uncond) != len(experts):
            raise ValueError(f"got {len(uncond)} unconditional experts for {len(experts)} experts; "
                             "give one shared or one per expert")
        self.uncond = uncond
        self.prediction_type = check_kind(prediction_type or experts[0].prediction_type)
        self.num_experts = len(experts)
        self.has_uncond = uncond is not None
        self.num_forward_calls = 0

    @property
    def member_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        u = list(self.uncond) if isinstance(self.uncond, Sequence) else [] if self.uncond is None else [self.uncond]
        return tuple(dict.fromkeys(e.prediction_type for e in [*self.experts, *u]))

    @property
    def has_shared_uncond(self) -> bool:  # type: ignore[override]
        return self.uncond is not None and not isinstance(self.uncond, Sequence)

    def subset(self, index: int) -> "ExpertSet | None":
        if type(self) is not ExpertList:  # a subclass may evaluate differently: evaluate all
            return None
        u = self.uncond[index] if isinstance(self.uncond, Sequence) else self.uncond
        return _CountingView(self, ExpertList([self.experts[index]], u, self.prediction_type))

    def _one(self, e: Expert, x: Tensor, t: Tensor, schedule: Schedule, who: str) -> Tensor:
        out = _check_pred(e.predict(x, t, schedule), x, who)
        self.num_forward_calls += 1
        return convert(out, e.prediction_type, self.prediction_type, x, schedule.alpha(t), schedule.sigma(t))

    def evaluate_conditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return torch.stack([self._one(e, x, t, schedule, f"expert {i}") for i, e in enumerate(self.experts)])

    def evaluate_unconditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor | None:
        if isinstance(self.uncond, Sequence):
            return torch.stack([self._one(e, x, t, schedule, f"unconditional expert {i}")
                                for i, e in enumerate(self.uncond)])
        if self.uncond is not None:
            return self._one(self.uncond, x, t, schedule, "unconditional expert")
        return None

    def evaluate(self, x: Tensor, t: Tensor, schedule: Schedule) -> ExpertOutput:
        return ExpertOutput(self.evaluate_conditional(x, t, schedule), self.evaluate_unconditional(x, t, schedule),
                            self.prediction_type)


class _CountingView(ExpertSet):
    """A sub-set whose forward calls are added to its parent's count."""

    def __init__(self, parent: ExpertSet, inner: ExpertSet) -> None:
        self.parent, self.inner = parent, inner
        self.prediction_type, self.num_experts, self.has_uncond = inner.prediction_type, inner.num_experts, inner.has_uncond
        self.prefers_finite_difference_jvp = inner.prefers_finite_difference_jvp

    @property
    def compute_dtype(self) -> torch.dtype | None:  # type: ignore[override]
        return self.inner.compute_dtype

    @property
    def member_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.member_kinds

    @property
    def has_shared_uncond(self) -> bool:  # type: ignore[override]
        return self.inner.has_shared_uncond

    @property
    def num_forward_calls(self) -> int:  # type: ignore[override]
        return self.parent.num_forward_calls

    @num_forward_calls.setter
    def num_forward_calls(self, value: int) -> None:
        pass

    def _counted(self, f: Callable[..., Any], *args: Any) -> Any:
        n0 = self.inner.num_forward_calls
        out = f(*args)
        self.parent.num_forward_calls += self.inner.num_forward_calls - n0
        return out

    def set_grid(self, times: Sequence[Tensor], device: torch.device | str | None = None) -> None:
        self.inner.set_grid(times, device)

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def evaluate(self, x: Tensor, t: Tensor, schedule: Schedule) -> ExpertOutput:
        return self._counted(self.inner.evaluate, x, t, schedule)

    def evaluate_conditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return self._counted(self.inner.evaluate_conditional, x, t, schedule)

    def evaluate_unconditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor | None:
        return self._counted(self.inner.evaluate_unconditional, x, t, schedule)


def _cat_conditions(conds: Sequence[Any], batch: int) -> Any:
    """Concatenate per-branch conditions along dim 0, broadcasting batch-1 entries to `batch`."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        parts = []
        for c in conds:
            if c.shape[0] == 1 and batch != 1:
                c = c.expand(batch, *c.shape[1:])
            elif c.shape[0] != batch:
                raise ValueError(f"condition has batch size {c.shape[0]}, expected 1 or {batch}")
            parts.append(c)
        return torch.cat(parts, 0)
    if isinstance(first, Mapping):
        return {k: _cat_conditions([c[k] for c in conds], batch) for k in first}
    raise ValueError(f"conditions must be tensors or dicts of tensors, got {type(first).__name__}")


def _slice_condition(cond: Any, sl: slice) -> Any:
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[sl]
    return {k: _slice_condition(v, sl) for k, v in cond.items()}


class SharedNetworkExperts(ExpertSet):
    """N conditions of ONE network (plus an optional unconditional one) in one forward call.

    fn(x [N, *S], t (0-d float64), cond) -> [N, *S], where cond is the conditions of the N
    rows concatenated along dim 0 (tensors or dicts of tensors). Rows are laid out as
    [expert 0 | expert 1 | ... | uncond], each block the whole batch B. A fn with
    `replicates_rows = True` is called as fn(x [B, *S], t, cond, repeats=n) for the n B rows
    [x | ... | x] and builds them itself (diffusers_experts.network_input: the copies, the
    input scale and the cast in one op), when they go through one call (no max_batch_size split).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, Any], Tensor], conditions: Sequence[Any],
                 prediction_type: str, uncond_condition: Any = None, max_batch_size: int | None = None) -> None:
        if len(conditions) == 0:
            raise ValueError("no conditions given: SharedNetworkExperts needs at least one")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.fn = fn
        self.conditions = list(conditions)
        self.uncond_condition = uncond_condition
        self.prediction_type = check_kind(prediction_type)
        self.num_experts = len(self.conditions)
        self.has_uncond = uncond_condition is not None
        self.max_batch_size = max_batch_size
        self.num_forward_calls = 0
        self._batched: dict[tuple, Any] = {}  # concatenated conditions per (rows, batch size)

    def evaluate_rows(self, x: Tensor, t: Tensor, rows: Sequence[int]) -> Tensor:
        """The network under the given rows [len(rows), B, *S] (row i < N: condition i; row N:
        the unconditional one), in one forward call (chunked by max_batch_size)."""
        B = x.shape[0]
        rows = tuple(rows)
        nb = len(rows)
        key = (rows, B)
        if key not in self._batched:  # the conditions never change: concatenate them once
            conds = self.conditions + [self.uncond_condition]
            self._batched[key] = _cat_conditions([conds[r] for r in rows], B)
        cb = self._batched[key]
        step = self.max_batch_size or nb * B
        if nb > 1 and step >= nb * B and getattr(self.fn, "replicates_rows", False):
            out = self.fn(x, t, cb, repeats=nb)  # it writes the rows [x | ... | x] into its input itself
            self.num_forward_calls += 1
            return _check_pred(out, x, "the shared network", rows=nb * B).reshape(nb, *x.shape)
        xb = x if nb == 1 else torch.cat([x] * nb)  # [row 0 | row 1 | ...], each B (cat: a third of repeat's time)
        outs = []
        for lo in range(0, nb * B, step):
            if step >= nb * B:  # one call: no slicing
                outs.append(self.fn(xb, t, cb))
            else:
                sl = slice(lo, min(lo + step, nb * B))
                outs.append(self.fn(xb[sl], t, _slice_condition(cb, sl)))
            self.num_forward_calls += 1
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        return _check_pred(out, xb, "the shared network").reshape(nb, *x.shape)

    def subset(self, index: int) -> "ExpertSet":
        return _RowsView(self, index)

    def set_grid(self, times: Sequence[Tensor], device: torch.device | str | None = None) -> None:
        fn = getattr(self.fn, "set_grid", None)
        if fn is not None:
            fn(times, device)

    def begin_step(self, step: int) -> None:
        fn = getattr(self.fn, "begin_step", None)
        if fn is not None:
            fn(step)

    def evaluate_conditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return self.evaluate_rows(x, t, range(self.num_experts))

    def evaluate_unconditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor | None:
        return self.evaluate_rows(x, t, [self.num_experts])[0] if self.has_uncond else None

    def evaluate(self, x: Tensor, t: Tensor, schedule: Schedule) -> ExpertOutput:
        out = self.evaluate_rows(x, t, range(self.num_experts + self.has_uncond))
        if self.has_uncond:
            return ExpertOutput(out[:-1], out[-1], self.prediction_type, out)
        return ExpertOutput(out, None, self.prediction_type)


class _RowsView(ExpertSet):
    """Condition `index` of a SharedNetworkExperts (and its unconditional row): one forward of
    those rows only, counted by the parent."""

    def __init__(self, parent: SharedNetworkExperts, index: int) -> None:
        self.parent, self.index = parent, index
        self.prediction_type, self.num_experts, self.has_uncond = parent.prediction_type, 1, parent.has_uncond

    @property
    def num_forward_calls(self) -> int:  # type: ignore[override]
        return self.parent.num_forward_calls

    @num_forward_calls.setter
    def num_forward_calls(self, value: int) -> None:
        pass

    def set_grid(self, times: Sequence[Tensor], device: torch.device | str | None = None) -> None:
        self.parent.set_grid(times, device)

    def begin_step(self, step: int) -> None:
        self.parent.begin_step(step)

    def evaluate(self, x: Tensor, t: Tensor, schedule: Schedule) -> ExpertOutput:
        rows = [self.index] + ([self.parent.num_experts] if self.has_uncond else [])
        out = self.parent.evaluate_rows(x, t, rows)
        return ExpertOutput(out[:1], out[1] if self.has_uncond else None, self.prediction_type,
                            out if self.has_uncond else None)

    def evaluate_conditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return self.parent.evaluate_rows(x, t, [self.index])

    def evaluate_unconditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor | None:
        return self.parent.evaluate_rows(x, t, [self.parent.num_experts])[0] if self.has_uncond else None


def as_expert_set(experts: ExpertSet | Expert | Sequence[Expert]) -> ExpertSet:
    if isinstance(experts, ExpertSet):
        if experts.num_experts < 1:
            raise ValueError("the expert set is empty: give at least one expert")
        return experts
    if isinstance(experts, Expert) and not isinstance(experts, (list, tuple)):
        return ExpertList([experts])
    if isinstance(experts, Sequence):
        return ExpertList(list(experts))
    raise ValueError(f"cannot use {type(experts).__name__} as experts; give an ExpertSet, an Expert "
                     "or a list of Experts")


class GaussianMixtureExpert:
    """Exact oracle for a Gaussian mixture in R^d (x of shape [B, d]).

    means [K, d]; variances: scalar, [K] (isotropic) or [K, d] (diagonal); weights [K]
    (normalised here). All computations are float64.
    """

    def __init__(self, means: Any, variances: Any = 1.0, weights: Any = None,
                 prediction_type: str = "epsilon") -> None:
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim == 1:
            mu = mu[None]
        if mu.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(mu.shape)}")
        K, d = mu.shape
        v = torch.as_tensor(variances, dtype=torch.float64)
        if v.ndim == 0:
            v = v.expand(K, d)
        elif v.ndim == 1:
            if v.shape[0] != K:
                raise ValueError(f"variances of shape {tuple(v.shape)} do not match K={K} components")
            v = v[:, None].expand(K, d)
        elif v.shape != (K, d):
            raise ValueError(f"variances must be scalar, [K] or [K, d] = [{K}, {d}], got {tuple(v.shape)}")
        if not torch.all(v > 0):
            raise ValueError("variances must be positive")
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or not torch.all(w > 0):
            raise ValueError(f"weights must be K={K} positive numbers")
        self.means, self.variances = mu, v.contiguous()
        self.log_weights = torch.log(w / w.sum())
        self.prediction_type = check_kind(prediction_type)
        self.dim = d

    # [B, K] component log-densities and per-component covariance [K, d]
    def _components(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"x has {x.shape[1]} features per sample, the mixture has d={self.dim}")
        C = alpha**2 * self.variances + sigma**2  # [K, d]
        m = alpha * self.means  # [K, d]
        diff = x[:, None, :] - m[None]  # [B, K, d]
        logn = -0.5 * ((diff**2) / C).sum(-1) - 0.5 * torch.log(2 * math.pi * C).sum(-1)
        return logn + self.log_weights, diff, C

    def _as(self, t: Any, schedule: Schedule) -> tuple[Tensor, Tensor]:
        return schedule.alpha(t).to(torch.float64), schedule.sigma(t).to(torch.float64)

    def log_prob(self, x: Tensor, t: Any, schedule: Schedule) -> Tensor:
        """Exact log q_t(x), shape [B]."""
        lc, _, _ = self._components(x, *self._as(t, schedule))
        return torch.logsumexp(lc, -1)

    def component_log_prob(self, x: Tensor, t: Any, schedule: Schedule) -> Tensor:
        """log pi_k + log N_k(x), shape [B, K]: argmax assigns a sample to a component."""
        return self._components(x, *self._as(t, schedule))[0]

    def score(self, x: Tensor, t: Any, schedule: Schedule) -> Tensor:
        lc, diff, C = self._components(x, *self._as(t, schedule))
        r = torch.softmax(lc, -1)  # [B, K]
        return (-(r[..., None] * diff / C)).sum(1).reshape(x.shape)

    def posterior_mean(self, x: Tensor, t: Any, schedule: Schedule) -> Tensor:
        """E[x0 | x_t = x] (finite also at alpha = 0)."""
        alpha, sigma = self._as(t, schedule)
        lc, diff, C = self._components(x, alpha, sigma)
        r = torch.softmax(lc, -1)
        comp = self.means[None] + (alpha * self.variances / C)[None] * diff  # [B, K, d]
        return (r[..., None] * comp).sum(1).reshape(x.shape)

    def laplacian_log_prob(self, x: Tensor, t: Any, schedule: Schedule) -> Tensor:
        """Exact div(score) = E_r[-tr C^-1 + ||C^-1 (m - x)||^2] - ||score||^2, shape [B]."""
        lc, diff, C = self._components(x, *self._as(t, schedule))
        r = torch.softmax(lc, -1)
        g = -diff / C  # [B, K, d]: score of each component
        s = (r[..., None] * g).sum(1)
        per = -(1.0 / C).sum(-1)[None] + (g**2).sum(-1)
        return (r * per).sum(-1) - (s**2).sum(-1)

    def predict(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        """The exact prediction of the expert's kind, from eps_hat = -sigma_t s and x0_hat =
        E[x0 | x_t]: both are finite wherever q_t is (alpha_t = 0 at the start of a rectified
        flow, sigma_t = 0 at its end), so every kind is too (the flow velocity is x - E[x0] at
        t = 1 and -x at t = 0), where converting one of them through x would divide by zero."""
        alpha, sigma = self._as(t, schedule)
        x64 = x.to(torch.float64)
        eps = -sigma * self.score(x64, t, schedule)
        if self.prediction_type == "epsilon":
            return eps.to(x.dtype)
        x0 = self.posterior_mean(x64, t, schedule)
        return from_eps_x0(eps, x0, self.prediction_type, x64, alpha, sigma).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, t: Any = None,
               schedule: Schedule | None = None) -> tuple[Tensor, Tensor]:
        """n draws of x0 (or of x_t when t and schedule are given) and their component ids."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x0 = self.means[k] + self.variances[k].sqrt() * z
        if t is None:
            return x0, k
        if schedule is None:
            raise ValueError("sampling x_t needs the schedule as well as t")
        a, s = self._as(t, schedule)
        return a * x0 + s * torch.randn(n, self.dim, dtype=torch.float64, generator=generator), k
