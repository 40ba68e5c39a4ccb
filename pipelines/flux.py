"""SuperDiff for Flux: N prompts (one expert each) through CLIP (pooled) and T5, composed with
OR / AND / average / single at sampling time on the rectified flow, with packed 2x2
latents, image ids and the dynamic shift exp(mu) of the image size, plus optional extra
Flux transformers as experts.

    from superdiff.pipelines import SuperDiffFluxPipeline
    pipe = SuperDiffFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
                                                 torch_dtype=torch.bfloat16).to("cuda")
    out = pipe(["a cat", "a dog"], operator="or", num_inference_steps=28, guidance_scale=3.5)

Guidance, by the transformer's config:
    guidance-distilled (guidance_embeds=True: FLUX.1-dev): `guidance_scale` (default 3.5) is
        the embedded guidance every expert row is fed; there is no unconditional branch, so N
        experts are N rows of ONE transformer call per step. `true_cfg_scale` > 1 and
        `negative_prompt` are refused (nothing to guide against).
    no guidance embedding (FLUX.1-schnell, de-distilled variants): `true_cfg_scale` > 1 is
        classifier-free guidance u + w (c_i - u) against `negative_prompt` (default: the
        empty prompt), the unconditional rows in the same call; `guidance_scale` is refused
        (there is no embedding to feed it to), except 0 (FLUX.1-schnell's documented call).

Also loadable as a custom pipeline:
    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/flux.py")
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from superdiff.pipelines import _common as C
from superdiff.schedules import Schedule
from superdiff.pipelines import adapters as A

__all__ = ["SuperDiffFluxPipeline"]

#: FluxPipeline's default embedded guidance
DEFAULT_EMBEDDED_GUIDANCE = 3.5


class SuperDiffFluxPipeline(DiffusionPipeline, FluxLoraLoaderMixin, C.SuperDiffPipelineMixin):
    """SuperDiff composition for the Flux component layout: transformer
    (FluxTransformer2DModel), scheduler (FlowMatchEulerDiscreteScheduler, usually with dynamic
    shifting), vae, text_encoder / tokenizer (CLIP, pooled), text_encoder_2 / tokenizer_2 (T5)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components: list[str] = []
    _callback_tensor_inputs = C.CALLBACK_TENSOR_INPUTS
    _denoiser_name = "transformer"
    _flow_matching = True
    _transformer_class = "FluxTransformer2DModel"

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: Any,
    ):
        super().__init__()
        C.check_flow_layout(transformer, scheduler, self._transformer_class, type(self).__name__)
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, transformer=transformer, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        # latents are packed in 2x2 patches: images are multiples of twice the VAE factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.tokenizer_max_length = (self.tokenizer.model_max_length
                                     if getattr(self, "tokenizer", None) is not None else 77)
        self.default_sample_size = 128

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any):
        """diffusers' from_pretrained, after refusing a local checkpoint of another layout
        (a UNet model, the other flow family) before any weights load."""
        C.check_flow_checkpoint(pretrained_model_name_or_path, cls._transformer_class, cls.__name__)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # diffusers' own implementations
    encode_prompt = FluxPipeline.encode_prompt
    _get_t5_prompt_embeds = FluxPipeline._get_t5_prompt_embeds
    _get_clip_prompt_embeds = FluxPipeline._get_clip_prompt_embeds
    _pack_latents = staticmethod(FluxPipeline._pack_latents)
    _unpack_latents = staticmethod(FluxPipeline._unpack_latents)
    _prepare_latent_image_ids = staticmethod(FluxPipeline._prepare_latent_image_ids)

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer embeds its guidance scale (FLUX.1-dev) instead of taking CFG."""
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    def _size_check(self, height: int, width: int) -> None:
        C.check_height_width(height, width, self.vae_scale_factor * 2,
                             "twice the VAE factor (Flux packs 2x2 latent patches):")

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def _latents_shape(self, batch: int, height: int, width: int) -> tuple[tuple[int, ...], str]:
        """(packed shape of x_1, its layout in words): [B, h/2 * w/2, 4 C], as diffusers' FluxPipeline."""
        h, w = self._latent_hw(height, width)
        c = self.transformer.config.in_channels // 4
        f = self.vae_scale_factor
        return ((batch, (h // 2) * (w // 2), 4 * c),
                f"the packed shape [batch, (height/{2 * f}) * (width/{2 * f}) tokens, 4 x {c} channels] of diffusers' "
                "FluxPipeline")

    def _initial_latents(self, batch: int, height: int, width: int, latents: torch.Tensor | None, generator: Any,
                         sigma0: float) -> torch.Tensor:
        """x_1 as diffusers' FluxPipeline draws it: randn [B, C, h, w], then packed to
        [B, h/2 * w/2, 4C]; given `latents` are packed already (their shape checked by _check_call)."""
        h, w = self._latent_hw(height, width)
        c = self.transformer.config.in_channels // 4
        device, dtype = self._execution_device, self.transformer.dtype
        if latents is None:
            x = randn_tensor((batch, c, h, w), generator=generator, device=device, dtype=dtype)
            x = self._pack_latents(x, batch, c, h, w)
        else:
            x = latents.to(device=device)
        return x * sigma0

    def _encode_texts(self, texts: Sequence[str], device: torch.device, max_sequence_length: int,
                      lora_scale: float | None) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        """Each distinct text once: (text -> {"encoder_hidden_states": [1, L, D],
        "pooled_projections": [1, P]}, txt_ids [L, 3])."""
        texts = C.unique_keys(list(texts))
        emb, pooled, txt_ids = self.encode_prompt(texts, None, device=device, num_images_per_prompt=1,
                                                  max_sequence_length=max_sequence_length, lora_scale=lora_scale)
        return ({t: {"encoder_hidden_states": emb[i : i + 1], "pooled_projections": pooled[i : i + 1]}
                 for i, t in enumerate(texts)}, txt_ids)

    def _check_guidance(self, guidance_scale: float | None, true_cfg_scale: float,
                        negative_prompt: Any) -> tuple[float | None, bool, float]:
        """(embedded guidance or None, do_cfg, CFG weight), refusing what cannot apply."""
        for name, v in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v)):
                raise ValueError(f"`{name}` must be a finite number, got {v!r}")
        if self.guidance_distilled:
            if true_cfg_scale != 1.0:
                raise ValueError(f"true_cfg_scale={true_cfg_scale}: this Flux transformer is guidance-distilled "
                                 "(guidance_embeds=True); its guidance is the embedded `guidance_scale` and it has "
                                 "no unconditional branch for classifier-free guidance. Leave true_cfg_scale at 1")
            if negative_prompt is not None:
                raise ValueError("a guidance-distilled Flux transformer takes no negative prompt (it has no "
                                 "unconditional branch); steer with the embedded `guidance_scale` instead")
            g = DEFAULT_EMBEDDED_GUIDANCE if guidance_scale is None else float(guidance_scale)
            return g, False, 1.0
        if guidance_scale is not None and float(guidance_scale) != 0.0:  # 0: FLUX.1-schnell's documented call
            raise ValueError(f"guidance_scale={guidance_scale}: this Flux transformer has no guidance embedding "
                             "(guidance_embeds=False, e.g. FLUX.1-schnell or a de-distilled model), so there is "
                             "nothing to feed it to; use true_cfg_scale > 1 (with negative_prompt) for "
                             "classifier-free guidance, or leave guidance_scale unset (or 0)")
        if true_cfg_scale < 1.0:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 disables classifier-free guidance), got {true_cfg_scale}")
        do_cfg = true_cfg_scale > 1.0
        return None, do_cfg, float(true_cfg_scale) if do_cfg else 1.0

    @C.diffusers_conventions
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
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
        max_sequence_length: int = 512,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Generate images from a superposition of N prompts (a list of prompts is ONE composition (its experts), a list of lists a batch of compositions; operator "and" by default).

        Args:
            prompt: one prompt or a list of N >= 1 prompts; each is an expert (CLIP and T5 alike).
            height, width: image size (default 1024); multiples of twice the VAE factor.
            num_inference_steps: number of sampler steps.
            guidance_scale: the embedded guidance of a guidance-distilled transformer (default
                3.5); refused on a transformer without guidance embedding, unless 0 (FLUX.1-schnell's
                documented `guidance_scale=0.0`, which diffusers ignores there too).
            true_cfg_scale: classifier-free guidance w (> 1 enables it) for a transformer without
                guidance embedding; refused (unless 1) on a guidance-distilled one.
            negative_prompt: the unconditional prompt of true CFG (one, or one per prompt;
                default ""); refused on a guidance-distilled transformer.
            num_images_per_prompt, generator: batch size B and one generator or one per image.
            latents: initial packed noise [B, h/2 * w/2, 4 C] (x at t = 1).
            output_type: "pil", "np", "pt" or "latent" (the packed latents).
            operator ... operator_kwargs, sampler, estimator, schedule, time_grid, max_batch_size,
                compose, and_mode, corrector,
                joint_template, callbacks: as SuperDiffStableDiffusion3Pipeline; with operator
                "single" and sampler "euler" this is diffusers' FluxPipeline.
            sigmas: custom sigmas (default linspace(1, 1/N, N), as FluxPipeline), shifted by
                exp(mu), mu from the number of packed tokens (dynamic shifting).
            extra_transformers: more experts from other Flux transformers of the same layout
                and guidance kind (modules, paths / hub ids, (transformer, prompt) pairs or
                superdiff.pipelines.TransformerExpert).
            adapters, switch_every: LoRA adapters as experts on this pipeline's transformer
                (pipelines/adapters.py, as SuperDiffStableDiffusionPipeline): paths, (path, scale)
                pairs, dicts or AdapterExpert, None for the base transformer; loaded with diffusers'
                `load_lora_weights`, all adapter experts in ONE batched transformer call per step
                (each row under its own adapter). `operator` may then also be "composite", "merge"
                or "switch" (adapter changing every `switch_every` steps).
            joint_attention_kwargs, max_sequence_length: as in diffusers.

        Returns:
            SuperDiffPipelineOutput (images, trace), or (images, trace) when return_dict is False.
        """
        # 1. validate everything before any compute
        embedded, do_cfg, w = self._check_guidance(guidance_scale, true_cfg_scale, negative_prompt)
        C.check_max_sequence_length(max_sequence_length)
        prompt, operator = self._apply_compose(prompt, operator, compose, and_mode)
        prompts = C.normalize_prompts(prompt)
        negatives = C.normalize_negative_prompts(negative_prompt, len(prompts))
        op_name, prompts, negatives = C.apply_joint(operator, prompts, negatives, joint_template)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        callback_inputs, integrator = self._check_call(
            height, width, num_inference_steps, num_images_per_prompt, output_type,
            embedded if embedded is not None else true_cfg_scale, max_batch_size, generator, sampler,
            callback_on_step_end, callback_on_step_end_tensor_inputs, latents=latents)
        B = int(num_images_per_prompt)
        base = C.NetworkPlan(self.transformer, C.transformer_info(self.transformer, self.scheduler.config,
                                                                  self.vae.config, "transformer"), "transformer")
        networks, extras = C.plan_extra_transformers(base, extra_transformers, self.scheduler.config,
                                                     self.transformer.dtype)
        plans = C.plan_text_experts(prompts, negatives, networks, extras)
        op_name, plans, routing, specs = A.plan_adapters(adapters, plans, prompts, negatives, op_name, switch_every)
        op_params = dict(weights=weights, bias=bias, temperature=temperature, lift=lift, offsets=offsets,
                         kappa_clamp=kappa_clamp, ridge=ridge, feedback=feedback, operator_kwargs=operator_kwargs)
        h, w_lat = self._latent_hw(height, width)
        cfg = self.scheduler.config
        if sigmas is None and time_grid is None and not cfg.get("use_flow_sigmas", False) \
                and not isinstance(schedule, Schedule):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)  # FluxPipeline's default
        mu = calculate_shift((h // 2) * (w_lat // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        grid = C.flow_grid(self.scheduler, num_inference_steps, schedule, time_grid, sigmas, None, mu)
        method = self._plan_method(op_name, len(plans), op_params, estimator, integrator, schedule,
                                   num_inference_steps, grid, "zero", corrector=corrector)

        if routing is not None:
            A.load_adapters(self, specs)  # every adapter checked against this transformer first

        # 2. encode every distinct prompt (and, with true CFG, negative prompt) once
        device = self._execution_device
        lora_scale = joint_attention_kwargs.get("scale") if joint_attention_kwargs else None
        texts = [p.prompt for p in plans] + ([p.negative or "" for p in plans] if do_cfg else [])
        enc, txt_ids = self._encode_texts(texts, device, max_sequence_length, lora_scale)
        if embedded is not None:  # the embedded guidance is one more per-row condition
            g = torch.full([1], embedded, device=device, dtype=torch.float32)
            enc = {t: {**e, "guidance": g} for t, e in enc.items()}
        branches = [C.Branch(p.network, enc[p.prompt], enc[p.negative or ""] if do_cfg else None,
                             ("neg", p.negative or "") if do_cfg else None, p.name) for p in plans]
        img_ids = self._prepare_latent_image_ids(B, h // 2, w_lat // 2, device, self.transformer.dtype)
        fixed: dict[str, Any] = dict(img_ids=img_ids, txt_ids=txt_ids)
        if joint_attention_kwargs:
            fixed["joint_attention_kwargs"] = joint_attention_kwargs
        forward = lambda m: C.transformer_forward(m, method.schedule, 1000.0, **fixed)  # noqa: E731
        if routing is not None:  # each row under its own adapter, still one transformer call per step
            branches = A.route_branches(branches, plans, routing)
            forward = A.routed_forward(self.transformer, routing, method.grid, forward)
        nets = C.prepare_networks(networks, method.schedule, device, forward=forward)
        experts = C.NetworkExperts(nets, branches, guidance=do_cfg, prediction_type="flow",
                                   max_batch_size=max_batch_size)

        # 3. sample from packed x_1 ~ N(0, I) drawn as diffusers draws it; every step is superdiff_step
        out = self._run(method, experts, [p.name for p in plans], B, height, width, latents, generator, w,
                        num_inference_steps, method.grid, "zero", callback_on_step_end, callback_inputs)
        trace = out.trace
        trace.meta.update(prompts=[p.prompt for p in plans], model_family="flux",
                          guidance_distilled=self.guidance_distilled, embedded_guidance=embedded,
                          true_cfg_scale=w if do_cfg else 1.0)
        if routing is not None:
            trace.meta.update(adapters=routing.describe(), adapter_mode=routing.mode)

        # 4. unpack and decode
        if output_type == "latent":
            image = out.samples.to(self.transformer.dtype)
        else:
            z = self._unpack_latents(out.samples, height, width, self.vae_scale_factor)
            image = self._postprocess(C.decode_latents(self.vae, z, generator), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, trace)
        return C.SuperDiffPipelineOutput(images=image, trace=trace)
