"""Train an unconditional half-data model `shapes-half-a` or `shapes-half-b`.

Each half sees only its own shape classes (``world.SHAPE_HALVES``: a = circle, square;
b = triangle, cross), every colour, held-out pairs excluded, in the latent space of the
shared shapes VAE (the same one the text-to-image model uses). The UNet2DModel is trained
on the epsilon-prediction loss (min-SNR-5 weights) over SD v1's DDPM schedule; the EMA
weights are exported in diffusers layout:

    <out>/unet/        UNet2DModel (config.json + diffusion_pytorch_model.safetensors)
    <out>/scheduler/   EulerDiscreteScheduler config (same betas as shapes-t2i)
    <out>/vae/         a copy of the shared AutoencoderKL
    <out>/training.json

    nohup nice -n 10 .venv/bin/python scripts/train_shapes_halves.py --half a > outputs/train_half_a.log 2>&1 &

``--half full`` trains `shapes-full` with the same recipe and budget (same steps, batch and
number of training images) on all four shape classes: the "one model on all the data" of the
paper's CIFAR-10 comparison (benchmarks/report.py).

Re-running the same command resumes from <workdir>/checkpoint.pt (other settings are refused;
``--export-only`` exports with the saved settings).
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

from superdiff.shapes import world
from superdiff.shapes.models import make_sampling_scheduler, make_train_scheduler, make_uncond_unet
from superdiff.shapes.training import (
    EMA,
    NOT_SETTINGS,
    Run,
    encode_latents,
    lr_at,
    min_snr_weights,
    parameter_count,
    reconcile_settings,
    replacing_dir,
    save_atomic,
    step_rng,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--half", required=True, choices=[*sorted(world.SHAPE_HALVES), "full"],
                    help="a or b: one half of the shape classes; full: all of them (shapes-full)")
    ap.add_argument("--vae", default="outputs/train/shapes-vae/final", help="trained VAE directory")
    ap.add_argument("--workdir", default=None, help="default outputs/train/shapes-half-<half>")
    ap.add_argument("--out", default=None, help="default superdiff/bundled/shapes-half-<half>")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--dataset-size", type=int, default=20000)
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
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    workdir = Path(args.workdir or f"outputs/train/{'shapes-full' if args.half == 'full' else f'shapes-half-{args.half}'}")
    run = Run(workdir)
    state = run.load()
    settings = reconcile_settings(run, state, settings, args, args.export_only)
    name = "shapes-full" if args.half == "full" else f"shapes-half-{args.half}"
    out = Path(args.out or f"superdiff/bundled/{name}")
    shapes = world.SHAPES if args.half == "full" else world.SHAPE_HALVES[args.half]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from diffusers import AutoencoderKL

    vae_dir = Path(args.vae)
    if not (vae_dir / "config.json").exists():
        raise SystemExit(f"no trained VAE at {vae_dir}; run scripts/train_shapes_vae.py first or pass --vae DIR")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)

    unet = make_uncond_unet()
    ema = EMA(unet, args.ema)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    train_sched = make_train_scheduler()
    ac = train_sched.alphas_cumprod
    start = 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        ema.module.load_state_dict(state["ema_unet"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        run.resume(start, args.export_only)

    cache = run.dir / f"latents-{args.seed}-{args.dataset_size}.pt"
    if args.export_only:  # an export needs no training data
        data = {"mean": torch.zeros(0)}
    elif cache.exists():
        data = torch.load(cache, weights_only=False)
    else:
        print(f"rendering and encoding {args.dataset_size} images of {shapes} ...", flush=True)
        ds = world.make_dataset(np.random.default_rng([args.seed, 3, ord(args.half[0])]), args.dataset_size, shapes=shapes)
        mean, std = encode_latents(vae, ds.images)
        data = {"mean": mean, "std": std}
        save_atomic(data, cache)
    n = len(data["mean"])

    unet.train()
    steps = 0 if args.export_only else args.steps
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, mininterval=10)
    running = []
    for step in bar:
        rng = step_rng(args.seed, step)
        idx = torch.from_numpy(rng.integers(0, n, size=args.batch))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z0 = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(ac), (args.batch,), generator=gen)
        zt = train_sched.add_noise(z0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        pred = unet(zt, t).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(ac, t, args.min_snr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet, step)
        running.append(per.mean().item())
        if (step + 1) % args.log_every == 0:
            rec = {"step": step + 1, "loss": float(np.mean(running)), "lr": opt.param_groups[0]["lr"], "cpu_s": run.cpu_seconds}
            running = []
            run.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            print(rec, flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            run.save({"unet": unet.state_dict(), "ema_unet": ema.module.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                      "settings": settings})

    final_state = run.load()
    if final_state is None:
        raise SystemExit(f"no checkpoint in {run.dir}; train first")
    ema.module.load_state_dict(final_state["ema_unet"])
    with replacing_dir(out) as stage:  # the previous export stays until this one is complete
        export(stage, name, shapes, args, final_state, ema, vae, vae_dir)
        run.copy_log(stage / "train_log.jsonl")
    print(f"exported {out}", flush=True)


def export(stage: Path, name: str, shapes, args, final_state: dict, ema, vae, vae_dir: Path) -> None:
    ema.module.save_pretrained(stage / "unet")
    make_sampling_scheduler().save_pretrained(stage / "scheduler")
    vae.save_pretrained(stage / "vae")
    vae_info = json.loads((vae_dir / "training.json").read_text()) if (vae_dir / "training.json").exists() else {}
    if not vae_info and (vae_dir.parent / "training.json").exists():  # the VAE of a bundled model
        vae_info = json.loads((vae_dir.parent / "training.json").read_text()).get("vae", {})
    write_json(
        stage / "training.json",
        {
            "name": name,
            **({"note": args.note} if args.note else {}),
            "kind": "unconditional",
            "shapes": list(shapes),
            "colours": list(world.COLOURS),
            "steps_trained": final_state["step"],
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("workdir", "out", "export_only", "vae", "note")},
            "parameters": {"unet": parameter_count([ema.module]), "vae": parameter_count([vae])},
            "cpu_seconds": {"unet": round(float(final_state["cpu_seconds"]), 1), "vae": vae_info.get("cpu_seconds")},
            "vae": vae_info,
            "data": {
                "training_images": args.dataset_size,
                "shapes": list(shapes),
                "held_out_excluded": [list(p) for p in world.HELD_OUT],
                "loss_log": "train_log.jsonl",
            },
        },
    )


if __name__ == "__main__":
    sys.exit(main())
