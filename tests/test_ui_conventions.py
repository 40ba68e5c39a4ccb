"""The studio fitted to A1111 / ComfyUI / diffusers habits (issue 14), below the browser:
seed -1, A1111's AND syntax in a prompt row, one-expert AND refused, the wait queue that
Cancel can withdraw from, the model picker listing only loadable folders, trace plots
titled per image, the compare grid as one PNG with metadata, the named scripted API
(gradio_client) and the server leaving no temporary folder behind.
(The same behaviours in a real browser: tests/test_ui_browser.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from superdiff.compose import DEFAULT_COMPOSITION, Composition, ModelCache, read_png_composition
from superdiff.ui import handlers as H

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def form(**kw):
    f = H.form_from_composition(DEFAULT_COMPOSITION)
    f.update(kw)
    return f


def test_seed_minus_one_draws_a_seed_and_says_which():
    c, notes = H.parse_form(form(seed=-1))
    assert 0 <= c.seed < 2**32 and f"seed -1 drew seed {c.seed}" in notes
    c2, _ = H.parse_form(form(seed=-1))
    assert c2.seed != c.seed or c2.seed != H.parse_form(form(seed=-1))[0].seed  # random, not a constant
    assert H.parse_form(form(seed=5))[0].seed == 5


def test_a1111_and_syntax_in_one_prompt_row():
    c, _ = H.parse_form(form(prompts=["a circle AND something red:2", ""], operator="or"))
    assert c.prompts == ["a circle", "something red"] and c.weights == [1.0, 2.0]
    c, _ = H.parse_form(form(prompts=["a circle AND something red", ""], operator="and"))
    assert c.prompts == ["a circle", "something red"] and c.operator == "and"
    with pytest.raises(ValueError, match="operator 'and' takes none"):
        H.parse_form(form(prompts=["a circle AND something red:2", ""], operator="and"))
    with pytest.raises(ValueError, match="in a single prompt row"):
        H.parse_form(form(prompts=["a AND b", "c"], operator="and"))


def test_and_with_one_expert_is_refused_and_single_says_what_it_ignores():
    c, _ = H.parse_form(form(prompts=["a circle", ""], operator="and"))
    with pytest.raises(ValueError) as e:
        H.check_experts(c)
    assert H.error_message(e.value).startswith("Prompts: AND composes two or more experts, got 1")
    c, _ = H.parse_form(form(operator="single", single_expert=2))
    assert H.check_experts(c) == ["operator single samples expert 2 ('something red') alone; the other 1 "
                                  "expert(s) are not used (single_index picks another)"]


def test_job_queue_positions_and_withdrawal():
    q = H.JobQueue(slots=1)
    assert q.request("a") is None and q.begin("a")  # a free slot: runs at once
    assert q.request("b") == 1 and q.request("c") == 2 and q.request("b") == 1
    assert q.withdraw("b") and not q.withdraw("b") and q.position("c") == 1
    q.end("a")
    assert not q.begin("b")  # withdrawn: skipped when its turn comes
    assert q.begin("c") and q.request("c") is None  # running: not queued again
    assert not q.withdraw("c")  # running jobs are cancelled through CancelRegistry, not withdrawn


def _fake(d: Path, weights: str | None) -> Path:
    (d / "unet").mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                    "unet": ["diffusers", "UNet2DConditionModel"],
                                                    "text_encoder": ["transformers", "CLIPTextModel"]}))
    if weights:
        (d / "unet" / weights).write_bytes(b"x")
    return d


def test_model_picker_lists_only_what_can_load(tmp_path):
    root = tmp_path / "models"
    good = _fake(root / "good", "diffusion_pytorch_model.safetensors")
    pickled = _fake(root / "pickled", "diffusion_pytorch_model.bin")
    outside = _fake(tmp_path / "outside", "diffusion_pytorch_model.safetensors")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "inner").symlink_to(good, target_is_directory=True)  # a link that stays inside is fine
    choices = H.model_choices([root])
    assert str(good.resolve()) in choices and str(root / "inner") in choices
    assert not any("pickled" in c or "escape" in c for c in choices), choices
    cache = ModelCache(allow_roots=[root], allow_hub=False)
    msg = H.describe_model(str(pickled), cache)
    assert "only .bin weights" in msg and "only safetensors are loaded" in msg, msg


def test_trace_plot_is_titled_per_image_with_the_legend_below(tmp_path):
    cache = ModelCache(allow_roots=[], allow_hub=False)
    long = "a very long prompt about a circle that would cover the curves of the plot"
    comp = DEFAULT_COMPOSITION.replace(prompts=[long, "something red"], steps=2, seed=3)
    items = list(H.run_jobs([("AND", comp)], cache, tmp_path))[-1]
    fig = H.trace_figure(items[0])
    texts = [t.get_text() for t in fig.texts]
    assert fig._suptitle.get_text() == "AND \u00b7 seed 3"
    assert all(ax.get_title() != "sample 0" for ax in fig.axes)
    legend = fig.legends[0]
    names = [t.get_text() for t in legend.get_texts()]
    assert names[1] == "something red" and names[0].endswith("\u2026") and len(names[0]) <= 28, (names, texts)
    assert all(ax.get_legend() is None for ax in fig.axes)  # no legend on top of the curves
    assert fig.axes[1].get_title() == "log q - mean over experts"
    # one expert (operator single: the others' log q is not tracked): relative to step 0, and said so
    one = list(H.run_jobs([("single", comp.replace(operator="single"))], cache, tmp_path / "one"))[-1]
    fig = H.trace_figure(one[0])
    assert fig.axes[1].get_title() == "log q - log q at step 0"
    assert "(not tracked)" in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    # after "Compare methods" the first trace shown is a SuperDiff one (OR / AND), not the flat joint prompt
    jobs = H.compare_methods(comp)
    fake = [H.ResultItem(label, label, items[0].path, c.image_record(0)) for label, c in jobs]
    assert H.pick_trace_item(fake).method == "OR"
    # the compare grid: one PNG, methods x seeds, with the base composition and every tile's record
    grid = H.compare_grid(fake + [H.ResultItem("AND", "AND", items[0].path, comp.replace(seed=4))],
                          tmp_path / "grid.png", comp)
    assert read_png_composition(grid) == comp
    with Image.open(grid) as im:
        tiles = json.loads(im.text["superdiff_grid"])
        w, h = im.size
    assert [t["method"] for t in tiles][:4] == ["joint prompt", "average", "OR", "AND"]
    assert w > 2 * 128 and h > 4 * 128  # 2 seed columns (+ row labels), 4 method rows (+ headers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scripted_call_through_gradio_client_with_named_inputs(tmp_path):
    """The call documented in docs/studio.md."""
    from gradio_client import Client

    from superdiff.ui.app import Studio, build_app, launch

    app = build_app(Studio(allow_roots=[], allow_hub=False, out_root=tmp_path))
    port = _free_port()
    launch(app, port=port, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
        names = [p["parameter_name"] for p in info["parameters"]]
        assert names == list(H.API_NAMES) and not any(n.startswith("param_") for n in names)
        images, status, *_ = client.predict(prompt_1="a circle", prompt_2="something red", operator="and",
                                            steps=2, num_images=1, seed=-1, sampler="ddpm", api_name="/generate")
        assert status.startswith("Done: 1 image(s) (AND, 2 steps, seed ") and "seed -1 drew seed" in status
        rec = read_png_composition(images[0]["image"])
        assert rec.prompts == ["a circle", "something red"] and f"seed {rec.seed})" in status
    finally:
        app.close()


def test_stopping_the_server_removes_its_temporary_folders(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "superdiff", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        studio_dirs = list(tmp_path.glob("superdiff-studio-*"))
        assert len(studio_dirs) == 1, list(tmp_path.iterdir())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "temporary files removed" in out
    assert not studio_dirs[0].exists() and not list(tmp_path.glob("superdiff-studio-*"))


def test_applying_settings_without_a_guidance_scale_keeps_the_models_default(tmp_path):
    """A composition without guidance_scale (the page's own initial Settings JSON, a hand-written
    --config) means the model's default; the slider cannot hold None and showed 0, so Generate
    after "Apply JSON" drew with guidance 0 instead of the default."""
    from superdiff.ui.app import Studio, build_app

    app = build_app(Studio(allow_roots=[], allow_hub=False, out_root=tmp_path))
    apply = next(f for f in app.fns.values() if f.name == "apply_json")
    assert DEFAULT_COMPOSITION.guidance_scale is None
    out = apply.fn(H.settings_json(DEFAULT_COMPOSITION))
    slider = next(c for c in apply.outputs if getattr(c, "elem_id", None) == "guidance")
    value = out[apply.outputs.index(slider)]
    assert slider.postprocess(value) == H.model_defaults("shapes-t2i", app.studio.cache)[0] == 4.0
    out = apply.fn(H.settings_json(DEFAULT_COMPOSITION.replace(guidance_scale=2.5)))  # a recorded scale is kept
    assert slider.postprocess(out[apply.outputs.index(slider)]) == 2.5
