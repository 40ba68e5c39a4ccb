"""superdiff.pipelines: diffusers pipelines that compose pretrained models with SuperDiff.

    SuperDiffStableDiffusionPipeline     SD 1.x / 2.x layout (superdiff.pipelines.stable_diffusion)
    SuperDiffStableDiffusionXLPipeline   SDXL layout (superdiff.pipelines.stable_diffusion_xl)
    SuperDiffUNet2DPipeline              two or more UNet2DModel checkpoints (superdiff.pipelines.unet2d)
    SuperDiffStableDiffusion3Pipeline    SD3 / SD3.5 layout, rectified flow (superdiff.pipelines.stable_diffusion_3)
    SuperDiffFluxPipeline                Flux layout, rectified flow, packed latents (superdiff.pipelines.flux)

Each file also loads as a diffusers custom pipeline:
    DiffusionPipeline.from_pretrained(path, custom_pipeline="<repo>/pipelines/stable_diffusion.py")
"""

from ._common import (SuperDiffPipelineOutput, TransformerExpert, UNetExpert, joint_prompt, load_transformer, load_unet,
                      render_trace)
from .flux import SuperDiffFluxPipeline
from .stable_diffusion_3 import SuperDiffStableDiffusion3Pipeline
from .stable_diffusion import SuperDiffStableDiffusionPipeline
from .stable_diffusion_xl import SuperDiffStableDiffusionXLPipeline
from .unet2d import SuperDiffUNet2DPipeline

__all__ = [
    "SuperDiffStableDiffusionPipeline",
    "SuperDiffStableDiffusionXLPipeline",
    "SuperDiffUNet2DPipeline",
    "SuperDiffStableDiffusion3Pipeline",
    "SuperDiffFluxPipeline",
    "TransformerExpert",
    "load_transformer",
    "SuperDiffPipelineOutput",
    "UNetExpert",
    "joint_prompt",
    "load_unet",
    "render_trace",
]
