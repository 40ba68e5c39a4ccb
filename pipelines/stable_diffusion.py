"""SuperDiff for Stable Diffusion 1.x / 2.x: N prompts (one expert each), composed with
OR / AND / average / single at sampling time, plus optional extra UNets as experts.

    from superdiff.pipelines import SuperDiffStableDiffusionPipeline
    pipe = SuperDiffStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    out = pipe(["a flamingo", "a candy cane"], operator="and", num_inference_steps=100)
    out.images[0].save("and.png"); out.plot_trace("trace.png")

Also loadable as a custom pipeline:
    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/stable_diffusion.py")
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.models.lora import adjust_lora_scale_text_encoder
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from transformers import CLIPTextModel, CLIPTokenizer

from superdiff.pipelines import _common as C
from superdiff.pipelines import adapters as A
from superdiff.pipelines._checkpoints import check_not_guidance_distilled

__all__ = ["SuperDiffStableDiffusionPipeline"]


class SuperDiffStableDiffusionPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    C.SuperDiffPipelineMixin,
):
    """SuperDiff composition for the Stable Diffusion 1.x / 2.x component layout.

    Components as diffusers' StableDiffusionPipeline: vae, text_encoder, tokenizer, unet,
    scheduler (its config defines the noise schedule; the sampler is superdiff's), and the
    optional safety_checker / feature_extractor.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = C.CALLBACK_TENSOR_INPUTS
    _embeds_kind = "sd"  # prompt_embeds= accepted (pipelines/_conventions.py)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__()
        # outdated SD configs fixed as diffusers' StableDiffusionPipeline fixes them, so that the
        # timestep grid and a seed's image match it (x0 clipping to [-1, 1] is for pixel models)
        fixes = {}
        if scheduler is not None and getattr(scheduler.config, "steps_offset", 1) != 1:
            fixes["steps_offset"] = 1
        if scheduler is not None and getattr(scheduler.config, "clip_sample", False) is True:
            fixes["clip_sample"] = False
        if fixes:
            from diffusers.configuration_utils import FrozenDict

            scheduler._internal_dict = FrozenDict({**scheduler.config, **fixes})
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, safety_checker=safety_checker,
                              feature_extractor=feature_extractor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    # diffusers' own implementations (textual inversion, LoRA scale and clip_skip included)
    run_safety_checker = StableDiffusionPipeline.run_safety_checker

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        """diffusers' StableDiffusionPipeline.encode_prompt, except the prompt encoding with
        clip_skip when the text encoder has no `.text_model` (transformers >= 5: CLIPTextModel
        is itself the text transformer, and diffusers' text_encoder.text_model.final_layer_norm
        fails): then `_clip_skip_embeds` gives diffusers' hidden_states[-(clip_skip + 1)]
        through the final layer norm, and diffusers does the rest (negatives, repeats, dtype)."""
        te = self.text_encoder
        if clip_skip is not None and prompt_embeds is None and te is not None and not hasattr(te, "text_model"):
            prompt_embeds = self._clip_skip_embeds(prompt, device, lora_scale, clip_skip)
        return StableDiffusionPipeline.encode_prompt(
            self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
            clip_skip=clip_skip)

    def _clip_skip_embeds(self, prompt: str | list[str], device: torch.device, lora_scale: float | None,
                          clip_skip: int) -> torch.Tensor:
        """The prompt encoding of diffusers' clip_skip path (textual inversion and LoRA scale
        included), with the final layer norm found on `.text_model` or on the encoder itself."""
        te = self.text_encoder
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        tokens = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device) if getattr(te.config, "use_attention_mask", False) else None
        if lora_scale is not None and not USE_PEFT_BACKEND:
            adjust_lora_scale_text_encoder(te, lora_scale)
        scaled = lora_scale is not None and USE_PEFT_BACKEND
        if scaled:
            scale_lora_layers(te, lora_scale)
        try:
            out = te(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
            return getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        finally:
            if scaled:
                unscale_lora_layers(te, lora_scale)

    def _encode_texts(self, texts: Sequence[str], device: torch.device, clip_skip: int | None,
                      lora_scale: float | None) -> dict[str, dict[str, torch.Tensor]]:
        """Each distinct text once, in one text-encoder batch: text -> {"encoder_hidden_states": [1, L, D]}."""
        texts = C.unique_keys(list(texts))
        emb, _ = self.encode_prompt(texts, device, 1, False, lora_scale=lora_scale, clip_skip=clip_skip)
        return {t: {"encoder_hidden_states": emb[i : i + 1]} for i, t in enumerate(texts)}

    @C.diffusers_conventions
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
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
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Generate images from a superposition of N prompts (a list of prompts is ONE composition (its experts), a list of lists a batch of compositions; operator "and" by default).

        Args:
            prompt: one prompt or a list of N >= 1 prompts; each is an expert. A list of such
                lists is a batch of compositions (diffusers' batch habit), run one after the
                other and returned together.
            height, width: image size (default: unet.config.sample_size * vae_scale_factor);
                must be divisible by the VAE factor.
            num_inference_steps: number of sampler steps.
            guidance_scale: classifier-free guidance w (> 1 enables it); every expert is guided
                as u + w (c_i - u), the combination is u + w sum_i kappa_i (c_i - u).
            negative_prompt: one for all prompts or one per prompt.
            num_images_per_prompt: batch size B (each image is a superposition of all experts).
            generator: a torch.Generator or one per image (a batch equals separate calls).
            latents: initial noise [B, C, H/f, W/f] (scaled like diffusers: times init sigma).
            output_type: "pil", "np", "pt" or "latent".
            operator: "and" (the default, as in the CLI and the studio), "or", "average",
                "single", "joint" (the joint-prompt baseline: one
                expert with the prompts combined by `joint_template`), or a superdiff Operator.
            weights / bias / temperature: OR mixture weights, log-weights and temperature T;
                `weights` are the fixed kappa for "average" (0.5/0.5 is the paper's averaging
                baseline; a negative weight is NOT).
            lift / offsets, kappa_clamp, ridge, feedback: AND parameters (kappa_clamp=False
                disables the clamp).
            operator_kwargs: further operator parameters (e.g. {"index": 1} for "single").
            sampler: "sde" (Euler-Maruyama, the paper's), "ddpm" (ancestral), "euler"/"ode"
                (deterministic, reproduces diffusers' EulerDiscreteScheduler), "heun".
            estimator: log-density estimator "kernel", "ito", "ode" or "none" (default: kernel
                for SDE samplers, ode for ODE samplers, none for single/average on an ODE).
            schedule: "ve" (sigma grid of diffusers' Euler schedulers; default except for
                "ddpm"), "vp" (DDPM/DDIM timesteps) or a superdiff Schedule.
            time_grid: a custom decreasing grid in schedule time -- sigmas for "ve", DDPM
                timesteps for "vp" -- of num_steps + 1 points (overrides num_inference_steps).
            grid_end: "zero" (end noise-free) or "min" (end at the smallest trained noise level).
            extra_unets: more experts from other UNets sharing this VAE (and text encoder):
                modules, checkpoint paths / hub ids, (unet, prompt) pairs or
                superdiff.pipelines.UNetExpert. A text-conditional UNet adds one expert per
                prompt unless given its own; a UNet2DModel on the same latents adds one
                unconditional expert. Incompatible ones are refused with ValueError.
            adapters: LoRA adapters as experts on this pipeline's UNet (pipelines/adapters.py):
                paths, (path, scale) pairs, dicts or superdiff.pipelines.adapters.AdapterExpert;
                None in the list is the base UNet without adapter. Each adapter is one expert per
                prompt (or for its own prompt), all in ONE batched forward per step. Besides the
                core operators, `operator` may then be "composite" (LoRA Composite), "merge"
                (weight merge) or "switch" (LoRA Switch, adapter changing every `switch_every` steps).
            compose: a composition formula instead of `prompt` / `operator`, e.g.
                '("a circle" & "something red") | "a square":0.5' (& AND, | OR, ~ NOT relative
                to the unconditional prompt, :weight; docs/correctors.md); and_mode "superdiff"
                (equal density, default) or "product" (the product of the experts).
            corrector: particle (SMC / Feynman-Kac) and MCMC correctors after each step:
                "smc:8", "ula", "hmc", "smc:4+ula", a dict of superdiff.correctors.Corrector
                fields, or a Corrector; K particles per image share the step's batched forward.
            max_batch_size: at most this many rows per network forward (all branches sharing a
                network otherwise go through ONE batched forward per step).
            cross_attention_kwargs, clip_skip: as in diffusers.
            callback_on_step_end: fn(pipe, step, timestep, callback_kwargs) -> dict, called after
                every step; callback_kwargs holds the names in
                `callback_on_step_end_tensor_inputs` among "latents", "kappa" [B, M],
                "logq" [B, M], "noise_pred"; a returned "latents" replaces the latents.

        Returns:
            SuperDiffPipelineOutput (images, trace, nsfw_content_detected), or a tuple
            (images, trace) when return_dict is False.
        """
        # 1. validate everything before any compute
        prompt, operator = self._apply_compose(prompt, operator, compose, and_mode)
        prompts = C.normalize_prompts(prompt)
        negatives = C.normalize_negative_prompts(negative_prompt, len(prompts))
        op_name, prompts, negatives = C.apply_joint(operator, prompts, negatives, joint_template)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        callback_inputs, integrator = self._check_call(
            height, width, num_inference_steps, num_images_per_prompt, output_type, guidance_scale, max_batch_size, generator, sampler,
            callback_on_step_end, callback_on_step_end_tensor_inputs, latents=latents)
        B = int(num_images_per_prompt)
        text_dim = self.text_encoder.config.hidden_size if self.text_encoder is not None else \
            self.unet.config.cross_attention_dim
        base = C.NetworkPlan(self.unet, C.network_info(self.unet, self.scheduler.config, None,
                                                       self.vae.config, "unet"), "unet")
        check_not_guidance_distilled(base.info, "the pipeline's 'unet'")  # as every extra UNet is checked
        networks, extras = C.plan_extra_networks(base, extra_unets, self.scheduler.config, text_dim,
                                                 self.unet.dtype)
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

        # 2. encode every distinct prompt and negative prompt once
        device = self._execution_device
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        texts = [p.prompt for p in plans if p.prompt is not None]
        enc = self._encode_texts(texts, device, clip_skip, lora_scale) if texts else {}
        enc_neg = {}
        if do_cfg and texts:  # negatives as diffusers encodes them: last hidden state, no clip_skip
            enc_neg = self._encode_texts([p.negative or "" for p in plans if p.prompt is not None], device, None,
                                         lora_scale)
        branches = []
        for p in plans:
            if p.prompt is None:  # unconditional / class-conditional UNet2DModel
                branches.append(C.promptless_branch(p, device))
                continue
            neg = p.negative or ""
            branches.append(C.Branch(p.network, enc[p.prompt], enc_neg[neg] if do_cfg else None,
                                     ("neg", neg) if do_cfg else None, p.name))
        forward = None
        if routing is not None:
            branches = A.route_branches(branches, plans, routing)
            forward = A.routed_unet_forward(self.unet, routing, method, cross_attention_kwargs)
        experts = C.NetworkExperts(C.prepare_networks(networks, method.schedule, device, cross_attention_kwargs,
                                                      forward=forward),
                                   branches, guidance=do_cfg, prediction_type=base.info["prediction_type"],
                                   max_batch_size=max_batch_size)

        # 3. sample from latents drawn as diffusers draws them; every step is superdiff.step.superdiff_step
        out = self._run(method, experts, [p.name for p in plans], B, height, width, latents, generator, w,
                        num_inference_steps, time_grid, grid_end, callback_on_step_end, callback_inputs)
        trace = out.trace
        trace.meta.update(prompts=[p.prompt for p in plans])
        if routing is not None:
            trace.meta.update(adapters=routing.describe(), adapter_mode=routing.mode)

        # 4. decode
        has_nsfw = None
        if output_type == "latent":
            image = out.samples.to(self.unet.dtype)
        else:
            image = C.decode_latents(self.vae, out.samples, generator)
            image, has_nsfw = self.run_safety_checker(image, device, image.dtype)
        do_denormalize = [True] * image.shape[0] if has_nsfw is None else [not f for f in has_nsfw]
        image = self._postprocess(image, output_type, do_denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, trace)
        return C.SuperDiffPipelineOutput(images=image, trace=trace, nsfw_content_detected=has_nsfw)
