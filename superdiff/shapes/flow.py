"""Rectified-flow training of the SD3-layout shapes model (``scripts/train_shapes_flow.py``).

Objective (flow matching, the convention of diffusers' SD3 / FlowMatchEulerDiscreteScheduler):
    x_t = (1 - t) x_0 + t eps,   target  v = d x_t / dt = eps - x_0,
    loss = || v_theta(x_t, 1000 t, c) - v ||^2,
with u ~ logit-normal(0, 1) (SD3's density) mapped through the scheduler's shift
    t = s u / (1 + (s - 1) u),
so that training spends its samples where the shifted sampling grid puts its steps. The
interpolation and the network time come from ``superdiff.schedules.RectifiedFlow``, the
schedule the sampler itself uses.

Conditioning is exactly what ``StableDiffusion3Pipeline.encode_prompt`` builds without a T5
encoder: the penultimate hidden states of both CLIP encoders side by side, padded to
``joint_attention_dim``, followed by ``max_sequence_length`` (256) zero tokens; the pooled
projections of both side by side. Those 256 zero tokens are identical at every layer (each
token is processed alike and attends to the same keys), and ``m`` identical keys with equal
values act in softmax attention as one key whose logit is raised by log m:
    sum_j exp(q.k_j) v_j  with m copies of (k, v)  =  exp(q.k + log m) v + ...
Training therefore appends ONE zero token and installs ``TiedTokenJointAttnProcessor(256)``,
which adds log 256 to that key's logit: the same function as the stock pipeline at 1/6 of the
compute. The exported model uses diffusers' own processor (tests check both agree).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..schedules import RectifiedFlow


def training_times(n: int, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow times t in (0, 1) [n]: logit-normal(0, 1) u, then the shift s u / (1 + (s - 1) u)."""
    u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
    return (shift * u / (1.0 + (shift - 1.0) * u)).float()


def flow_pair(schedule: RectifiedFlow, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v): the interpolant alpha_t x_0 + sigma_t eps and its time derivative eps - x_0."""
    tt = t.to(torch.float64).view(-1, *([1] * (x0.dim() - 1)))
    a, s = schedule.alpha(tt).to(x0.dtype), schedule.sigma(tt).to(x0.dtype)
    da, ds = schedule.dalpha(tt).to(x0.dtype), schedule.dsigma(tt).to(x0.dtype)
    return a * x0 + s * noise, da * x0 + ds * noise


def clip_prompt_embeds(text_encoders, ids: torch.Tensor, joint_attention_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's CLIP part of the conditioning: (sequence [B, L, joint_attention_dim], pooled [B, sum proj])."""
    seqs, pooled = [], []
    for enc in text_encoders:
        out = enc(ids, output_hidden_states=True)
        seqs.append(out.hidden_states[-2])
        pooled.append(out[0])
    seq = torch.cat(seqs, dim=-1)
    return F.pad(seq, (0, joint_attention_dim - seq.shape[-1])), torch.cat(pooled, dim=-1)


def with_tied_zero_token(seq: torch.Tensor) -> torch.Tensor:
    """Append the one zero token that stands for the pipeline's T5 zero tokens."""
    return torch.cat([seq, seq.new_zeros(seq.shape[0], 1, seq.shape[-1])], dim=1)


class TiedTokenJointAttnProcessor:
    """Joint (MMDiT) attention in which the LAST context token stands for ``multiplicity``
    identical tokens: its key's logit is raised by log(multiplicity) (module docstring).

    Same projections and outputs as diffusers' ``JointAttnProcessor2_0`` (SD3 without
    QK-norm), with that one additive logit bias.
    """

    def __init__(self, multiplicity: int):
        if multiplicity < 1:
            raise ValueError(f"multiplicity must be >= 1, got {multiplicity}")
        self.log_m = math.log(multiplicity)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None or attn.norm_q is not None or attn.norm_added_q is not None:
            raise ValueError("TiedTokenJointAttnProcessor handles joint attention without QK-norm only")
        b, n = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q = torch.cat([heads(attn.to_q(hidden_states)), heads(attn.add_q_proj(encoder_hidden_states))], dim=2)
        k = torch.cat([heads(attn.to_k(hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))], dim=2)
        v = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        bias = q.new_zeros(1, 1, 1, k.shape[2])
        bias[..., -1] = self.log_m
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        img, ctx = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](img)), ctx
