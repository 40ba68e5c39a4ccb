"""Planning the experts of a call: the networks (the pipeline's own and `extra_unets`,
each checked against it), one expert per (network, prompt) or per class / unconditional
network, and the core `Network` objects the batched forward runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from superdiff.diffusers_experts import Branch, Network, unet_forward
from superdiff.schedules import Schedule

from ._checkpoints import (TransformerExpert, UNetExpert, as_transformer_expert, as_unet_expert, check_compatible,
                           check_transformer_compatible, network_info, transformer_info)

__all__ = ["ExpertPlan", "NetworkPlan", "plan_extra_networks", "plan_extra_transformers", "plan_text_experts",
           "promptless_branch", "prepare_networks"]


@dataclass
class ExpertPlan:
    """One expert before encoding: which network, which prompt / class, which negative."""

    network: int
    prompt: str | None = None
    negative: str | None = None
    class_label: int | None = None
    name: str = "expert"
    adapter: str | None = None  # the adapter (LoRA) this expert runs with (pipelines/adapters.py)


@dataclass
class NetworkPlan:
    module: torch.nn.Module
    info: dict[str, Any]
    name: str


def _module_device(m: torch.nn.Module) -> torch.device:
    try:
        return next(m.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def plan_extra_networks(base: NetworkPlan, extras: Sequence[Any] | None, scheduler_config: Mapping[str, Any],
                        text_dim: int | None,
                        torch_dtype: torch.dtype | None = None,
                        first_index: int = 2) -> tuple[list[NetworkPlan], list[UNetExpert]]:
    """Normalise `extra_unets` and check every one against the base network (ValueError
    before any compute). Returns the networks (base first; a module given twice is one
    network) and the entries as UNetExperts. base.info must carry the pipeline VAE's
    scaling_factor / latent_channels (network_info(..., vae_config=pipe.vae.config))."""
    networks = [base]
    entries: list[UNetExpert] = []
    if extras is None:
        return networks, entries
    if isinstance(extras, (torch.nn.Module, str, os.PathLike, UNetExpert)):
        extras = [extras]
    for k, raw in enumerate(extras):
        e = as_unet_expert(raw, torch_dtype)
        if not isinstance(e.unet, torch.nn.Module):
            raise ValueError(f"extra UNet {k} is a {type(e.unet).__name__}, not a UNet module")
        name = e.name or f"unet_{first_index + k}"
        sched = e.scheduler_config if e.scheduler_config is not None else scheduler_config
        info = network_info(e.unet, sched, e.prediction_type or (None if e.scheduler_config else
                                                                 base.info["prediction_type"]),
                            e.vae_config, name)
        check_compatible(base.info, info, text_dim)
        idx = next((i for i, n in enumerate(networks) if n.module is e.unet), None)
        if idx is None:
            networks.append(NetworkPlan(e.unet, info, name))
        entries.append(UNetExpert(e.unet, e.prompt, e.negative_prompt, e.class_label, info["prediction_type"],
                                  sched, e.vae_config, name))
    return networks, entries


def plan_extra_transformers(base: NetworkPlan, extras: Sequence[Any] | None, scheduler_config: Mapping[str, Any],
                            torch_dtype: torch.dtype | None = None,
                            first_index: int = 2) -> tuple[list[NetworkPlan], list[TransformerExpert]]:
    """`plan_extra_networks` for the flow pipelines' `extra_transformers`: each one checked
    against the pipeline's transformer (check_transformer_compatible) before any compute."""
    networks = [base]
    entries: list[TransformerExpert] = []
    if extras is None:
        return networks, entries
    if isinstance(extras, (torch.nn.Module, str, os.PathLike, TransformerExpert, UNetExpert)):
        extras = [extras]
    for k, raw in enumerate(extras):
        e = as_transformer_expert(raw, torch_dtype)
        if not isinstance(e.transformer, torch.nn.Module):
            raise ValueError(f"extra transformer {k} is a {type(e.transformer).__name__}, not a transformer module")
        name = e.name or f"transformer_{first_index + k}"
        sched = e.scheduler_config if e.scheduler_config is not None else scheduler_config
        info = transformer_info(e.transformer, sched, e.vae_config, name)
        check_transformer_compatible(base.info, info)
        if not any(n.module is e.transformer for n in networks):
            networks.append(NetworkPlan(e.transformer, info, name))
        entries.append(TransformerExpert(e.transformer, e.prompt, e.negative_prompt, sched, e.vae_config, name))
    return networks, entries


def promptless_branch(plan: ExpertPlan, device: torch.device) -> Branch:
    """The branch of an expert without a prompt in a text pipeline (an extra UNet2DModel):
    unguided, conditioned on its class label if it has one."""
    cond = None if plan.class_label is None else {"class_labels": torch.tensor([plan.class_label], device=device)}
    return Branch(plan.network, cond, name=plan.name)


def plan_text_experts(prompts: Sequence[str], negatives: Sequence[str | None], networks: Sequence[NetworkPlan],
                      extras: Sequence[UNetExpert]) -> list[ExpertPlan]:
    """Experts of a text-conditional pipeline: one per prompt on the pipeline's UNet, then
    for each extra UNet one per prompt (or its own prompt); an unconditional UNet2DModel is
    one expert without guidance, a class-conditional one one expert for its class_label."""
    plans = [ExpertPlan(0, p, negatives[i], name=p) for i, p in enumerate(prompts)]
    shared_neg = negatives[0] if len(set(negatives)) == 1 else None
    for e in extras:
        net = next(i for i, n in enumerate(networks) if n.module is e.unet)
        info = networks[net].info
        if info["class"] == "UNet2DModel":
            if info["class_conditional"]:
                if e.class_label is None:
                    raise ValueError(f"extra UNet {e.name!r} is class-conditional: give its class_label "
                                     "(superdiff.pipelines.UNetExpert(unet, class_label=...))")
                plans.append(ExpertPlan(net, class_label=int(e.class_label), name=f"{e.name}: class {e.class_label}"))
            else:
                plans.append(ExpertPlan(net, name=e.name))
        elif e.prompt is not None:
            neg = e.negative_prompt if e.negative_prompt is not None else (
                negatives[prompts.index(e.prompt)] if e.prompt in prompts else shared_neg)
            plans.append(ExpertPlan(net, e.prompt, neg, name=f"{e.name}: {e.prompt}"))
        else:
            for i, p in enumerate(prompts):
                neg = e.negative_prompt if e.negative_prompt is not None else negatives[i]
                plans.append(ExpertPlan(net, p, neg, name=f"{e.name}: {p}"))
    return plans


def prepare_networks(networks: Sequence[NetworkPlan], schedule: Schedule, device: torch.device,
                     cross_attention_kwargs: dict | None = None,
                     forward: Callable[[torch.nn.Module], Callable] | None = None) -> list[Network]:
    """Core Network objects; extra networks are moved to the execution device. forward(module)
    gives a network's fn(x, t, cond) (default: unet_forward)."""
    out = []
    for k, n in enumerate(networks):
        if k > 0 and _module_device(n.module) != device:
            n.module.to(device)
        fn = forward(n.module) if forward is not None else unet_forward(n.module, schedule, cross_attention_kwargs)
        out.append(Network(fn, n.info["prediction_type"], n.name))
    return out
