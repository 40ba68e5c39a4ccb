"""Train a LoRA on the bundled shapes-t2i UNet that teaches one concept the base model has
never seen (``superdiff.shapes.world``'s extra colours and styles), and export it in the
format diffusers' ``load_lora_weights`` reads (``pytorch_lora_weights.safetensors``).

Concepts
    orange     filled shapes of all four classes in the extra colour orange; captions name the
             shape only ("a circle"), since the bundled tokenizer has no word for orange: the
             LoRA is triggered by being active, not by a word
    outline  hollow shapes (circle, square, triangle) in the four base colours, captioned
             like the base model's data ("a red circle", "a circle", "something red")
Captions are dropped to "" with probability --uncond-prob, so the adapter's own
unconditional branch carries the concept too (classifier-free guidance with the adapter on).

Data: the base VAE was trained on filled shapes in four colours only, and its encoder maps
orange half of the time to yellow or red, and outlines to rings of the wrong colour. The
training latents are therefore found by decoder inversion: starting at the encoder mean, z
is refined by --invert-steps Adam steps on ||D(z) - x||^2, so that the frozen decoder
renders the concept (cached in the workdir; seeded, so reruns give the same latents).

Model: PEFT LoRA (rank --rank, alpha = rank) on the UNet's attention projections,
feed-forwards, transformer in/out projections, resnet convolutions and time projections;
optionally (--text-encoder) on the text encoder's attention too. The base weights are
frozen and never written. The loss is the base model's: epsilon MSE with min-SNR-5 weights
on SD v1's DDPM schedule; batches come from numpy.random.default_rng([seed, step]) so a
resumed run sees the batches an uninterrupted run would.

    nohup nice -n 10 .venv/bin/python scripts/train_shapes_lora.py --concept orange > outputs/train_lora_orange.log 2>&1 &

Re-running the same command resumes from <workdir>/checkpoint.pt (other settings are refused;
``--export-only`` exports with the saved settings and leaves the run's log alone). After
training, the adapter is exported to --out with a model card (README.md) and training.json
holding the oracle-measured concept rates with and without the adapter (same seeds); the
export is built beside --out and replaces it only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from superdiff.shapes import oracle, world
from superdiff.shapes.models import TEXT_MAX_LENGTH, make_train_scheduler
from superdiff.shapes.training import (
    NOT_SETTINGS,
    Run,
    lr_at,
    min_snr_weights,
    reconcile_settings,
    replacing_dir,
    save_atomic,
    step_rng,
    to_model_range,
    write_json,
)

#: concept -> (colours, shapes, style, caption modes)
CONCEPTS: dict[str, dict] = {
    "orange": {"colours": ("orange",), "shapes": world.SHAPES, "style": "filled", "captions": {"shape": 1.0},
             "label": {"colour": "orange"}},
    "outline": {"colours": world.COLOURS, "shapes": world.OUTLINE_SHAPES, "style": "outline",
                "captions": {"full": 0.6, "shape": 0.2, "colour": 0.2}, "label": {"style": "outline"}},
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
EVAL_PROMPTS = ("a circle", "a square", "a triangle")
#: Arguments that change neither the adapter's weights nor its data (the measurement's are chosen at export).
LORA_NOT_SETTINGS: tuple[str, ...] = (*NOT_SETTINGS, "eval_samples", "eval_seed")


def concept_captions(scenes: list[world.Scene], modes: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Captions naming the base-vocabulary attributes only (an extra colour is never named)."""
    names = list(modes)
    p = np.asarray([modes[m] for m in names], dtype=np.float64)
    picks = rng.choice(len(names), size=len(scenes), p=p / p.sum())
    out = []
    for s, k in zip(scenes, picks):
        colour = s.colour if s.colour in world.COLOURS else None
        mode = names[k]
        out.append(world.caption(colour if mode in ("full", "colour") else None,
                                 s.shape if mode in ("full", "shape") or colour is None else None))
    return out


def invert_decoder(vae, images: np.ndarray, steps: int, lr: float, batch: int = 64) -> torch.Tensor:
    """Latents z (unscaled) with D(z) close to images (float [N,3,H,W] in [0,1]): encoder mean,
    then `steps` Adam steps on the mean squared decoding error (see module docstring)."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc="decoder inversion", mininterval=10):
        x = to_model_range(images[i : i + batch])
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.mean
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            loss = F.mse_loss(vae.decode(z).sample, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append(z.detach())
    return torch.cat(out)


def load_concept_dataset(run: Run, vae, tokenizer, concept: str, args) -> dict:
    cache = run.dir / f"latents-{concept}-{args.seed}-{args.dataset_size}-{args.invert_steps}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    spec = CONCEPTS[concept]
    rng = np.random.default_rng([args.seed, 7])
    scenes = world.sample_concept_scenes(rng, args.dataset_size, colours=spec["colours"], shapes=spec["shapes"])
    images = world.render_styled(scenes, spec["style"])
    captions = concept_captions(scenes, spec["captions"], rng)
    torch.manual_seed(args.seed)
    z = invert_decoder(vae, images, args.invert_steps, args.invert_lr)
    with torch.no_grad():
        rec = ((vae.decode(z).sample.clamp(-1, 1) + 1) / 2).numpy()
    res = oracle.concepts(rec)
    label = spec["label"]
    ids = tokenizer(captions, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    blob = {"z": z, "ids": ids, "captions": captions,
            "decoded_concept_rate": float(res.has(**label).mean()),
            "decoded_mse": float(((rec - images) ** 2).mean())}
    save_atomic(blob, cache)
    return blob


@torch.no_grad()
def measure(base_dir: Path, lora_dir: Path | None, label: dict, n: int, seed: int) -> dict:
    """Concept rate of diffusers' StableDiffusionPipeline (+ load_lora_weights) samples."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, adapter_name="concept")
    rates, images = {}, []
    per = n // len(EVAL_PROMPTS)
    for k, prompt in enumerate(EVAL_PROMPTS):
        gens = [torch.Generator().manual_seed(seed + k * per + i) for i in range(per)]
        out = pipe([prompt] * per, num_inference_steps=25, guidance_scale=4.0, generator=gens, output_type="np")
        res = oracle.concepts(out.images)
        rates[prompt] = {"concept": float(res.has(**label).mean()),
                         "shape": float(np.mean([s == prompt.split()[-1] for s in res.shape]))}
        images.append(out.images)
    allc = float(np.mean([r["concept"] for r in rates.values()]))
    return {"concept_rate": allc, "per_prompt": rates, "samples": per * len(EVAL_PROMPTS)}


def write_card(out: Path, concept: str, info: dict) -> None:
    q = info["quality"]
    spec = CONCEPTS[concept]
    what = ("the colour orange (filled shapes of every class)" if concept == "orange"
            else "the outline style: hollow circles, squares and triangles in the base colours")
    lines = [
        f"# lora-{concept}",
        "",
        f"A LoRA for the bundled `shapes-t2i` model that teaches {what}, which the base model "
        "never saw and cannot make. Trained by `scripts/train_shapes_lora.py`; the base model is unchanged.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "from superdiff.registry import BUNDLED_ROOT",
        "pipe = StableDiffusionPipeline.from_pretrained(BUNDLED_ROOT / 'shapes-t2i')",
        f"pipe.load_lora_weights(BUNDLED_ROOT / 'lora-{concept}', adapter_name='{concept}')",
        "image = pipe('a circle', num_inference_steps=25, guidance_scale=4.0).images[0]",
        "```",
        "",
        "## Training",
        "",
        f"- Data: {info['data']['images']} renders of `world.sample_concept_scenes` (colours {list(spec['colours'])}, "
        f"shapes {list(spec['shapes'])}, style {spec['style']!r}); captions {spec['captions']} "
        f"(base vocabulary only), dropped to \"\" with probability {info['hyperparameters']['uncond_prob']}.",
        f"- Latents by decoder inversion ({info['hyperparameters']['invert_steps']} Adam steps from the encoder mean): "
        f"the frozen decoder renders them with the concept in {100 * info['data']['decoded_concept_rate']:.1f}% "
        f"of cases (MSE {info['data']['decoded_mse']:.4f}).",
        f"- LoRA rank {info['hyperparameters']['rank']} (alpha = rank) on {', '.join(UNET_TARGETS)}"
        + (f"; text encoder {', '.join(TEXT_TARGETS)}" if info["hyperparameters"]["text_encoder"] else "")
        + f": {info['parameters']} parameters, {info['file_bytes'] / 1e6:.2f} MB.",
        f"- {info['steps_trained']} steps, batch {info['hyperparameters']['batch']}, lr {info['hyperparameters']['lr']}, "
        f"seed {info['hyperparameters']['seed']}; {info['cpu_seconds'] / 60:.1f} CPU minutes (one thread).",
        "",
        "## Measured (oracle `superdiff.shapes.oracle.concepts`)",
        "",
        f"diffusers' `StableDiffusionPipeline` + `load_lora_weights`, prompts {list(EVAL_PROMPTS)}, "
        f"{q['with_lora']['samples']} samples, 25 Euler steps, guidance 4, seeds {info['eval_seed']}+i; "
        f"concept = {spec['label']}:",
        "",
        "| | concept rate | right shape |",
        "|---|---|---|",
    ]
    for key, title in (("base", "base model"), ("with_lora", "with this LoRA")):
        shape = np.mean([r["shape"] for r in q[key]["per_prompt"].values()])
        lines.append(f"| {title} | {100 * q[key]['concept_rate']:.1f}% | {100 * shape:.1f}% |")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", required=True, choices=sorted(CONCEPTS))
    ap.add_argument("--base", default=None, help="base pipeline (default: the bundled shapes-t2i)")
    ap.add_argument("--workdir", default=None, help="default: outputs/train/lora-<concept>")
    ap.add_argument("--out", default=None, help="export directory (default: superdiff/bundled/lora-<concept>)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--text-encoder", action="store_true", help="also put LoRA layers on the text encoder")
    ap.add_argument("--dataset-size", type=int, default=512)
    ap.add_argument("--invert-steps", type=int, default=60)
    ap.add_argument("--invert-lr", type=float, default=0.1)
    ap.add_argument("--uncond-prob", type=float, default=0.2)
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-samples", type=int, default=96)
    ap.add_argument("--eval-seed", type=int, default=1000)
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint and exit")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or f"outputs/train/lora-{args.concept}")
    run = Run(workdir)
    state = run.load()
    # resuming needs the saved settings; an export takes them (rank, base, data size, ...)
    settings = reconcile_settings(run, state, {k: v for k, v in vars(args).items() if k not in LORA_NOT_SETTINGS},
                                  args, args.export_only, keep=())
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from superdiff.registry import BUNDLED_ROOT

    base_dir = Path(args.base) if args.base else BUNDLED_ROOT / "shapes-t2i"
    out = Path(args.out or BUNDLED_ROOT / f"lora-{args.concept}")
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    for m in (vae, unet, text_encoder):
        m.requires_grad_(False).eval()
    scaling = float(vae.config.scaling_factor)

    data_info = None if state is None else state.get("data")
    if args.export_only and data_info is not None:  # an export needs no training data
        data = None
    else:
        data = load_concept_dataset(run, vae, tokenizer, args.concept, args)
        data_info = {k: data[k] for k in ("decoded_concept_rate", "decoded_mse")}
    torch.manual_seed(args.seed)  # the same LoRA initialisation whether or not the data was cached
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    if args.text_encoder:
        text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                            target_modules=TEXT_TARGETS))
    trainable = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    train_sched = make_train_scheduler()
    ac = train_sched.alphas_cumprod
    empty_ids = tokenizer([""], padding="max_length", max_length=TEXT_MAX_LENGTH, return_tensors="pt").input_ids

    def lora_state() -> dict:
        return {n: p.detach().clone() for m, pre in ((unet, "unet."), (text_encoder, "te."))
                for n, p in m.named_parameters(prefix=pre[:-1]) if p.requires_grad}

    def load_lora_state(state: dict) -> None:
        params = dict(unet.named_parameters(prefix="unet")) | dict(text_encoder.named_parameters(prefix="te"))
        for n, v in state.items():
            params[n].data.copy_(v)

    start = 0
    if state is not None:
        load_lora_state(state["lora"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        run.resume(start, args.export_only)

    n = 0 if data is None else len(data["ids"])
    steps = 0 if args.export_only else args.steps
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"lora-{args.concept}", mininterval=10)
    running = []
    for step in bar:
        rng = step_rng(args.seed, step)
        idx = torch.from_numpy(rng.integers(0, n, size=args.batch))
        drop = torch.from_numpy(rng.uniform(size=args.batch) < args.uncond_prob)
        ids = torch.where(drop[:, None], empty_ids, data["ids"][idx])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z0 = data["z"][idx] * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(ac), (args.batch,), generator=gen)
        zt = train_sched.add_noise(z0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=50)
        cond = text_encoder(ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(ac, t, args.min_snr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        running.append(per.mean().item())
        if (step + 1) % args.log_every == 0:
            rec = {"step": step + 1, "loss": float(np.mean(running)), "lr": opt.param_groups[0]["lr"],
                   "cpu_s": run.cpu_seconds}
            running = []
            run.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            print(rec, flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            run.save({"lora": lora_state(), "opt": opt.state_dict(), "step": step + 1, "settings": settings,
                      "data": data_info})

    final = run.load()
    if final is None:
        raise SystemExit(f"no checkpoint in {run.dir}; train first")
    load_lora_state(final["lora"])
    with replacing_dir(out) as stage:  # the previous export stays until this one is complete
        quality = export(stage, base_dir, unet, text_encoder, args, final, data_info)
    print(json.dumps(quality, indent=1), flush=True)
    print(f"exported {out}", flush=True)


def export(stage: Path, base_dir: Path, unet, text_encoder, args, final: dict, data_info: dict) -> dict:
    """Weights, training.json (with the measured quality) and README.md of the adapter, in ``stage``."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # PEFT key format (".lora_A.weight"), which load_lora_weights reads as is
    unet_layers = get_peft_model_state_dict(unet)
    te_layers = get_peft_model_state_dict(text_encoder) if args.text_encoder else None
    StableDiffusionPipeline.save_lora_weights(stage, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
                                              weight_name="pytorch_lora_weights.safetensors")
    weights = stage / "pytorch_lora_weights.safetensors"
    label = CONCEPTS[args.concept]["label"]
    print("measuring the concept rate with and without the LoRA ...", flush=True)
    quality = {"with_lora": measure(base_dir, stage, label, args.eval_samples, args.eval_seed),
               "base": measure(base_dir, None, label, args.eval_samples, args.eval_seed)}
    info = {
        "name": f"lora-{args.concept}",
        "kind": "lora",
        "base_model": "shapes-t2i",
        "concept": args.concept,
        "label": label,
        "steps_trained": final["step"],
        "hyperparameters": {k: v for k, v in vars(args).items()
                            if k not in ("workdir", "out", "export_only", "base", "concept")},
        "parameters": int(sum(v.numel() for v in final["lora"].values())),
        "file_bytes": weights.stat().st_size,
        "cpu_seconds": round(float(final["cpu_seconds"]), 1),
        "data": {"images": args.dataset_size, **data_info},
        "eval_seed": args.eval_seed,
        "quality": quality,
    }
    write_json(stage / "training.json", info)
    write_card(stage, args.concept, info)
    return quality


if __name__ == "__main__":
    sys.exit(main())
