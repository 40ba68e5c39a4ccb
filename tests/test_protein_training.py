"""scripts/train_protein.py: a tiny run writes a loadable model with its card, a resumed run
continues the same run, a run with other settings refuses the old checkpoint, and the extra
procedural windows are of the model's class and cached."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _training import killed_after_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dim": 16, "depth": 1, "heads": 2}


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_protein", ROOT / "scripts" / "train_protein.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_tiny_run_writes_a_loadable_model_with_card(train, tmp_path):
    from superdiff.protein.models import load_backbone_model

    info = train.train_one("b", 3, 2, 1e-3, 0, 2, tmp_path / "work", TINY, 2.0, out_root=tmp_path / "models")
    d = tmp_path / "models" / "protein-b-strand"
    for f in ("config.json", "model.safetensors", "training_log.json", "README.md"):
        assert (d / f).is_file()
    model = load_backbone_model(d)
    assert model.config["dim"] == 16 and model.length == 32
    out = model(torch.zeros(2, 32, 4, 3), torch.tensor([10, 500]))
    assert out.shape == (2, 32, 4, 3) and torch.isfinite(out).all()
    log = json.loads((d / "training_log.json").read_text())
    assert log["steps"] == 3 and log["trained_on"] == "strand" and log["procedural_extra"] == 0
    card = (d / "README.md").read_text()
    assert info["command"] in card and "strand" in card
    # nothing was written into the shipped model directory
    assert not (tmp_path / "work" / "protein-b-strand" / "model.safetensors").exists()


def test_resume_continues_and_other_settings_are_refused(train, tmp_path, monkeypatch):
    args = ("a", 4, 2, 1e-3, 0, 2)
    train.train_one(*args, tmp_path / "w1", TINY, 2.0, out_root=tmp_path / "straight")
    # the same run killed right after its step-2 checkpoint, then started again
    killed_after_checkpoint(monkeypatch, train.torch, "save",
                            lambda: train.train_one(*args, tmp_path / "w2", TINY, 2.0, out_root=tmp_path / "resumed"))
    assert torch.load(tmp_path / "w2" / "protein-a-helix" / "ckpt.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "resumed").exists()
    train.train_one(*args, tmp_path / "w2", TINY, 2.0, out_root=tmp_path / "resumed")
    w1, w2 = _weights(tmp_path / "straight" / "protein-a-helix"), _weights(tmp_path / "resumed" / "protein-a-helix")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # a checkpoint made with other settings is refused, not silently mixed in
    for other, key in [(("a", 5, 2, 1e-3, 0, 2), "steps"), (("a", 4, 2, 1e-3, 1, 2), "seed"),
                       (("a", 4, 3, 1e-3, 0, 2), "batch"), (("a", 4, 2, 5e-1, 0, 2), "lr")]:
        with pytest.raises(SystemExit, match=rf"other settings \({key} differ\)"):
            train.train_one(*other, tmp_path / "w1", TINY, 2.0, out_root=tmp_path / "other")
    with pytest.raises(SystemExit, match=r"other settings \(extra differ\)"):
        train.train_one(*args, tmp_path / "w1", TINY, 2.0, extra=3, out_root=tmp_path / "other")


def test_extra_procedural_windows_have_the_class_and_are_cached(train, tmp_path):
    from superdiff.protein.metrics import secondary_structure

    cache = tmp_path / "extra.npy"
    X = train.procedural_extra("a", 3, 32, 0, cache)
    assert X.shape == (3, 32, 4, 3) and cache.is_file()
    assert np.allclose(X.reshape(3, -1, 3).mean(1), 0, atol=1e-4)  # centred
    assert list(secondary_structure(X.astype(np.float64))[3]) == ["helical"] * 3
    again = train.procedural_extra("a", 3, 32, 0, cache)
    assert np.array_equal(X, again)


def test_extra_window_cache_of_another_length_is_rebuilt_not_reused(train, tmp_path, monkeypatch):
    from superdiff.protein import procedural

    # ideal helices instead of the (slow) hairpin search: the cache logic is what is tested
    monkeypatch.setattr(procedural, "helical_hairpin", lambda L, rng: procedural.ideal_helix(L))
    cache = tmp_path / "extra.npy"
    short = train.procedural_extra("a", 2, 16, 0, cache)
    assert short.shape == (2, 16, 4, 3)
    longer = train.procedural_extra("a", 2, 20, 0, cache)  # same count and seed, other window length
    assert longer.shape == (2, 20, 4, 3)
    assert np.load(cache).shape == (2, 20, 4, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["extra.npy"]  # written in place of a temporary file


def test_resumed_run_keeps_the_same_loss_curve(train, tmp_path, monkeypatch):
    """A checkpoint between two loss-curve points carries the losses since the last point, so the
    resumed run's curve (and the card's final loss) equals the uninterrupted run's."""
    monkeypatch.setattr(train, "LOG_EVERY", 3)
    args = ("a", 6, 2, 1e-3, 0, 2)  # checkpoints at steps 2, 4, 6; loss-curve points at 3, 6
    straight = train.train_one(*args, tmp_path / "w1", TINY, 2.0, out_root=tmp_path / "straight")
    killed_after_checkpoint(monkeypatch, train.torch, "save",
                            lambda: train.train_one(*args, tmp_path / "w2", TINY, 2.0, out_root=tmp_path / "resumed"))
    resumed = train.train_one(*args, tmp_path / "w2", TINY, 2.0, out_root=tmp_path / "resumed")
    assert [p["step"] for p in straight["loss_log"]] == [3, 6]
    assert resumed["loss_log"] == straight["loss_log"]
    assert resumed["final_loss"] == straight["final_loss"]


def test_card_command_reproduces_the_run_settings(train, tmp_path, monkeypatch):
    """The model card's `Reproduce` command, parsed by the script itself, asks for the same
    training run (lr, dim and depth included)."""
    import shlex

    info = train.train_one("b", 2, 2, 5e-4, 3, 2, tmp_path / "work", {"dim": 24, "depth": 1}, 1.5,
                           out_root=tmp_path / "models")
    calls = []
    monkeypatch.setattr(train, "train_one", lambda *a: calls.append(a))
    argv = shlex.split(info["command"])
    assert argv[:2] == ["python", "scripts/train_protein.py"]
    assert train.main(argv[2:]) == 0
    which, steps, batch, lr, seed, _ckpt, _work, config, t_power, extra, _out = calls[0]
    assert (which, steps, batch, lr, seed, t_power, extra) == ("b", 2, 2, 5e-4, 3, 1.5, 0)
    assert config == {"dim": 24, "depth": 1}


def test_cards_only_rewrites_the_cards_under_out_root(train, tmp_path):
    from superdiff.protein.models import bundled_protein_model_path

    train.train_one("b", 2, 2, 1e-3, 0, 2, tmp_path / "work", TINY, 2.0, out_root=tmp_path / "models")
    card = tmp_path / "models" / "protein-b-strand" / "README.md"
    expected = card.read_text()
    card.write_text("stale card\n")
    shipped = bundled_protein_model_path("protein-b-strand") / "README.md"
    shipped_before = shipped.read_bytes()
    assert train.main(["--which", "b", "--cards-only", "--out-root", str(tmp_path / "models")]) == 0
    assert card.read_text() == expected
    assert shipped.read_bytes() == shipped_before  # the shipped card is not touched


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--ckpt-every", "--procedural-extra", "--lr"])
def test_bad_counts_are_refused_by_name_before_training(train, flag, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "train_one", lambda *a: calls.append(a))
    value = "-1" if flag in ("--procedural-extra", "--lr") else "0"
    with pytest.raises(SystemExit) as exc:
        train.main(["--which", "a", flag, value])
    assert exc.value.code == 2 and flag in capsys.readouterr().err and not calls


def test_the_documented_loss_is_the_mean_over_the_12L_coordinates(train):
    """The shipped weights were trained with mean((P eps_theta - P eps)^2) over B x L x 4 x 3
    entries: the model docstring and the script say / (12 L), not / d = 3(4L - 1)."""
    import superdiff.protein.models as models

    assert "P eps ||^2 / (12 L)" in models.__doc__ and "P eps ||^2 / d " not in models.__doc__
    assert "P eps ||^2 / (12 L)" in train.__doc__
    B, L = 3, 5
    g = torch.Generator().manual_seed(0)
    pred, eps = models.center(torch.randn(B, L, 4, 3, generator=g)), models.center(torch.randn(B, L, 4, 3, generator=g))
    loss = (pred - eps).pow(2).mean()  # as in train_one
    assert torch.allclose(loss, ((pred - eps) ** 2).sum((1, 2, 3)).div(12 * L).mean())
