"""The pipelines on the bundled shapes models (skipped while they are not built)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from superdiff.registry import bundled_model_path, list_bundled_models  # noqa: E402
from _pipes import _one_thread, gen  # noqa: F401  (autouse fixture)

AVAILABLE = set(list_bundled_models())
STEPS = 3


def need(*names):
    missing = [n for n in names if n not in AVAILABLE]
    return pytest.mark.skipif(bool(missing), reason=f"bundled model(s) {missing} not built")


@need("shapes-t2i")
def test_sd_pipeline_on_bundled_t2i_with_an_unconditional_half():
    from superdiff.pipelines import SuperDiffStableDiffusionPipeline

    pipe = SuperDiffStableDiffusionPipeline.from_pretrained(bundled_model_path("shapes-t2i"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red square", "a blue circle"], operator="and", num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape[0] == 1 and np.isfinite(out.images).all()
    if "shapes-half-a" in AVAILABLE:
        out = pipe("a red square", extra_unets=[str(bundled_model_path("shapes-half-a"))], operator="or",
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
        assert out.trace.num_experts == 2 and np.isfinite(out.trace.logq).all()


@need("shapes-half-a", "shapes-half-b")
def test_unet2d_pipeline_on_bundled_halves():
    from superdiff.pipelines import SuperDiffUNet2DPipeline

    pipe = SuperDiffUNet2DPipeline.from_checkpoints([bundled_model_path("shapes-half-a"),
                                                     bundled_model_path("shapes-half-b")])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, operator="or", num_inference_steps=STEPS,
               generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np")
    assert out.images.shape[0] == 2 and np.isfinite(out.images).all()
    assert out.trace.expert_names == ["unet", "unet_2"]
