"""Backbone models as SuperDiff experts, in the centre-of-mass-free subspace.

The subspace. A backbone of L residues with A atoms each (A = 4: N, CA, C, O; A = 1 for CA or
frame-translation models) is x in R^{N x 3}, N = A L. Diffusion models of backbones remove the
centre of mass, so data and noise live in V = {x : sum_n x_n = 0} (per axis), of dimension
d = 3 (N - 1). We sample in orthonormal coordinates of V:

    x = H y,   y = H^T x,   y in R^{(N-1) x 3},

with H [N, N-1] the Helmert basis (columns orthonormal and orthogonal to 1). Then

  * the sampler's state, noise draws and prior are y ~ N(0, I_d): exactly the centre-of-mass-
    free Gaussian P eps of training, with no component along the centre of mass;
  * an expert's prediction is read as H^T pred(H y), i.e. projected onto V (a model that leaks
    a centre-of-mass component is corrected, consistently for every expert);
  * every estimator (Ito, kernel, ODE) sees dimension ctx.dim = 3 (N - 1) and inner products in
    V, and the tracked log q_i are densities on V with respect to its Lebesgue measure, so the
    shared prior log N(y; 0, I_d) and the d f_t term of the Ito estimator count 3(N-1) and not
    3N dimensions. The step uses the full g_t noise (no noise_scale < 1: that breaks Ito's
    estimator, superdiff-math.md section 5).

Composition then goes through superdiff.sampling.sample unchanged (OR with bias, AND,
average, single): see `compose_backbones`.

Adapter interface for your own backbone model (coordinates):

    expert = CoordinateBackboneExpert(fn, length=L, atoms=4, coord_scale=0.15,
                                      prediction_type="epsilon", model_time=None)

    fn(x: Tensor [B, L, atoms, 3], t_model: Tensor (0-d)) -> Tensor [B, L, atoms, 3]

x is the centred backbone times coord_scale (what your model was trained on, e.g. Angstrom *
0.1 for nm), t_model = model_time(t) (default: the schedule's model_time, the DDPM timestep for
VPDiscrete); the prediction kind is any of superdiff's ("epsilon", "sample", "v_prediction",
"flow"), with the SAME schedule (alpha_t, sigma_t) your model was trained with.

Frame models (FrameDiff-style SE(3) = R3 x SO(3)): see `FrameExpert` / `sample_frames`. The R3
part (residue translations, centre-of-mass-free, A = 1) is composed exactly as above. The SO(3)
part is NOT density-tracked: kappa comes from the R3 log-densities only (log q_i of the
translations given the current rotations), and rotations follow a geodesic random walk on SO(3)
driven by the same kappa-weighted combination of the experts' rotation scores, with its own,
independent noise draw. That is a heuristic for the rotations, stated as such.
"""

from __future__ import annotations

import math
import operator as _operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from superdiff.experts import ExpertList
from superdiff.predictions import check_kind
from superdiff.schedules import Schedule

Tensor = torch.Tensor

__all__ = ["helmert_basis", "CoMFreeBasis", "CoordinateBackboneExpert", "BackboneModelExpert",
           "backbone_expert_set", "compose_backbones", "FrameExpert", "sample_frames", "so3_exp"]


def helmert_basis(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """H [n, n-1]: orthonormal columns spanning {v in R^n : sum v = 0} (Helmert contrasts).

    Column k (k = 1..n-1) is (1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1)) with k ones."""
    if n < 2:
        raise ValueError(f"the centre-of-mass-free space needs at least 2 atoms, got {n}")
    H = torch.zeros(n, n - 1, dtype=dtype)
    for k in range(1, n):
        H[:k, k - 1] = 1.0
        H[k, k - 1] = -float(k)
        H[:, k - 1] /= math.sqrt(k * (k + 1))
    return H


def _count(value: Any, what: str) -> int:
    """value as a positive Python int: ints and numpy/torch integers are accepted, bools, floats
    (even 8.0) and strings are not (a float length would otherwise be truncated silently)."""
    try:
        n = _operator.index(value)
    except TypeError:
        n = None
    if n is None or isinstance(value, bool) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return n


class CoMFreeBasis:
    """Isometry between backbones [B, L, A, 3] (centre-free) and coordinates y [B, L*A - 1, 3]."""

    def __init__(self, length: int, atoms: int = 4) -> None:
        length, atoms = _count(length, "length"), _count(atoms, "atoms")
        self.length, self.atoms = length, atoms
        self.n = length * atoms
        self.H = helmert_basis(self.n)

    @property
    def shape(self) -> tuple[int, int]:
        """Per-sample shape of the sampler's state y."""
        return (self.n - 1, 3)

    @property
    def dim(self) -> int:
        """d = 3 (L A - 1), the dimension every estimator works in."""
        return 3 * (self.n - 1)

    def check_y(self, y: Tensor) -> None:
        if y.dim() != 3 or tuple(y.shape[1:]) != self.shape:
            raise ValueError(f"expected centre-free coordinates of shape [B, {self.n - 1}, 3] for a backbone of "
                             f"{self.length} residues x {self.atoms} atoms, got {tuple(y.shape)}; "
                             "check that every expert has the same length and atoms")

    def to_coords(self, y: Tensor) -> Tensor:
        self.check_y(y)
        H = self.H.to(device=y.device, dtype=y.dtype)
        return torch.einsum("nk,bkc->bnc", H, y).reshape(y.shape[0], self.length, self.atoms, 3)

    def from_coords(self, x: Tensor) -> Tensor:
        """y = H^T x: the centre of mass (any component along 1) is dropped."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.length, self.atoms, 3):
            raise ValueError(f"expected backbones of shape [B, {self.length}, {self.atoms}, 3], got {tuple(x.shape)}")
        H = self.H.to(device=x.device, dtype=x.dtype)
        return torch.einsum("nk,bnc->bkc", H, x.reshape(x.shape[0], self.n, 3))


class CoordinateBackboneExpert:
    """Adapter: a user's coordinate backbone model as a superdiff Expert on y-coordinates (see module doc)."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], length: int, atoms: int = 4,
                 coord_scale: float = 1.0, prediction_type: str = "epsilon",
                 model_time: Callable[[Tensor], Tensor] | None = None, name: str = "backbone model") -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable (x [B, L, A, 3], t) -> [B, L, A, 3], got {type(fn).__name__}")
        if not (coord_scale > 0 and math.isfinite(coord_scale)):
            raise ValueError(f"coord_scale must be a positive number, got {coord_scale}")
        self.fn = fn
        self.basis = CoMFreeBasis(length, atoms)
        self.length, self.atoms = self.basis.length, self.basis.atoms
        self.coord_scale = float(coord_scale)
        self.prediction_type = check_kind(prediction_type)
        self.model_time = model_time
        self.name = name

    def signature(self) -> tuple[int, int, float]:
        return (self.length, self.atoms, self.coord_scale)

    def predict(self, y: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        x = self.basis.to_coords(y)
        tm = schedule.model_time(t) if self.model_time is None else self.model_time(t)
        out = self.fn(x, tm)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"{self.name} returned {tuple(getattr(out, 'shape', ()))}, expected {tuple(x.shape)}")
        return self.basis.from_coords(out.to(y.dtype))

    # conversions between Angstrom backbones and sampler coordinates
    def encode(self, backbone_angstrom: Tensor) -> Tensor:
        """[B, L, A, 3] Angstrom -> y (centred, scaled)."""
        x = torch.as_tensor(backbone_angstrom, dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("backbone coordinates contain NaN or inf; fix or drop those structures")
        return self.basis.from_coords(x * self.coord_scale)

    def decode(self, y: Tensor) -> Tensor:
        """y -> [B, L, A, 3] Angstrom (centred)."""
        return self.basis.to_coords(y.to(torch.float64)) / self.coord_scale


class BackboneModelExpert(CoordinateBackboneExpert):
    """A protein/models.py BackboneDenoiser (e.g. the bundled protein-a-helix) as an expert."""

    def __init__(self, model: torch.nn.Module, name: str | None = None) -> None:
        cfg = model.config
        self.model = model.eval()

        def fn(x: Tensor, tm: Tensor) -> Tensor:
            dtype = next(model.parameters()).dtype  # float32 as shipped; float64 after model.double()
            with torch.no_grad():
                return model(x.to(dtype), tm).to(x.dtype)

        super().__init__(fn, cfg["length"], 4, cfg["coord_scale"], cfg["prediction_type"], name=name or "backbone model")
        self.config = cfg

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "BackboneModelExpert":
        from .models import load_backbone_model

        return cls(load_backbone_model(name_or_path), name=str(name_or_path))

    def schedule(self) -> Schedule:
        """The training schedule with 'trailing' spacing (the grid starts at t = T - 1)."""
        from superdiff.schedules import VPDiscrete, make_betas

        c = self.config
        return VPDiscrete(make_betas(c["num_train_timesteps"], c["beta_start"], c["beta_end"], c["beta_schedule"]),
                          timestep_spacing="trailing")


def backbone_expert_set(experts: Sequence[CoordinateBackboneExpert]) -> ExpertList:
    """An ExpertList of backbone experts, after checking they share length, atoms and coord_scale."""
    experts = list(experts)
    if not experts:
        raise ValueError("no backbone experts given: pass at least one")
    for i, e in enumerate(experts):
        if not isinstance(e, CoordinateBackboneExpert):
            raise ValueError(f"expert {i} is a {type(e).__name__}, not a CoordinateBackboneExpert; wrap it first")
    L0, A0, s0 = experts[0].signature()
    for i, e in enumerate(experts[1:], 1):
        L, A, s = e.signature()
        if (L, A) != (L0, A0):
            raise ValueError(f"mismatched experts: expert {i} ({e.name}) makes {L} residues x {A} atoms but expert 0 "
                             f"({experts[0].name}) makes {L0} x {A0}; composed experts must share the backbone length")
        if abs(s - s0) > 1e-12:
            raise ValueError(f"mismatched experts: expert {i} uses coord_scale {s} but expert 0 uses {s0}; "
                             "composed experts must share one coordinate system")
    _check_training_schedules(experts)
    return ExpertList(experts)


def _check_training_schedules(experts: Sequence[CoordinateBackboneExpert]) -> None:
    """Trained experts (those with a training schedule, BackboneModelExpert) must share it: their
    scores are scores of one noise process only then."""
    trained = [(i, e) for i, e in enumerate(experts) if isinstance(e, BackboneModelExpert)]
    if len(trained) < 2:
        return
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    i0, e0 = trained[0]
    betas = e0.schedule().betas
    for i, e in trained[1:]:
        if not torch.equal(e.schedule().betas, betas):
            theirs = ", ".join(f"{k}={e.config.get(k)}" for k in keys)
            ours = ", ".join(f"{k}={e0.config.get(k)}" for k in keys)
            raise ValueError(f"mismatched experts: expert {i} ({e.name}) was trained with another noise schedule "
                             f"({theirs}) than expert {i0} ({e0.name}: {ours}); composed models must "
                             "share their training schedule")


def compose_backbones(experts: Sequence[CoordinateBackboneExpert], schedule: Schedule, num_samples: int,
                      num_steps: int = 200, operator: Any = "or", estimator: str | None = None,
                      integrator: str = "em", generator: torch.Generator | None = None,
                      progress: bool = False, **kw: Any):
    """Sample composed backbones through superdiff.sampling.sample.

    Returns (backbones [B, L, A, 3] Angstrom float64, SampleOutput). The state is y, so the
    prior, the noise and the estimators all live in the centre-of-mass-free space."""
    from superdiff.sampling import sample

    es = backbone_expert_set(experts)
    num_samples = _count(num_samples, "num_samples")
    basis = experts[0].basis
    out = sample(es, schedule, num_steps, operator=operator, estimator=estimator, integrator=integrator,
                 shape=(num_samples, *basis.shape), generator=generator, dtype=torch.float64,
                 expert_names=[e.name for e in experts], progress=progress, **kw)
    return experts[0].decode(out.samples), out


# ----------------------------------------------------------------------------------------------
# frames: R3 exact, SO(3) by a kappa-weighted geodesic random walk (not density-tracked)

def _skew(w: Tensor) -> Tensor:
    z = torch.zeros_like(w[..., 0])
    return torch.stack([torch.stack([z, -w[..., 2], w[..., 1]], -1),
                        torch.stack([w[..., 2], z, -w[..., 0]], -1),
                        torch.stack([-w[..., 1], w[..., 0], z], -1)], -2)


def so3_exp(w: Tensor) -> Tensor:
    """Rodrigues: axis-angle vectors [..., 3] -> rotation matrices [..., 3, 3]."""
    th = w.norm(dim=-1, keepdim=True)[..., None]
    K = _skew(w)
    small = th < 1e-8
    a = torch.where(small, torch.ones_like(th), torch.sin(th) / th.clamp(min=1e-12))
    b = torch.where(small, 0.5 * torch.ones_like(th), (1 - torch.cos(th)) / th.clamp(min=1e-12) ** 2)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(K.shape)
    return eye + a * K + b * (K @ K)


@dataclass
class _FrameState:
    rots: Tensor | None = None  # [B, L, 3, 3]


class FrameExpert(CoordinateBackboneExpert):
    """A user's frame model: fn(trans [B, L, 1, 3] (scaled, centred), rots [B, L, 3, 3], t_model)
    -> (trans_pred [B, L, 1, 3] of kind prediction_type, rot_score [B, L, 3] in the body frame).

    Used through `sample_frames`, which owns the shared rotation state."""

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]], length: int,
                 coord_scale: float = 1.0, prediction_type: str = "epsilon",
                 model_time: Callable[[Tensor], Tensor] | None = None, name: str = "frame model") -> None:
        self.frame_fn = fn
        self.state = _FrameState()
        self.last_rot_score: Tensor | None = None

        def coord_fn(x: Tensor, tm: Tensor) -> Tensor:
            if self.state.rots is None:
                raise ValueError("FrameExpert needs rotations: sample it with sample_frames()")
            if self.state.rots.shape[0] != x.shape[0]:
                raise ValueError(f"{name} holds rotations for {self.state.rots.shape[0]} samples but was called on "
                                 f"{x.shape[0]}; sample it with sample_frames()")
            trans, rs = fn(x, self.state.rots.to(x.dtype), tm)
            if tuple(rs.shape) != (x.shape[0], length, 3):
                raise ValueError(f"{name} returned a rotation score of shape {tuple(rs.shape)}, "
                                 f"expected [B, {length}, 3] (tangent vectors in the body frame)")
            self.last_rot_score = rs.to(torch.float64)
            return trans

        super().__init__(coord_fn, length, 1, coord_scale, prediction_type, model_time, name)


def sample_frames(experts: Sequence[FrameExpert], schedule: Schedule, rot_g2: Callable[[float], float],
                  num_samples: int, num_steps: int = 200, operator: Any = "or",
                  generator: torch.Generator | None = None, rot_generator: torch.Generator | None = None,
                  **kw: Any):
    """Compose frame models: translations through superdiff.sampling.sample (exact R3 part, EM +
    Ito by default), rotations updated after every step by

        R' = R exp( h g2_rot(t) sum_i kappa_i r_i  +  sqrt(h g2_rot(t)) z ),   z ~ N(0, I_3) per residue,

    (reverse-time geodesic random walk; r_i expert i's rotation score at the step's start, h the
    step length, z drawn from rot_generator: never the translation noise). Rotations start
    uniform (the SO(3) prior). Returns (trans [B, L, 3] Angstrom, rots [B, L, 3, 3], SampleOutput).
    The experts hold the rotations only while this runs: afterwards (or after an error) their
    state is cleared, so they cannot be evaluated later with this run's rotations."""
    from superdiff.sampling import sample

    from .models import random_rotations

    experts = list(experts)
    if kw.get("integrator", "em") not in ("em", "sde") or kw.get("estimator") not in (None, "ito", "kernel"):
        raise ValueError("sample_frames supports the Euler-Maruyama integrator with the 'ito' or 'kernel' "
                         "estimator (one expert evaluation per step, whose rotation scores drive the SO(3) step)")
    es = backbone_expert_set(experts)
    for e in experts:
        if not isinstance(e, FrameExpert):
            raise ValueError(f"sample_frames needs FrameExpert instances, got {type(e).__name__}")
    num_samples = _count(num_samples, "num_samples")
    L = experts[0].length
    rots = random_rotations(num_samples * L, rot_generator, torch.float64).reshape(num_samples, L, 3, 3)
    for e in experts:
        e.state.rots = rots

    def callback(info):
        nonlocal rots
        scores = torch.stack([e.last_rot_score for e in experts])  # [M, B, L, 3]
        k = info.kappa.T.to(torch.float64)[:, :, None, None]
        h = info.t - info.t_next
        g2 = float(rot_g2(info.t))
        z = torch.randn(rots.shape[:-1], generator=rot_generator, dtype=torch.float64)
        step = h * g2 * (k * scores).sum(0) + math.sqrt(max(h * g2, 0.0)) * z
        rots = rots @ so3_exp(step)
        for e in experts:
            e.state.rots = rots
        return None

    try:
        out = sample(es, schedule, num_steps, operator=operator, shape=(num_samples, *experts[0].basis.shape),
                     generator=generator, dtype=torch.float64, expert_names=[e.name for e in experts],
                     callback=callback, progress=False, **kw)
    finally:  # the rotations belong to this run only
        for e in experts:
            e.state.rots, e.last_rot_score = None, None
    trans = experts[0].decode(out.samples)[:, :, 0]
    return trans, rots, out
