"""Model cards (README.md) for the bundled models, rendered from their measured JSON files.

A bundled directory holds ``training.json`` (written by its training script: data,
hyperparameters, parameter counts, CPU seconds) and ``quality.json`` (written by
``scripts/eval_bundled.py``: oracle-measured quality). ``write_card(dir)`` turns both into
README.md, so that no number in a card is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .world import COLOURS, HELD_OUT, SHAPES


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60.0:.1f} CPU-min ({seconds:.0f} s)"


def _hyper(h: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sorted(h.items()))


def _sd3_intro(name: str, tr: dict[str, Any], world_line: str, size: int) -> list[str]:
    """Card introduction of a rectified-flow model in SD3 layout (``scripts/train_shapes_flow.py``)."""
    modes = tr["data"]["caption_modes"]
    two_part = any(m not in ("full", "shape", "colour") for m in modes)
    return [
        "A mini rectified-flow text-to-image model in Stable Diffusion 3 layout, trained from scratch on CPU "
        "by this repository's scripts. Load it like any SD3 checkpoint without its T5 encoder:",
        "",
        "```python",
        "from diffusers import StableDiffusion3Pipeline",
        "from superdiff.registry import bundled_model_path",
        f'pipe = StableDiffusion3Pipeline.from_pretrained(bundled_model_path("{name}"), text_encoder_3=None, tokenizer_3=None)',
        'image = pipe("a blue circle", num_inference_steps=25, guidance_scale=4.0).images[0]  # 32x32',
        "```",
        "",
        world_line,
        "Captions name all or some attributes (\"a red circle\", \"a circle\", \"something red\")"
        + ("; two-part captions join the two single-attribute prompts of seen pairs "
           "(\"a circle and something red\", \"a circle that is red\"), so the joint-prompt baseline is fair"
           if two_part else "")
        + f". {tr['data']['training_images']} training images, caption modes {modes}, caption dropped to \"\" "
        f"with probability {tr['hyperparameters']['uncond_prob']} for classifier-free guidance.",
        "",
        "Components: AutoencoderKL (the shapes VAE of `shapes-t2i`, same weights and latent space; config "
        "`shift_factor` 0 as SD3 decoding needs a value), two CLIPTextModelWithProjection encoders in the "
        "CLIP-L / CLIP-G slots trained from scratch with one CLIP BPE tokenizer built from the caption words "
        "(`tokenizer/`, `tokenizer_2/`), no T5 (`text_encoder_3 = None`: diffusers then appends "
        f"`max_sequence_length` = {tr['max_sequence_length']} zero tokens, the layout it was trained for), "
        "SD3Transformer2DModel (MMDiT, patch size 1 on the 8x8x4 latents), FlowMatchEulerDiscreteScheduler.",
        f"Objective: {tr['objective']}. Training computes the {tr['max_sequence_length']} identical zero tokens as "
        "one token with log-multiplicity attention (exact; `superdiff.shapes.flow`).",
        f"Parameters: {tr['parameters']}. Weights: {size / 1e6:.1f} MB (float32 safetensors).",
    ]


def render_card(directory: str | Path) -> str:
    """The README.md text for a bundled model directory."""
    d = Path(directory)
    tr = json.loads((d / "training.json").read_text())
    q = json.loads((d / "quality.json").read_text()) if (d / "quality.json").exists() else None
    name, kind = tr["name"], tr["kind"]
    vae = tr.get("vae", {})
    cpu = tr.get("cpu_seconds", {})
    size = sum(p.stat().st_size for p in d.rglob("*.safetensors"))
    lines = [f"# {name}", ""]
    held = ", ".join(f"{c} {s}" for c, s in HELD_OUT)
    world_line = (
        f"Data: the procedural shapes world (`superdiff.shapes.world`): 32x32 RGB, one shape "
        f"({', '.join(SHAPES)}) in one colour ({', '.join(COLOURS)}) on black, random size and "
        f"position. Held out of all training data: {held}."
    )
    if kind == "text-to-image" and tr.get("layout") == "sd3":
        lines += _sd3_intro(name, tr, world_line, size)
    elif kind == "text-to-image":
        lines += [
            "A mini text-to-image model in Stable Diffusion layout, trained from scratch on CPU by "
            "this repository's scripts. Load it like any hub checkpoint:",
            "",
            "```python",
            "from diffusers import StableDiffusionPipeline",
            "from superdiff.registry import bundled_model_path",
            f'pipe = StableDiffusionPipeline.from_pretrained(bundled_model_path("{name}"))',
            'image = pipe("a blue circle", num_inference_steps=25, guidance_scale=4.0).images[0]  # 32x32',
            "```",
            "",
            world_line,
            f"Captions name all or some attributes (\"a red circle\", \"a circle\", \"something red\"); "
            f"{tr['data']['training_images']} training images, caption modes {tr['data']['caption_modes']}, "
            f"caption dropped to \"\" with probability {tr['hyperparameters']['uncond_prob']} for classifier-free guidance.",
            "",
            "Components: AutoencoderKL (32x32x3 <-> 8x8x4, shared with the half-data models), "
            "CLIPTextModel trained from scratch with a CLIP BPE tokenizer built from the caption words "
            "(`superdiff/shapes/tokenizer.py`), UNet2DConditionModel, EulerDiscreteScheduler "
            "(SD v1 scaled_linear betas 0.00085-0.012, 1000 steps, epsilon prediction).",
            f"Parameters: {tr['parameters']}. Weights: {size / 1e6:.1f} MB (float32 safetensors).",
        ]
    else:
        shapes = ", ".join(tr["shapes"])
        lines += [
            f"An unconditional latent diffusion model trained only on the shapes {shapes} "
            "(all colours), for multi-checkpoint composition (the SuperDiff paper's CIFAR-halves setup). "
            "It shares the VAE latent space of `shapes-t2i` (vae/ is a copy of the same weights).",
            "",
            "```python",
            "from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DModel",
            "from superdiff.registry import bundled_model_path",
            f'path = bundled_model_path("{name}")',
            'unet = UNet2DModel.from_pretrained(path, subfolder="unet")',
            'vae = AutoencoderKL.from_pretrained(path, subfolder="vae")',
            'scheduler = EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")',
            "```",
            "",
            "`superdiff.shapes.reference.sample_unconditional` is a plain sampling loop for it.",
            "",
            world_line,
            f"{tr['data']['training_images']} training images of {shapes} only.",
            f"Parameters: {tr['parameters']}. Weights: {size / 1e6:.1f} MB (float32 safetensors, VAE copy included).",
        ]
    unet_cpu = cpu.get("unet_and_text_encoder", cpu.get("transformer_and_text_encoders", cpu.get("unet")))
    lines += [
        "",
        "## Training",
        "",
        f"- Script: `{tr.get('script', 'scripts/train_shapes_t2i.py' if kind == 'text-to-image' else 'scripts/train_shapes_halves.py')}` "
        f"(VAE: `scripts/train_shapes_vae.py`); {tr['steps_trained']} steps.",
        f"- Hyperparameters: {_hyper(tr['hyperparameters'])}.",
        *([f"- Note: {tr['note']}"] if tr.get("note") else []),
        f"- VAE hyperparameters: {_hyper(vae.get('hyperparameters', {}))}; "
        f"reconstruction MSE {vae.get('reconstruction', {}).get('mse_01', float('nan')):.4f} (images in [0,1]), "
        f"oracle joint accuracy on reconstructions {_pct(vae.get('reconstruction', {}).get('oracle_accuracy_on_reconstructions', {}).get('joint'))}.",
        *([f"- VAE note: {vae['note']}"] if vae.get("note") else []),
        f"- Loss log: `train_log.jsonl` (one JSON line per {tr['hyperparameters'].get('log_every', 50)} steps: "
        "step, loss, lr, cumulative CPU seconds).",
        f"- CPU time (one thread, shared machine): diffusion model {_minutes(unet_cpu)}; VAE {_minutes(vae.get('cpu_seconds'))}.",
        "",
        "## Measured quality",
        "",
    ]
    if q is None:
        lines.append("Not measured yet: run `python scripts/eval_bundled.py`.")
    else:
        lines.append(f"Measured by `{q['command']}` with the analytic oracle (`superdiff.shapes.oracle`); settings {q['settings']}.")
        lines.append("")
        if kind == "text-to-image":
            f, h = q["full_caption"], q["held_out"]
            lines += [
                f"- Full-caption prompts (the 12 training pairs), right shape AND colour: **{_pct(f['joint'])}** "
                f"of {f['samples']} samples (shape {_pct(f['shape'])}, colour {_pct(f['colour'])}).",
                f"- Held-out pairs ({held}), joint prompt success: **{_pct(h['joint'])}** of {h['samples']} "
                f"samples (shape {_pct(h['shape'])}, colour {_pct(h['colour'])}); per pair: "
                + ", ".join(f"{k} {_pct(v)}" for k, v in h["per_prompt"].items())
                + ".",
                f"- Single-attribute prompts (\"a circle\", \"something red\"): named attribute right in "
                f"{_pct(q['single_attribute']['accuracy'])} of {q['single_attribute']['samples']} samples.",
            ]
            if q.get("guidance_sweep"):
                lines.append(
                    f"- Full-caption joint success by guidance scale ({q.get('guidance_sweep_samples_each', '?')} samples each): "
                    + ", ".join(f"{g}: {_pct(v)}" for g, v in q["guidance_sweep"].items())
                    + "."
                )
        else:
            lines += [
                f"- Samples whose oracle shape is one of its own classes ({', '.join(tr['shapes'])}): "
                f"**{_pct(q['purity'])}** of {q['samples']}.",
                "- Shape distribution: " + ", ".join(f"{k} {_pct(v)}" for k, v in q["shape_distribution"].items())
                + "; colour distribution: " + ", ".join(f"{k} {_pct(v)}" for k, v in q["colour_distribution"].items()) + ".",
                f"- Samples that are a held-out pair (never in training data): {_pct(q.get('held_out_pair_rate'))}.",
            ]
        lines.append(f"- Mean oracle template fit (IoU) of the samples: {q['mean_fit']:.3f} (clean renders: {q['reference_fit']:.3f}).")
    return "\n".join(lines) + "\n"


def write_card(directory: str | Path) -> Path:
    """Render README.md from the directory's JSON files; written atomically."""
    from ..atomic import write_text

    path = Path(directory) / "README.md"
    write_text(path, render_card(directory))
    return path
