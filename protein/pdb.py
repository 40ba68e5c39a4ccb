"""Backbone PDB I/O: read N/CA/C/O of every chain, write backbone-only PDB files.

A backbone is an array ``[L, 4, 3]`` (atoms N, CA, C, O in Angstrom). Reading keeps the
first model, altloc ' ' or 'A', residues that have all four atoms, and splits a chain into
segments at breaks (peptide C(i)-N(i+1) distance > 2.0 A), so that a segment is a
physically continuous backbone. Pure numpy, no structure library needed.
"""

from __future__ import annotations

import bz2
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BACKBONE_ATOMS", "THREE_TO_ONE", "Segment", "read_backbone_segments", "read_text",
           "backbone_pdb_string", "write_backbone_pdb", "check_backbone"]

BACKBONE_ATOMS = ("N", "CA", "C", "O")
THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G",
    "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S",
    "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V", "MSE": "M", "SEC": "C", "HSD": "H", "HSE": "H",
    "HSP": "H", "HID": "H", "HIE": "H", "HIP": "H", "CYX": "C",
}
_PEPTIDE_BREAK = 2.0  # Angstrom; a C-N peptide bond is 1.33 A


def check_backbone(x: np.ndarray, name: str = "backbone", length: int | None = None) -> np.ndarray:
    """Validate a backbone array [L, 4, 3] (or a batch [B, L, 4, 3]); raise ValueError saying what is wrong."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in (3, 4) or a.shape[-2:] != (4, 3):
        raise ValueError(f"{name} must have shape [L, 4, 3] or [B, L, 4, 3] (atoms N, CA, C, O; xyz in A), "
                         f"got {tuple(a.shape)}")
    if length is not None and a.shape[-3] != length:
        raise ValueError(f"{name} has {a.shape[-3]} residues, expected {length}; crop or pad to {length}")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0].tolist()
        raise ValueError(f"{name} contains NaN or inf coordinates (first at index {bad}); "
                         "remove or rebuild those atoms")
    return a


def read_text(path: str | Path) -> str:
    """File text, transparently decompressing .gz and .bz2."""
    p = Path(path)
    if p.suffix == ".gz":
        return gzip.open(p, "rt", errors="replace").read()
    if p.suffix == ".bz2":
        return bz2.open(p, "rt", errors="replace").read()
    return p.read_text(errors="replace")


@dataclass
class Segment:
    chain: str
    start_resseq: str  # residue number (+ insertion code) of the first residue
    sequence: str  # one-letter codes ('X' for unknown residues)
    coords: np.ndarray  # [L, 4, 3] float64


def read_backbone_segments(text: str) -> list[Segment]:
    """Continuous backbone segments of every chain of the first model in PDB text."""
    chains: dict[str, dict[tuple, dict]] = {}
    order: dict[str, list[tuple]] = {}
    seen_model = False
    for line in text.splitlines():
        rec = line[:6]
        if rec.startswith("MODEL"):
            if seen_model:
                break
            seen_model = True
            continue
        if rec.startswith("ENDMDL"):
            break
        if rec not in ("ATOM  ", "HETATM") or len(line) < 54:
            continue
        resname = line[17:20].strip()
        if rec == "HETATM" and resname != "MSE":
            continue
        name = line[12:16].strip()
        if name not in BACKBONE_ATOMS or line[16] not in (" ", "A"):
            continue
        chain = line[21]
        key = (line[22:26], line[26])
        try:
            xyz = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
        except ValueError:
            continue
        res = chains.setdefault(chain, {})
        if key not in res:
            res[key] = {"resname": resname}
            order.setdefault(chain, []).append(key)
        res[key].setdefault(name, xyz)
    out: list[Segment] = []
    for chain, keys in order.items():
        res = chains[chain]
        full = [k for k in keys if all(a in res[k] for a in BACKBONE_ATOMS)]
        if not full:
            continue
        X = np.array([[res[k][a] for a in BACKBONE_ATOMS] for k in full], dtype=np.float64)
        seq = "".join(THREE_TO_ONE.get(res[k]["resname"], "X") for k in full)
        gaps = np.linalg.norm(X[1:, 0] - X[:-1, 2], axis=-1) > _PEPTIDE_BREAK
        cuts = [0, *(np.nonzero(gaps)[0] + 1).tolist(), len(full)]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if hi > lo:
                out.append(Segment(chain, "".join(full[lo]).strip(), seq[lo:hi], X[lo:hi]))
    return out


def backbone_pdb_string(coords: np.ndarray, sequence: str | None = None, chain: str = "A",
                        remarks: list[str] | None = None) -> str:
    """PDB text of one backbone [L, 4, 3] (residues named by `sequence`, default glycine)."""
    X = check_backbone(coords)
    if X.ndim != 3:
        raise ValueError(f"write one backbone [L, 4, 3] at a time, got {tuple(X.shape)}")
    L = X.shape[0]
    if L == 0:
        raise ValueError("backbone has 0 residues: a PDB file needs at least one [4, 3] residue")
    one_to_three = {v: k for k, v in THREE_TO_ONE.items() if len(k) == 3 and k not in
                    ("MSE", "SEC", "HSD", "HSE", "HSP", "HID", "HIE", "HIP", "CYX")}
    if sequence is not None and len(sequence) != L:
        raise ValueError(f"sequence has {len(sequence)} letters for {L} residues")
    lines = [f"REMARK   1 {r}"[:80] for r in (remarks or [])]
    serial = 1
    for i in range(L):
        resname = one_to_three.get(sequence[i], "UNK") if sequence else "GLY"
        for j, atom in enumerate(BACKBONE_ATOMS):
            x, y, z = X[i, j]
            lines.append(f"ATOM  {serial:5d}  {atom:<3s} {resname} {chain}{i + 1:4d}    "
                         f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           {atom[0]}")
            serial += 1
    lines.append(f"TER   {serial:5d}      {resname} {chain}{L:4d}")
    lines.append("END")
    return "\n".join(lines) + "\n"


def write_backbone_pdb(path: str | Path, coords: np.ndarray, sequence: str | None = None,
                       remarks: list[str] | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(backbone_pdb_string(coords, sequence, remarks=remarks))
    return p
