"""Protein geometry, PDB I/O, procedural backbones and the vendored dataset (issue 7).

Needs the `protein` extra (pydssp, tmtools); a missing package is an ImportError here, not a skip.
"""

from __future__ import annotations

import numpy as np
import pytest

import pydssp  # noqa: F401  (required: fail loudly when the protein extra is missing)
import tmtools  # noqa: F401

from superdiff.protein.data import classify, load_dataset
from superdiff.protein.metrics import (ca_ca_distances, clash_counts, geometry_metrics, novelty, pairwise_diversity,
                                       radius_of_gyration, secondary_structure, tm_score)
from superdiff.protein.pdb import backbone_pdb_string, check_backbone, read_backbone_segments
from superdiff.protein.procedural import beta_meander, build_backbone, dihedral, helical_hairpin, ideal_helix


def test_ideal_helix_geometry_and_dssp():
    X = ideal_helix(32)
    d = ca_ca_distances(X)[0]
    assert np.allclose(d, 3.80, atol=0.01)
    ss, h, e, cls = secondary_structure(X)
    # DSSP cannot call the two terminal residues H (no i-4 / i+4 partner): the interior is all H
    assert set(ss[0][1:-1]) == {"H"} and e[0] == 0.0 and cls[0] == "helical"
    assert clash_counts(X)[0] == 0
    # rise 1.5 A per residue: Rg of a 32-residue alpha helix is ~ 1.5 * 32 / sqrt(12) ~ 14 A
    assert 13.0 < radius_of_gyration(X)[0] < 15.5
    g = geometry_metrics(X)
    assert bool(g["valid"][0])


def test_nerf_reproduces_torsions():
    rng = np.random.default_rng(0)
    phi, psi = rng.uniform(-180, 180, 12), rng.uniform(-180, 180, 12)
    X = build_backbone(phi, psi)
    N, CA, C = X[:, 0], X[:, 1], X[:, 2]
    phi_m = dihedral(C[:-1], N[1:], CA[1:], C[1:])
    psi_m = dihedral(N[:-1], CA[:-1], C[:-1], N[1:])
    wrap = lambda a: (a + 180) % 360 - 180  # noqa: E731
    assert np.allclose(wrap(phi_m - phi[1:]), 0, atol=1e-6)
    assert np.allclose(wrap(psi_m - psi[:-1]), 0, atol=1e-6)
    assert np.allclose(np.linalg.norm(CA - N, axis=-1), 1.458)


def test_procedural_classes():
    rng = np.random.default_rng(1)
    _, _, _, cls = secondary_structure(np.stack([helical_hairpin(32, rng), beta_meander(32, rng, iters=80)]))
    assert cls.tolist() == ["helical", "strand"]


def test_clash_detected():
    X = ideal_helix(12)
    X[8] = X[2] + 0.5  # residue 8 on top of residue 2
    assert clash_counts(X)[0] > 0
    assert not geometry_metrics(X)["valid"][0]


def test_pdb_roundtrip():
    X = ideal_helix(10)
    text = backbone_pdb_string(X, "ACDEFGHIKL", remarks=["test"])
    segs = read_backbone_segments(text)
    assert len(segs) == 1 and segs[0].sequence == "ACDEFGHIKL"
    assert np.allclose(segs[0].coords, X, atol=1e-3)


def test_pdb_chain_break_splits_segments():
    X = ideal_helix(10)
    X[5:] += 20.0
    assert [len(s.sequence) for s in read_backbone_segments(backbone_pdb_string(X))] == [5, 5]


def test_bad_backbones_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[L, 4, 3\]"):
        check_backbone(np.zeros((10, 3, 3)))
    X = ideal_helix(8)
    X[3, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        geometry_metrics(X)
    with pytest.raises(ValueError, match="expected 32"):
        check_backbone(ideal_helix(10), length=32)
    with pytest.raises(ValueError, match="0 residues"):
        backbone_pdb_string(np.zeros((0, 4, 3)))


def test_classify_rules():
    assert classify([0.5, 0.0, 0.3, 0.0], [0.0, 0.5, 0.3, 0.0]).tolist() == ["helical", "strand", "mixed", "other"]


def test_tm_scores():
    X = ideal_helix(32)
    assert tm_score(X, X) == pytest.approx(1.0, abs=1e-6)
    assert novelty(X[None], [X])[0] == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(2)
    assert pairwise_diversity(np.stack([X, beta_meander(32, rng, iters=40)])) > 0.3


def test_vendored_dataset_provenance_and_classes():
    ds = load_dataset()
    assert ds.window == 32
    real = [str(s) for s in ds.seg_source if not str(s).startswith("procedural")]
    assert len(real) >= 50
    assert all("==" in s and ":" in s for s in real)  # package==version:path
    assert all(len(p) >= 4 for p, s in zip(ds.seg_pdb, ds.seg_source) if not str(s).startswith("procedural"))
    for cls in ("helical", "strand", "mixed"):
        assert len(ds.window_indices(cls, real=True)) >= 100
    assert len(ds.window_indices("mixed", real=False)) == 0  # mixed = real held-out windows only
    W = ds.windows("helical")[:20]
    assert np.allclose(W.reshape(20, -1, 3).mean(1), 0, atol=1e-9)
    # stored classes agree with pydssp on the stored (float16) coordinates
    _, _, _, cls = secondary_structure(W)
    assert (cls == "helical").all()


def test_torch_nerf_builds_on_the_device_and_dtype_of_its_torsions():
    """build_backbone_torch makes every tensor where its torsions live ("meta" stands in for a GPU:
    a tensor left on the CPU is refused there exactly as on CUDA) and matches the float64 build."""
    import torch

    from superdiff.protein.procedural import build_backbone_torch

    phi = torch.full((2, 5), -57.0, device="meta")
    X = build_backbone_torch(phi, torch.full((2, 5), -47.0, device="meta"))
    assert X.device.type == "meta" and X.shape == (2, 5, 4, 3) and X.dtype == torch.float32
    X32 = build_backbone_torch(torch.full((5,), -57.0), torch.full((5,), -47.0))
    assert X32.dtype == torch.float32
    assert np.allclose(X32.numpy(), ideal_helix(5), atol=1e-4)


def _protein_data_script():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "protein_data", Path(__file__).resolve().parents[1] / "scripts" / "protein_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, message", [
    (["--stride", "0"], "--stride must be >= 1"),
    (["--stride", "-2"], "--stride must be >= 1"),
    (["--window", "10"], "--window must be >= 11 with --procedural > 0"),
    (["--window", "0", "--procedural", "0"], "--window must be >= 1"),
    (["--procedural", "-1"], "--procedural must be >= 0"),
])
def test_protein_data_refuses_bad_flags_before_extracting(argv, message, monkeypatch, capsys, tmp_path):
    mod = _protein_data_script()

    def no_extract(*a, **k):
        raise AssertionError("the slow extraction ran before the arguments were checked")

    monkeypatch.setattr(mod, "extract", no_extract)
    with pytest.raises(SystemExit) as ex:
        mod.main(argv + ["--out", str(tmp_path / "b.npz")])
    assert ex.value.code == 2
    assert message in capsys.readouterr().err


def test_helical_hairpin_names_its_minimum_length():
    from superdiff.protein.procedural import HAIRPIN_MIN_LENGTH, helical_hairpin

    assert HAIRPIN_MIN_LENGTH == 11
    with pytest.raises(ValueError, match="a helical hairpin needs at least 11 residues, got 10"):
        helical_hairpin(10, np.random.default_rng(0))
    assert helical_hairpin(11, np.random.default_rng(0), tries=8).shape == (11, 4, 3)
