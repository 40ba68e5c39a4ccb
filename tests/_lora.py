"""A random LoRA for an in-memory network, saved the way diffusers saves one (test helper)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch


def random_network_lora(network: torch.nn.Module, out_dir: Path, seed: int, pipeline_cls: type,
                        targets: Sequence[str], layers: str, rank: int = 2, alpha: float | None = None) -> Path:
    """Adapt a copy of `network` (the network itself is untouched) with a rank-`rank` PEFT LoRA on
    `targets`, give every LoRA weight N(0, 0.3^2) values from `seed`, and save it with
    `pipeline_cls.save_lora_weights(out_dir, <layers>=...)` ("unet_lora_layers",
    "transformer_lora_layers")."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    net = copy.deepcopy(network)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pipeline_cls.save_lora_weights(out_dir, **{layers: get_peft_model_state_dict(net)})
    return out_dir


def kohya_from_peft(peft_file: Path, out_file: Path, prefix: str = "unet", alpha: float | None = None) -> Path:
    """The same LoRA in the kohya / A1111 layout ("lora_unet_<module path with _>.lora_down.weight",
    ".lora_up.weight", ".alpha"); alpha defaults to the rank (scale alpha / r = 1, as a PEFT file
    saved with lora_alpha = r)."""
    from safetensors.torch import load_file, save_file

    out = {}
    for key, v in load_file(peft_file).items():
        module, kind = key[len(prefix) + 1:].rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        out[name + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = v
        if kind.startswith("A"):
            out[name + ".alpha"] = torch.tensor(float(v.shape[0] if alpha is None else alpha))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, out_file)
    return out_file
