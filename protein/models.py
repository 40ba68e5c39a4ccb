"""Small backbone diffusion models: eps-prediction on centre-of-mass-free N/CA/C/O coordinates.

Data: a backbone X [L, 4, 3] (Angstrom) becomes x0 = coord_scale * (X - mean(X)), i.e. a point
of the subspace V = {x in R^{4L x 3}: sum_atoms x = 0} of dimension d = 3(4L - 1). The forward
process is the VP-discrete DDPM process restricted to V,

    x_t = alpha_t x0 + sigma_t P eps,   eps ~ N(0, I_{4L x 3}),   P = I - 1 1^T / (4L) (per axis)

(P eps is the standard Gaussian of V), and the network is trained with
loss = || P eps_theta(x_t, t) - P eps ||^2 / (12 L), the mean over all 4L x 3 coordinates
(and the batch; integer t, see scripts/train_protein.py), not divided by d = 3(4L - 1): the two
differ by the constant factor d / (12 L), so only the loss scale changes. Its prediction is then always read
through P (protein/experts.py), so it is a field on V.

Network: a small transformer over the L residues (one token of 12 coordinates each; the input
layer is a width-3 convolution over residues so that bond vectors to the neighbours are linear
features; every block adds a grouped width-5 residue convolution before self-attention; learned
positions; sinusoidal time features through an MLP added to every token). With "geometric":
RBF features of bond and short-range distances per residue, an attention bias from the CA-CA
distance matrix, and an equivariant local head

    eps_p += sum_{q: |res(p) - res(q)| <= w} (a_pq + b_pq (d_pq - 1.5 A)) (x_p - x_q) / d_pq

with (a, b) predicted from the two residues' features, the atom-pair type and the time: a
harmonic restraint on bond lengths and angles is then exactly representable, which is what the
low-noise end of the reverse process needs (a plain transformer left CA-CA bonds ~0.8 A off). It is not SE(3)
equivariant; training augments with uniformly random rotations.

A model directory holds config.json, model.safetensors, training_log.json (loss curve, CPU
time, data, seed) and README.md (model card). No training.json/unet/: these are not image
models and superdiff.registry.list_bundled_models() does not list them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from superdiff.schedules import VPDiscrete, make_betas

Tensor = torch.Tensor

__all__ = ["BackboneDenoiser", "DEFAULT_CONFIG", "schedule_from_config", "load_backbone_model",
           "save_backbone_model", "random_rotations", "center", "BUNDLED_PROTEIN_MODELS", "bundled_protein_model_path"]

from superdiff.registry import BUNDLED_ROOT  # noqa: E402  (superdiff/bundled, in editable and regular installs)

#: name -> directory under superdiff/bundled
BUNDLED_PROTEIN_MODELS = {"protein-a-helix": "protein-a-helix", "protein-b-strand": "protein-b-strand"}

DEFAULT_CONFIG: dict[str, Any] = {
    "length": 32,
    "coord_scale": 0.15,  # 1 unit = 6.67 Angstrom: per-coordinate std of a 32-residue window ~ 1
    "dim": 128,
    "depth": 4,
    "heads": 4,
    "ff_mult": 2,
    "conv_kernel": 5,  # residue-neighbourhood convolution in every block (0: none)
    "input_kernel": 3,  # the input layer sees residues i-1, i, i+1 (bond vectors are linear in them)
    "geometric": True,  # distance features, CA-CA attention bias and the equivariant local head
    "local_window": 1,  # the local head's atom pairs: residues |i - j| <= local_window
    "prediction_type": "epsilon",
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}


def schedule_from_config(cfg: dict[str, Any]) -> VPDiscrete:
    """The model's training noise process (VP discrete, as a DDPM)."""
    return VPDiscrete(make_betas(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"]))


def center(x: Tensor) -> Tensor:
    """Remove the centre of mass: x [..., L, 4, 3] -> x - mean over the L*4 atoms (per axis)."""
    return x - x.flatten(-3, -2).mean(-2)[..., None, None, :]


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """n uniformly random rotation matrices [n, 3, 3] (QR of a Gaussian with sign fix)."""
    A = torch.randn(n, 3, 3, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    det = torch.linalg.det(Q)
    Q[:, :, 0] = Q[:, :, 0] * det[:, None]
    return Q.to(dtype)


_NRBF, _NRBF_LOCAL = 8, 10
#: per-residue distances fed to the network: (atom i, residue offset, atom j) in Angstrom
_RES_DISTS = [(0, 0, 1), (1, 0, 2), (2, 0, 3), (0, 0, 2), (2, 1, 0), (1, 1, 1), (1, 2, 1), (1, 3, 1), (1, 4, 1),
              (3, 3, 0), (3, 4, 0), (0, -3, 3), (0, -4, 3)]


def _rbf(d: Tensor, lo: float, hi: float, n: int) -> Tensor:
    mu = torch.linspace(lo, hi, n, device=d.device, dtype=d.dtype)
    width = (hi - lo) / (n - 1)
    return torch.exp(-(((d[..., None] - mu) / width) ** 2))


def _residue_distance_features(xa: Tensor) -> Tensor:
    """[B, L, len(_RES_DISTS) * _NRBF]: RBFs of bond and short-range distances (zero past the ends),
    e.g. N-CA, CA-C, C-O, C(i)-N(i+1), CA(i)-CA(i+k), O(i)-N(i+3/4) (helix H-bonds)."""
    B, L = xa.shape[:2]
    feats = []
    for a, k, b in _RES_DISTS:
        d = torch.zeros(B, L, device=xa.device, dtype=xa.dtype)
        valid = torch.zeros(L, device=xa.device, dtype=xa.dtype)
        if abs(k) >= L:  # no residue has a partner k away: all zero (a negative slice bound would wrap)
            pass
        elif k >= 0:
            d[:, : L - k] = (xa[:, : L - k, a] - xa[:, k:, b]).norm(dim=-1)
            valid[: L - k] = 1
        else:
            d[:, -k:] = (xa[:, -k:, a] - xa[:, : L + k, b]).norm(dim=-1)
            valid[-k:] = 1
        feats.append(_rbf(d, 1.0, 12.0, _NRBF) * valid[None, :, None])
    return torch.cat(feats, -1)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int, conv_kernel: int = 0) -> None:
        super().__init__()
        self.conv = None
        if conv_kernel:
            self.n0 = nn.LayerNorm(dim)
            self.conv = nn.Conv1d(dim, dim, conv_kernel, padding=conv_kernel // 2, groups=4)
        self.n1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.n2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, h: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.conv is not None:
            h = h + self.conv(self.n0(h).transpose(1, 2)).transpose(1, 2)
        a = self.n1(h)
        h = h + self.attn(a, a, a, attn_mask=bias, need_weights=False)[0]
        return h + self.ff(self.n2(h))


class BackboneDenoiser(nn.Module):
    """eps_theta(x_t [B, L, 4, 3] (scaled, centred), t [B] or 0-d timestep) -> [B, L, 4, 3]."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        self.config = cfg
        L, D = int(cfg["length"]), int(cfg["dim"])
        self.length = L
        k_in = int(cfg.get("input_kernel", 1))
        self.inp = nn.Conv1d(12, D, k_in, padding=k_in // 2)
        self.pos = nn.Parameter(torch.randn(L, D) * 0.02)
        self.time = nn.Sequential(nn.Linear(32, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([_Block(D, int(cfg["heads"]), int(cfg["ff_mult"]), int(cfg.get("conv_kernel", 0))) for _ in range(int(cfg["depth"]))])
        self.out_norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, 12)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.geometric = bool(cfg.get("geometric", False))
        if self.geometric:
            self.heads = int(cfg["heads"])
            self.dist_in = nn.Linear(len(_RES_DISTS) * _NRBF, D)
            self.pair_bias = nn.Linear(_NRBF, self.heads)
            nn.init.zeros_(self.pair_bias.weight)
            nn.init.zeros_(self.pair_bias.bias)
            # equivariant local head over atom pairs (p, q) of residues |r_p - r_q| <= w
            w = int(cfg.get("local_window", 2))
            n = 4 * L
            res = torch.arange(n) // 4
            P, Q = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            keep = ((res[P] - res[Q]).abs() <= w) & (P != Q)
            p, q = P[keep], Q[keep]
            etype = ((p % 4) * 4 + (q % 4)) * (2 * w + 1) + (res[q] - res[p] + w)
            self.register_buffer("edge_p", p, persistent=False)
            self.register_buffer("edge_q", q, persistent=False)
            self.register_buffer("edge_type", etype, persistent=False)
            E = 32
            self.edge_type_emb = nn.Embedding(16 * (2 * w + 1), E)
            self.edge_src = nn.Linear(D, E)
            self.edge_dst = nn.Linear(D, E)
            self.edge_rbf = nn.Linear(_NRBF_LOCAL, E)
            self.edge_time = nn.Linear(D, E)
            self.edge_out = nn.Linear(E, 2)  # w = a + b * (d - 1.5 A): a harmonic bond/angle restraint is exact
            nn.init.zeros_(self.edge_out.weight)
            nn.init.zeros_(self.edge_out.bias)

    def _time_features(self, t: Tensor, B: int) -> Tensor:
        # in the weights' dtype (float32 as trained; float64 after model.double())
        t = torch.as_tensor(t, dtype=self.pos.dtype, device=self.pos.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)
        u = t / float(self.config["num_train_timesteps"])
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), 16, device=u.device, dtype=u.dtype))
        ang = u[:, None] * freqs[None] * math.pi
        return torch.cat([torch.sin(ang), torch.cos(ang)], -1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.length, 4, 3):
            raise ValueError(f"the backbone model takes x of shape [B, {self.length}, 4, 3], got {tuple(x.shape)}")
        B, L = x.shape[0], self.length
        x = x.to(self.pos.dtype)
        h = self.inp(x.reshape(B, L, 12).transpose(1, 2)).transpose(1, 2) + self.pos[None]
        temb = self.time(self._time_features(t, B))
        h = h + temb[:, None, :]
        bias = None
        if self.geometric:
            xa = x / float(self.config["coord_scale"])  # Angstrom
            h = h + self.dist_in(_residue_distance_features(xa))
            ca = xa[:, :, 1]
            dca = torch.cdist(ca, ca)  # [B, L, L]
            bias = self.pair_bias(_rbf(dca, 2.0, 20.0, _NRBF)).permute(0, 3, 1, 2).reshape(B * self.heads, L, L)
        for blk in self.blocks:
            h = blk(h, bias)
        out = self.out(self.out_norm(h)).reshape(B, L, 4, 3)
        if self.geometric:
            out = out + self._local_head(h, x, temb)
        return out

    def _local_head(self, h: Tensor, x: Tensor, temb: Tensor) -> Tensor:
        """sum_q w_pq (x_p - x_q) / |x_p - x_q|: rotation-equivariant corrections along local bonds."""
        B, L = x.shape[:2]
        flat = x.reshape(B, 4 * L, 3)
        p, q = self.edge_p, self.edge_q
        diff = flat[:, p] - flat[:, q]  # [B, E, 3]
        d = diff.norm(dim=-1, keepdim=True)
        dA = d[..., 0] / float(self.config["coord_scale"])
        src = self.edge_src(h).repeat_interleave(4, dim=1)  # [B, 4L, E] per atom
        dst = self.edge_dst(h).repeat_interleave(4, dim=1)
        e = src[:, p] + dst[:, q] + self.edge_type_emb(self.edge_type)[None] \
            + self.edge_rbf(_rbf(dA, 0.5, 8.0, _NRBF_LOCAL)) + self.edge_time(temb)[:, None, :]
        ab = self.edge_out(torch.nn.functional.silu(e))  # [B, E, 2]
        w = ab[..., :1] + ab[..., 1:] * (dA[..., None] - 1.5)
        contrib = w * diff / (d + 1e-3)
        out = torch.zeros_like(flat).index_add_(1, p, contrib)
        return out.reshape(B, L, 4, 3)


def save_backbone_model(model: BackboneDenoiser, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return d


def bundled_protein_model_path(name: str) -> Path:
    if name not in BUNDLED_PROTEIN_MODELS:
        raise ValueError(f"unknown bundled protein model {name!r}; available: {', '.join(BUNDLED_PROTEIN_MODELS)}")
    return BUNDLED_ROOT / BUNDLED_PROTEIN_MODELS[name]


def load_backbone_model(name_or_path: str | Path) -> BackboneDenoiser:
    """Load a bundled protein model by name ("protein-a-helix", "protein-b-strand") or from a directory."""
    from safetensors.torch import load_file

    p = Path(name_or_path)
    if not p.is_dir():
        if str(name_or_path) not in BUNDLED_PROTEIN_MODELS:
            raise ValueError(
                f"unknown bundled protein model {str(name_or_path)!r} and no such model directory "
                f"({p.resolve()}); pass one of {', '.join(BUNDLED_PROTEIN_MODELS)} or a directory with "
                "config.json and model.safetensors (scripts/train_protein.py --out-root writes one)")
        p = bundled_protein_model_path(str(name_or_path))
    cfg_path, w_path = p / "config.json", p / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{p} needs config.json and model.safetensors; train it with scripts/train_protein.py")
    with w_path.open("rb") as f:
        if f.read(64).startswith(b"version https://git-lfs"):
            raise FileNotFoundError(f"{w_path} is a Git LFS pointer, not weights; run `git lfs pull`")
    model = BackboneDenoiser(json.loads(cfg_path.read_text()))
    model.load_state_dict(load_file(str(w_path)))
    return model.eval()
