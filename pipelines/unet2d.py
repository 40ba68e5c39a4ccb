"""SuperDiff over two or more UNet2DModel checkpoints (e.g. the paper's CIFAR-10 models
trained on disjoint halves of the classes), in pixel space or in a shared VAE latent
space, unconditional or class-conditional.

    from superdiff.pipelines import SuperDiffUNet2DPipeline
    pipe = SuperDiffUNet2DPipeline.from_checkpoints(["path/or/hub-id-a", "path/or/hub-id-b"])
    out = pipe(batch_size=4, operator="or", num_inference_steps=100)

The pipeline's own components are `unet`, `scheduler`, optional `vae` and optional
`unet_2` ... `unet_8` (saved and loaded like any diffusers component); more UNets can be
passed per call with `extra_unets=`.

Also loadable as a custom pipeline:
    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/unet2d.py")
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers

from superdiff.pipelines import _common as C

__all__ = ["SuperDiffUNet2DPipeline"]

MAX_UNETS = 8
_EXTRA = [f"unet_{k}" for k in range(2, MAX_UNETS + 1)]


class SuperDiffUNet2DPipeline(DiffusionPipeline, C.SuperDiffPipelineMixin):
    """SuperDiff composition of UNet2DModel experts sharing one noise schedule and one
    data space (pixels, or the latents of the optional `vae`).

    prediction_types: what each registered UNet predicts, in the order unet, unet_2, ...
    (default: the scheduler's prediction_type for all).
    """

    model_cpu_offload_seq = "->".join(["unet", *_EXTRA, "vae"])
    _optional_components = ["vae", *_EXTRA]
    _callback_tensor_inputs = C.CALLBACK_TENSOR_INPUTS

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL = None,
        unet_2: UNet2DModel = None,
        unet_3: UNet2DModel = None,
        unet_4: UNet2DModel = None,
        unet_5: UNet2DModel = None,
        unet_6: UNet2DModel = None,
        unet_7: UNet2DModel = None,
        unet_8: UNet2DModel = None,
        prediction_types: list[str] | None = None,
    ):
        super().__init__()
        extra = dict(unet_2=unet_2, unet_3=unet_3, unet_4=unet_4, unet_5=unet_5, unet_6=unet_6, unet_7=unet_7,
                     unet_8=unet_8)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, **extra)
        self.register_to_config(prediction_types=list(prediction_types) if prediction_types else None)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ construction
    @property
    def unets(self) -> list[tuple[str, UNet2DModel]]:
        """The registered UNets, (component name, module), in expert order."""
        out = [("unet", self.unet)]
        out += [(n, getattr(self, n, None)) for n in _EXTRA if getattr(self, n, None) is not None]
        return out

    @classmethod
    def from_unets(cls, unets: Sequence[UNet2DModel], scheduler: Any, vae: AutoencoderKL | None = None,
                   prediction_types: Sequence[str] | None = None) -> "SuperDiffUNet2DPipeline":
        """A pipeline from 1..8 UNet2DModel modules sharing `scheduler` (and `vae`)."""
        unets = list(unets)
        if not 1 <= len(unets) <= MAX_UNETS:
            raise ValueError(f"give between 1 and {MAX_UNETS} UNets, got {len(unets)}; pass more per call with "
                             "extra_unets=")
        extra = {n: u for n, u in zip(_EXTRA, unets[1:])}
        pipe = cls(unet=unets[0], scheduler=scheduler, vae=vae, prediction_types=prediction_types, **extra)
        pipe._check_registered()
        return pipe

    @classmethod
    def from_checkpoints(cls, sources: Sequence[str | os.PathLike], torch_dtype: torch.dtype | None = None,
                         scheduler: Any = None, vae: AutoencoderKL | None = None) -> "SuperDiffUNet2DPipeline":
        """A pipeline from 1..8 checkpoints (local directories or hub ids), each a pipeline
        folder (unet/, scheduler/, optional vae/) or a bare UNet2DModel folder.

        The scheduler and VAE come from the first checkpoint that has them (or the arguments);
        every checkpoint's noise schedule, prediction type and VAE config are checked before
        the pipeline is built.
        """
        from diffusers import DDPMScheduler

        experts = [C.load_unet(s, torch_dtype) for s in sources]
        if not experts:
            raise ValueError("give at least one checkpoint")
        sched_cfg = next((e.scheduler_config for e in experts if e.scheduler_config), None)
        if scheduler is None:
            if sched_cfg is None:
                raise ValueError("none of the checkpoints has a scheduler/ folder; pass scheduler=")
            scheduler = DDPMScheduler.from_config(sched_cfg)
        if vae is None:
            src = next((s for s, e in zip(sources, experts) if e.vae_config is not None), None)
            if src is not None:
                kw = {"subfolder": "vae"}
                if torch_dtype is not None:
                    kw["torch_dtype"] = torch_dtype
                vae = AutoencoderKL.from_pretrained(str(src), **kw)
        vae_cfg = None if vae is None else dict(vae.config)
        base = C.network_info(experts[0].unet, experts[0].scheduler_config or scheduler.config,
                              experts[0].prediction_type, vae_cfg, experts[0].name or "unet")
        for e in experts[1:]:
            info = C.network_info(e.unet, e.scheduler_config or scheduler.config, e.prediction_type, e.vae_config,
                                  e.name or "unet")
            C.check_compatible(base, info)
        for e in experts:
            if e.vae_config is not None and vae_cfg is not None:
                C.check_compatible(base, C.network_info(e.unet, e.scheduler_config or scheduler.config,
                                                        e.prediction_type, e.vae_config, e.name or "unet"))
        preds = [e.prediction_type or scheduler.config.get("prediction_type", "epsilon") for e in experts]
        return cls.from_unets([e.unet for e in experts], scheduler, vae, preds)

    def _prediction_type(self, k: int) -> str:
        preds = self.config.get("prediction_types") or None
        if preds and k < len(preds) and preds[k]:
            return preds[k]
        return self.scheduler.config.get("prediction_type", "epsilon")

    def _base_info(self) -> dict[str, Any]:
        return C.network_info(self.unet, self.scheduler.config, self._prediction_type(0),
                              None if self.vae is None else dict(self.vae.config), "unet")

    def _check_registered(self) -> list[C.NetworkPlan]:
        base = C.NetworkPlan(self.unet, self._base_info(), "unet")
        nets = [base]
        for k, (name, u) in enumerate(self.unets[1:], start=1):
            if not isinstance(u, UNet2DModel):
                raise ValueError(f"{name} is a {type(u).__name__}; SuperDiffUNet2DPipeline composes UNet2DModel "
                                 "checkpoints (use the Stable Diffusion pipelines for text-conditional UNets)")
            info = C.network_info(u, self.scheduler.config, self._prediction_type(k), None, name)
            C.check_compatible(base.info, info)
            nets.append(C.NetworkPlan(u, info, name))
        return nets

    def _size_check(self, height: int, width: int) -> None:
        """The VAE factor (1 in pixel space) times 2**(down-sampling levels) of every registered UNet."""
        super()._size_check(height, width)
        C.check_unet_size(self.unets, height, width, self.vae_scale_factor)

    # ------------------------------------------------------------------ sampling
    @C.diffusers_conventions
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: int | Sequence[int] | None = None,
        guidance_scale: float = 1.0,
        null_class_label: int | None = None,
        height: int | None = None,
        width: int | None = None,
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
        max_batch_size: int | None = None,
        corrector: Any = None,
        num_images_per_prompt: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Sample a superposition of the UNet experts (operator "and" by default).

        Experts: each registered UNet (unet, unet_2, ...) then each of `extra_unets`; an
        unconditional UNet is one expert, a class-conditional one is one expert per label in
        `class_labels` (or its UNetExpert.class_label).

        Args:
            batch_size (alias num_images_per_prompt): number of samples B (default 1); give
                one of the two, or both equal.
            class_labels: the labels for class-conditional UNets (one expert each), each in
                [0, num_class_embeds); refused when no UNet is class-conditional.
            guidance_scale, null_class_label: classifier-free guidance for class-conditional
                UNets trained with a null class (> 1 needs null_class_label, in
                [0, num_class_embeds) of every class-conditional UNet).
            height, width: sample size (default: unet.config.sample_size times the VAE factor);
                multiples of the VAE factor times 2**(down-sampling levels) of every UNet.
            operator ... grid_end, max_batch_size, corrector, callback_on_step_end: as in
                SuperDiffStableDiffusionPipeline.__call__.
            extra_unets: more UNet2DModel experts (modules, checkpoint paths / hub ids or
                superdiff.pipelines.UNetExpert), checked for compatibility before any compute.

        Returns:
            SuperDiffPipelineOutput (images, trace), or (images, trace) when return_dict is False.
        """
        if batch_size is not None and num_images_per_prompt is not None and batch_size != num_images_per_prompt:
            raise ValueError(f"batch_size={batch_size!r} and num_images_per_prompt={num_images_per_prompt!r} are "
                             "the same setting (the number of samples) with different values; give one of them")
        B = num_images_per_prompt if num_images_per_prompt is not None else batch_size
        B = 1 if B is None else int(B)
        size = self.unet.config.sample_size
        sh, sw = (size, size) if isinstance(size, int) else tuple(size)
        height = height or sh * self.vae_scale_factor
        width = width or sw * self.vae_scale_factor
        callback_inputs, integrator = self._check_call(
            height, width, num_inference_steps, B, output_type, guidance_scale, max_batch_size, generator, sampler,
            callback_on_step_end, callback_on_step_end_tensor_inputs, latents=latents)
        networks = self._check_registered()
        n_registered = len(networks)
        extras: list[C.UNetExpert] = []
        if extra_unets:
            networks, extras = self._with_extras(networks, extra_unets)
            C.check_unet_size([(n.name, n.module) for n in networks[n_registered:]], height, width,
                              self.vae_scale_factor)  # the registered ones: _size_check
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = [class_labels]
        labels = None if class_labels is None else [int(c) for c in class_labels]
        plans: list[C.ExpertPlan] = []
        for k in range(n_registered):
            plans += self._expert_plans(k, networks[k], labels)
        for e in extras:
            k = next(i for i, n in enumerate(networks) if n.module is e.unet)
            if e.class_label is not None and not networks[k].info["class_conditional"]:
                raise ValueError(f"extra UNet {networks[k].name!r} is unconditional (no num_class_embeds in its "
                                 f"config), but was given class_label={e.class_label!r}, which it cannot take; "
                                 "leave class_label out for it")
            plans += self._expert_plans(k, networks[k], labels if e.class_label is None else [e.class_label])
        self._check_labels(networks, plans, class_labels, null_class_label)
        do_cfg, w = self._guidance(guidance_scale)
        if do_cfg:
            if null_class_label is None or not any(p.class_label is not None for p in plans):
                raise ValueError(f"guidance_scale={guidance_scale} needs class-conditional UNets and "
                                 "null_class_label (the label of the unconditional class); use guidance_scale=1")
        op_params = dict(weights=weights, bias=bias, temperature=temperature, lift=lift, offsets=offsets,
                         kappa_clamp=kappa_clamp, ridge=ridge, feedback=feedback, operator_kwargs=operator_kwargs)
        method = self._plan_method(operator, len(plans), op_params, estimator, integrator, schedule,
                                   num_inference_steps, time_grid, grid_end, corrector=corrector)

        device = self._execution_device
        branches = []
        for p in plans:
            if p.class_label is None:
                branches.append(C.Branch(p.network, None, name=p.name))
                continue
            cond = {"class_labels": torch.tensor([p.class_label], device=device)}
            unc = {"class_labels": torch.tensor([null_class_label], device=device)} if do_cfg else None
            branches.append(C.Branch(p.network, cond, unc, ("null",) if do_cfg else None, p.name))
        experts = C.NetworkExperts(C.prepare_networks(networks, method.schedule, device), branches, guidance=do_cfg,
                                   prediction_type=networks[0].info["prediction_type"],
                                   max_batch_size=max_batch_size)
        out = self._run(method, experts, [p.name for p in plans], B, height, width, latents, generator, w,
                        num_inference_steps, time_grid, grid_end, callback_on_step_end, callback_inputs)
        trace = out.trace
        if output_type == "latent":
            image = out.samples.to(self.unet.dtype)
        elif self.vae is not None:
            image = C.decode_latents(self.vae, out.samples, generator)
        else:
            image = out.samples
        image = self._postprocess(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, trace)
        return C.SuperDiffPipelineOutput(images=image, trace=trace)

    def _with_extras(self, networks: list[C.NetworkPlan], extra_unets: Any):
        nets, extras = C.plan_extra_networks(networks[0], extra_unets, self.scheduler.config, None, self.unet.dtype,
                                             first_index=len(networks) + 1)
        for e in extras:
            if type(e.unet).__name__ != "UNet2DModel":
                raise ValueError(f"extra UNet {e.name!r} is a {type(e.unet).__name__}; this pipeline composes "
                                 "UNet2DModel experts")
        merged = list(networks)
        for n in nets[1:]:
            if not any(m.module is n.module for m in merged):
                merged.append(n)
        return merged, extras

    @staticmethod
    def _check_labels(networks: list[C.NetworkPlan], plans: list[C.ExpertPlan], class_labels: Any,
                      null_class_label: Any) -> None:
        """Labels that would be ignored (no class-conditional UNet) or that lie outside a UNet's
        class embedding table are refused before any compute."""
        if not any(n.info["class_conditional"] for n in networks):
            given = [k for k, v in (("class_labels", class_labels), ("null_class_label", null_class_label))
                     if v is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} given, but none of the UNets is class-conditional (no "
                                 "num_class_embeds in their configs), so the labels would be ignored; leave "
                                 f"{'them' if len(given) > 1 else 'it'} out")
            return

        def table(n: C.NetworkPlan) -> int | None:  # an nn.Embedding of num_class_embeds rows
            cfg = n.module.config
            if getattr(cfg, "class_embed_type", None) is None and getattr(cfg, "num_class_embeds", None):
                return int(cfg.num_class_embeds)
            return None

        for p in plans:
            n = networks[p.network]
            size = table(n)
            if p.class_label is not None and size is not None and not 0 <= p.class_label < size:
                raise ValueError(f"class label {p.class_label} is outside {n.name}'s classes 0..{size - 1} "
                                 f"(num_class_embeds={size}); give labels in that range")
            if null_class_label is not None and p.class_label is not None and size is not None \
                    and not 0 <= int(null_class_label) < size:
                raise ValueError(f"null_class_label={null_class_label} is outside {n.name}'s classes "
                                 f"0..{size - 1} (num_class_embeds={size}); give the label its training used for "
                                 "the unconditional (dropped) class")

    @staticmethod
    def _expert_plans(k: int, n: C.NetworkPlan, labels: list[int] | None) -> list[C.ExpertPlan]:
        if not n.info["class_conditional"]:
            return [C.ExpertPlan(k, name=n.name)]
        if not labels:
            raise ValueError(f"{n.name} is class-conditional: pass class_labels (one expert per label)")
        return [C.ExpertPlan(k, class_label=c, name=f"{n.name}: class {c}") for c in labels]
