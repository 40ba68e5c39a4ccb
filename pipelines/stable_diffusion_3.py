"""SuperDiff for Stable Diffusion 3 / 3.5: N prompts (one expert each) through CLIP-L, CLIP-G
and T5 (pooled projections included), composed with OR / AND / average / single at
sampling time on the rectified flow x_t = (1 - t) x0 + t eps, plus optional extra SD3
transformers as experts.

    from superdiff.pipelines import SuperDiffStableDiffusion3Pipeline
    pipe = SuperDiffStableDiffusion3Pipeline.from_pretrained(
        "stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16).to("cuda")
    out = pipe(["a cat", "a dog"], operator="or", num_inference_steps=28)

Classifier-free guidance as in diffusers (guidance_scale > 1): every expert's conditional
rows and the unconditional rows of all distinct negative prompts go through ONE batched
transformer call per step (per network; `max_batch_size` chunks it).

Also loadable as a custom pipeline:
    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/stable_diffusion_3.py")
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import SD3LoraLoaderMixin
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from superdiff.pipelines import _common as C
from superdiff.pipelines import adapters as A

__all__ = ["SuperDiffStableDiffusion3Pipeline"]


class SuperDiffStableDiffusion3Pipeline(DiffusionPipeline, SD3LoraLoaderMixin, C.SuperDiffPipelineMixin):
    """SuperDiff composition for the SD3 component layout: transformer (SD3Transformer2DModel),
    scheduler (FlowMatchEulerDiscreteScheduler: its shift and sigma grid are used; the sampler
    is superdiff's), vae, text_encoder / tokenizer (CLIP-L), text_encoder_2 / tokenizer_2
    (CLIP-G), text_encoder_3 / tokenizer_3 (T5; optional as in diffusers: without it the T5
    part of the text embedding is zeros)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["text_encoder_3", "tokenizer_3"]
    _callback_tensor_inputs = C.CALLBACK_TENSOR_INPUTS
    _denoiser_name = "transformer"
    _flow_matching = True
    #: the transformer class this layout takes
    _transformer_class = "SD3Transformer2DModel"

    def __init__(
        self,
        transformer: Any,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
    ):
        super().__init__()
        C.check_flow_layout(transformer, scheduler, self._transformer_class, type(self).__name__)
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                              tokenizer_3=tokenizer_3, transformer=transformer, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.tokenizer_max_length = (self.tokenizer.model_max_length
                                     if getattr(self, "tokenizer", None) is not None else 77)
        self.default_sample_size = (self.transformer.config.sample_size
                                    if getattr(self, "transformer", None) is not None else 128)
        self.patch_size = (self.transformer.config.patch_size
                           if getattr(self, "transformer", None) is not None else 2)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any):
        """diffusers' from_pretrained, after refusing a local checkpoint of another layout
        (a UNet model, the other flow family) before any weights load."""
        C.check_flow_checkpoint(pretrained_model_name_or_path, cls._transformer_class, cls.__name__)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # diffusers' own implementations (LoRA scale and clip_skip included)
    encode_prompt = StableDiffusion3Pipeline.encode_prompt
    _get_t5_prompt_embeds = StableDiffusion3Pipeline._get_t5_prompt_embeds
    _get_clip_prompt_embeds = StableDiffusion3Pipeline._get_clip_prompt_embeds

    def _encode_texts(self, texts: Sequence[str], device: torch.device, clip_skip: int | None,
                      max_sequence_length: int, lora_scale: float | None) -> dict[str, dict[str, torch.Tensor]]:
        """Each distinct text once, in one batch per text encoder:
        text -> {"encoder_hidden_states": [1, 77 + L, D], "pooled_projections": [1, P]}."""
        texts = C.unique_keys(list(texts))
        emb, _, pooled, _ = self.encode_prompt(texts, None, None, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False, clip_skip=clip_skip,
                                               max_sequence_length=max_sequence_length, lora_scale=lora_scale)
        return {t: {"encoder_hidden_states": emb[i : i + 1], "pooled_projections": pooled[i : i + 1]}
                for i, t in enumerate(texts)}

    def _size_check(self, height: int, width: int) -> None:
        C.check_height_width(height, width, self.vae_scale_factor * self.patch_size,
                             "the VAE factor times the transformer's patch size")

    def _mu(self, height: int, width: int) -> float | None:
        """The dynamic shift for this image size, as diffusers' SD3 pipeline computes it."""
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", None):
            return None
        seq = (height // self.vae_scale_factor // self.patch_size) * (width // self.vae_scale_factor // self.patch_size)
        return calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))

    @C.diffusers_conventions
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        operator: str | Any = "and",
        weights: Sequence[float] | None = None,
        bias: Sequence[float] | None = None,
        temperature: float | None = None,
        lift: float | Sequence[float] | None = None,
        offsets: Sequence[float] | None = None,
        kappa_clamp: Any = None,
        ridge: float | None = None,
        feedback: float | None = None,
        operator_kwargs: dict[str, Any] | None = None,
        sampler: str = "sde",
        estimator: str | None = None,
        schedule: Any = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        time_grid: Sequence[float] | None = None,
        extra_transformers: Sequence[Any] | None = None,
        adapters: Sequence[Any] | None = None,
        switch_every: int = 1,
        max_batch_size: int | None = None,
        compose: str | None = None,
        and_mode: str = "superdiff",
        corrector: Any = None,
        joint_template: str | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Generate images from a superposition of N prompts (a list of prompts is ONE composition (its experts), a list of lists a batch of compositions; operator "and" by default).

        Args:
            prompt: one prompt or a list of N >= 1 prompts; each is an expert (encoded by all
                three text encoders, as diffusers' prompt / prompt_2 / prompt_3 set alike).
            height, width: image size (default transformer.config.sample_size * vae_scale_factor);
                divisible by the VAE factor.
            num_inference_steps: number of sampler steps.
            guidance_scale: classifier-free guidance w (> 1 enables it): every expert is guided
                as u + w (c_i - u); the combination is u + w sum_i kappa_i (c_i - u).
            negative_prompt: one for all prompts or one per prompt.
            num_images_per_prompt: batch size B (each image is a superposition of all experts).
            generator: a torch.Generator or one per image.
            latents: initial noise [B, C, H/f, W/f] (x at t = 1).
            output_type: "pil", "np", "pt" or "latent".
            operator ... operator_kwargs: as SuperDiffStableDiffusionPipeline ("or", "and",
                "average", "single", "joint" or a superdiff Operator, and their parameters).
            sampler: "sde" (Euler-Maruyama with posterior steps where the flow SDE is singular),
                "ddpm" (posterior steps), "euler"/"ode" (the probability-flow ODE dx/dt = u;
                with operator "single" it reproduces diffusers' StableDiffusion3Pipeline), "heun".
            estimator: "kernel", "ito", "ode" or "none" (default: the core's per-sampler choice).
            schedule: None or "flow" (the rectified flow of the scheduler config, on the
                scheduler's grid) or a superdiff RectifiedFlow, whose own grid (its shift, t_min,
                t_max) is then used instead of the scheduler's.
            sigmas, mu: the scheduler's custom sigmas and dynamic shift, as in diffusers (the grid
                is the FlowMatch scheduler's own: shift, dynamic shifting, ending at t = 0; steps
                of length 0, as from sigmas ending in 0, are dropped: they leave x unchanged).
            time_grid: a custom decreasing grid of schedule times t in [0, 1]. The grid comes from
                one source: time_grid, a RectifiedFlow `schedule`, or sigmas / mu; two are refused.
            extra_transformers: more experts from other SD3 transformers sharing this VAE and these
                text encoders: modules, checkpoint paths / hub ids, (transformer, prompt) pairs or
                superdiff.pipelines.TransformerExpert; one expert per prompt unless given its own.
                Incompatible ones (a UNet, a Flux transformer, other widths) are refused.
            adapters, switch_every: LoRA adapters as experts on this pipeline's transformer
                (pipelines/adapters.py, as SuperDiffStableDiffusionPipeline): paths, (path, scale)
                pairs, dicts or AdapterExpert, None for the base transformer; loaded with diffusers'
                `load_lora_weights`, all adapter experts in ONE batched transformer call per step
                (each row under its own adapter). `operator` may then also be "composite", "merge"
                or "switch" (adapter changing every `switch_every` steps).
            max_batch_size: at most this many rows per transformer call.
            compose, and_mode, corrector: a composition formula and particle / MCMC correctors, as in
                SuperDiffStableDiffusionPipeline.__call__ (docs/correctors.md).
            joint_attention_kwargs, clip_skip, max_sequence_length: as in diffusers.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as
                SuperDiffStableDiffusionPipeline ("latents", "kappa", "logq", "noise_pred").

        Returns:
            SuperDiffPipelineOutput (images, trace), or (images, trace) when return_dict is False.
        """
        # 1. validate everything before any compute
        C.check_max_sequence_length(max_sequence_length)
        prompt, operator = self._apply_compose(prompt, operator, compose, and_mode)
        prompts = C.normalize_prompts(prompt)
        negatives = C.normalize_negative_prompts(negative_prompt, len(prompts))
        op_name, prompts, negatives = C.apply_joint(operator, prompts, negatives, joint_template)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        callback_inputs, integrator = self._check_call(
            height, width, num_inference_steps, num_images_per_prompt, output_type, guidance_scale, max_batch_size,
            generator, sampler, callback_on_step_end, callback_on_step_end_tensor_inputs, latents=latents)
        B = int(num_images_per_prompt)
        base = C.NetworkPlan(self.transformer, C.transformer_info(self.transformer, self.scheduler.config,
                                                                  self.vae.config, "transformer"), "transformer")
        networks, extras = C.plan_extra_transformers(base, extra_transformers, self.scheduler.config,
                                                     self.transformer.dtype)
        plans = C.plan_text_experts(prompts, negatives, networks, extras)
        op_name, plans, routing, specs = A.plan_adapters(adapters, plans, prompts, negatives, op_name, switch_every)
        op_params = dict(weights=weights, bias=bias, temperature=temperature, lift=lift, offsets=offsets,
                         kappa_clamp=kappa_clamp, ridge=ridge, feedback=feedback, operator_kwargs=operator_kwargs)
        grid = C.flow_grid(self.scheduler, num_inference_steps, schedule, time_grid, sigmas, mu,
                           self._mu(height, width))
        method = self._plan_method(op_name, len(plans), op_params, estimator, integrator, schedule,
                                   num_inference_steps, grid, "zero", corrector=corrector)
        do_cfg, w = self._guidance(guidance_scale)

        if routing is not None:
            A.load_adapters(self, specs)  # every adapter checked against this transformer first

        # 2. encode every distinct prompt and negative prompt once
        device = self._execution_device
        lora_scale = joint_attention_kwargs.get("scale") if joint_attention_kwargs else None
        enc = self._encode_texts([p.prompt for p in plans], device, clip_skip, max_sequence_length, lora_scale)
        enc_neg = {}
        if do_cfg:  # negatives as diffusers encodes them: no clip_skip
            enc_neg = self._encode_texts([p.negative or "" for p in plans], device, None, max_sequence_length,
                                         lora_scale)
        branches = [C.Branch(p.network, enc[p.prompt], enc_neg[p.negative or ""] if do_cfg else None,
                             ("neg", p.negative or "") if do_cfg else None, p.name) for p in plans]
        fixed = {"joint_attention_kwargs": joint_attention_kwargs} if joint_attention_kwargs else {}
        forward = lambda m: C.transformer_forward(m, method.schedule, **fixed)  # noqa: E731
        if routing is not None:  # each row under its own adapter, still one transformer call per step
            branches = A.route_branches(branches, plans, routing)
            forward = A.routed_forward(self.transformer, routing, method.grid, forward)
        nets = C.prepare_networks(networks, method.schedule, device, forward=forward)
        experts = C.NetworkExperts(nets, branches, guidance=do_cfg, prediction_type="flow",
                                   max_batch_size=max_batch_size)

        # 3. sample from x_1 ~ N(0, I) drawn as diffusers draws it; every step is superdiff.step.superdiff_step
        out = self._run(method, experts, [p.name for p in plans], B, height, width, latents, generator, w,
                        num_inference_steps, method.grid, "zero", callback_on_step_end, callback_inputs)
        trace = out.trace
        trace.meta.update(prompts=[p.prompt for p in plans], model_family="sd3")
        if routing is not None:
            trace.meta.update(adapters=routing.describe(), adapter_mode=routing.mode)

        # 4. decode
        if output_type == "latent":
            image = out.samples.to(self.transformer.dtype)
        else:
            image = self._postprocess(C.decode_latents(self.vae, out.samples, generator), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, trace)
        return C.SuperDiffPipelineOutput(images=image, trace=trace)
