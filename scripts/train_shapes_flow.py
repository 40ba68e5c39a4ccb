"""Train the rectified-flow text-to-image model `shapes-flow` (Stable Diffusion 3 layout) from scratch.

Components (``superdiff.shapes.models``): the shapes VAE of ``shapes-t2i`` (frozen; same
latent space), two tiny CLIPTextModelWithProjection encoders in SD3's CLIP-L / CLIP-G
slots sharing one CLIP BPE tokenizer built from the caption words, no T5 encoder, an
SD3Transformer2DModel (MMDiT) and a FlowMatchEulerDiscreteScheduler with shift
``FLOW_SHIFT``. The transformer and both encoders are trained jointly on the flow-matching
loss of ``superdiff.shapes.flow`` (x_t = (1 - t) x_0 + t eps, target v = eps - x_0, network
time 1000 t, logit-normal t through the scheduler's shift). Captions are dropped to "" with
probability --uncond-prob for classifier-free guidance. The caption set is --captions
(default ``two-part``: the single-attribute captions plus joint prompts of seen pairs, so
the joint-prompt baseline is fair on held-out pairs); held-out pairs are never rendered.

Every batch is drawn from numpy.random.default_rng([seed, step]), so the run is
deterministic from --seed and a resumed run sees the batches an uninterrupted one would.

The EMA weights are exported with diffusers' StableDiffusion3Pipeline.save_pretrained
(text_encoder_3 = tokenizer_3 = None), loadable with StableDiffusion3Pipeline.from_pretrained.

    nohup nice -n 10 .venv/bin/python scripts/train_shapes_flow.py > outputs/train_flow.log 2>&1 &

Re-running the same command resumes from <workdir>/checkpoint.pt (other settings are refused).
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

from superdiff.schedules import RectifiedFlow
from superdiff.shapes import world
from superdiff.shapes.flow import TiedTokenJointAttnProcessor, clip_prompt_embeds, flow_pair, training_times, with_tied_zero_token
from superdiff.shapes.models import (
    FLOW_SHIFT,
    FLOW_T5_TOKENS,
    TEXT_MAX_LENGTH,
    make_flow_scheduler,
    make_flow_transformer,
    make_text_encoder,
)
from superdiff.shapes.tokenizer import build_tokenizer
from superdiff.shapes.training import (
    CAPTION_PROBS,
    EMA,
    NOT_SETTINGS,
    Run,
    load_latent_dataset,
    lr_at,
    parameter_count,
    reconcile_settings,
    replacing_dir,
    step_rng,
    write_json,
)


def build_models(tokenizer):
    """(transformer, [text_encoder, text_encoder_2]) freshly initialised from the global seed."""
    encoders = [
        make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, with_projection=True)
        for _ in range(2)
    ]
    return make_flow_transformer(), encoders


def export(out: Path, vae, tokenizer_dir: Path, transformer, encoders) -> None:
    """Write the diffusers SD3 directory (no T5) with both tokenizers' BPE source files."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from transformers import CLIPTokenizer

    transformer.set_attn_processor(JointAttnProcessor2_0())  # the stock processor: 256 real zero tokens
    vae.register_to_config(shift_factor=0.0)  # SD3 decodes latents / scaling + shift; same latent space
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=make_flow_scheduler(),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; ship the BPE source files too (CLIP layout).
    for sub in ("tokenizer", "tokenizer_2"):
        for fname in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_dir / fname, out / sub / fname)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", default="superdiff/bundled/shapes-t2i/vae", help="trained shapes VAE directory")
    ap.add_argument("--workdir", default="outputs/train/shapes-flow")
    ap.add_argument("--out", default="superdiff/bundled/shapes-flow", help="export directory")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--dataset-size", type=int, default=40000)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--captions", choices=sorted(CAPTION_PROBS), default="two-part",
                    help="caption set (see superdiff.shapes.training.CAPTION_PROBS)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint and exit")
    ap.add_argument("--note", default="", help="free-text note recorded in training.json")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.dataset_size < 1:
        raise SystemExit("--steps, --batch and --dataset-size must be positive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    settings.update(shift=FLOW_SHIFT, t5_tokens=FLOW_T5_TOKENS)

    from diffusers import AutoencoderKL

    vae_dir = Path(args.vae)
    if not (vae_dir / "config.json").exists():
        raise SystemExit(f"no trained VAE at {vae_dir}; pass --vae DIR (the shapes VAE, e.g. superdiff/bundled/shapes-t2i/vae)")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)

    run = Run(args.workdir)
    state = run.load()
    # resuming needs the saved settings; an export takes them (e.g. --captions picks the tokenizer)
    settings = reconcile_settings(run, state, settings, args, args.export_only)
    tokenizer = build_tokenizer(run.dir / "tokenizer", model_max_length=TEXT_MAX_LENGTH, two_part=args.captions == "two-part")
    transformer, encoders = build_models(tokenizer)
    transformer.set_attn_processor(TiedTokenJointAttnProcessor(FLOW_T5_TOKENS))
    modules = {"transformer": transformer, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
    emas = {k: EMA(m, args.ema) for k, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = RectifiedFlow(num_train_timesteps=1000, shift=FLOW_SHIFT)
    joint_dim = transformer.config.joint_attention_dim

    start = 0
    if state is not None:
        for k, m in modules.items():
            m.load_state_dict(state[k])
            emas[k].module.load_state_dict(state["ema_" + k])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        run.resume(start, args.export_only)

    if not args.export_only:  # an export needs no training data
        data = load_latent_dataset(run, vae, args.seed, args.dataset_size, tokenizer, args.captions)
        n = len(data["ids"])
    empty_ids = tokenizer([""], padding="max_length", max_length=TEXT_MAX_LENGTH, return_tensors="pt").input_ids

    for m in modules.values():
        m.train()
    steps = 0 if args.export_only else args.steps
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="flow", mininterval=10)
    running = []
    for step in bar:
        rng = step_rng(args.seed, step)
        idx = torch.from_numpy(rng.integers(0, n, size=args.batch))
        drop = torch.from_numpy(rng.uniform(size=args.batch) < args.uncond_prob)
        ids = torch.where(drop[:, None], empty_ids, data["ids"][idx])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)) * scaling
        noise = torch.randn(x0.shape, generator=gen)
        t = training_times(args.batch, FLOW_SHIFT, gen)
        xt, target = flow_pair(schedule, x0, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        seq, pooled = clip_prompt_embeds(encoders, ids, joint_dim)
        pred = transformer(xt, encoder_hidden_states=with_tied_zero_token(seq), pooled_projections=pooled,
                           timestep=schedule.model_time(t).float()).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, m in modules.items():
            emas[k].update(m, step)
        running.append(loss.item())
        if (step + 1) % args.log_every == 0:
            rec = {"step": step + 1, "loss": float(np.mean(running)), "lr": opt.param_groups[0]["lr"], "cpu_s": run.cpu_seconds}
            running = []
            run.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            print(rec, flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            run.save({**{k: m.state_dict() for k, m in modules.items()},
                      **{"ema_" + k: e.module.state_dict() for k, e in emas.items()},
                      "opt": opt.state_dict(), "step": step + 1, "settings": settings})

    final = run.load()
    if final is None:
        raise SystemExit(f"no checkpoint in {run.dir}; train first")
    for k, e in emas.items():
        e.module.load_state_dict(final["ema_" + k])
    out = Path(args.out)
    with replacing_dir(out) as stage:  # the previous export stays until this one is complete
        export(stage, vae, run.dir / "tokenizer", emas["transformer"].module,
               [emas["text_encoder"].module, emas["text_encoder_2"].module])
        write_training_json(stage, out.name, args, final, emas, vae, vae_dir)
        run.copy_log(stage / "train_log.jsonl")
    print(f"exported {out}", flush=True)


def write_training_json(stage: Path, name: str, args, final: dict, emas: dict, vae, vae_dir: Path) -> None:
    vae_info = json.loads((vae_dir.parent / "training.json").read_text()).get("vae", {}) if (vae_dir.parent / "training.json").exists() else {}
    write_json(
        stage / "training.json",
        {
            "name": name,
            **({"note": args.note} if args.note else {}),
            "kind": "text-to-image",
            "layout": "sd3",
            "script": "scripts/train_shapes_flow.py",
            "objective": "flow matching: x_t = (1 - t) x_0 + t eps, v = eps - x_0, timestep 1000 t, "
                         f"logit-normal(0, 1) t with shift {FLOW_SHIFT}, MSE",
            "max_sequence_length": FLOW_T5_TOKENS,
            "steps_trained": final["step"],
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("workdir", "out", "export_only", "vae", "note")},
            "parameters": {
                "transformer": parameter_count([emas["transformer"].module]),
                "text_encoder": parameter_count([emas["text_encoder"].module]),
                "text_encoder_2": parameter_count([emas["text_encoder_2"].module]),
                "vae": parameter_count([vae]),
            },
            "cpu_seconds": {"transformer_and_text_encoders": round(float(final["cpu_seconds"]), 1), "vae": vae_info.get("cpu_seconds")},
            "wall_seconds": round(float(final.get("wall_seconds", 0.0)), 1),
            "vae": vae_info,
            "data": {
                "training_images": args.dataset_size,
                "caption_modes": CAPTION_PROBS[args.captions],
                "held_out": [list(p) for p in world.HELD_OUT],
                "loss_log": "train_log.jsonl",
            },
        },
    )


if __name__ == "__main__":
    sys.exit(main())
