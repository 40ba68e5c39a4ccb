"""The SuperDiff studio: a Gradio page to compose prompts or models with OR / AND (and the
baselines), watch kappa and log q per expert, compare methods on one seed, and download
PNGs that carry their parameters.

`build_app(...)` returns the `gr.Blocks`; `launch(app, ...)` serves it (offline: no share
link, no analytics, local fonts). The logic lives in `ui/handlers.py`.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from superdiff.compose import DEFAULT_COMPOSITION, Composition  # noqa: E402
from superdiff.model_loading import ModelCache  # noqa: E402

from . import handlers as H  # noqa: E402

log = logging.getLogger("superdiff.ui")

__all__ = ["build_app", "launch", "CSS", "Studio"]

CSS = """
#results-gallery img, #trace-plot img { image-rendering: pixelated; }
#results-gallery img { image-rendering: pixelated; }
#results-gallery .caption-label { white-space: normal; overflow: visible; text-overflow: clip; max-width: 100%; }
.prompt-row { align-items: end; }
footer { display: none !important; }
"""

#: Ctrl+Enter (Cmd+Enter) starts Generate from anywhere on the page, as in A1111
JS = """
() => {
  document.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') {
      const b = document.querySelector('#generate');
      if (b) { e.preventDefault(); b.click(); }
    }
  });
}
"""

MAX_STEPS = 200
MAX_IMAGES = 8


class Studio:
    """Server-side state shared by all sessions: the model cache (models are loaded once), the
    allow-listed model folders, cancel flags and the output folders."""

    def __init__(self, cache: ModelCache | None = None, *, allow_roots: Sequence[str | os.PathLike] | None = None,
                 allow_hub: bool = True, max_models: int = 2, out_root: str | os.PathLike | None = None,
                 max_steps: int = MAX_STEPS, max_images: int = MAX_IMAGES) -> None:
        roots = H.default_allow_roots() if allow_roots is None else [Path(r).resolve() for r in allow_roots]
        # never None: an empty allow-list means "bundled models only", never "any path"
        self.cache = cache or ModelCache(max_models=max_models, allow_roots=roots, allow_hub=allow_hub)
        if self.cache.allow_roots is None:
            self.cache.allow_roots = roots
        self.allow_roots = list(self.cache.allow_roots)
        self.allow_hub = self.cache.allow_hub
        self.cancels = H.CancelRegistry()
        self.queue = H.JobQueue(1)
        self.outputs = H.OutputDirs(out_root)
        # uploaded LoRAs (safetensors only) live beside the outputs and may be loaded like allowed files
        self.lora_dir = (self.outputs.root / "loras").resolve()
        self.lora_dir.mkdir(parents=True, exist_ok=True)
        self.cache.allow_roots = [*self.cache.allow_roots, self.lora_dir]
        self.max_steps = max_steps
        self.max_images = max_images

    def model_choices(self) -> list[str]:
        return H.model_choices(self.allow_roots)

    def lora_choices(self) -> list[tuple[str, str]]:
        return H.lora_choices(self.lora_dir)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def build_app(studio: Studio | None = None, *, default: Composition = DEFAULT_COMPOSITION,
              max_concurrency: int = 1, max_queue: int = 16, **studio_kwargs: Any) -> gr.Blocks:
    """The studio page. `studio_kwargs` (allow_roots, allow_hub, max_models, ...) build a
    Studio when none is given. The queue runs at most `max_concurrency` jobs at once and
    holds at most `max_queue` waiting ones."""
    studio = studio or Studio(**studio_kwargs)
    studio.queue.slots = max(1, int(max_concurrency))
    form0 = H.form_from_composition(default)
    models = studio.model_choices()
    if default.model not in models:
        models = [default.model, *models]

    # Gradio's own file cache (what it serves to browsers) is swept hourly of files older than a day
    with gr.Blocks(title="SuperDiff studio", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown("## SuperDiff studio\nCompose prompts or models at sampling time. **AND** finds images all "
                    "experts find likely; **OR** follows whichever fits best. The plots show each expert's weight "
                    "(kappa) and log-density (log q) over the steps.")
        # the number of prompt rows shown: a hidden field (not gr.State) so API calls can set it
        rows_state = gr.Number(form0["rows"], visible=False, precision=0, elem_id="prompt-rows")
        # the sha256 recorded for the adapters of imported settings (hidden; Generate checks the files)
        lora_sha256 = gr.Textbox(form0["lora_sha256"], visible=False, elem_id="lora-sha256")
        # the names imported settings give their adapter files (hidden; the run keeps them)
        lora_names = gr.Textbox(form0["lora_names"], visible=False, elem_id="lora-names")
        results_state = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=360):
                with gr.Row():
                    model = gr.Dropdown(models, value=default.model, label="Model", allow_custom_value=True,
                                        scale=3, elem_id="model",
                                        info="bundled name, a folder under the allowed roots"
                                             + (", or a hub id" if studio.allow_hub else ""))
                    extra_models = gr.Dropdown(models, value=form0["extra_models"], multiselect=True,
                                               allow_custom_value=True, label="Extra models", scale=2,
                                               info="more checkpoints, one expert each")
                model_info = gr.Markdown(H.describe_model(default.model, studio.cache), elem_id="model-info")
                gr.Markdown("**Prompts** (one expert each) with optional weight (OR, average) or bias (OR), and "
                            "optionally a LoRA per row: the row's expert is the model with that adapter (or write "
                            "A1111's `<lora:name:0.8>` in the prompt); once a row has a LoRA, rows without one are "
                            "the base model")
                prompt_rows, prompts, weights, biases, loras, lora_scales = [], [], [], [], [], []
                lora_opts = studio.lora_choices()
                for i in range(H.MAX_PROMPTS):
                    with gr.Row(visible=i < form0["rows"], elem_classes=["prompt-row"]) as row:
                        prompts.append(gr.Textbox(form0["prompts"][i], label=f"Prompt {i + 1}", scale=6,
                                                  elem_id=f"prompt-{i + 1}", max_lines=1))
                        weights.append(gr.Textbox(form0["weights"][i], label="weight", scale=1, min_width=70,
                                                  placeholder="auto", max_lines=1, elem_id=f"weight-{i + 1}"))
                        biases.append(gr.Textbox(form0["biases"][i], label="bias", scale=1, min_width=70,
                                                 placeholder="0", max_lines=1, elem_id=f"bias-{i + 1}"))
                        loras.append(gr.Dropdown(lora_opts, value=form0["loras"][i], label="LoRA", scale=2,
                                                 min_width=110, allow_custom_value=True, elem_id=f"lora-{i + 1}"))
                        lora_scales.append(gr.Number(form0["lora_scales"][i], label="LoRA scale", scale=1,
                                                     min_width=70, placeholder="1", elem_id=f"lora-scale-{i + 1}"))
                    prompt_rows.append(row)
                with gr.Row():
                    add_btn = gr.Button("+ Add prompt", size="sm", elem_id="add-prompt")
                    remove_btn = gr.Button("\u2212 Remove prompt", size="sm", elem_id="remove-prompt")
                    lora_upload = gr.UploadButton("Upload LoRA (.safetensors)", file_types=[".safetensors"],
                                                  size="sm", elem_id="lora-upload")
                lora_msg = gr.Markdown("", elem_id="lora-msg")
                with gr.Accordion("Formula and correctors", open=False):
                    compose = gr.Textbox(form0["compose"], label="Formula (replaces the prompts and the operator)",
                                         placeholder='("a circle" & "something red") | "a square":0.5',
                                         max_lines=2, elem_id="compose",
                                         info="& AND, | OR, ~ NOT (relative to the unconditional prompt), "
                                              ":weight; docs/correctors.md")
                    with gr.Row():
                        and_mode = gr.Radio(["superdiff", "product"], value=form0["and_mode"], label="& means",
                                            info="superdiff: equal density; product: the product (exact with smc)")
                        corrector = gr.Textbox(form0["corrector"], label="Corrector", max_lines=1,
                                               placeholder="none, smc:4, ula, smc:8+hmc", elem_id="corrector",
                                               info="particles per image and/or MCMC moves per step")
                    formula_view = gr.Markdown(H.formula_tree(form0["compose"], form0["and_mode"]),
                                               elem_id="formula-tree")
                operator = gr.Radio([(v, k) for k, v in H.OPERATOR_LABELS.items()], value=default.operator,
                                    label="Operator", elem_id="operator")
                with gr.Group(visible=default.operator == "or") as or_group:
                    temperature = gr.Textbox(form0["temperature"], label="OR temperature",
                                             placeholder="1 (default)", max_lines=1,
                                             info="1 samples the mixture; inf: each image follows one expert; 0: "
                                                  "plain averaging")
                with gr.Group(visible=default.operator == "and") as and_group:
                    with gr.Row():
                        lift = gr.Textbox(form0["lift"], label="AND lift", placeholder="0", max_lines=1,
                                          info="target log q1 - log q2 (two experts)")
                        clamp_mode = gr.Radio(["default", "custom", "off"], value=form0["clamp_mode"],
                                              label="kappa clamp", info="default [-1, 2]")
                        clamp_lo = gr.Number(form0["clamp_lo"], label="clamp lo", min_width=80)
                        clamp_hi = gr.Number(form0["clamp_hi"], label="clamp hi", min_width=80)
                with gr.Group(visible=default.operator == "single") as single_group:
                    single_expert = gr.Number(form0["single_expert"], label="Expert number", precision=0,
                                              minimum=1, maximum=H.MAX_PROMPTS + 4)
                with gr.Group(visible=default.operator == "joint") as joint_group:
                    joint_template = gr.Textbox(form0["joint_template"], label="Joint prompt template",
                                                placeholder="{0} and {1}   (default: the prompts joined by 'and')",
                                                max_lines=1)
                with gr.Group(visible=default.operator == "switch") as switch_group:
                    switch_every = gr.Number(form0["switch_every"], label="Switch every (steps)", precision=0,
                                             minimum=1, elem_id="switch-every",
                                             info="the adapter driving the step changes every this many steps")
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        # plain numbers, not sliders: an out-of-range value is refused with a message
                        # instead of being clamped in the browser without a word
                        steps = gr.Number(default.steps, label=f"Steps (1-{studio.max_steps})", precision=0,
                                          elem_id="steps")
                        guidance = gr.Slider(0, H.GUIDANCE_MAX, value=default.guidance_scale if default.guidance_scale is not None
                                             else (H.model_defaults(default.model, studio.cache)[0] or 4.0),
                                             step=0.5, label="Guidance scale", elem_id="guidance")
                    with gr.Row():
                        seed = gr.Number(default.seed, label="Seed (-1: random)", precision=0, elem_id="seed")
                        dice = gr.Button("random seed", size="sm", scale=0, min_width=60)
                        num_images = gr.Number(default.num_images, label=f"Images (1-{studio.max_images})",
                                               precision=0, elem_id="num-images")
                    with gr.Row():
                        sampler = gr.Dropdown(list(H.SAMPLER_UI_CHOICES), value=default.sampler, label="Sampler",
                                              elem_id="sampler", info="ddpm works well with few steps")
                        estimator = gr.Dropdown(list(H.ESTIMATOR_UI_CHOICES), value=form0["estimator"],
                                                label="log q estimator", info="auto: the sampler's default")
                    negative_prompt = gr.Textbox(form0["negative_prompt"], label="Negative prompt", max_lines=1)
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        height = gr.Textbox(form0["height"], label="Height", placeholder="the model's",
                                            max_lines=1)
                        width = gr.Textbox(form0["width"], label="Width", placeholder="the model's", max_lines=1)
                        dtype = gr.Dropdown(list(H.DTYPE_UI_CHOICES), value=default.dtype, label="Precision",
                                            info="float16/bfloat16 need a GPU")
                with gr.Accordion("Settings JSON (export / import)", open=False):
                    settings_code = gr.Code(H.settings_json(default), language="json", label="Composition",
                                            interactive=True, elem_id="settings-json")
                    with gr.Row():
                        export_btn = gr.Button("Export current settings", size="sm")
                        apply_btn = gr.Button("Apply JSON above", size="sm")
                        import_btn = gr.UploadButton("Import .json or .png", file_types=[".json", ".png"],
                                                     size="sm", elem_id="settings-import")
                    settings_msg = gr.Markdown("", elem_id="settings-msg")
                    settings_file = gr.File(label="settings file", visible=False, interactive=False)
            with gr.Column(scale=6, min_width=360):
                # at the top of the page (visible without scrolling at 1920x1080); Ctrl+Enter = Generate
                with gr.Row():
                    run_btn = gr.Button("Generate (Ctrl+Enter)", variant="primary", elem_id="generate")
                    compare_btn = gr.Button("Compare methods", elem_id="compare")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Markdown("Ready.", elem_id="status", label="status")
                gallery = gr.Gallery(label="Images", columns=4, height="auto", object_fit="contain",
                                     format="png", elem_id="results-gallery", interactive=False)
                trace_pick = gr.Dropdown([], label="Trace of image (or click an image)", elem_id="trace-pick",
                                         info="kappa (the weight of each expert) and log q (its log-density, "
                                              "relative to the experts' mean, or to its start for a lone expert) over the steps")
                trace_plot = gr.Image(label="trace", show_label=False, type="filepath", format="png",
                                      interactive=False, elem_id="trace-plot")
                files = gr.File(label="Downloads: PNGs with embedded parameters, and everything as a zip",
                                file_count="multiple", interactive=False, elem_id="downloads")

        # the form, in handlers.FORM_SCALARS order, then prompts, weights, biases
        scalar_components = {
            "model": model, "extra_models": extra_models, "rows": rows_state, "operator": operator,
            "temperature": temperature, "lift": lift, "clamp_mode": clamp_mode, "clamp_lo": clamp_lo,
            "clamp_hi": clamp_hi, "single_expert": single_expert, "joint_template": joint_template,
            "switch_every": switch_every, "estimator": estimator, "sampler": sampler, "steps": steps,
            "guidance_scale": guidance, "negative_prompt": negative_prompt, "seed": seed, "num_images": num_images,
            "height": height, "width": width, "dtype": dtype, "compose": compose, "and_mode": and_mode,
            "corrector": corrector, "lora_sha256": lora_sha256, "lora_names": lora_names,
        }
        assert tuple(scalar_components) == H.FORM_SCALARS
        form_components = [*scalar_components.values(), *prompts, *weights, *biases, *loras, *lora_scales]
        # the scripted API (gradio_client): every input under its own name (H.API_NAMES)
        api_inputs = dict(zip(H.API_NAMES, form_components))
        op_groups = [or_group, and_group, single_group, joint_group, switch_group]

        def read_form(data: dict) -> dict[str, Any]:
            return H.form_from_values([data[c] for c in form_components])

        def read_named(named: dict[str, Any]) -> dict[str, Any]:
            return H.form_from_values([named[n] for n in H.API_NAMES])

        def op_visibility(op: str) -> list[Any]:
            return [gr.update(visible=op == name) for name in ("or", "and", "single", "joint", "switch")]

        def row_visibility(n: int) -> list[Any]:
            return [gr.update(visible=i < n) for i in range(H.MAX_PROMPTS)]

        # ---- form behaviour ----------------------------------------------------------------
        ui_only: dict[str, Any] = {"queue": False, "show_progress": "hidden", "api_visibility": "undocumented"}
        operator.change(op_visibility, operator, op_groups, **ui_only)
        for box in (compose, and_mode):  # the parsed tree of the formula, or where it fails to parse
            box.change(H.formula_tree, [compose, and_mode], formula_view, **ui_only)

        def add_row(n: int) -> list[Any]:
            n = min(H.MAX_PROMPTS, int(n or 2) + 1)
            return [n, *row_visibility(n)]

        def remove_row(n: int) -> list[Any]:
            n = max(H.MIN_PROMPTS, int(n or 2) - 1)
            return [n, *row_visibility(n)]

        add_btn.click(add_row, rows_state, [rows_state, *prompt_rows], **ui_only)
        remove_btn.click(remove_row, rows_state, [rows_state, *prompt_rows], **ui_only)
        dice.click(lambda: random.randrange(0, 2**31 - 1), None, seed, **ui_only)

        def upload_lora(path: str | None) -> list[Any]:
            """A LoRA file for the rows' pickers: stored when it is a safetensors LoRA, refused otherwise."""
            try:
                stored = H.store_lora_upload(path, studio.lora_dir)
            except Exception as e:  # noqa: BLE001
                text = H.error_message(e)
                gr.Warning(text)
                return [f"**Error:** {text}"] + [gr.skip()] * len(loras)
            opts = studio.lora_choices()
            return [f"LoRA `{Path(stored).stem}` uploaded: pick it in a prompt row."] + \
                [gr.update(choices=opts) for _ in loras]

        lora_upload.upload(upload_lora, lora_upload, [lora_msg, *loras], **ui_only)

        def on_model(name: str, extras: list[str] | None) -> list[Any]:
            try:
                unconditional = H.model_kind(name or "", studio.cache) == "unet2d"
            except Exception:  # noqa: BLE001  (describe_model says what is wrong)
                unconditional = False
            # an unconditional model takes no prompts: clear the rows instead of failing at Generate
            cleared = [gr.update(value="") if unconditional else gr.skip() for _ in prompts]
            # the family's defaults: the guidance scale, and no negative prompt for guidance-distilled Flux
            scale, negative = H.model_defaults(name or "", studio.cache)
            return [H.describe_model(name or "", studio.cache),
                    gr.update(value=H.suggest_extra_models(name or "", extras, studio.cache)),
                    gr.skip() if scale is None else gr.update(value=scale),
                    gr.update(interactive=negative, **({} if negative else {"value": ""})), *cleared]

        model.input(on_model, [model, extra_models],
                    [model_info, extra_models, guidance, negative_prompt, *prompts], **ui_only)

        # ---- settings export / import -------------------------------------------------------
        # errors are shown in the status line and under the buttons (where the user looks), and
        # as a notification; nothing else on the page changes
        def export_settings(data: dict) -> list[Any]:
            try:
                comp, notes = H.parse_form(read_form(data))
            except Exception as e:  # noqa: BLE001
                msg = f"**Error:** {H.error_message(e)}"
                gr.Warning(H.error_message(e))
                return [gr.skip(), gr.skip(), msg, msg]
            path = studio.outputs.new() / "superdiff-settings.json"
            path.write_text(H.settings_json(comp))
            msg = "Settings exported: download the file, or copy the JSON." + (
                " Note: " + "; ".join(notes) + "." if notes else "")
            return [H.settings_json(comp), gr.update(value=str(path), visible=True), msg, msg]

        export_btn.click(export_settings, set(form_components), [settings_code, settings_file, status, settings_msg],
                         queue=False, show_progress="hidden", api_visibility="undocumented")

        apply_outputs = [*form_components, *prompt_rows, *op_groups, settings_code, model_info, status, settings_msg]

        def apply_composition(comp: Composition, source: str) -> list[Any]:
            form = H.form_from_composition(comp)
            if form["guidance_scale"] is None:  # "the model's default": the slider cannot hold None (it would show 0)
                scale = H.model_defaults(comp.model, studio.cache)[0]
                form["guidance_scale"] = gr.skip() if scale is None else scale
            msg = f"Settings loaded from {source}."
            return [*H.values_from_form(form), *row_visibility(form["rows"]), *op_visibility(comp.operator),
                    H.settings_json(comp), H.describe_model(comp.model, studio.cache), msg, msg]

        def apply_failed(e: BaseException) -> list[Any]:
            text = H.error_message(e)
            gr.Warning(text)
            msg = f"**Error:** {text}"
            return [gr.skip()] * (len(apply_outputs) - 2) + [msg, msg]

        def apply_json(text: str) -> list[Any]:
            try:
                return apply_composition(H.check_adapter_files(H.settings_from_json(text), studio.cache),
                                         "the JSON box")
            except Exception as e:  # noqa: BLE001
                return apply_failed(e)

        def import_file(path: str | None) -> list[Any]:
            if not path:
                return apply_failed(ValueError("settings: no file received; choose a .json settings file or a "
                                               "superdiff .png"))
            try:
                return apply_composition(H.load_settings_file(path, studio.cache), Path(path).name)
            except Exception as e:  # noqa: BLE001
                return apply_failed(e)

        apply_btn.click(apply_json, settings_code, apply_outputs, queue=False, show_progress="hidden",
                        api_visibility="undocumented")
        import_btn.upload(import_file, import_btn, apply_outputs, queue=False, show_progress="hidden",
                          api_visibility="undocumented")

        # ---- running ------------------------------------------------------------------------
        run_outputs = [gallery, status, trace_pick, trace_plot, files, results_state, settings_code]

        def gallery_value(items: list[H.ResultItem], grid: str | None = None) -> list[tuple[str, str]]:
            return [(it.path, it.label) for it in items] + ([(grid, "grid: methods x seeds")] if grid else [])

        def run(form: dict, compare: bool, request: gr.Request, progress: gr.Progress) -> Any:
            key = _session(request)
            try:
                comp, notes = H.parse_form(form)
                H.check_limits(comp, studio.max_steps, studio.max_images)
                # refuses paths outside the roots, and mismatched prompts, before any work
                H.check_model_fits(comp, H.model_kind(comp.model, studio.cache))
                for m in comp.extra_models:
                    studio.cache.resolve(m, "extra_models")
                if compare:
                    jobs = H.compare_methods(comp)
                else:
                    notes += H.check_experts(comp)
                    jobs = [(comp.operator.upper(), comp)]
            except Exception as e:  # noqa: BLE001
                studio.queue.withdraw(key)
                msg = H.error_message(e)
                yield [gr.skip(), f"**Error:** {msg}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()]
                raise gr.Error(msg, print_exception=False) from None
            if not studio.queue.begin(key):
                yield [gr.skip(), "Withdrawn from the queue: it did not run.", gr.skip(), gr.skip(), gr.skip(),
                       gr.skip(), gr.skip()]
                return
            flag = studio.cancels.start(key)
            out_dir = studio.outputs.new()
            items: list[H.ResultItem] = []
            what = ", ".join(label for label, _ in jobs)
            note = (" Note: " + "; ".join(notes) + ".") if notes else ""
            yield [gr.update(value=[]), f"Running {what} \u2026{note}", gr.update(choices=[], value=None), None,
                   None, [], H.settings_json(comp)]

            def on_progress(frac: float, text: str) -> None:
                progress(frac, desc=text)

            shown: H.ResultItem | None = None
            try:
                for items in H.run_jobs(jobs, studio.cache, out_dir, on_progress=on_progress,
                                        should_stop=flag.is_set):
                    best = H.pick_trace_item(items)
                    switch = best is not shown and (shown is None or shown.record.operator not in ("or", "and"))
                    if switch:
                        shown = best
                    yield [gallery_value(items), f"{len(items)} image(s) done \u2026",
                           gr.update(choices=[it.label for it in items], **({"value": shown.label} if switch else {})),
                           H.render_trace_plot(shown) if switch else gr.skip(), gr.skip(), items, gr.skip()]
            except InterruptedError:
                zipped = [H.zip_results(items, out_dir / "superdiff-results.zip")] if items else []
                gr.Warning("Cancelled.")
                yield [gallery_value(items), f"Cancelled after {len(items)} image(s).",
                       gr.skip(), gr.skip(), [it.path for it in items] + zipped, items, gr.skip()]
                return
            except Exception as e:  # noqa: BLE001
                msg = H.error_message(e)
                yield [gallery_value(items), f"**Error:** {msg}", gr.skip(), gr.skip(),
                       [it.path for it in items] or None, items, gr.skip()]
                raise gr.Error(msg, print_exception=False) from None
            finally:
                studio.cancels.finish(key, flag)
                studio.queue.end(key)
            zipped = H.zip_results(items, out_dir / "superdiff-results.zip")
            grid = H.compare_grid(items, out_dir / "superdiff-compare-grid.png", comp) if compare else None
            secs = sum(it.extra.get("seconds", 0.0) for it in items)
            yield [gallery_value(items, grid), f"Done: {len(items)} image(s) ({what}, {comp.steps} steps, seed "
                   f"{comp.seed}) in {secs:.1f} s. The PNGs carry their parameters (import one to reproduce it)."
                   f"{note}", gr.skip(), gr.skip(), [it.path for it in items] + ([grid] if grid else []) + [zipped],
                   items, gr.skip()]

        def run_generate(request: gr.Request, progress=gr.Progress(), **form: Any):  # noqa: B008
            """Generate the composition of the form (every image a PNG with its parameters)."""
            yield from run(read_named(form), False, request, progress)

        def run_compare(request: gr.Request, progress=gr.Progress(), **form: Any):  # noqa: B008
            """Joint prompt, averaging, OR and AND on the same seeds, plus a labelled grid."""
            yield from run(read_named(form), True, request, progress)

        def queued_notice(request: gr.Request) -> Any:
            """Runs at once on click: says where the request waits when every slot is busy."""
            place = studio.queue.request(_session(request))
            if place is None:
                return gr.skip()
            return (f"Queued: {place} request(s) ahead of this one incl. the running job"
                    if place > 1 else "Queued: waiting for the running job to finish") + \
                "; Cancel withdraws it."

        # progress (and a failed run's error badge) show on the gallery; the status line stays readable
        for btn, fn, name in ((run_btn, run_generate, "generate"), (compare_btn, run_compare, "compare")):
            btn.click(queued_notice, None, status, queue=False, show_progress="hidden",
                      api_visibility="undocumented")
            btn.click(fn, inputs_kwargs=api_inputs, outputs=run_outputs, api_name=name,
                      concurrency_id="generate", show_progress_on=[gallery])

        def cancel(request: gr.Request) -> str:
            key = _session(request)
            if studio.cancels.cancel(key):
                return "Cancelling after the current step \u2026"
            if studio.queue.withdraw(key):
                return "Withdrawn from the queue: it will not run."
            return "Nothing is running."

        cancel_btn.click(cancel, None, status, queue=False, show_progress="hidden", api_visibility="undocumented")

        # ---- trace selection ----------------------------------------------------------------
        def pick_trace(label: str | None, items: list[H.ResultItem]) -> Any:
            for it in items or []:
                if it.label == label:
                    return H.render_trace_plot(it)
            return None

        def select_image(items: list[H.ResultItem], evt: gr.SelectData) -> list[Any]:
            if not items or evt.index is None or not 0 <= int(evt.index) < len(items):
                return [gr.skip(), gr.skip()]
            it = items[int(evt.index)]
            return [gr.update(value=it.label), H.render_trace_plot(it)]

        trace_pick.input(pick_trace, [trace_pick, results_state], trace_plot, show_progress="hidden",
                         concurrency_limit=None, api_visibility="undocumented")
        gallery.select(select_image, results_state, [trace_pick, trace_plot], show_progress="hidden",
                       concurrency_limit=None, api_visibility="undocumented")

    app.queue(default_concurrency_limit=max(1, int(max_concurrency)), max_size=max(1, int(max_queue)))
    app.studio = studio  # type: ignore[attr-defined]
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           block: bool = True, quiet: bool = False) -> Any:
    """Serve the studio (no share link unless asked; files only from Gradio's cache and the
    studio's own output folder)."""
    studio = getattr(app, "studio", None)
    allowed = [str(studio.outputs.root)] if studio is not None else None
    return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                      quiet=quiet, show_error=False, ssr_mode=False, allowed_paths=allowed, css=CSS, js=JS,
                      footer_links=[], mcp_server=False, pwa=False, enable_monitoring=False)
