"""The studio's handler functions, free of gradio, in one namespace for `ui/app.py` (which
only wires them to components) and the tests (tests/test_ui_handlers.py, no browser):

- ui/forms.py: form values <-> `Composition`, settings JSON import/export, the error
  messages that name a form field;
- ui/models.py: the model and LoRA-adapter choices, and the adapter uploads;
- ui/jobs.py: cancellation, the job queue and the runner that writes PNGs with their
  parameters, trace plots, compare grids and result zips.
"""

from __future__ import annotations

from superdiff.compose import DEFAULT_COMPOSITION, check_experts

from .forms import (API_NAMES, COMPARE_METHODS, DTYPE_UI_CHOICES, ESTIMATOR_UI_CHOICES, FIELD_LABELS, FORM_SCALARS,
                    GUIDANCE_MAX, MAX_PROMPTS, MIN_PROMPTS, NO_LORA, OPERATOR_LABELS, ROW_FIELDS, SAMPLER_UI_CHOICES,
                    check_adapter_files, check_limits, check_model_fits, compare_methods, composition_from_form,
                    error_message, for_operator, form_from_composition, form_from_values, formula_tree,
                    load_settings_file, parse_form, settings_from_json, settings_json, values_from_form)
from .jobs import (CancelRegistry, JobQueue, OutputDirs, ResultItem, compare_grid, pick_trace_item, render_trace_plot,
                   run_jobs, trace_figure, zip_results)
from .models import (MAX_LORA_BYTES, bundled_adapters, default_allow_roots, describe_model, lora_choices,
                     model_choices, model_defaults, model_kind, store_lora_upload, suggest_extra_models)

__all__ = [
    "MAX_PROMPTS", "MIN_PROMPTS", "FORM_SCALARS", "OPERATOR_LABELS", "COMPARE_METHODS", "FIELD_LABELS",
    "form_from_values", "values_from_form", "parse_form", "composition_from_form", "form_from_composition",
    "for_operator", "compare_methods", "check_limits", "check_model_fits", "settings_json", "settings_from_json", "load_settings_file",
    "default_allow_roots", "model_choices", "model_kind", "describe_model", "suggest_extra_models", "error_message",
    "CancelRegistry", "JobQueue", "ResultItem", "run_jobs", "render_trace_plot", "zip_results", "OutputDirs",
    "compare_grid", "pick_trace_item", "API_NAMES", "formula_tree", "lora_choices", "store_lora_upload",
    "NO_LORA", "check_adapter_files", "ROW_FIELDS", "ESTIMATOR_UI_CHOICES", "SAMPLER_UI_CHOICES", "DTYPE_UI_CHOICES",
    "MAX_LORA_BYTES", "GUIDANCE_MAX", "bundled_adapters", "trace_figure", "model_defaults", "check_experts", "DEFAULT_COMPOSITION",
]
