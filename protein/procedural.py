"""Procedural backbones: NeRF (natural extension reference frame) from backbone torsions.

Given three placed atoms a, b, c, the next atom d at bond length l = |cd|, bond angle
theta = angle(b, c, d) and torsion chi = dihedral(a, b, c, d) is (Parsons et al. 2005)

    d = c + [bc_hat, n_hat x bc_hat, n_hat] @ (-l cos theta, l sin theta cos chi, l sin theta sin chi)
    with bc_hat = (c - b)/|c - b|, n_hat = (b - a) x bc_hat / |.|.

Residue i is built from (phi_i, psi_i, omega_i) with Engh & Huber bond lengths and angles;
the carbonyl O lies in the peptide plane (torsion N(i+1)-CA-C-O = 180 deg).

Generators (all deterministic given a numpy Generator):
    ideal_helix(L)           phi, psi = -57, -47: pydssp calls it all H, CA-CA = 3.80 A
    helical_hairpin(L, rng)  two helices joined by a short loop, loop torsions chosen by a
                             small random search for a compact, clash-free, antiparallel pair
    beta_meander(L, rng)     antiparallel strands joined by 2-residue type I' turns, turn and
                             strand torsions chosen by random search to maximise pydssp's strand
                             (E) content, i.e. inter-strand H-bonds in pydssp's energy map.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BOND", "ANGLE", "nerf_place", "build_backbone", "ideal_helix", "ideal_strand",
           "helical_hairpin", "HAIRPIN_MIN_LENGTH", "beta_meander", "beta_meanders", "dihedral",
           "build_backbone_torch"]

BOND = {"N-CA": 1.458, "CA-C": 1.525, "C-N": 1.329, "C-O": 1.231}
ANGLE = {"N-CA-C": 111.2, "CA-C-N": 116.2, "C-N-CA": 121.7, "CA-C-O": 120.5}
HELIX = (-57.0, -47.0)
STRAND = (-120.0, 130.0)
TURN_I_PRIME = ((60.0, 30.0), (90.0, 0.0))


def nerf_place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle_deg: float,
               torsion_deg: float) -> np.ndarray:
    """Position of d with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion."""
    th, chi = np.deg2rad(angle_deg), np.deg2rad(torsion_deg)
    bc = c - b
    bc = bc / np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n = n / np.linalg.norm(n)
    m = np.stack([bc, np.cross(n, bc), n], axis=-1)  # columns
    d2 = np.array([-bond * np.cos(th), bond * np.sin(th) * np.cos(chi), bond * np.sin(th) * np.sin(chi)])
    return c + m @ d2


def dihedral(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Dihedral angle(s) in degrees (broadcasts over leading dims)."""
    b0, b1, b2 = a - b, c - b, d - c
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    x = (v * w).sum(-1)
    y = (np.cross(b1n, v) * w).sum(-1)
    return np.rad2deg(np.arctan2(y, x))


def _place_t(a, b, c, bond: float, angle_deg: float, torsion_deg):
    """Torch NeRF step (differentiable in the torsion); a, b, c [..., 3], torsion [...] degrees."""
    import torch

    th = torch.deg2rad(torch.as_tensor(angle_deg, dtype=c.dtype, device=c.device))
    chi = torch.deg2rad(torsion_deg)
    bc = c - b
    bc = bc / bc.norm(dim=-1, keepdim=True)
    n = torch.cross(b - a, bc, dim=-1)
    n = n / n.norm(dim=-1, keepdim=True)
    m = torch.stack([bc, torch.cross(n, bc, dim=-1), n], dim=-1)
    d2 = torch.stack([-bond * torch.cos(th) * torch.ones_like(chi), bond * torch.sin(th) * torch.cos(chi),
                      bond * torch.sin(th) * torch.sin(chi)], dim=-1)
    return c + (m @ d2[..., None])[..., 0]


def build_backbone_torch(phi, psi, omega=None):
    """Differentiable NeRF: torsions [..., L] (degrees, torch) -> backbone [..., L, 4, 3]."""
    import torch

    L = phi.shape[-1]
    omega = torch.full_like(phi, 180.0) if omega is None else omega
    batch = phi.shape[:-1]
    ang = np.deg2rad(180.0 - ANGLE["N-CA-C"])
    N0 = torch.zeros(*batch, 3, dtype=phi.dtype, device=phi.device)
    CA0 = N0 + torch.tensor([BOND["N-CA"], 0.0, 0.0], dtype=phi.dtype, device=phi.device)
    C0 = CA0 + BOND["CA-C"] * torch.tensor([np.cos(ang), np.sin(ang), 0.0], dtype=phi.dtype, device=phi.device)
    Ns, CAs, Cs = [N0], [CA0], [C0]
    for i in range(1, L):
        n = _place_t(Ns[-1], CAs[-1], Cs[-1], BOND["C-N"], ANGLE["CA-C-N"], psi[..., i - 1])
        ca = _place_t(CAs[-1], Cs[-1], n, BOND["N-CA"], ANGLE["C-N-CA"], omega[..., i - 1])
        c = _place_t(Cs[-1], n, ca, BOND["CA-C"], ANGLE["N-CA-C"], phi[..., i])
        Ns.append(n), CAs.append(ca), Cs.append(c)
    N, CA, C = (torch.stack(v, dim=-2) for v in (Ns, CAs, Cs))
    O = _place_t(N, CA, C, BOND["C-O"], ANGLE["CA-C-O"], psi + 180.0)
    return torch.stack([N, CA, C, O], dim=-2)


def build_backbone(phi: np.ndarray, psi: np.ndarray, omega: np.ndarray | None = None) -> np.ndarray:
    """Backbone [L, 4, 3] (N, CA, C, O) from torsions in degrees (phi_0 is unused)."""
    import torch

    phi = np.asarray(phi, dtype=np.float64)
    psi = np.asarray(psi, dtype=np.float64)
    L = len(phi)
    if phi.ndim != 1 or psi.shape != (L,) or L < 1:
        raise ValueError(f"phi and psi must be 1-D arrays of equal length >= 1, got {phi.shape} and {psi.shape}")
    om = None if omega is None else torch.as_tensor(np.asarray(omega, dtype=np.float64))
    with torch.no_grad():
        X = build_backbone_torch(torch.as_tensor(phi), torch.as_tensor(psi), om)
    return X.numpy()


def ideal_helix(L: int) -> np.ndarray:
    return build_backbone(np.full(L, HELIX[0]), np.full(L, HELIX[1]))


def ideal_strand(L: int) -> np.ndarray:
    return build_backbone(np.full(L, STRAND[0]), np.full(L, STRAND[1]))


def _ss_fractions(X: np.ndarray) -> tuple[float, float, np.ndarray]:
    import pydssp

    ss = pydssp.assign(X.astype(np.float64), out_type="c3")
    return float(np.mean(ss == "H")), float(np.mean(ss == "E")), ss


def _clash_free(X: np.ndarray, min_dist: float = 3.0) -> bool:
    ca = X[:, 1]
    d = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
    iu = np.triu_indices(len(ca), k=3)
    return bool((d[iu] > min_dist).all())


def _rg(X: np.ndarray) -> float:
    ca = X[:, 1]
    return float(np.sqrt(((ca - ca.mean(0)) ** 2).sum(-1).mean()))


#: the shortest helical hairpin: the loop (3-5 residues) starts up to 3 residues either side of the
#: middle, so both helices exist only from 11 residues on
HAIRPIN_MIN_LENGTH = 11


def helical_hairpin(L: int, rng: np.random.Generator, tries: int = 48) -> np.ndarray:
    """Helix - loop (3-5 residues) - helix, the loop chosen for compactness among clash-free tries."""
    if L < HAIRPIN_MIN_LENGTH:
        raise ValueError(f"a helical hairpin needs at least {HAIRPIN_MIN_LENGTH} residues, got {L}")
    best, best_score = None, np.inf
    for _ in range(tries):
        loop = int(rng.integers(3, 6))
        h1 = int(rng.integers((L - loop) // 2 - 3, (L - loop) // 2 + 4))
        phi = np.full(L, HELIX[0]) + rng.normal(0, 4, L)
        psi = np.full(L, HELIX[1]) + rng.normal(0, 4, L)
        lo, hi = h1, h1 + loop
        phi[lo:hi] = rng.choice([-90.0, -70.0, 60.0, -120.0], hi - lo) + rng.normal(0, 15, hi - lo)
        psi[lo:hi] = rng.choice([150.0, 0.0, 40.0, 120.0, -30.0], hi - lo) + rng.normal(0, 15, hi - lo)
        X = build_backbone(phi, psi)
        if not _clash_free(X):
            continue
        score = _rg(X)
        if score < best_score:
            best, best_score = X, score
    if best is None:
        raise RuntimeError("no clash-free helical hairpin found; increase tries")
    return best


def _meander_layout(L: int, rng: np.random.Generator) -> tuple[list[int], list[tuple[int, int]]]:
    """Turn starts t (type I' turn at t, t+1) and the H-bonded antiparallel pairs they imply."""
    turns, pairs = [], []
    i = int(rng.integers(0, 2))
    while True:
        i += int(rng.integers(5, 8))
        if i + 2 >= L - 4:
            break
        turns.append(i)
        i += 2
    for t in turns:
        k = 0
        while t - 1 - k >= 0 and t + 2 + k < L:
            if any(t - 1 - k <= u + 1 < t for u in turns if u < t) or any(t + 2 <= u <= t + 2 + k for u in turns if u > t):
                break
            if k % 2 == 0:  # 2:2 hairpin: (t-1, t+2), (t-3, t+4), ... are the H-bonded (narrow) pairs
                pairs.append((t - 1 - k, t + 2 + k))
            k += 1
    return turns, pairs


def beta_meanders(n: int, L: int, rng: np.random.Generator, iters: int = 120) -> np.ndarray:
    """n antiparallel beta meanders [n, L, 4, 3], refined together against pydssp's H-bond energy.

    Each starts from strand torsions (-120, 130) joined by type I' turns (60, 30), (90, 0) at a
    random register, then Adam (on all n at once) minimises
        sum_{H-bonded pairs (i, j)} clamp(E(i->j), -3) + clamp(E(j->i), -3)
        + 10 sum_{|i-j|>=3} relu(3.8 - |CA_i - CA_j|)^2 + 1e-4 ||torsions - start||^2
    where E is pydssp's electrostatic H-bond energy (kcal/mol; below -0.5 is an H-bond) and the
    pairs are those of 2:2 hairpins: (t-1, t+2), (t-3, t+4), ... for a turn at (t, t+1).
    """
    import torch
    from pydssp.pydssp_torch import get_hbond_map

    phi0 = np.full((n, L), STRAND[0]) + rng.normal(0, 6, (n, L))
    psi0 = np.full((n, L), STRAND[1]) + rng.normal(0, 6, (n, L))
    target = np.zeros((n, L, L))
    for b in range(n):
        turns, pairs = _meander_layout(L, rng)
        for t in turns:
            for k, (p, s) in enumerate(TURN_I_PRIME):
                phi0[b, t + k], psi0[b, t + k] = p + rng.normal(0, 4), s + rng.normal(0, 4)
        for i, j in pairs:
            target[b, i, j] = target[b, j, i] = 1.0
    phi = torch.tensor(phi0, requires_grad=True)
    psi = torch.tensor(psi0, requires_grad=True)
    ref = torch.tensor(np.stack([phi0, psi0]))
    T = torch.tensor(target)
    opt = torch.optim.Adam([phi, psi], lr=1.0)
    far = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=3)
    for _ in range(iters):
        opt.zero_grad()
        X = build_backbone_torch(phi, psi)
        e = get_hbond_map(X, return_e=True)  # [n, L, L]: donor (N-H) row, acceptor (C=O) column
        loss = (e.clamp(min=-3.0) * T).sum()
        ca = X[..., 1, :]
        d = (ca[:, :, None] - ca[:, None]).norm(dim=-1)
        loss = loss + 10 * torch.relu(3.8 - d[:, far]).pow(2).sum()
        loss = loss + 1e-4 * ((torch.stack([phi, psi]) - ref) ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return build_backbone_torch(phi.detach(), psi.detach()).numpy()


def beta_meander(L: int, rng: np.random.Generator, iters: int = 120) -> np.ndarray:
    """One beta meander [L, 4, 3] (see beta_meanders)."""
    return beta_meanders(1, L, rng, iters)[0]
