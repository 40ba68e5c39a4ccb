"""The flow-matching training of shapes-flow (superdiff.shapes.flow, scripts/train_shapes_flow.py):
the training-time conditioning is the stock SD3 pipeline's, one tied zero token computes exactly
what the pipeline's 256 zero T5 tokens compute, and a tiny run exports a loadable SD3 directory,
resumes bit for bit and refuses other settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from superdiff.schedules import RectifiedFlow
from _training import killed_after_checkpoint
from superdiff.shapes.flow import (
    TiedTokenJointAttnProcessor,
    clip_prompt_embeds,
    flow_pair,
    training_times,
    with_tied_zero_token,
)
from superdiff.shapes.models import FLOW_T5_TOKENS, make_flow_transformer

ROOT = Path(__file__).resolve().parents[1]
VAE = ROOT / "superdiff" / "bundled" / "shapes-t2i" / "vae"
TINY = ["--steps", "4", "--dataset-size", "24", "--batch", "4", "--ckpt-every", "2", "--log-every", "2", "--vae", str(VAE)]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_shapes_flow", ROOT / "scripts" / "train_shapes_flow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flow_pair_is_the_rectified_flow_interpolant_and_its_velocity():
    x0, eps = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    xt, v = flow_pair(RectifiedFlow(shift=3.0), x0, eps, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - tt) * x0 + tt * eps)
    torch.testing.assert_close(v, eps - x0)


def test_training_times_follow_the_shifted_logit_normal():
    t = training_times(20000, 3.0, torch.Generator().manual_seed(0)).double()
    assert 0 < t.min() and t.max() < 1
    u = t / (3.0 - 2.0 * t)  # inverse of the shift s u / (1 + (s - 1) u)
    z = torch.logit(u)
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    # the median of u is 1/2, so the median of t is the shifted 1/2: 3/4
    assert abs(t.median() - 0.75) < 0.01


def test_one_tied_zero_token_equals_the_pipelines_256_zero_tokens():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    torch.manual_seed(0)
    model = make_flow_transformer().eval()
    with torch.no_grad():  # leave the zero-initialised adaLN gates: make every path count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, clip, pooled = torch.randn(3, 4, 8, 8), torch.randn(3, 16, 128), torch.randn(3, 128)
    t = torch.tensor([999.0, 500.0, 3.0])
    stock = torch.cat([clip, torch.zeros(3, FLOW_T5_TOKENS, 128)], dim=1)
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=stock, pooled_projections=pooled, timestep=t).sample
        model.set_attn_processor(TiedTokenJointAttnProcessor(FLOW_T5_TOKENS))
        tied = model(x, encoder_hidden_states=with_tied_zero_token(clip), pooled_projections=pooled, timestep=t).sample
        model.set_attn_processor(JointAttnProcessor2_0())
        untied = model(x, encoder_hidden_states=with_tied_zero_token(clip), pooled_projections=pooled, timestep=t).sample
    torch.testing.assert_close(tied, ref, atol=1e-5, rtol=1e-5)
    assert (untied - ref).abs().max() > 1e-2  # the log-multiplicity is what makes them agree
    with pytest.raises(ValueError, match="multiplicity"):
        TiedTokenJointAttnProcessor(0)


def test_tiny_run_exports_an_sd3_pipeline_whose_prompts_encode_like_training(train, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "shapes-flow"
    train.main([*TINY, "--workdir", str(tmp_path / "work"), "--out", str(out)])
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    info = json.loads((out / "training.json").read_text())
    assert info["steps_trained"] == 4 and info["layout"] == "sd3" and info["max_sequence_length"] == FLOW_T5_TOKENS
    for sub in ("tokenizer", "tokenizer_2"):
        assert (out / sub / "vocab.json").is_file() and (out / sub / "merges.txt").is_file()

    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.scheduler.config.shift == 3.0
    prompt = "a circle and something red"
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer_max_length, return_tensors="pt").input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids[0, 3:4].tolist()) == ["and</w>"]
    with torch.no_grad():
        seq, pooled_train = clip_prompt_embeds([pipe.text_encoder, pipe.text_encoder_2], ids, 128)
    assert embeds.shape == (1, seq.shape[1] + FLOW_T5_TOKENS, 128)
    torch.testing.assert_close(embeds[:, : seq.shape[1]], seq)
    assert embeds[:, seq.shape[1]:].abs().max() == 0
    torch.testing.assert_close(pooled, pooled_train)


def test_resume_is_bit_identical_and_other_settings_are_refused(train, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    weights = "transformer/diffusion_pytorch_model.safetensors"
    train.main([*TINY, "--workdir", str(tmp_path / "w1"), "--out", str(tmp_path / "straight")])
    killed_after_checkpoint(monkeypatch, train.Run, "save",  # killed after the step-2 checkpoint
                            lambda: train.main([*TINY, "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "resumed")]))
    assert torch.load(tmp_path / "w2" / "checkpoint.pt", weights_only=False)["step"] == 2
    train.main([*TINY, "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "resumed")])
    a, b = load_file(str(tmp_path / "straight" / weights)), load_file(str(tmp_path / "resumed" / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "w2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]

    with pytest.raises(SystemExit, match="other settings.*'lr'"):
        train.main([*TINY, "--lr", "1e-3", "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "other")])


def test_a_run_shorter_than_one_log_interval_still_exports(train, tmp_path):
    out = tmp_path / "out"
    train.main([*TINY, "--log-every", "100", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    assert json.loads((out / "training.json").read_text())["steps_trained"] == 4
    assert (out / "train_log.jsonl").read_text() == ""  # no step was logged


def test_export_only_describes_the_trained_run_and_keeps_the_previous_export_on_failure(train, tmp_path, monkeypatch):
    work, out = tmp_path / "w", tmp_path / "out"
    train.main([*TINY, "--captions", "single", "--workdir", str(work), "--out", str(out)])
    caches = sorted(p.name for p in work.glob("latents-*"))

    # an export with the command's defaults records the settings the weights were trained with
    train.main(["--export-only", "--vae", str(VAE), "--workdir", str(work), "--out", str(out)])
    info = json.loads((out / "training.json").read_text())
    hp = info["hyperparameters"]
    assert (hp["steps"], hp["batch"], hp["dataset_size"], hp["captions"]) == (4, 4, 24, "single")
    assert info["data"]["training_images"] == 24 and info["steps_trained"] == 4
    assert sorted(p.name for p in work.glob("latents-*")) == caches  # no training set rendered to export

    # an export that fails half-way leaves the previous export whole, and no half-written one beside it
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(train, "write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        train.main(["--export-only", "--vae", str(VAE), "--workdir", str(work), "--out", str(out)])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "w"]
