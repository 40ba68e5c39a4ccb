"""SuperDiff for Stable Diffusion XL: N prompts (one expert each) through both text
encoders (pooled embeddings and add_time_ids included), composed with OR / AND / average /
single at sampling time, plus optional extra SDXL UNets as experts.

    from superdiff.pipelines import SuperDiffStableDiffusionXLPipeline
    pipe = SuperDiffStableDiffusionXLPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16).to("cuda")
    out = pipe(["a cat", "a dog"], operator="or", num_inference_steps=50)

Also loadable as a custom pipeline:
    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/stable_diffusion_xl.py")
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import is_invisible_watermark_available
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from superdiff.pipelines import _common as C
from superdiff.pipelines import adapters as A
from superdiff.pipelines._checkpoints import check_not_guidance_distilled

__all__ = ["SuperDiffStableDiffusionXLPipeline"]


class SuperDiffStableDiffusionXLPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    C.SuperDiffPipelineMixin,
):
    """SuperDiff composition for the SDXL component layout (vae, text_encoder,
    text_encoder_2, tokenizer, tokenizer_2, unet, scheduler)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["tokenizer", "text_encoder", "image_encoder", "feature_extractor"]
    _callback_tensor_inputs = C.CALLBACK_TENSOR_INPUTS
    _embeds_kind = "sdxl"  # prompt_embeds= accepted (pipelines/_conventions.py)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: Any = None,
        feature_extractor: Any = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                              feature_extractor=feature_extractor)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.default_sample_size = (self.unet.config.sample_size if getattr(self, "unet", None) is not None
                                    else 128)
        add_watermarker = add_watermarker if add_watermarker is not None else is_invisible_watermark_available()
        if add_watermarker:
            from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

            self.watermark = StableDiffusionXLWatermarker()
        else:
            self.watermark = None

    # diffusers' own implementations
    encode_prompt = StableDiffusionXLPipeline.encode_prompt
    _get_add_time_ids = StableDiffusionXLPipeline._get_add_time_ids

    def _encode_texts(self, texts: Sequence[str], device: torch.device, clip_skip: int | None,
                      lora_scale: float | None, time_ids: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Each distinct text once: text -> {"encoder_hidden_states", "text_embeds", "time_ids"} (batch 1)."""
        texts = C.unique_keys(list(texts))
        emb, _, pooled, _ = self.encode_prompt(prompt=texts, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False, lora_scale=lora_scale,
                                               clip_skip=clip_skip)
        return {t: {"encoder_hidden_states": emb[i : i + 1], "text_embeds": pooled[i : i + 1],
                    "time_ids": time_ids} for i, t in enumerate(texts)}

    @C.diffusers_conventions
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
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
        time_grid: Sequence[float] | None = None,
        grid_end: str = "zero",
        extra_unets: Sequence[Any] | None = None,
        adapters: Sequence[Any] | None = None,
        switch_every: int = 1,
        max_batch_size: int | None = None,
        compose: str | None = None,
        and_mode: str = "superdiff",
        corrector: Any = None,
        joint_template: str | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Generate images from a superposition of N prompts with SDXL (a list of prompts is ONE composition (its experts), a list of lists a batch of compositions; operator "and" by default).

        The arguments are those of `SuperDiffStableDiffusionPipeline.__call__` plus SDXL's
        micro-conditioning (original_size, crops_coords_top_left, target_size), adapters (LoRA
        experts, see pipelines/adapters.py) included. negative_original_size,
        negative_crops_coords_top_left and negative_target_size micro-condition the
        unconditional branch as in diffusers (they apply when both sizes are given; one size
        alone, or the crop alone, is refused rather than ignored). With
        force_zeros_for_empty_prompt (the SDXL default) and no negative prompt, the
        unconditional branch uses zero embeddings, as in diffusers.

        Returns:
            SuperDiffPipelineOutput (images, trace), or a tuple (images, trace) when
            return_dict is False.
        """
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
        negative_sizes = negative_original_size is not None and negative_target_size is not None
        if not negative_sizes and (negative_original_size is not None or negative_target_size is not None
                                   or tuple(negative_crops_coords_top_left or (0, 0)) != (0, 0)):
            raise ValueError("negative micro-conditioning applies (as in diffusers) only with both "
                             "negative_original_size and negative_target_size; give both (e.g. (1024, 1024)), "
                             "or none of the negative_* size arguments")
        base = C.NetworkPlan(self.unet, C.network_info(self.unet, self.scheduler.config, None,
                                                       self.vae.config, "unet"), "unet")
        check_not_guidance_distilled(base.info, "the pipeline's 'unet'")  # as every extra UNet is checked
        networks, extras = C.plan_extra_networks(base, extra_unets, self.scheduler.config,
                                                 self.unet.config.cross_attention_dim, self.unet.dtype)
        C.check_unet_size([(n.name, n.module) for n in networks], height, width, self.vae_scale_factor)
        plans = C.plan_text_experts(prompts, negatives, networks, extras)
        op_name, plans, routing, specs = A.plan_adapters(adapters, plans, prompts, negatives, op_name, switch_every)
        op_params = dict(weights=weights, bias=bias, temperature=temperature, lift=lift, offsets=offsets,
                         kappa_clamp=kappa_clamp, ridge=ridge, feedback=feedback, operator_kwargs=operator_kwargs)
        method = self._plan_method(op_name, len(plans), op_params, estimator, integrator, schedule,
                                   num_inference_steps, time_grid, grid_end, corrector=corrector)
        do_cfg, w = self._guidance(guidance_scale)
        if routing is not None:
            A.load_adapters(self, specs)  # every adapter checked against this UNet first

        # encode prompts (two text encoders, pooled embeddings) and the micro-conditioning
        device = self._execution_device
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        original_size = tuple(original_size or (height, width))
        target_size = tuple(target_size or (height, width))
        proj_dim = (self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None
                    else self.unet.config.projection_class_embeddings_input_dim
                    - 6 * self.unet.config.addition_time_embed_dim)
        time_ids = self._get_add_time_ids(original_size, tuple(crops_coords_top_left), target_size,
                                          dtype=self.unet.dtype, text_encoder_projection_dim=proj_dim).to(device)
        neg_time_ids = time_ids  # the unconditional branch's, as diffusers' negative_add_time_ids
        if negative_sizes:
            neg_time_ids = self._get_add_time_ids(tuple(negative_original_size),
                                                  tuple(negative_crops_coords_top_left or (0, 0)),
                                                  tuple(negative_target_size),
                                                  dtype=self.unet.dtype,
                                                  text_encoder_projection_dim=proj_dim).to(device)
        texts = [p.prompt for p in plans if p.prompt is not None]
        enc = self._encode_texts(texts, device, clip_skip, lora_scale, time_ids) if texts else {}
        zeros_for_empty = self.config.force_zeros_for_empty_prompt
        if do_cfg:
            neg_texts = [p.negative or "" for p in plans
                         if p.prompt is not None and not (p.negative is None and zeros_for_empty)]
            if neg_texts:
                enc_neg = self._encode_texts(neg_texts, device, None, lora_scale, neg_time_ids)
                enc.update({("neg", k): v for k, v in enc_neg.items()})
        branches = []
        for p in plans:
            if p.prompt is None:  # unconditional / class-conditional UNet2DModel
                branches.append(C.promptless_branch(p, device))
                continue
            c = enc[p.prompt]
            if not do_cfg:
                branches.append(C.Branch(p.network, c, name=p.name))
            elif p.negative is None and zeros_for_empty:
                u = {"encoder_hidden_states": torch.zeros_like(c["encoder_hidden_states"]),
                     "text_embeds": torch.zeros_like(c["text_embeds"]), "time_ids": neg_time_ids}
                branches.append(C.Branch(p.network, c, u, ("zeros",), p.name))
            else:
                neg = p.negative or ""
                branches.append(C.Branch(p.network, c, enc[("neg", neg)], ("neg", neg), p.name))
        forward = None
        if routing is not None:
            branches = A.route_branches(branches, plans, routing)
            forward = A.routed_unet_forward(self.unet, routing, method, cross_attention_kwargs)
        experts = C.NetworkExperts(C.prepare_networks(networks, method.schedule, device, cross_attention_kwargs,
                                                      forward=forward),
                                   branches, guidance=do_cfg, prediction_type=base.info["prediction_type"],
                                   max_batch_size=max_batch_size)
        out = self._run(method, experts, [p.name for p in plans], B, height, width, latents, generator, w,
                        num_inference_steps, time_grid, grid_end, callback_on_step_end, callback_inputs)
        trace = out.trace
        trace.meta.update(prompts=[p.prompt for p in plans])
        if routing is not None:
            trace.meta.update(adapters=routing.describe(), adapter_mode=routing.mode)

        if output_type == "latent":
            image = out.samples.to(self.unet.dtype)
        else:
            image = C.decode_latents(self.vae, out.samples)
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
        image = self._postprocess(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, trace)
        return C.SuperDiffPipelineOutput(images=image, trace=trace)
