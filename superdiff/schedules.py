"""Noise processes x_t = alpha_t x_0 + sigma_t eps (superdiff-math.md, section 1).

One small class per process, in the spirit of score_sde's sde_lib. Each exposes

    alpha(t), sigma(t)                      the marginal coefficients
    f(t)  = d log(alpha_t) / dt             forward drift coefficient
    g2(t) = d(sigma_t^2)/dt - 2 f_t sigma_t^2   squared forward diffusion
    grid(n)                                 n + 1 decreasing times for n reverse steps
    model_time(t)                           what the network is fed as its timestep

Time runs forward from data (small t) to noise (large t); samplers walk a grid from
t_max down to t_min. All arithmetic is float64.

| class             | time variable t                | alpha         | sigma            |
|-------------------|--------------------------------|---------------|------------------|
| VPDiscrete        | diffusers timestep (0..T-1)    | sqrt(abar(t)) | sqrt(1-abar(t))  |
| VESigma           | sigma itself (k-diffusion)     | 1             | t                |
| RectifiedFlow     | t in [0, 1]                    | 1 - t         | t                |

VPDiscrete extends the discrete abar_n of a DDPM beta schedule to continuous t by linear
interpolation of log abar between integer timesteps (with abar(-1) = 1, the "final alpha"
diffusers uses for the last DDPM/DDIM step). VESigma is the coordinate system of diffusers'
Euler schedulers: x~ = x_t / alpha_t, sigma = sqrt((1 - abar) / abar); its grid reproduces
EulerDiscreteScheduler.set_timesteps and model_time inverts diffusers' interpolation.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

Tensor = torch.Tensor
_F64 = torch.float64

__all__ = [
    "Schedule",
    "VPDiscrete",
    "VESigma",
    "RectifiedFlow",
    "make_betas",
    "schedule_from_config",
]


def _t(t: Any) -> Tensor:
    return torch.as_tensor(t, dtype=_F64)


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
) -> np.ndarray:
    """DDPM betas as diffusers builds them ("linear", "scaled_linear", "squaredcos_cap_v2")."""
    n = int(num_train_timesteps)
    if n < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {n}")
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17, with betas capped at 0.999 as in diffusers.
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=np.float64
        )
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; expected 'linear', 'scaled_linear' or "
            "'squaredcos_cap_v2'"
        )
    return betas


def diffusers_timesteps(num_train_timesteps: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """The n decreasing timesteps diffusers' set_timesteps picks (float64, not yet clipped)."""
    T = int(num_train_timesteps)
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.float64) - 1
    raise ValueError(
        f"unknown timestep_spacing {spacing!r}; expected 'linspace', 'leading' or 'trailing'"
    )


def _check_end(end: str) -> None:
    if end not in ("zero", "min"):
        raise ValueError(f"end must be 'zero' (noise-free end point) or 'min' (smallest trained "
                         f"noise level, sigma > 0), got {end!r}")


class Schedule:
    """Base class: subclasses define alpha, sigma, dlog_alpha, dsigma2, grid, model_time."""

    name: str = "schedule"
    t_min: float
    t_max: float
    #: True when f_t = d log alpha_t / dt is unbounded as alpha_t -> 0 at the noise end
    #: (Euler-Maruyama then takes posterior steps there; see integrators.EulerMaruyama)
    singular_noise_end: bool = False

    @property
    def time_limit(self) -> float:
        """The largest time alpha_t and sigma_t are defined at (custom grids lie in
        [time_floor, time_limit])."""
        return self.t_max

    @property
    def time_floor(self) -> float:
        """The smallest time alpha_t and sigma_t are defined at (0: the data end)."""
        return 0.0

    # --- marginal coefficients -------------------------------------------------------
    def alpha(self, t: Any) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Any) -> Tensor:
        raise NotImplementedError

    def dlog_alpha(self, t: Any) -> Tensor:
        """d log(alpha_t) / dt."""
        raise NotImplementedError

    def dsigma2(self, t: Any) -> Tensor:
        """d (sigma_t^2) / dt."""
        raise NotImplementedError

    # --- SDE coefficients (superdiff-math.md, section 1) -------------------------------
    def f(self, t: Any) -> Tensor:
        return self.dlog_alpha(t)

    def g2(self, t: Any) -> Tensor:
        return self.dsigma2(t) - 2.0 * self.f(t) * self.sigma(t) ** 2

    def dalpha(self, t: Any) -> Tensor:
        """d alpha_t / dt (finite where f is not, e.g. flow matching at t = 1)."""
        return self.alpha(t) * self.dlog_alpha(t)

    def dsigma(self, t: Any) -> Tensor:
        """d sigma_t / dt."""
        return self.dsigma2(t) / (2.0 * self.sigma(t))

    def prior_std(self, t: Any | None = None) -> Tensor:
        """Std of x_t for unit-variance data: sqrt(alpha^2 + sigma^2); used for x_T ~ N(0, .)."""
        t = self.t_max if t is None else t
        return torch.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2)

    def transition(self, t_from: Any, t_to: Any) -> tuple[Tensor, Tensor]:
        """(a, s2) of the exact forward kernel x_{t_to} | x_{t_from} ~ N(a x, s2 I), t_to > t_from."""
        a_from, a_to = self.alpha(t_from), self.alpha(t_to)
        s_from, s_to = self.sigma(t_from), self.sigma(t_to)
        a = a_to / a_from
        s2 = torch.clamp(s_to**2 - a**2 * s_from**2, min=0.0)
        return a, s2

    def model_time(self, t: Any) -> Tensor:
        """The timestep the network is conditioned on at schedule time t."""
        return _t(t)

    def grid(self, num_steps: int, end: str = "zero") -> Tensor:
        raise NotImplementedError

    def _check_steps(self, num_steps: int) -> int:
        if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
            raise ValueError(f"num_steps must be an int, got {type(num_steps).__name__}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return int(num_steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


class VPDiscrete(Schedule):
    """Variance-preserving discrete-time process of DDPM/DDIM and SD 1.x/2.x/XL.

    alpha_t = sqrt(abar(t)), sigma_t = sqrt(1 - abar(t)), with log abar piecewise linear in t
    between integer timesteps and abar(-1) = 1. On the segment (n - 1, n]:
        d log abar / dt = log(1 - beta_n),  so  f = log(1 - beta_n) / 2  and  g2 = -log(1 - beta_n)
    (g2 = beta_n to first order: the DDPM forward kernel).
    """

    name = "vp"

    def __init__(
        self,
        betas: np.ndarray | Tensor,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        t_min: float = 0.0,
    ) -> None:
        betas = torch.as_tensor(np.asarray(betas, dtype=np.float64), dtype=_F64)
        if betas.ndim != 1 or len(betas) < 2 or not torch.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array of values in (0, 1) with at least 2 entries")
        self.betas = betas
        self.num_train_timesteps = len(betas)
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        # knots at t = -1, 0, ..., T-1
        self._log_abar = torch.cat([torch.zeros(1, dtype=_F64), log_abar])
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.t_min = float(t_min)
        self.t_max = float(self.num_train_timesteps - 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "VPDiscrete":
        cfg = dict(config)
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        else:
            betas = make_betas(
                cfg.get("num_train_timesteps", 1000),
                cfg.get("beta_start", 1e-4),
                cfg.get("beta_end", 0.02),
                cfg.get("beta_schedule", "linear"),
            )
        kw = dict(
            timestep_spacing=cfg.get("timestep_spacing", "leading"),
            steps_offset=cfg.get("steps_offset", 0),
        )
        kw.update(overrides)
        return cls(betas, **kw)

    # position on the knot array: u = t + 1 in [0, T]
    def _seg(self, t: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.clamp(t + 1.0, 0.0, float(self.num_train_timesteps))
        hi = torch.clamp(torch.ceil(u), 1, self.num_train_timesteps).long()
        return u, hi

    @property
    def time_floor(self) -> float:
        """t = -1, where abar = 1 (sigma = 0): the end point of the DDPM/DDIM loop (grid(end="zero"))."""
        return -1.0

    def log_abar(self, t: Any) -> Tensor:
        t = _t(t)
        u, hi = self._seg(t)
        lo = hi - 1
        w = u - lo.to(_F64)
        # torch.take: a 0-d index tensor in [] would be read back to the host (a sync)
        return torch.take(self._log_abar, lo) * (1 - w) + torch.take(self._log_abar, hi) * w

    def alpha(self, t: Any) -> Tensor:
        return torch.exp(0.5 * self.log_abar(t))

    def sigma(self, t: Any) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_abar(t)))

    def _slope(self, t: Any) -> Tensor:
        t = _t(t)
        _, hi = self._seg(t)
        return torch.take(self._log_abar, hi) - torch.take(self._log_abar, hi - 1)

    def dlog_alpha(self, t: Any) -> Tensor:
        return 0.5 * self._slope(t)

    def dsigma2(self, t: Any) -> Tensor:
        return -torch.exp(self.log_abar(t)) * self._slope(t)

    def grid(self, num_steps: int, end: str = "zero") -> Tensor:
        """Timesteps as diffusers' DDPM/DDIM set_timesteps picks them, plus an end point.

        end="zero": n diffusers timesteps then t = -1 (abar = 1, sigma = 0), exactly the
        DDPM/DDIM loop. end="min": n + 1 diffusers timesteps, ending at the smallest trained
        noise level (sigma > 0), where every density estimator is defined.
        """
        _check_end(end)
        n = self._check_steps(num_steps)
        T = self.num_train_timesteps
        if n + (end == "min") > T:
            raise ValueError(f"num_steps={n} is too many for num_train_timesteps={T}")
        # DDPM/DDIM round their timesteps to integers (Euler keeps them fractional)
        if end == "zero":
            ts = diffusers_timesteps(T, n, self.timestep_spacing, self.steps_offset).round()
            ts = np.concatenate([np.clip(ts, 0, T - 1), [-1.0]])
        else:
            ts = np.clip(diffusers_timesteps(T, n + 1, self.timestep_spacing, self.steps_offset).round(), 0, T - 1)
        if np.any(np.diff(ts) >= 0):
            raise ValueError(f"timestep grid is not strictly decreasing for num_steps={n} with "
                             f"spacing {self.timestep_spacing!r}: {ts}")
        return torch.as_tensor(ts, dtype=_F64)


class VESigma(Schedule):
    """Variance-exploding "sigma" form used by diffusers' Euler schedulers and k-diffusion.

    alpha = 1, sigma = t (time is sigma), f = 0, g2 = 2 sigma. A VP model is evaluated on
    x~ / sqrt(sigma^2 + 1) at the timestep whose sigma_n = sqrt((1 - abar_n)/abar_n) equals t.
    """

    name = "ve"

    def __init__(
        self,
        sigmas_train: np.ndarray | Tensor,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_karras_sigmas: bool = False,
        t_min: float | None = None,
    ) -> None:
        s = np.asarray(sigmas_train, dtype=np.float64)
        if s.ndim != 1 or len(s) < 2 or not np.all(np.diff(s) > 0) or s[0] <= 0:
            raise ValueError("sigmas_train must be a positive, strictly increasing 1-D array")
        self.sigmas_train = s
        self._sigmas_t = torch.as_tensor(s, dtype=_F64)
        self.num_train_timesteps = len(s)
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.t_min = float(s[0] if t_min is None else t_min)
        self.t_max = float(s[-1])

    @classmethod
    def from_betas(cls, betas: np.ndarray, **kw: Any) -> "VESigma":
        abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        return cls(np.sqrt((1 - abar) / abar), **kw)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "VESigma":
        vp = VPDiscrete.from_config(config)
        kw = dict(
            timestep_spacing=config.get("timestep_spacing", "linspace"),
            steps_offset=config.get("steps_offset", 0),
            use_karras_sigmas=bool(config.get("use_karras_sigmas", False)),
        )
        kw.update(overrides)
        return cls.from_betas(vp.betas.numpy(), **kw)

    @property
    def time_limit(self) -> float:
        """t = sigma: defined for every sigma >= 0 (the network's conditioning is another matter)."""
        return math.inf

    def alpha(self, t: Any) -> Tensor:
        return torch.ones_like(_t(t))

    def sigma(self, t: Any) -> Tensor:
        return _t(t)

    def dlog_alpha(self, t: Any) -> Tensor:
        return torch.zeros_like(_t(t))

    def dsigma2(self, t: Any) -> Tensor:
        return 2.0 * _t(t)

    def dalpha(self, t: Any) -> Tensor:
        return torch.zeros_like(_t(t))

    def dsigma(self, t: Any) -> Tensor:
        return torch.ones_like(_t(t))

    def prior_std(self, t: Any | None = None) -> Tensor:
        t = self.t_max if t is None else t
        return torch.sqrt(1.0 + _t(t) ** 2)

    def model_time(self, t: Any) -> Tensor:
        """The timestep diffusers' Euler/Heun schedulers feed the network at sigma = t, clamped
        to [0, T - 1], with n the training step below t:

            n + (sigma - sigma_n) / (sigma_n+1 - sigma_n)             the inverse of their
                np.interp(timesteps, arange(T), sigmas) on the default grid
            n + log(sigma / sigma_n) / log(sigma_n+1 / sigma_n)       with Karras sigmas, whose
                timesteps their _sigma_to_t interpolates in log sigma

        Tensor ops only (no host read; traceable by torch.func transforms and torch.compile)."""
        tt = _t(t)
        s = self._sigmas_t.to(tt.device)
        u = torch.clamp(tt, float(self.sigmas_train[0]), float(self.sigmas_train[-1]))
        hi = torch.clamp(torch.searchsorted(s, u.reshape(-1)), 1, len(s) - 1).reshape(u.shape)
        lo = hi - 1
        s_lo, s_hi = torch.take(s, lo), torch.take(s, hi)
        if self.use_karras_sigmas:
            return lo.to(_F64) + torch.log(u / s_lo) / torch.log(s_hi / s_lo)
        return lo.to(_F64) + (u - s_lo) / (s_hi - s_lo)

    def input_scale(self, t: Any) -> Tensor:
        """c_in = 1 / sqrt(sigma^2 + 1): maps x~ back to the VP variable the network expects."""
        return 1.0 / torch.sqrt(_t(t) ** 2 + 1.0)

    def grid(self, num_steps: int, end: str = "zero") -> Tensor:
        """Sigmas of EulerDiscreteScheduler.set_timesteps(n) followed by 0 (end="zero"), or
        n + 1 such sigmas ending at the smallest trained sigma > 0 (end="min")."""
        _check_end(end)
        n = self._check_steps(num_steps)
        T = self.num_train_timesteps
        m = n + (end == "min")
        ts = diffusers_timesteps(T, m, self.timestep_spacing, self.steps_offset)
        sig = np.interp(ts, np.arange(T, dtype=np.float64), self.sigmas_train)
        if self.use_karras_sigmas:
            rho = 7.0  # Karras et al. 2022, eq. 5
            lo, hi = sig[-1] ** (1 / rho), sig[0] ** (1 / rho)
            sig = (hi + np.linspace(0, 1, m) * (lo - hi)) ** rho
        if end == "zero":
            sig = np.concatenate([sig, [0.0]])
        return torch.as_tensor(sig, dtype=_F64)


class RectifiedFlow(Schedule):
    """Rectified flow / flow matching (SD3, Flux): alpha = 1 - t, sigma = t.

    f = -1 / (1 - t) and g2 = 2 t / (1 - t) are infinite at t = 1 (q_1 = N(0, I) exactly):
    the DDPM posterior step and the probability-flow ODE start there; Euler-Maruyama starts
    with posterior steps (integrators.EulerMaruyama). Network time is t * num_train_timesteps
    (SD3 convention; Flux feeds t).
    """

    name = "flow"
    singular_noise_end = True

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, t_min: float = 1e-3,
                 t_max: float = 1.0) -> None:
        if not (0.0 <= t_min < t_max <= 1.0):
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "RectifiedFlow":
        kw = dict(num_train_timesteps=config.get("num_train_timesteps", 1000),
                  shift=config.get("shift", 1.0))
        kw.update(overrides)
        return cls(**kw)

    @property
    def time_limit(self) -> float:
        """alpha_t = 1 - t: defined up to t = 1 (pure noise), whatever t_max."""
        return 1.0

    def alpha(self, t: Any) -> Tensor:
        return 1.0 - _t(t)

    def sigma(self, t: Any) -> Tensor:
        return _t(t)

    def dlog_alpha(self, t: Any) -> Tensor:
        return -1.0 / (1.0 - _t(t))

    def dsigma2(self, t: Any) -> Tensor:
        return 2.0 * _t(t)

    def dalpha(self, t: Any) -> Tensor:
        return -torch.ones_like(_t(t))

    def dsigma(self, t: Any) -> Tensor:
        return torch.ones_like(_t(t))

    def model_time(self, t: Any) -> Tensor:
        return _t(t) * self.num_train_timesteps

    def grid(self, num_steps: int, end: str = "zero") -> Tensor:
        """Uniform in t from t_max to 0 (end="zero") or to t_min (end="min"), then the SD3
        shift s t / (1 + (s - 1) t)."""
        _check_end(end)
        n = self._check_steps(num_steps)
        lo = 0.0 if end == "zero" else self.t_min
        t = torch.linspace(self.t_max, lo, n + 1, dtype=_F64)
        if self.shift != 1.0:
            t = self.shift * t / (1 + (self.shift - 1) * t)
        return t


def schedule_from_config(config: Any, kind: str | None = None, **overrides: Any) -> Schedule:
    """Build a schedule from a diffusers scheduler, its config, or a config dict.

    kind: "vp" (DDPM/DDIM posterior steps), "ve" (Euler sigma grid) or "flow"; by default
    FlowMatch* schedulers give "flow", Euler*/Heun*/DPM* "ve", everything else "vp".
    """
    if hasattr(config, "config") and not isinstance(config, Mapping):  # a scheduler instance
        cls_name = type(config).__name__
        cfg = dict(config.config)
    else:
        cfg = dict(config)
        cls_name = str(cfg.get("_class_name", ""))
    if kind is None:
        if "FlowMatch" in cls_name:
            kind = "flow"
        elif any(k in cls_name for k in ("Euler", "Heun", "KDPM", "LMS")):
            kind = "ve"
        else:
            kind = "vp"
    if kind == "vp":
        return VPDiscrete.from_config(cfg, **overrides)
    if kind == "ve":
        return VESigma.from_config(cfg, **overrides)
    if kind == "flow":
        return RectifiedFlow.from_config(cfg, **overrides)
    raise ValueError(f"unknown schedule kind {kind!r}; expected 'vp', 've' or 'flow'")
