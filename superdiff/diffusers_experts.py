"""Experts backed by diffusers networks (UNet2DConditionModel, UNet2DModel).

The pipelines describe every expert as a *branch*: one network evaluated under one
condition (a prompt embedding, a class label, nothing), plus the condition of its
unconditional (classifier-free guidance) branch. `NetworkExperts` groups the branches by
network and evaluates each network's rows -- all its experts' conditions and every distinct
unconditional condition -- in ONE batched forward per step (chunked by `max_batch_size`),
through `superdiff.experts.SharedNetworkExperts`. It then converts each network's output
to one common prediction kind and hands the core

    cond   [M, B, *S]                 branch i's conditional prediction
    uncond [B, *S]                    when every branch shares one unconditional row block
           [M, B, *S]                 otherwise (per-expert negative prompts, several networks;
                                      a branch without guidance gets u_i = c_i)

`unet_forward` turns a diffusers UNet into the `fn(x, t, cond)` that SharedNetworkExperts
expects, closing over the schedule: the VE ("sigma") form of diffusers' Euler schedulers
feeds the network x~ / sqrt(sigma^2 + 1) at the timestep whose sigma is t
(`VESigma.input_scale`, `VESigma.model_time`); the VP form feeds x at t itself.

`transformer_forward` does the same for the rectified-flow transformers (SD3's
SD3Transformer2DModel, Flux's FluxTransformer2DModel): they predict the velocity
u = eps - x0 of x_t = (1 - t) x0 + t eps and are fed x_t itself at the timestep
t * num_train_timesteps (SD3) or t (Flux), with each row's conditions (text embeddings,
pooled projections, Flux's embedded guidance) as keyword arguments.

`NullEstimator` skips log-density tracking for operators whose kappa does not depend on
it ("single", "average"), so an ODE sampler does not pay for a divergence it never uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

from .estimators import NullEstimator  # noqa: F401  (re-exported for the pipelines)
from .experts import ExpertOutput, ExpertSet, SharedNetworkExperts, coarsest_dtype
from .predictions import check_kind, convert
from .schedules import Schedule

Tensor = torch.Tensor

__all__ = ["Branch", "Network", "NetworkExperts", "TimeInputs", "unet_forward", "transformer_forward", "NullEstimator"]


def _differentiated(x: Tensor) -> bool:
    """Whether x is being differentiated through (autograd or torch.func transforms)."""
    if x.requires_grad:
        return True
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # pragma: no cover - older torch
        return False


class TimeInputs:
    """What a network is fed at a schedule time t: its timestep model_time(t) / divisor (a
    float32 tensor on the network's device) and the input scale c_in(t) (VE form; 1 otherwise).

    `set_grid(times)` computes both for every time of a sampling grid at once (one vectorised
    call each, as `superdiff.sampling.sample` does before its loop) and keeps them keyed by the
    grid's time tensors themselves (tensors hash by identity), so a step looks its time up with
    no tensor op at all. A time that is not on the grid (a direct call) is computed on the fly
    in tensor ops, which read nothing back to the host and which torch.func transforms trace.
    """

    def __init__(self, schedule: Schedule, divisor: float = 1.0, scaled: bool = True) -> None:
        self.schedule = schedule
        self.divisor = float(divisor)
        self._scale = getattr(schedule, "input_scale", None) if scaled else None
        self._grid: dict[Tensor, tuple[Tensor, float]] = {}

    def set_grid(self, times: Sequence[Tensor], device: torch.device | str | None = None) -> None:
        if not times:
            self._grid = {}
            return
        g = torch.stack(list(times)).to(device="cpu", dtype=torch.float64).reshape(-1)
        with torch.no_grad():
            mt = self.schedule.model_time(g).to(torch.float32)  # float32 first, as diffusers' timesteps
            if self.divisor != 1.0:
                mt = mt / self.divisor
            mt = mt.to(device=device or "cpu")
            scales = [1.0] * len(times) if self._scale is None else \
                torch.as_tensor(self._scale(g), dtype=torch.float64).expand(len(times)).tolist()
        self._grid = {t: (m, s) for t, m, s in zip(times, mt.unbind(0), scales)}

    def __call__(self, t: Tensor, device: torch.device) -> tuple[Tensor, float | Tensor]:
        """(timestep tensor, input scale) at t, for inputs on `device`."""
        hit = self._grid.get(t) if isinstance(t, torch.Tensor) else None
        if hit is not None:
            m, s = hit
            return (m if m.device == device else m.to(device)), s
        m = self.schedule.model_time(t).to(device=device, dtype=torch.float32)
        if self.divisor != 1.0:
            m = m / self.divisor
        return m, (1.0 if self._scale is None else self._scale(t))


def _scaled(x: Tensor, scale: float | Tensor) -> Tensor:
    if isinstance(scale, float):
        return x if scale == 1.0 else x * scale
    return x * scale.to(dtype=x.dtype)


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def network_input(x: Tensor, scale: float | Tensor, dtype: torch.dtype, repeats: int = 1) -> Tensor:
    """The network's input rows [x | x | ...] (`repeats` copies of the batch x [B, *S]), each
    multiplied by the input scale c_in, in the network's dtype. The scaled rows are written by
    one op from a broadcast view of x: the copies are never materialised unscaled
    (SharedNetworkExperts.evaluate_rows); without a scale they are one `cat`."""
    if repeats == 1:
        return _as(_scaled(x, scale), dtype)
    if isinstance(scale, float) and scale == 1.0:
        return _as(torch.cat([x] * repeats), dtype)
    s = scale if isinstance(scale, float) else scale.to(dtype=x.dtype)
    return _as(torch.mul(x.expand(repeats, *x.shape), s).flatten(0, 1), dtype)


class _NetworkFn:
    """fn(x, t, cond) for SharedNetworkExperts, with `set_grid` forwarded to its TimeInputs.

    It builds its input rows itself (`replicates_rows`): fn(x [B, *S], t, cond, repeats=n)
    evaluates the n B rows [x | ... | x] (one op for the copies, the input scale and the cast,
    network_input), so that the caller does not materialise them first.

    The network's dtype is read once per sampling call (at `set_grid`, or at the first call):
    diffusers' `ModelMixin.dtype` walks every submodule, which costs more than the rest of a
    step around a small network."""

    def __init__(self, module: torch.nn.Module, times: TimeInputs,
                 call: Callable[[Tensor, Tensor, float | Tensor, Any, torch.dtype], Tensor]) -> None:
        self.module = module
        self.times = times
        self._call = call
        self._dtype: torch.dtype | None = None
        self._dtype_read = False

    replicates_rows = True  # see SharedNetworkExperts.evaluate_rows

    def set_grid(self, times: Sequence[Tensor], device: torch.device | str | None = None) -> None:
        self.times.set_grid(times, device)
        self._dtype, self._dtype_read = None, False

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The network's dtype (what its inputs are cast to), read once per sampling call; None
        for a module without one."""
        if not self._dtype_read:
            self._dtype, self._dtype_read = getattr(self.module, "dtype", None), True
        return self._dtype

    def __call__(self, x: Tensor, t: Tensor, cond: Any, repeats: int = 1) -> Tensor:
        ts, scale = self.times(t, x.device)
        dtype = self.compute_dtype or x.dtype
        if _differentiated(x):
            # the ODE estimator's Jacobian-vector products: fused attention kernels (flash,
            # memory-efficient) have no forward-mode / double-backward derivative; math has
            from torch.nn.attention import SDPBackend, sdpa_kernel

            if repeats > 1:  # plain ops on traced tensors (no out=)
                x, repeats = torch.cat([x] * repeats), 1
            with sdpa_kernel([SDPBackend.MATH]):
                return self._call(x, ts, scale, cond, dtype, repeats)
        return self._call(x, ts, scale, cond, dtype, repeats)


def unet_forward(unet: torch.nn.Module, schedule: Schedule,
                 cross_attention_kwargs: dict | None = None) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """fn(x [N, *S], t (0-d schedule time), cond) -> prediction [N, *S] for a diffusers UNet.

    cond is None (unconditional UNet2DModel), or a dict with any of
    "encoder_hidden_states" [N, L, D], "text_embeds" [N, P], "time_ids" [N, 6] (SDXL's
    added conditions) and "class_labels" [N]. The network gets x * c_in(t) at model_time(t)
    (TimeInputs: looked up, not computed, on a grid set by `sample`).
    """

    def call(x: Tensor, ts: Tensor, scale: float | Tensor, cond: Any, dtype: torch.dtype, repeats: int) -> Tensor:
        kw: dict[str, Any] = {}
        if cond is not None:
            if "encoder_hidden_states" in cond:
                kw["encoder_hidden_states"] = _as(cond["encoder_hidden_states"], dtype)
                if cross_attention_kwargs is not None:
                    kw["cross_attention_kwargs"] = cross_attention_kwargs
            if "text_embeds" in cond:
                kw["added_cond_kwargs"] = {"text_embeds": _as(cond["text_embeds"], dtype),
                                           "time_ids": _as(cond["time_ids"], dtype)}
            if "class_labels" in cond:
                kw["class_labels"] = cond["class_labels"]
        out = unet(network_input(x, scale, dtype, repeats), ts, return_dict=False, **kw)[0]
        return _as(out, x.dtype)

    return _NetworkFn(unet, TimeInputs(schedule), call)


def transformer_forward(transformer: torch.nn.Module, schedule: Schedule, timestep_divisor: float = 1.0,
                        **fixed: Any) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """fn(x [N, *S], t (0-d schedule time), cond) -> velocity [N, *S] for a flow transformer.

    The transformer gets hidden_states=x, timestep = model_time(t) / timestep_divisor for
    every row (float32, the scheduler's dtype; Flux divides by 1000), the row conditions in `cond` (a dict such as
    {"encoder_hidden_states" [N, L, D], "pooled_projections" [N, P]}, Flux adds "guidance"
    [N]) and the `fixed` keyword arguments shared by all rows (Flux's img_ids / txt_ids,
    joint_attention_kwargs).
    """

    def call(x: Tensor, ts: Tensor, scale: float | Tensor, cond: Any, dtype: torch.dtype, repeats: int) -> Tensor:
        kw: dict[str, Any] = dict(fixed)
        for k, v in (cond or {}).items():
            kw[k] = v if k == "guidance" else _as(v, dtype)
        out = transformer(hidden_states=network_input(x, 1.0, dtype, repeats), timestep=ts.expand(repeats * x.shape[0]),
                          return_dict=False, **kw)[0]
        return _as(out, x.dtype)

    return _NetworkFn(transformer, TimeInputs(schedule, timestep_divisor, scaled=False), call)


@dataclass
class Network:
    """One network: fn(x, t, cond) as for SharedNetworkExperts, and its prediction kind."""

    fn: Callable[[Tensor, Tensor, Any], Tensor]
    prediction_type: str
    name: str = "network"


@dataclass
class Branch:
    """One expert: network index, its condition, and its unconditional condition.

    uncond_key identifies equal unconditional conditions (e.g. the negative prompt text),
    so that each distinct one is computed once per network. uncond=None with
    uncond_key=None: this expert has no guidance branch (u_i = c_i).
    """

    network: int
    cond: Any
    uncond: Any = None
    uncond_key: Hashable | None = None
    name: str = "expert"


class NetworkExperts(ExpertSet):
    """Branches over one or more networks; one batched forward per network per step."""

    prefers_finite_difference_jvp = True  # see ODEEstimator

    def __init__(self, networks: Sequence[Network], branches: Sequence[Branch], guidance: bool,
                 prediction_type: str | None = None, max_batch_size: int | None = None) -> None:
        if not branches:
            raise ValueError("no experts: give at least one prompt, class label or UNet")
        self.networks = list(networks)
        self.branches = list(branches)
        self.prediction_type = check_kind(prediction_type or self.networks[self.branches[0].network].prediction_type)
        self.num_experts = len(self.branches)
        self.guidance = bool(guidance)
        # per network: the rows it evaluates, and where each branch's cond / uncond lives
        self._sets: dict[int, SharedNetworkExperts] = {}
        self._cond_row: list[tuple[int, int]] = []
        self._uncond_row: list[tuple[int, int] | None] = []
        rows: dict[int, list[Any]] = {}
        ukeys: dict[int, dict[Hashable, int]] = {}
        for b in self.branches:
            if not 0 <= b.network < len(self.networks):
                raise ValueError(f"branch {b.name!r} refers to network {b.network}, but there are "
                                 f"{len(self.networks)}")
            rows.setdefault(b.network, [])
            ukeys.setdefault(b.network, {})
        for b in self.branches:
            self._cond_row.append((b.network, len(rows[b.network])))
            rows[b.network].append(b.cond)
        for b in self.branches:
            if not self.guidance or b.uncond_key is None:
                self._uncond_row.append(None)
                continue
            keys = ukeys[b.network]
            if b.uncond_key not in keys:
                keys[b.uncond_key] = len(rows[b.network])
                rows[b.network].append(b.uncond)
            self._uncond_row.append((b.network, keys[b.uncond_key]))
        for n, conds in rows.items():
            self._sets[n] = SharedNetworkExperts(self.networks[n].fn, conds, self.networks[n].prediction_type,
                                                 max_batch_size=max_batch_size)
        self.has_uncond = self.guidance and any(u is not None for u in self._uncond_row)
        distinct = {u for u in self._uncond_row}
        self._shared_uncond = self.has_uncond and len(distinct) == 1 and None not in distinct
        # the common layout: one network whose rows are [expert 0 | ... | expert M-1 | shared
        # uncond]: its output splits into cond and uncond as views, without gathering rows
        M = self.num_experts
        self._one_block = (len(self._sets) == 1 and self._cond_row == [(self.branches[0].network, i) for i in range(M)]
                           and (not self.has_uncond or (self._shared_uncond
                                                        and self._uncond_row[0] == (self.branches[0].network, M))))

    @property
    def member_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(self.networks[n].prediction_type for n in self._sets))

    @property
    def has_shared_uncond(self) -> bool:  # type: ignore[override]
        return self._shared_uncond

    def set_grid(self, times: Sequence[Tensor], device: torch.device | str | None = None) -> None:
        for s in self._sets.values():
            s.set_grid(times, device)

    def begin_step(self, step: int) -> None:
        for s in self._sets.values():
            s.begin_step(step)

    def subset(self, index: int) -> "NetworkExperts":
        """Branch `index` alone: its conditional row and its unconditional row, in one forward of
        the same network (the same batched-condition cache and forward-call counts)."""
        import copy

        sub = copy.copy(self)
        sub.branches = [self.branches[index]]
        sub._cond_row = [self._cond_row[index]]
        sub._uncond_row = [self._uncond_row[index]]
        sub.num_experts = 1
        sub.has_uncond = self.guidance and sub._uncond_row[0] is not None
        sub._shared_uncond = sub.has_uncond
        sub._one_block = False
        return sub

    @property
    def num_forward_calls(self) -> int:  # type: ignore[override]
        return sum(s.num_forward_calls for s in self._sets.values())

    @property
    def compute_dtype(self) -> torch.dtype | None:  # type: ignore[override]
        """The coarsest dtype among the networks that report one (TimeInputs-wrapped diffusers
        modules do; a plain fn does not)."""
        return coarsest_dtype(*(getattr(net.fn, "compute_dtype", None) for net in self.networks))

    @num_forward_calls.setter
    def num_forward_calls(self, value: int) -> None:  # ExpertSet's class attribute default
        pass

    def forward_calls_per_network(self) -> dict[str, int]:
        return {self.networks[n].name: s.num_forward_calls for n, s in self._sets.items()}

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.branches]

    def _rows(self, x: Tensor, t: Tensor, schedule: Schedule, wanted: Sequence[tuple[int, int]]) -> dict:
        """{(network, row): prediction [B, *S] in the common kind} for the wanted rows, one
        batched forward per network."""
        per: dict[int, list[int]] = {}
        for n, r in wanted:
            per.setdefault(n, [])
            if r not in per[n]:
                per[n].append(r)
        got: dict[tuple[int, int], Tensor] = {}
        for n, rows in per.items():
            o = self._sets[n].evaluate_rows(x, t, rows)  # [rows, B, *S]
            kind = self.networks[n].prediction_type
            if kind != self.prediction_type:
                o = convert(o, kind, self.prediction_type, x, schedule.alpha(t), schedule.sigma(t))
            got.update({(n, r): o[i] for i, r in enumerate(rows)})
        return got

    def _uncond(self, got: dict, cond: Tensor) -> Tensor | None:
        if not self.has_uncond:
            return None
        if self._shared_uncond:
            return got[self._uncond_row[0]]
        return torch.stack([got[u] if u is not None else cond[i] for i, u in enumerate(self._uncond_row)])

    def _block(self, x: Tensor, t: Tensor, schedule: Schedule, rows: int) -> Tensor:
        """The first `rows` rows of the one network (the one-block layout), [rows, B, *S] in the
        common kind."""
        n = self.branches[0].network
        o = self._sets[n].evaluate_rows(x, t, range(rows))
        kind = self.networks[n].prediction_type
        if kind != self.prediction_type:
            o = convert(o, kind, self.prediction_type, x, schedule.alpha(t), schedule.sigma(t))
        return o

    def evaluate(self, x: Tensor, t: Tensor, schedule: Schedule) -> ExpertOutput:
        if self._one_block:
            M = self.num_experts
            o = self._block(x, t, schedule, M + self.has_uncond)  # [M (+1), B, *S]
            return ExpertOutput(o[:M], o[M] if self.has_uncond else None, self.prediction_type,
                                o if self.has_uncond else None)
        unc_rows = [u for u in self._uncond_row if u is not None] if self.has_uncond else []
        got = self._rows(x, t, schedule, self._cond_row + unc_rows)
        cond = torch.stack([got[r] for r in self._cond_row])
        return ExpertOutput(cond, self._uncond(got, cond), self.prediction_type)

    def evaluate_conditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        if self._one_block:  # rows 0..M-1 of the one network: already [M, B, *S]
            return self._block(x, t, schedule, self.num_experts)
        got = self._rows(x, t, schedule, self._cond_row)
        return torch.stack([got[r] for r in self._cond_row])

    def evaluate_unconditional(self, x: Tensor, t: Tensor, schedule: Schedule) -> Tensor | None:
        if not self.has_uncond:
            return None
        if self._shared_uncond:
            return self._rows(x, t, schedule, [self._uncond_row[0]])[self._uncond_row[0]]
        # a branch without guidance uses its own conditional prediction as u_i
        need = [u if u is not None else self._cond_row[i] for i, u in enumerate(self._uncond_row)]
        got = self._rows(x, t, schedule, need)
        return torch.stack([got[r] for r in need])


