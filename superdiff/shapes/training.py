"""Resumable training scaffolding shared by the bundled-model scripts in ``scripts/``.

A run lives in a work directory holding ``checkpoint.pt`` (models, EMA, optimiser, step,
accumulated CPU seconds, loss log) and ``log.jsonl`` (one JSON line per logged step).
Every batch is drawn from ``numpy.random.default_rng([seed, step])``, so a resumed run
sees exactly the batches an uninterrupted run would have seen, without saving RNG state.

Learning rate: linear warm-up for ``warmup`` steps, then cosine decay to 10% of the base.
EMA: ``ema = d * ema + (1 - d) * param`` with ``d = min(decay, (1 + step) / (10 + step))``.
Diffusion loss: epsilon MSE with min-SNR-gamma weights ``min(SNR, gamma) / SNR``.
Data: ``load_latent_dataset`` renders and captions the training images once (caption
sets ``CAPTION_PROBS``), VAE-encodes them to posterior mean/std and caches them in the run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import atomic
from . import world
from .models import TEXT_MAX_LENGTH


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The batch generator of ``step``: deterministic and independent of resumption.

    It is the generator of any other ``default_rng([seed, k])`` at ``step == k`` (e.g. the
    dataset's ``[seed, 2]`` below): that batch's indices are then a rescaling of the dataset's
    first draws (positions, not contents, are correlated). Kept as it is, since any other key
    would change the recipe of the shipped models.
    """
    return np.random.default_rng([seed, step])


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Warm-up then cosine decay to ``0.1 * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


class EMA:
    """Exponential moving average of a module's parameters (see module docstring)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-gamma loss weights for epsilon prediction."""
    snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr


class Run:
    """A resumable run: checkpoint I/O, CPU-time accounting and a JSON-lines loss log."""

    def __init__(self, workdir: str | Path):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.dir / "checkpoint.pt"
        self.log_path = self.dir / "log.jsonl"
        self.cpu_offset = 0.0
        self._cpu_start = time.process_time()
        self._wall_start = time.time()
        self.wall_offset = 0.0

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of this process since start plus those recorded before a resume."""
        return self.cpu_offset + time.process_time() - self._cpu_start

    @property
    def wall_seconds(self) -> float:
        return self.wall_offset + time.time() - self._wall_start

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` for a fresh run; restores the time counters."""
        if not self.ckpt.exists():
            return None
        try:
            state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file: say which and what to do
            raise SystemExit(
                f"{self.ckpt} is not a readable checkpoint ({type(e).__name__}: {e}); "
                "delete it to start this run afresh, or pass another --workdir"
            ) from e
        if not isinstance(state, dict) or "step" not in state:
            raise SystemExit(f"{self.ckpt} is not a training checkpoint of these scripts (no 'step'); "
                             "delete it to start this run afresh, or pass another --workdir")
        self.cpu_offset = float(state.get("cpu_seconds", 0.0))
        self.wall_offset = float(state.get("wall_seconds", 0.0))
        self._cpu_start = time.process_time()
        self._wall_start = time.time()
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Atomically write ``state`` (plus the time counters) to ``checkpoint.pt``."""
        save_atomic(dict(state, cpu_seconds=self.cpu_seconds, wall_seconds=self.wall_seconds), self.ckpt)

    def log(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines past ``step`` (written after the last checkpoint before a crash),
        and a line cut short by the crash; the log is rewritten atomically."""
        if not self.log_path.exists():
            return
        keep = []
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # empty, or cut short by a crash while it was written
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(line)
        atomic.write_text(self.log_path, "".join(k + "\n" for k in keep))

    def resume(self, step: int, export_only: bool = False) -> None:
        """Go on from a checkpoint at ``step``: drop the log lines written after it and say so.
        An export (``export_only``) beside a possibly live run leaves its log alone."""
        if export_only:
            return
        self.truncate_log(step)
        print(f"resuming from step {step} ({self.cpu_offset:.0f} CPU s so far)", flush=True)

    def copy_log(self, dest: str | Path) -> None:
        """Copy the loss log to ``dest`` (an empty file when no step was logged yet)."""
        if self.log_path.exists():
            shutil.copy(self.log_path, dest)
        else:
            Path(dest).write_text("")


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """float [N,3,H,W] in [0,1] -> torch tensor in [-1,1] (the VAE's input range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float() * 2.0 - 1.0


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N,4,h,w] of ``images`` (float [N,3,H,W] in [0,1]), unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(to_model_range(images[i : i + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented, key-sorted JSON, written atomically."""
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def parameter_count(modules: Iterable[torch.nn.Module]) -> int:
    return int(sum(p.numel() for m in modules for p in m.parameters()))


#: Caption-mode probabilities of each --captions choice (see world.make_dataset).
CAPTION_PROBS: dict[str, dict[str, float]] = {
    "single": {"full": 0.6, "shape": 0.2, "colour": 0.2},
    "two-part": {"full": 0.4, "shape": 0.15, "colour": 0.15,
                 "shape_and_colour": 0.1, "colour_and_shape": 0.1, "shape_that_is_colour": 0.1},
}


def load_latent_dataset(run: Run, vae, seed: int, size: int, tokenizer, captions: str = "single"):
    """Render, caption, tokenize and VAE-encode the training set once; cached in the workdir."""
    cache = run.dir / (f"latents-{seed}-{size}.pt" if captions == "single" else f"latents-{seed}-{size}-{captions}.pt")
    if cache.exists():
        return torch.load(cache, weights_only=False)
    print(f"rendering and encoding {size} training images ...", flush=True)
    data = world.make_dataset(np.random.default_rng([seed, 2]), size, caption_probs=CAPTION_PROBS[captions])
    mean, std = encode_latents(vae, data.images)
    ids = tokenizer(data.captions, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    blob = {"mean": mean, "std": std, "ids": ids, "captions": data.captions}
    save_atomic(blob, cache)
    return blob


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file: a crash never leaves a partial file."""
    with atomic.replacing(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def replacing_dir(out: str | Path):
    """Yield an empty staging directory beside ``out``; when the block succeeds it replaces
    ``out`` (an export is complete or absent), when it fails ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
    for d in (stage, old):
        if d.exists():
            shutil.rmtree(d)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


#: Command-line arguments that do not change the trained weights (all others must match on resume).
NOT_SETTINGS: tuple[str, ...] = ("workdir", "out", "export_only", "note", "threads", "log_every", "ckpt_every")


def reconcile_settings(run: Run, state: dict[str, Any] | None, settings: dict[str, Any], args, export_only: bool,
                       keep: tuple[str, ...] = ("vae",)) -> dict[str, Any]:
    """The settings a run goes on with, given its checkpoint ``state`` (``None``: a fresh run).

    Resuming with settings other than the saved ones is refused (a run would mix two recipes);
    an export adopts the saved settings into ``args`` (except ``keep``) so that the exported
    ``training.json`` describes the run that made the weights, not the export command's
    defaults. A checkpoint from before settings were saved is taken as it is.
    """
    saved = None if state is None else state.get("settings")
    if saved is None:
        return settings
    if export_only:
        for k, v in saved.items():
            if k not in keep and hasattr(args, k):
                setattr(args, k, v)
        return dict(saved)
    if saved != settings:
        diff = {k: (saved.get(k), settings.get(k)) for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)}
        raise SystemExit(f"{run.ckpt} was trained with other settings (saved, given): {diff}; "
                         "use the saved settings to resume, or another --workdir")
    return settings
