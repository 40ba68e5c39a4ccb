"""Train the mini text-to-image model `shapes-t2i` (Stable Diffusion layout) from scratch.

Components: the trained shapes VAE (frozen, from scripts/train_shapes_vae.py), a CLIP BPE
tokenizer built from the caption words, a tiny CLIPTextModel and a UNet2DConditionModel
trained jointly on the epsilon-prediction loss (min-SNR-5 weights) over SD v1's DDPM
schedule. Captions are dropped to "" with probability --uncond-prob so that
classifier-free guidance works. A fixed dataset of --dataset-size renders (held-out pairs
excluded, captions naming all or some attributes) is encoded once to latent posteriors;
each step samples latents z = scaling_factor * (mean + std * eps).

The EMA weights are exported with diffusers' StableDiffusionPipeline.save_pretrained, with
an EulerDiscreteScheduler of the same betas, no safety checker and no feature extractor.

    nohup nice -n 10 .venv/bin/python scripts/train_shapes_t2i.py > outputs/train_t2i.log 2>&1 &

Re-running the same command resumes from <workdir>/checkpoint.pt (other settings are refused;
``--export-only`` exports with the saved settings).

``--captions two-part`` trains the ``shapes-t2i-pairs`` variant: a tokenizer that also knows
"and", "that", "is", and captions that include joint prompts of seen pairs written the way a
user joins two prompts ("a circle and something red", "a circle that is red"; see
``world.TWO_PART_MODES``), so the joint-prompt baseline is fair on held-out pairs:

    nohup nice -n 10 .venv/bin/python scripts/train_shapes_t2i.py --captions two-part \
        --vae superdiff/bundled/shapes-t2i/vae --workdir outputs/train/shapes-t2i-pairs \
        --out superdiff/bundled/shapes-t2i-pairs --steps 3000 > outputs/train_t2i_pairs.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from superdiff.shapes import world
from superdiff.shapes.models import (
    TEXT_MAX_LENGTH,
    make_sampling_scheduler,
    make_t2i_unet,
    make_text_encoder,
    make_train_scheduler,
)
from superdiff.shapes.tokenizer import build_tokenizer
from superdiff.shapes.training import (
    CAPTION_PROBS,
    EMA,
    NOT_SETTINGS,
    Run,
    load_latent_dataset,
    lr_at,
    min_snr_weights,
    parameter_count,
    reconcile_settings,
    replacing_dir,
    step_rng,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", default="outputs/train/shapes-vae/final", help="trained VAE directory")
    ap.add_argument("--workdir", default="outputs/train/shapes-t2i")
    ap.add_argument("--out", default="superdiff/bundled/shapes-t2i", help="export directory")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--dataset-size", type=int, default=40000)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--captions", choices=sorted(CAPTION_PROBS), default="single",
                    help="caption set: 'single' (shapes-t2i) or 'two-part' (adds joint prompts of seen pairs)")
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint and exit")
    ap.add_argument("--note", default="", help="free-text note recorded in training.json (e.g. schedule changes)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.dataset_size < 1:
        raise SystemExit("--steps, --batch and --dataset-size must be positive")
    run = Run(args.workdir)
    state = run.load()
    # resuming needs the saved settings; an export takes them (e.g. --captions picks the tokenizer)
    settings = reconcile_settings(run, state, {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS},
                                  args, args.export_only)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae_dir = Path(args.vae)
    if not (vae_dir / "config.json").exists():
        raise SystemExit(f"no trained VAE at {vae_dir}; run scripts/train_shapes_vae.py first or pass --vae DIR")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)

    tokenizer = build_tokenizer(run.dir / "tokenizer", model_max_length=TEXT_MAX_LENGTH, two_part=args.captions == "two-part")
    text_encoder = make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    unet = make_t2i_unet()
    ema_te, ema_unet = EMA(text_encoder, args.ema), EMA(unet, args.ema)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    train_sched = make_train_scheduler()
    ac = train_sched.alphas_cumprod

    start = 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.module.load_state_dict(state["ema_unet"])
        ema_te.module.load_state_dict(state["ema_text_encoder"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        run.resume(start, args.export_only)

    if not args.export_only:  # an export needs no training data
        data = load_latent_dataset(run, vae, args.seed, args.dataset_size, tokenizer, args.captions)
        n = len(data["ids"])
    empty_ids = tokenizer([""], padding="max_length", max_length=TEXT_MAX_LENGTH, return_tensors="pt").input_ids

    unet.train()
    text_encoder.train()
    steps = 0 if args.export_only else args.steps
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="t2i", mininterval=10)
    running = []
    for step in bar:
        rng = step_rng(args.seed, step)
        idx = torch.from_numpy(rng.integers(0, n, size=args.batch))
        drop = torch.from_numpy(rng.uniform(size=args.batch) < args.uncond_prob)
        ids = torch.where(drop[:, None], empty_ids, data["ids"][idx])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z0 = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(ac), (args.batch,), generator=gen)
        zt = train_sched.add_noise(z0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        cond = text_encoder(ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(ac, t, args.min_snr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet, step)
        ema_te.update(text_encoder, step)
        running.append(per.mean().item())
        if (step + 1) % args.log_every == 0:
            rec = {"step": step + 1, "loss": float(np.mean(running)), "lr": opt.param_groups[0]["lr"], "cpu_s": run.cpu_seconds}
            running = []
            run.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            print(rec, flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            run.save(
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "ema_unet": ema_unet.module.state_dict(),
                    "ema_text_encoder": ema_te.module.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "settings": settings,
                }
            )

    final_state = run.load()
    if final_state is None:
        raise SystemExit(f"no checkpoint in {run.dir}; train first")
    ema_unet.module.load_state_dict(final_state["ema_unet"])
    ema_te.module.load_state_dict(final_state["ema_text_encoder"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=ema_te.module,
        tokenizer=tokenizer,
        unet=ema_unet.module,
        scheduler=make_sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(args.out)
    with replacing_dir(out) as stage:  # the previous export stays until this one is complete
        export(stage, out.name, pipe, run, args, final_state, ema_unet, ema_te, vae, vae_dir)
    print(f"exported {out}", flush=True)


def export(stage: Path, name: str, pipe, run: Run, args, final_state: dict, ema_unet, ema_te, vae, vae_dir: Path) -> None:
    pipe.save_pretrained(stage, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; ship the BPE source files too (CLIP layout).
    for fname in ("vocab.json", "merges.txt"):
        shutil.copy(run.dir / "tokenizer" / fname, stage / "tokenizer" / fname)
    vae_info = json.loads((vae_dir / "training.json").read_text()) if (vae_dir / "training.json").exists() else {}
    if not vae_info and (vae_dir.parent / "training.json").exists():  # the VAE of a bundled model
        vae_info = json.loads((vae_dir.parent / "training.json").read_text()).get("vae", {})
    write_json(
        stage / "training.json",
        {
            "name": name,
            **({"note": args.note} if args.note else {}),
            "kind": "text-to-image",
            "steps_trained": final_state["step"],
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("workdir", "out", "export_only", "vae", "note")},
            "parameters": {
                "unet": parameter_count([ema_unet.module]),
                "text_encoder": parameter_count([ema_te.module]),
                "vae": parameter_count([vae]),
            },
            "cpu_seconds": {"unet_and_text_encoder": round(float(final_state["cpu_seconds"]), 1), "vae": vae_info.get("cpu_seconds")},
            "vae": vae_info,
            "data": {
                "training_images": args.dataset_size,
                "caption_modes": CAPTION_PROBS[args.captions],
                "held_out": [list(p) for p in world.HELD_OUT],
                "loss_log": "train_log.jsonl",
            },
        },
    )
    run.copy_log(stage / "train_log.jsonl")


if __name__ == "__main__":
    sys.exit(main())
