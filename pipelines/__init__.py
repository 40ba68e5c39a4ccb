"""superdiff.pipelines: diffusers pipelines that compose pretrained models with SuperDiff.

    SuperDiffStableDiffusionPipeline     SD 1.x / 2.x layout (superdiff.pipelines.stable_diffusion)
    SuperDiffStableDiffusionXLPipeline   SDXL layout (superdiff.pipelines.stable_diffusion_xl)
    SuperDiffUNet2DPipeline              two or more UNet2DModel checkpoints (superdiff.pipelines.unet2d)

Each file also loads as a diffusers custom pipeline:
    DiffusionPipeline.from_pretrained(path, custom_pipeline="<repo>/pipelines/stable_diffusion.py")
"""

from ._common import SuperDiffPipelineOutput, UNetExpert, joint_prompt, load_unet, render_trace
from .stable_diffusion import SuperDiffStableDiffusionPipeline
from .stable_diffusion_xl import SuperDiffStableDiffusionXLPipeline
from .unet2d import SuperDiffUNet2DPipeline

__all__ = [
    "SuperDiffStableDiffusionPipeline",
    "SuperDiffStableDiffusionXLPipeline",
    "SuperDiffUNet2DPipeline",
    "SuperDiffPipelineOutput",
    "UNetExpert",
    "joint_prompt",
    "load_unet",
    "render_trace",
]
