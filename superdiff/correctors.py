"""Particle (Feynman-Kac / SMC) and MCMC correctors of a composed sampler (docs/correctors.md;
superdiff-math.md, section 8). Written once; `superdiff.sampling.sample` (and so every
pipeline, the CLI, the studio and the benchmarks) runs it after each SuperDiff step.

Feynman-Kac weights (Skreta et al., ICML 2025). The step drives x with the composed score
S = sum_j a_j s_j of "leaf" densities q_j (the experts, their unconditional branches under
guidance). Simulating the reverse SDE dx = (-f x + g^2 S) dtau + g dW and carrying the
log-weight dw = G dtau makes the weighted particles follow the unnormalised path
p_t = prod_j q_j(x, t)^(a_j) at every t, with (derived in docs/correctors.md)

    product node  G = sum_j a_j G_j + (g^2 / 2) (||sum_j a_j s_j||^2 - sum_j a_j ||s_j||^2)  [P]
    mixture node  G = sum_c pi_c G_c,   pi = softmax(log w_c + log p_c)                        [M]
    a true marginal q_j (an expert)  G = 0

where [P] also carries (sum_j a_j - 1) d f (d the data dimension, f the forward drift
coefficient, 0 on VE). That term is constant for a lone product node, but [M] weights it by
x-dependent responsibilities when an OR's children have different exponent sums (e.g.
("a" & "b") | "c" in product mode on a VP schedule), so product_potential keeps it. [P] gives
the product of experts (a = 1, 1: G = g^2 <s_1, s_2>), q^beta (one leaf, a = beta:
G = beta (beta - 1) g^2/2 ||s||^2), CFG as the geometric average q_u^(1-w) q_c^w
(G = w (w - 1) g^2/2 ||s_c - s_u||^2). The potentials need only the predictions the step
already made: no extra network evaluation. The first step also carries the initial weight
log p_T(x_T) - log N(x_T; 0, prior_std^2). Under guidance w with a shared unconditional branch
the leaves are the guided q_u^(1-w) q_i^w: the step's kappa (GuidedLeaves) and the potentials
(formula.tree_potential) evaluate the tree at w log q_i, exact where every OR's children have
equal kappa sums; Corrector.check refuses the other ORs (their target needs log q_u).

Resampling: effective sample size ESS = (sum w)^2 / sum w^2 of each image's K particles;
systematic resampling when ESS < threshold * K and the step lies inside the window
(progress (k + 1) / n in [lo, hi]); weights reset to zero after each resample. The output
image is one particle drawn in proportion to its final weight, and its trace follows its
ancestry.

MCMC (Du et al., ICML 2023): after a step to t' (sigma > 0), ULA
x <- x + eps S(x) + sqrt(2 eps) z or unadjusted underdamped HMC (partial momentum refresh,
leapfrog steps of size delta), on the composed score at t', eps = c sigma_t'^2 and
delta = c sigma_t' (a step size per noise level). Each expert's tracked log q_i follows the
move by the trapezoid rule of the line integral, <x' - x, (s_i(x) + s_i(x')) / 2>. The last
evaluation is cached and reused by the next step, so n ULA moves cost n network evaluations
per step (HMC: n * leapfrog).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .experts import ExpertOutput, ExpertSet
from .operators import Operator
from .predictions import null_prediction, to_score
from .schedules import Schedule

Tensor = torch.Tensor
_F64 = torch.float64

__all__ = [
    "Corrector",
    "Corrected",
    "GuidedLeaves",
    "split_corrected",
    "CorrectorRun",
    "make_corrector",
    "effective_sample_size",
    "systematic_resample",
    "product_potential",
    "LeafScores",
    "leaf_scores",
    "composed_score",
    "ula_move",
    "leapfrog_move",
    "CachedExperts",
    "MCMC_METHODS",
]

MCMC_METHODS = ("ula", "hmc")


# --------------------------------------------------------------------------------------------
# pure numerical core
# --------------------------------------------------------------------------------------------

def effective_sample_size(logw: Tensor) -> Tensor:
    """ESS = (sum_k w_k)^2 / sum_k w_k^2 of each row of log-weights [G, K]; in [1, K]."""
    lw = logw.to(_F64)
    lw = lw - lw.max(-1, keepdim=True).values
    w = lw.exp()
    return w.sum(-1) ** 2 / (w**2).sum(-1)


def systematic_resample(logw: Tensor, u: Tensor) -> Tensor:
    """Systematic resampling of each row of log-weights [G, K] with offsets u [G] in [0, 1):
    particle j is picked for the positions (u + m) / K, m = 0..K-1, that fall in
    [c_(j-1), c_j), c the cumulative normalised weights. Returns indices [G, K] (ascending)."""
    G, K = logw.shape
    w = torch.softmax(logw.to(_F64), -1)
    c = torch.cumsum(w, -1)
    c[:, -1] = 1.0
    pos = (u.to(_F64).reshape(G, 1) + torch.arange(K, dtype=_F64, device=logw.device)) / K
    return torch.searchsorted(c, pos, right=True).clamp_(max=K - 1)


def product_potential(scores: Tensor, coeffs: Tensor, g2h: Tensor | float,
                      child_potentials: Tensor | None = None, fh: Tensor | float = 0.0) -> Tensor:
    """Log-weight increment [B] of the product node prod_j p_j^(a_j), equation [P]:

        G h = sum_j a_j G_j h + (sum_j a_j - 1) d f h + (g^2 h / 2) (||sum_j a_j s_j||^2 - sum_j a_j ||s_j||^2)

    scores [L, B, D] (the children's scores, flattened: D is the data dimension d), coeffs
    [B, L], g2h = g_t^2 h, fh = f_t h (f the forward drift coefficient, 0 on VE schedules),
    child_potentials [B, L] (their G_j h; None: all zero, i.e. true marginals).

    The term (sum_j a_j - 1) d f h is the same for every particle of a lone product node, but
    an OR over children with different exponent sums weights it by the responsibilities pi_c,
    which depend on x: it must be kept there (docs/correctors.md, [P] and [M]). With f = 0 it
    is not added at all (the VE path is unchanged bit for bit)."""
    s = scores.to(_F64)
    a = coeffs.to(_F64)
    S = torch.einsum("bl,lbd->bd", a, s)
    out = 0.5 * float(g2h) * ((S**2).sum(-1) - (a * (s**2).sum(-1).T).sum(-1))
    fh = float(fh)
    if fh != 0.0:
        out = out + (a.sum(-1) - 1.0) * (s.shape[-1] * fh)
    if child_potentials is not None:
        out = out + (a * child_potentials.to(_F64)).sum(-1)
    return out


@dataclass
class LeafScores:
    """The step's leaves, flattened to [*, B, D]: each expert as the step used it."""

    scores: Tensor  # [M, B, D] expert i's (guided) score s_g_i
    own: Tensor  # [M, B, D] expert i's own (unguided) score s_i (what log q_i tracks)
    potentials: Tensor  # [B, M] G of each guided leaf times h (0 without guidance)
    ref: Tensor | None  # [B, D] score of the reference completing sum kappa != 1 (None: zero score)
    guidance: float = 1.0  # w of the guided leaves q_u^(1-w) q_i^w (1.0: the experts themselves)


def leaf_scores(out: ExpertOutput, x: Tensor, t: Tensor, schedule: Schedule, guidance_scale: float,
                g2h: float) -> LeafScores:
    """Scores of the step's leaves. Under guidance w each expert's guided prediction is the
    geometric average q_u^(1-w) q_i^w, a product node with G h = w (w - 1) (g^2 h / 2)
    ||s_i - s_u||^2 (CFG as a geometric average)."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    x = x.to(_F64)
    B = x.shape[0]
    own = to_score(out.cond.to(_F64), out.kind, x, a, s).reshape(out.cond.shape[0], B, -1)
    M = own.shape[0]
    w = float(guidance_scale)
    if out.uncond is None or w == 1.0:
        ref = None
        if out.uncond is not None and out.uncond.dim() < out.cond.dim():
            ref = to_score(out.uncond.to(_F64), out.kind, x, a, s).reshape(B, -1)
        return LeafScores(own, own, torch.zeros(B, M, dtype=_F64, device=x.device), ref)
    u = to_score(out.uncond.to(_F64), out.kind, x, a, s)
    shared = u.dim() < out.cond.dim()
    u = u.reshape(B, -1)[None] if shared else u.reshape(M, B, -1)
    guided = u + w * (own - u)
    pot = (w * (w - 1.0) * 0.5 * float(g2h)) * ((own - u) ** 2).sum(-1).T  # [B, M]
    return LeafScores(guided, own, pot, u[0] if shared else None, w)


def composed_prediction(out: ExpertOutput, kappa: Tensor, guidance_scale: float, x: Tensor, t: Tensor,
                        schedule: Schedule, affine: bool | None = None) -> Tensor:
    """The combined prediction sum_i kappa_i p_i + (1 - sum kappa) ref of superdiff.step.

    affine: whether kappa sums to one (the operator's `affine`, as the step reads it: no
    reference term and no host read); None: decided from kappa itself (one host read)."""
    from .step import combine, guided

    preds = guided(out, guidance_scale)
    ref = None
    if affine is None:
        affine = not bool(torch.any((1.0 - kappa.to(_F64).sum(-1)).abs() > 1e-12))
    if not affine:
        if out.uncond is not None and out.uncond.dim() < out.cond.dim():
            ref = out.uncond
        else:
            ref = null_prediction(out.kind, x.to(_F64), schedule.alpha(t), schedule.sigma(t))
    return combine(preds, kappa, ref)


def composed_score(out: ExpertOutput, kappa: Tensor, guidance_scale: float, x: Tensor, t: Tensor,
                   schedule: Schedule, affine: bool | None = None) -> Tensor:
    """Score of the composed prediction (the MCMC target's score), [B, *S] float64."""
    pred = composed_prediction(out, kappa, guidance_scale, x, t, schedule, affine)
    return to_score(pred.to(_F64), out.kind, x.to(_F64), schedule.alpha(t), schedule.sigma(t))


def ula_move(x: Tensor, score: Tensor, eps: float, z: Tensor) -> Tensor:
    """One unadjusted Langevin step x + eps S(x) + sqrt(2 eps) z."""
    return x + eps * score + math.sqrt(2.0 * eps) * z


def leapfrog_move(x: Tensor, p: Tensor, score: Tensor, delta: float, score_fn) -> tuple[Tensor, Tensor, Tensor]:
    """One leapfrog step (unit mass): p += delta/2 S(x); x += delta p; p += delta/2 S(x').
    score_fn(x') returns S(x'). Returns (x', p', S(x'))."""
    p = p + 0.5 * delta * score
    x = x + delta * p
    s_new = score_fn(x)
    return x, p + 0.5 * delta * s_new, s_new


# --------------------------------------------------------------------------------------------
# the expert-set wrapper: one cached evaluation handed from the corrector to the next step
# --------------------------------------------------------------------------------------------

class CachedExperts(ExpertSet):
    """Delegates to an ExpertSet; remembers the last evaluation (for the FK potentials) and
    returns a primed evaluation (the MCMC end point) to the next call at the same (x, t)
    without a forward call."""

    def __init__(self, inner: ExpertSet) -> None:
        self.inner = inner
        self.prediction_type = inner.prediction_type
        self.num_experts = inner.num_experts
        self.has_uncond = inner.has_uncond
        self._primed: tuple[Tensor, int, float, ExpertOutput] | None = None
        self._source: tuple[Tensor, int] | None = None  # (sampler's x, its version) when _primed holds its copy
        self.last: tuple[Tensor, float, ExpertOutput] | None = None

    @property
    def num_forward_calls(self) -> int:  # type: ignore[override]
        return self.inner.num_forward_calls

    @property
    def prefers_finite_difference_jvp(self) -> bool:  # type: ignore[override]
        return self.inner.prefers_finite_difference_jvp

    @property
    def compute_dtype(self) -> torch.dtype | None:  # type: ignore[override]
        return self.inner.compute_dtype

    @num_forward_calls.setter
    def num_forward_calls(self, v: int) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def set_grid(self, times: Sequence[Tensor], device: Any = None) -> None:
        self.inner.set_grid(times, device)

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def prime(self, x: Tensor, t: Tensor, out: ExpertOutput, source: Tensor | None = None) -> None:
        """The next evaluate(x, t) returns `out` without a forward call. The tensor itself is kept
        (with its version counter, which an in-place change moves on): the sampler passes the
        same tensor to the next step, recognised without reading its values back; an equal copy
        is compared value by value (one host read). source: the sampler's own x when x is its
        copy in the models' dtype; the step's `model_input(source, dtype)` then returns x itself."""
        self._primed = (x, x._version, float(t), out)
        self._source = None if source is None or source is x else (source, source._version)

    def model_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        src, primed = self._source, self._primed
        if src is not None and x is src[0] and x._version == src[1] and primed[0].dtype == dtype:
            return primed[0]
        return super().model_input(x, dtype)

    def evaluate_conditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        """The inner set's conditional rows alone (the ODE estimator's JVP point): neither the
        priming nor `last` (the evaluation at the step's own x) is touched."""
        return self.inner.evaluate_conditional(x, t, schedule)

    def evaluate(self, x: Tensor, t: Tensor, schedule: Schedule, *args: Any, **kwargs: Any) -> ExpertOutput:
        out = None
        if self._primed is not None and not args and not kwargs:
            px, pv, pt, pout = self._primed
            try:
                hit = float(t) == pt and px.shape == x.shape and px.dtype == x.dtype and (
                    (x is px and x._version == pv) or (x is not px and torch.equal(px, x)))
            except Exception:  # e.g. dual tensors inside a JVP
                hit = False
            if hit:
                out = pout
            self._primed = self._source = None
        if out is None:
            out = self.inner.evaluate(x, t, schedule, *args, **kwargs)
        try:
            self.last = (x.detach(), float(t), out)
        except Exception:
            self.last = None
        return out


# --------------------------------------------------------------------------------------------
# the corrector (configuration) and one run of it (state)
# --------------------------------------------------------------------------------------------

@dataclass
class Corrector:
    """Configuration of the particle and MCMC correctors.

    particles: K particles per requested image (K = 1: no reweighting).
    ess_threshold: resample an image's particles when ESS < ess_threshold * K (1.0: at every
        step inside the window, as Skreta et al. do).
    window: (lo, hi) in [0, 1], the part of the trajectory (step progress (k + 1) / n, 0 = pure
        noise, 1 = the end) in which resampling may happen. Weights accumulate everywhere.
    clip: optional bound (nats) on each step's log-weight increment after centring it per
        image (the authors' heuristic for images); None: exact weights.
    mcmc: None, "ula" or "hmc" (unadjusted; no Metropolis test, see docs/correctors.md).
    mcmc_steps: moves per noise level; step_scale c: eps = c sigma^2 (ULA), delta = c sigma
        (HMC leapfrog); default 0.1 (ULA) and 0.5 (HMC).
    leapfrog: leapfrog steps per HMC move; momentum_keep: the fraction gamma of the momentum
        kept at each refresh, p <- gamma p + sqrt(1 - gamma^2) xi (0: full refresh).
    """

    particles: int = 1
    ess_threshold: float = 0.5
    window: tuple[float, float] = (0.0, 1.0)
    clip: float | None = None
    mcmc: str | None = None
    mcmc_steps: int = 1
    step_scale: float | None = None
    leapfrog: int = 3
    momentum_keep: float = 0.5

    def __post_init__(self) -> None:
        K = self.particles
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"particles K must be an int >= 1 (particles per requested image), got {K!r}")
        try:
            lo, hi = (float(v) for v in self.window)
        except (TypeError, ValueError):
            raise ValueError(f"window must be two numbers (lo, hi) in [0, 1], got {self.window!r}") from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"resampling window {self.window!r} is outside [0, 1] or reversed; give (lo, hi) "
                             "with 0 <= lo <= hi <= 1 (fractions of the trajectory: 0 = pure noise, 1 = the end)")
        self.window = (lo, hi)
        if not (0.0 < float(self.ess_threshold) <= 1.0):
            raise ValueError(f"ess_threshold must be in (0, 1] (a fraction of K), got {self.ess_threshold!r}")
        self.ess_threshold = float(self.ess_threshold)
        if self.clip is not None and not (float(self.clip) > 0 and math.isfinite(float(self.clip))):
            raise ValueError(f"clip must be a positive number of nats or None, got {self.clip!r}")
        if self.mcmc is not None:
            m = str(self.mcmc).lower()
            if m in ("none", ""):
                m = None
            elif m not in MCMC_METHODS:
                raise ValueError(f"unknown MCMC corrector {self.mcmc!r}; expected one of {', '.join(MCMC_METHODS)} "
                                 "or None (Metropolis-adjusted moves need an energy the experts do not give)")
            self.mcmc = m
        n = self.mcmc_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"mcmc_steps must be an int >= 1, got {n!r}")
        L = self.leapfrog
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(f"leapfrog must be an int >= 1, got {L!r}")
        if self.step_scale is not None and not (float(self.step_scale) > 0 and math.isfinite(float(self.step_scale))):
            raise ValueError(f"step_scale must be a positive number, got {self.step_scale!r}")
        if not (0.0 <= float(self.momentum_keep) < 1.0):
            raise ValueError(f"momentum_keep must be in [0, 1), got {self.momentum_keep!r}")

    @property
    def smc(self) -> bool:
        return self.particles > 1

    @property
    def active(self) -> bool:
        return self.smc or self.mcmc is not None

    @property
    def scale(self) -> float:
        if self.step_scale is not None:
            return float(self.step_scale)
        return 0.5 if self.mcmc == "hmc" else 0.1

    def params(self) -> dict[str, Any]:
        return {"particles": self.particles, "ess_threshold": self.ess_threshold, "window": list(self.window),
                "clip": self.clip, "mcmc": self.mcmc, "mcmc_steps": self.mcmc_steps,
                "step_scale": self.scale if self.mcmc else self.step_scale, "leapfrog": self.leapfrog,
                "momentum_keep": self.momentum_keep}

    def evals_per_step(self) -> int:
        """Extra network evaluations per step (beyond the step's own)."""
        if self.mcmc == "ula":
            return self.mcmc_steps
        if self.mcmc == "hmc":
            return self.mcmc_steps * self.leapfrog
        return 0

    def check(self, operator: Any, integrator: Any, num_experts: int, has_uncond: bool = False) -> None:
        """Refuse, before any compute, what this corrector cannot do with the step.

        has_uncond: the experts have an unconditional branch (ExpertSet.has_uncond), which
        completes the step's kappa: then SMC refuses an OR whose children's kappa sums differ
        (its target needs log q_u; superdiff.formula.check_reference_mixtures)."""
        if self.smc:
            if not getattr(integrator, "stochastic", True):
                raise ValueError(f"SMC (particles={self.particles}) needs a stochastic integrator ('em' or 'ddpm'): "
                                 f"under the ODE integrator {integrator.name!r} resampled copies of a particle "
                                 "would stay identical")
            from .formula import check_reference_mixtures, operator_tree

            tree = operator_tree(operator, num_experts, for_potential=True)  # raises when there is no target density
            if has_uncond:
                formula = getattr(operator, "formula", None)
                check_reference_mixtures(tree, formula.names if formula is not None else None)

    def check_grid(self, schedule: Schedule, grid: Tensor) -> None:
        """Refuse a grid whose first step has an infinite Feynman-Kac potential (SMC only)."""
        if self.smc and len(grid) > 1:
            t0, t1 = grid[0], grid[1]
            if not math.isfinite(float(schedule.g2(t0) * (t0 - t1))):
                raise ValueError(f"the Feynman-Kac potential is infinite on the first step (g_t^2 = inf at "
                                 f"t={float(t0):g}, e.g. a rectified flow starting at t = 1); start the grid "
                                 "below it (RectifiedFlow(t_max=0.999) or custom timesteps) to use SMC")

    def start(self, experts: ExpertSet, x: Tensor, logq: Tensor, schedule: Schedule, grid: Tensor,
              operator: Any, generator: Any, guidance_scale: float, model_dtype: torch.dtype,
              noise_dtype: torch.dtype) -> "CorrectorRun":
        return CorrectorRun(self, experts, x, logq, schedule, grid, operator, generator, guidance_scale,
                            model_dtype, noise_dtype)


def make_corrector(spec: Any) -> Corrector | None:
    """A Corrector from None, a Corrector, a dict of its fields, or a string: "none", "smc"
    (K = 4), "smc:K" (e.g. "smc:8"), "ula", "hmc", joined by "+" ("smc:8+ula")."""
    if spec is None or isinstance(spec, Corrector):
        return spec if (spec is None or spec.active) else None
    if isinstance(spec, Mapping):
        allowed = set(Corrector.__dataclass_fields__)
        bad = sorted(set(spec) - allowed)
        if bad:
            raise ValueError(f"unknown corrector field(s) {bad}; allowed: {', '.join(sorted(allowed))}")
        d = dict(spec)
        if "window" in d and d["window"] is not None:
            d["window"] = tuple(d["window"]) if isinstance(d["window"], (list, tuple)) else d["window"]
        c = Corrector(**d)
        return c if c.active else None
    if isinstance(spec, str):
        kw: dict[str, Any] = {}
        for part in spec.lower().replace(" ", "").split("+"):
            if part in ("", "none"):
                continue
            key = "particles" if part.split(":")[0] == "smc" else "mcmc" if part in MCMC_METHODS else None
            if key in kw:
                raise ValueError(f"bad corrector {spec!r}: give at most one {'smc' if key == 'particles' else 'MCMC'} "
                                 "part (e.g. 'smc:8+ula')")
            if part == "smc":
                kw["particles"] = 4
            elif part.startswith("smc:"):
                try:
                    kw["particles"] = int(part[4:])
                except ValueError:
                    raise ValueError(f"bad corrector {spec!r}: 'smc:K' needs an integer K, got {part[4:]!r}") from None
            elif part in MCMC_METHODS:
                kw["mcmc"] = part
            else:
                raise ValueError(f"unknown corrector {part!r} in {spec!r}; expected 'smc', 'smc:K', 'ula', 'hmc' "
                                 "or 'none', joined by '+' (e.g. 'smc:8+ula')")
        c = Corrector(**kw)
        return c if c.active else None
    raise ValueError(f"cannot make a corrector from {type(spec).__name__}; give a string, a dict or a Corrector")


class _Wrapped(Operator):
    """An operator around another: name, properties, kappa, validation, params and fields are
    the wrapped operator's unless a subclass says otherwise."""

    _own_fields = ("operator",)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.operator.name

    @property
    def needs_linear_model(self) -> bool:  # type: ignore[override]
        return self.operator.needs_linear_model

    @property
    def needs_logq(self) -> bool:  # type: ignore[override]
        return self.operator.needs_logq

    @property
    def affine(self) -> bool:  # type: ignore[override]
        return self.operator.affine

    def kappa(self, state: Any) -> Tensor:
        return self.operator.kappa(state)

    def validate(self, num_experts: int) -> None:
        self.operator.validate(num_experts)

    def params(self) -> dict[str, Any]:
        return self.operator.params()

    def __getattr__(self, name: str) -> Any:  # the wrapped operator's own fields (weights, temperature, ...)
        if name in self._own_fields:
            raise AttributeError(name)
        return getattr(self.operator, name)


class GuidedLeaves(_Wrapped):
    """An operator evaluated on the guided leaves' log-densities w log q_i: the drift of SMC
    under guidance w with a shared unconditional branch u (docs/correctors.md, "Guidance and
    the unconditional branch"). The target is the operator's tree over the guided leaves
    q_u^(1-w) q_i^w; a child with kappa sum k is q_u^((1-w) k) times the child at the leaf
    values w log q_i, so in every OR whose children's kappa sums agree (the others are refused
    by Corrector.check) the q_u factors cancel in pi = softmax(log w_c + log p~_c), and kappa
    is the operator's at w log q_i. Everything else is the wrapped operator's."""

    def __init__(self, operator: Any, guidance_scale: float) -> None:
        self.operator = operator
        self.w = float(guidance_scale)

    def kappa(self, state: Any) -> Tensor:
        from .operators import StepState

        return self.operator.kappa(StepState(self.w * state.logq, state.step, state.num_steps, state.linear_model))

    def __repr__(self) -> str:
        return f"GuidedLeaves({self.operator!r}, w={self.w:g})"


class Corrected(_Wrapped):
    """An operator together with the corrector that follows each of its steps. Every pipeline
    takes an Operator instance, so `operator=Corrected(op, "smc:8")` reaches
    `superdiff.sampling.sample`, which runs both; kappa, validation and the name are the
    wrapped operator's."""

    _own_fields = ("operator", "corrector")

    def __init__(self, operator: Any, corrector: Any) -> None:
        from .operators import make_operator

        self.operator = make_operator(operator)
        self.corrector = make_corrector(corrector)

    def params(self) -> dict[str, Any]:
        p = dict(self.operator.params())
        if self.corrector is not None:
            p["corrector"] = self.corrector.params()
        return p

    def __repr__(self) -> str:
        return f"Corrected({self.operator!r}, {self.corrector!r})"


def split_corrected(operator: Any, corrector: Any = None) -> tuple[Any, "Corrector | None"]:
    """(the plain operator, the corrector to run): a Corrected operator brings its own; an
    explicit `corrector` argument wins."""
    if isinstance(operator, Corrected):
        return operator.operator, make_corrector(corrector) if corrector is not None else operator.corrector
    return operator, make_corrector(corrector)


def _groups(generator: Any, B: int) -> list[Any] | None:
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} images; give one per image")
        return list(generator)
    return None


class CorrectorRun:
    """The state of one corrected sampling run (particles, log-weights, ancestry, momenta).

    Rows are laid out image-major: row b * K + k is particle k of image b."""

    def __init__(self, cfg: Corrector, experts: ExpertSet, x: Tensor, logq: Tensor, schedule: Schedule,
                 grid: Tensor, operator: Any, generator: Any, guidance_scale: float, model_dtype: torch.dtype,
                 noise_dtype: torch.dtype) -> None:
        from .step import randn

        self.cfg = cfg
        self.schedule = schedule
        self.grid = grid
        self.operator = operator
        #: the operator the steps (and the MCMC moves) take kappa from: under SMC with guidance
        #: and an unconditional branch, the operator on the guided leaves (GuidedLeaves), so that
        #: the drift is the score of the tree_potential's target; else the operator itself
        self.step_operator = operator
        self.affine = bool(getattr(operator, "affine", True))  # kappa sums to one (static, as the step reads it)
        self.guidance = float(guidance_scale)
        self.model_dtype = model_dtype
        self.noise_dtype = noise_dtype
        K = cfg.particles
        B = x.shape[0]
        self.B, self.K = B, K
        gens = _groups(generator, B)
        self.group_generators = gens
        self.generator = generator
        # particle generators: image b's K particles draw with image b's generator
        self.row_generator = [g for g in gens for _ in range(K)] if gens is not None else generator
        self.dtype = x.dtype  # the loop's dtype for x, kept; the corrector's arithmetic is float64
        x = x.to(_F64)
        if K > 1:
            shape = x.shape[1:]
            std = float(schedule.prior_std(grid[0]))
            if gens is not None:
                extra = torch.stack([randn((K - 1, *shape), g, noise_dtype, x.device) for g in gens]).to(_F64) * std
            else:
                extra = randn((B * (K - 1), *shape), generator, noise_dtype, x.device).to(_F64).reshape(
                    B, K - 1, *shape) * std
            x = torch.cat([x[:, None], extra], 1).reshape(B * K, *shape)
            from .sampling import prior_log_prob

            fresh = prior_log_prob(x, schedule, grid[0])[:, None].expand(B * K, logq.shape[1])
            logq = torch.where((torch.arange(B * K, device=x.device) % K == 0)[:, None],
                               logq.to(_F64).repeat_interleave(K, 0), fresh)
        self.x0 = x.clone()
        self.experts = CachedExperts(experts) if cfg.active else experts
        self.logw = torch.zeros(B, K, dtype=_F64, device=x.device)
        self._keep = torch.arange(K, device=x.device)[None].expand(B, K)  # each particle its own ancestor
        self._offsets = (torch.arange(B, device=x.device) * K)[:, None]  # image b's rows start at b K
        self.ancestry: list[Tensor | None] = []
        self.ess: list[Tensor] = []
        self.resampled: list[Tensor] = []
        self.momentum: Tensor | None = None
        self.x, self.logq = x.to(self.dtype), logq.to(_F64)
        self.extra_evals = 0
        if cfg.smc:
            from .formula import operator_tree

            self.tree = operator_tree(operator, logq.shape[1], for_potential=True)
            cfg.check_grid(schedule, grid)
            if self.guidance != 1.0 and experts.has_uncond and self.tree.has_or:
                self.step_operator = GuidedLeaves(operator, self.guidance)
        self._prior_logp = None
        if cfg.smc:
            from .sampling import prior_log_prob

            self._prior_logp = prior_log_prob(x, schedule, grid[0])

    # -- SMC ----------------------------------------------------------------------------------
    def _increment(self, k: int, t: Tensor, t_next: Tensor, logq_before: Tensor, kappa: Tensor) -> Tensor:
        last = self.experts.last
        if last is None or last[1] != float(t):
            raise RuntimeError("the corrector found no evaluation of the step at its time t; "
                               "SMC needs the step's own predictions (integrators 'em' or 'ddpm')")
        x_pre, _, out = last
        sch = self.schedule
        g2h = float(sch.g2(t) * (t - t_next))
        if not math.isfinite(g2h):
            raise ValueError(f"the Feynman-Kac potential is infinite at t={float(t):g} (g_t^2 = inf); start the "
                             "grid below t = 1 (e.g. RectifiedFlow(t_max=0.999)) to use SMC")
        fh = float(sch.f(t) * (t - t_next))  # f_t h: the product nodes' (sum a - 1) d f h (0 on VE)
        leaves = leaf_scores(out, x_pre, t, sch, self.guidance, g2h)
        from .formula import tree_potential

        G, logp = tree_potential(self.tree, leaves, logq_before, kappa, g2h, fh)
        if k == 0:  # initial weight: log p_T(x_T) - log N(x_T; 0, prior_std^2)
            G = G + logp - self._prior_logp
        return G

    def after_step(self, k: int, n: int, t: Tensor, t_next: Tensor, x: Tensor, logq: Tensor,
                   step_out: Any, monitor: Any = None) -> tuple[Tensor, Tensor]:
        """Reweight, resample (inside the window) and move the particles after step k (t -> t_next).
        x, logq: the state after the step. Returns the corrected (x, logq). monitor: the
        sampler's step.FiniteMonitor, where the MCMC evaluations' non-finite values are recorded
        on the device (read once after the loop); without one they are checked here."""
        cfg, B, K = self.cfg, self.B, self.K
        idx = None
        if cfg.smc:
            G = self._increment(k, t, t_next, logq - step_out.delta_logq, step_out.kappa).reshape(B, K)
            if cfg.clip is not None:
                G = G - G.mean(-1, keepdim=True)
                G = G.clamp(-cfg.clip, cfg.clip)
            self.logw = self.logw + G
            ess = effective_sample_size(self.logw) / K
            progress = (k + 1) / n
            lo, hi = cfg.window
            inside = lo <= progress <= hi  # a Python bool: the window is a fraction of the steps
            if not inside:
                do = torch.zeros_like(ess, dtype=torch.bool)
            elif cfg.ess_threshold >= 1.0:
                do = torch.ones_like(ess, dtype=torch.bool)
            else:
                do = ess < cfg.ess_threshold
            self.ess.append(ess)
            self.resampled.append(do)
            u = self._uniforms()  # one draw per image and step, used or not: images stay independent
            if inside:
                # images below the threshold take their resampled ancestors, the others keep
                # their own particles (an identity gather): which ones is never read back
                local = systematic_resample(self.logw, u)  # [B, K]
                local = torch.where(do[:, None], local, self._keep)
                idx = (local + self._offsets).reshape(-1)
                x, logq = x.index_select(0, idx), logq.index_select(0, idx)
                if self.momentum is not None:
                    self.momentum = self.momentum.index_select(0, idx)
                self.logw = torch.where(do[:, None], torch.zeros_like(self.logw), self.logw)
        self.ancestry.append(idx)
        if cfg.mcmc is not None and float(self.schedule.sigma(t_next)) > 0:
            x, logq = self._mcmc(k, n, t_next, x, logq, step_out.kappa, monitor)  # x in the loop's dtype
        return x, logq

    def _uniforms(self) -> Tensor:
        """One uniform per image [B], drawn with the image's generator (on the generator's device,
        diffusers' convention) and placed with the particles."""
        dev = self.logw.device
        gens = self.group_generators
        if gens is not None:  # one draw per image's generator, joined where they live, moved once
            on = gens[0].device if len({g.device for g in gens}) == 1 else dev
            return torch.cat([torch.rand(1, generator=g, dtype=_F64, device=g.device).to(on) for g in gens]).to(dev)
        gen = self.generator
        return torch.rand(self.B, generator=gen, dtype=_F64, device=gen.device if gen is not None else dev).to(dev)

    # -- MCMC ---------------------------------------------------------------------------------
    def _eval(self, x: Tensor, t: Tensor, k: int, monitor: Any) -> ExpertOutput:
        """The experts at the MCMC point (x, t) after step k; non-finite values recorded on the
        sampler's monitor (read after the loop), or checked here without one."""
        xm = x.to(self.model_dtype)
        out = self.experts.inner.evaluate(xm, t, self.schedule)
        self.extra_evals += 1
        if monitor is not None:
            monitor.corrector(out.cond, k)
        elif not torch.isfinite(out.cond).all():
            raise ValueError(f"an expert returned non-finite values during the MCMC corrector at t={float(t):g}")
        return out

    def _kappa(self, k: int, n: int, logq: Tensor, kappa: Tensor) -> Tensor:
        from .operators import StepState

        if getattr(self.operator, "needs_linear_model", False):
            return kappa  # AND: keep the step's kappa (there is no density to follow)
        return self.step_operator.kappa(StepState(logq.to(_F64), k, n, None))

    def _own(self, out: ExpertOutput, x: Tensor, t: Tensor) -> Tensor:
        sch = self.schedule
        return to_score(out.cond.to(_F64), out.kind, x, sch.alpha(t), sch.sigma(t))

    def _mcmc(self, k: int, n: int, t: Tensor, x: Tensor, logq: Tensor, kappa: Tensor,
              monitor: Any = None) -> tuple[Tensor, Tensor]:
        from .step import randn

        cfg, sch = self.cfg, self.schedule
        sig = float(sch.sigma(t))
        x = x.to(_F64)
        feat = tuple(range(1, x.dim()))
        out = self._eval(x, t, k, monitor)
        own = self._own(out, x, t)
        kap = self._kappa(k, n, logq, kappa)
        S = composed_score(out, kap, self.guidance, x, t, sch, self.affine)

        def trapezoid(dx: Tensor, own0: Tensor, own1: Tensor) -> Tensor:
            return (dx[None] * 0.5 * (own0 + own1)).sum(dim=tuple(d + 1 for d in feat)).T  # [B, M]

        if cfg.mcmc == "ula":
            eps = cfg.scale * sig**2
            for _ in range(cfg.mcmc_steps):
                z = randn(x.shape, self.row_generator, self.noise_dtype, x.device).to(_F64)
                x_new = ula_move(x, S, eps, z)
                out = self._eval(x_new, t, k, monitor)
                own_new = self._own(out, x_new, t)
                logq = logq + trapezoid(x_new - x, own, own_new)
                x, own = x_new, own_new
                kap = self._kappa(k, n, logq, kappa)
                S = composed_score(out, kap, self.guidance, x, t, sch, self.affine)
        else:  # unadjusted underdamped HMC
            delta = cfg.scale * sig
            gam = cfg.momentum_keep
            if self.momentum is None:
                self.momentum = torch.zeros_like(x)
            for _ in range(cfg.mcmc_steps):
                xi = randn(x.shape, self.row_generator, self.noise_dtype, x.device).to(_F64)
                p = gam * self.momentum + math.sqrt(1.0 - gam**2) * xi
                for _ in range(cfg.leapfrog):
                    p = p + 0.5 * delta * S
                    x_new = x + delta * p
                    out = self._eval(x_new, t, k, monitor)
                    own_new = self._own(out, x_new, t)
                    logq = logq + trapezoid(x_new - x, own, own_new)
                    kap = self._kappa(k, n, logq, kappa)
                    S = composed_score(out, kap, self.guidance, x_new, t, sch, self.affine)
                    p = p + 0.5 * delta * S
                    x, own = x_new, own_new
                self.momentum = p
        # the next step evaluates the experts at exactly this (x, t): hand it the evaluation,
        # primed with the very tensor it will be given: its copy in the models' dtype, which the
        # step asks for through model_input (the loop's x itself when the dtypes agree: `to`
        # returns it, and prime keeps no source then)
        x = x.to(self.dtype)
        self.experts.prime(x.to(self.model_dtype), t, out, source=x)
        return x, logq

    # -- the end ------------------------------------------------------------------------------
    def finish(self, x: Tensor, logq: Tensor, kappas: list[Tensor], logqs: list[Tensor]
               ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], dict[str, Any]]:
        """One particle per image (drawn in proportion to its final weight) and the trace of its
        ancestry. Returns x [B], logq [B, M], kappas, logqs (per step, [B, M]) and the extra
        trace fields."""
        K = self.K
        extra: dict[str, Any] = {}
        if K == 1:
            if self.cfg.mcmc is not None:
                extra["meta"] = {"corrector_evaluations": self.extra_evals}
            return x, logq, kappas, logqs, extra
        u = self._uniforms()  # one draw per image from its categorical(w) by inversion
        c = torch.cumsum(torch.softmax(self.logw, -1), -1)
        c[:, -1] = 1.0
        pick = torch.searchsorted(c, u[:, None], right=True)[:, 0].clamp_(max=K - 1)
        rows = pick + self._offsets[:, 0]  # pick is on the particles' device (the weights')
        x_out, logq_out = x[rows], logq[rows]
        n = len(kappas)
        k_sel: list[Tensor] = [None] * n  # type: ignore[list-item]
        q_sel: list[Tensor] = [None] * (n + 1)  # type: ignore[list-item]
        pos = rows.clone()
        for k in range(n - 1, -1, -1):  # logqs[k + 1]: after step k's resampling and moves
            q_sel[k + 1] = logqs[k + 1][pos]
            a = self.ancestry[k]
            if a is not None:  # back to the rows before step k's resampling
                pos = a[pos]
            k_sel[k] = kappas[k][pos]
        q_sel[0] = logqs[0][pos]
        extra["ess"] = torch.stack(self.ess).cpu().numpy()  # [n, B] ESS / K
        extra["resampled"] = torch.stack(self.resampled).cpu().numpy()  # [n, B]
        extra["meta"] = {"corrector_evaluations": self.extra_evals,
                         "final_ess": (effective_sample_size(self.logw) / K).tolist()}
        return x_out, logq_out, k_sel, q_sel, extra
