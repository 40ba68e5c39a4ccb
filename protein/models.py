"""Small backbone diffusion models: eps-prediction on centre-of-mass-free N/CA/C/O coordinates.

Data: a backbone X [L, 4, 3] (Angstrom) becomes x0 = coord_scale * (X - mean(X)), i.e. a point
of the subspace V = {x in R^{4L x 3}: sum_atoms x = 0} of dimension d = 3(4L - 1). The forward
process is the VP-discrete DDPM process restricted to V,

    x_t = alpha_t x0 + sigma_t P eps,   eps ~ N(0, I_{4L x 3}),   P = I - 1 1^T / (4L) (per axis)

(P eps is the standard Gaussian of V), and the network is trained with
loss = || P eps_theta(x_t, t) - P eps ||^2 / d (uniform integer t). Its prediction is then
always read through P (protein/experts.py), so it is a field on V.

Network: a small transformer over the L residues (one token of 12 coordinates each, learned
positions, sinusoidal time features through an MLP added to every token). It is not SE(3)
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

import numpy as np
import torch
from torch import nn

from superdiff.schedules import VPDiscrete, make_betas

Tensor = torch.Tensor

__all__ = ["BackboneDenoiser", "DEFAULT_CONFIG", "schedule_from_config", "load_backbone_model",
           "save_backbone_model", "random_rotations", "center", "BUNDLED_PROTEIN_MODELS", "bundled_protein_model_path"]

BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "superdiff" / "bundled"
#: name -> directory under superdiff/bundled
BUNDLED_PROTEIN_MODELS = {"protein-a-helix": "protein-a-helix", "protein-b-strand": "protein-b-strand"}

DEFAULT_CONFIG: dict[str, Any] = {
    "length": 32,
    "coord_scale": 0.15,  # 1 unit = 6.67 Angstrom: per-coordinate std of a 32-residue window ~ 1
    "dim": 128,
    "depth": 4,
    "heads": 4,
    "ff_mult": 2,
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


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.n2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, h: Tensor) -> Tensor:
        a = self.n1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.ff(self.n2(h))


class BackboneDenoiser(nn.Module):
    """eps_theta(x_t [B, L, 4, 3] (scaled, centred), t [B] or 0-d timestep) -> [B, L, 4, 3]."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        self.config = cfg
        L, D = int(cfg["length"]), int(cfg["dim"])
        self.length = L
        self.inp = nn.Linear(12, D)
        self.pos = nn.Parameter(torch.randn(L, D) * 0.02)
        self.time = nn.Sequential(nn.Linear(32, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([_Block(D, int(cfg["heads"]), int(cfg["ff_mult"])) for _ in range(int(cfg["depth"]))])
        self.out_norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, 12)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _time_features(self, t: Tensor, B: int) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=self.pos.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)
        u = t / float(self.config["num_train_timesteps"])
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), 16, device=u.device))
        ang = u[:, None] * freqs[None] * math.pi
        return torch.cat([torch.sin(ang), torch.cos(ang)], -1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.length, 4, 3):
            raise ValueError(f"the backbone model takes x of shape [B, {self.length}, 4, 3], got {tuple(x.shape)}")
        B = x.shape[0]
        h = self.inp(x.reshape(B, self.length, 12).to(self.pos.dtype)) + self.pos[None]
        h = h + self.time(self._time_features(t, B))[:, None, :]
        for blk in self.blocks:
            h = blk(h)
        return self.out(self.out_norm(h)).reshape(B, self.length, 4, 3)


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
