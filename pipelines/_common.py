"""Parts shared by the SuperDiff diffusers pipelines, one idea per module:

    _inputs       prompts, negative prompts, the joint-prompt baseline, argument checks
    _checkpoints  expert networks from checkpoints and the compatibility check
    _method       operator, sampler, estimator, schedule and initial latents of a call
    _experts      the networks and experts of a call (extra_unets, one expert per prompt)
    _outputs      the output dataclass, the trace plot, the VAE decode
    _mixin        SuperDiffPipelineMixin: the checks, the plan and the sampling loop (one
                  call to `superdiff.sampling.sample`, whose every step is
                  `superdiff.step.superdiff_step`)
    _conventions  diffusers' calling habits around __call__: batches of compositions, scheduler
                  swaps, prompt_embeds, sigmas, interrupt; the other diffusers arguments refused

This module gathers their public names, so that a pipeline file needs one import,
`from superdiff.pipelines import _common as C`. The pipeline files import it by its absolute
name, so that each of them also loads through
`DiffusionPipeline.from_pretrained(path, custom_pipeline="<file>.py")`. Nothing here
subclasses `DiffusionPipeline` (a custom-pipeline file must define exactly one).
"""

from __future__ import annotations

from superdiff.diffusers_experts import (Branch, Network, NetworkExperts, NullEstimator, transformer_forward,
                                        unet_forward)

from ._checkpoints import (FLOW_TRANSFORMERS, VP_KINDS, TransformerExpert, UNetExpert, as_transformer_expert,
                           as_unet_expert, check_compatible, check_flow_checkpoint, check_flow_layout,
                           check_transformer_compatible, load_transformer, load_unet, mixed_families_message,
                           network_info, transformer_info)
from ._experts import (ExpertPlan, NetworkPlan, plan_extra_networks, plan_extra_transformers, plan_text_experts,
                       prepare_networks, promptless_branch)
from ._inputs import (apply_joint, check_common, check_generator, check_height_width, check_max_sequence_length, check_unet_size, joint_prompt,
                      normalize_negative_prompts, normalize_prompts, unique_keys)
from ._method import (SAMPLERS, MethodPlan, build_operator, flow_grid, flow_time_grid, init_noise_sigma, make_flow_schedule,
                      make_schedule, prepare_latents, resolve_estimator, resolve_sampler)
from ._conventions import SCHEDULER_SAMPLERS, diffusers_conventions
from ._mixin import CALLBACK_TENSOR_INPUTS, SuperDiffPipelineMixin
from ._outputs import OUTPUT_TYPES, SuperDiffPipelineOutput, decode_latents, render_trace

__all__ = [
    # outputs
    "SuperDiffPipelineOutput", "render_trace", "decode_latents", "OUTPUT_TYPES",
    # checkpoints
    "UNetExpert", "load_unet", "as_unet_expert", "network_info", "check_compatible", "VP_KINDS",
    "TransformerExpert", "load_transformer", "as_transformer_expert", "transformer_info",
    "check_transformer_compatible", "mixed_families_message", "FLOW_TRANSFORMERS", "check_flow_layout",
    "check_flow_checkpoint",
    # inputs
    "joint_prompt", "normalize_prompts", "normalize_negative_prompts", "apply_joint", "unique_keys",
    "check_height_width", "check_unet_size", "check_common", "check_generator", "check_max_sequence_length",
    # method
    "MethodPlan", "build_operator", "resolve_sampler", "resolve_estimator", "make_schedule", "init_noise_sigma",
    "prepare_latents", "SAMPLERS", "make_flow_schedule", "flow_time_grid", "flow_grid",
    # experts
    "ExpertPlan", "NetworkPlan", "plan_extra_networks", "plan_extra_transformers", "plan_text_experts",
    "promptless_branch",
    "prepare_networks",
    # the mixin, and diffusers' calling habits (prompt batches, scheduler swaps, embeds, interrupt)
    "SuperDiffPipelineMixin", "CALLBACK_TENSOR_INPUTS", "diffusers_conventions", "SCHEDULER_SAMPLERS",
    # the core's network experts, re-exported for the pipeline files
    "Branch", "Network", "NetworkExperts", "NullEstimator", "unet_forward", "transformer_forward",
]
