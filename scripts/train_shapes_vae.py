"""Train the shapes-world AutoencoderKL (32x32x3 <-> 8x8x4) shared by every bundled model.

Loss on images in [-1, 1]: MSE + L1 + kl_weight * KL(posterior || N(0, I)). Batches are
fresh renders of the training combinations (held-out pairs excluded), seeded per step.
After training, ``scaling_factor = 1 / std(latent means)`` is written into the config,
as Stable Diffusion does, and the model is saved in diffusers layout to <workdir>/final.

    nohup nice -n 10 .venv/bin/python scripts/train_shapes_vae.py > outputs/train_vae.log 2>&1 &

Re-running the same command resumes from <workdir>/checkpoint.pt; the checkpoint keeps torch's
RNG state (the posterior samples), so a resumed run matches an uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from superdiff.shapes import oracle, world
from superdiff.shapes.models import make_vae
from superdiff.shapes.training import Run, encode_latents, lr_at, parameter_count, step_rng, to_model_range, write_json


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="outputs/train/shapes-vae")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=250)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    run = Run(args.workdir)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    state = run.load()
    if state is not None:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        if "torch_rng" in state:  # the posterior samples draw from it: resume the same stream
            torch.set_rng_state(state["torch_rng"])
        run.resume(start)

    vae.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="vae", mininterval=10)
    for step in bar:
        data = world.make_dataset(step_rng(args.seed, step), args.batch)
        x = to_model_range(data.images)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        l1 = F.l1_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0:
            rec_ = {"step": step + 1, "loss": loss.item(), "mse": mse.item(), "l1": l1.item(), "kl": kl.item(), "cpu_s": run.cpu_seconds}
            run.log(rec_)
            bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.0f}")
            print(rec_, flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            run.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "torch_rng": torch.get_rng_state()})

    # Export: scaling factor and reconstruction quality on fresh, unseen renders.
    vae.eval()
    held = world.make_dataset(np.random.default_rng([args.seed, 10**9]), 1024, exclude=())
    mean, _ = encode_latents(vae, held.images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        rec = torch.cat([vae.decode(mean[i : i + 256]).sample for i in range(0, len(mean), 256)])
    rec01 = ((rec + 1) / 2).clamp(0, 1).numpy()
    acc = oracle.accuracy(oracle.classify(rec01), held.shape_ids, held.colour_ids)
    mse = float(np.mean((rec01 - held.images) ** 2))
    final = run.dir / "final"
    vae.save_pretrained(final)
    info = {
        "model": "AutoencoderKL",
        "parameters": parameter_count([vae]),
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("workdir",)},
        "cpu_seconds": round(run.cpu_seconds, 1),
        "wall_seconds": round(run.wall_seconds, 1),
        "scaling_factor": scaling,
        "reconstruction": {"mse_01": mse, "oracle_accuracy_on_reconstructions": acc, "samples": len(held.images), "includes_held_out_pairs": True},
    }
    write_json(final / "training.json", info)
    print(info, flush=True)


if __name__ == "__main__":
    sys.exit(main())
