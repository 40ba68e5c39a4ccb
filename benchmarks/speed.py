"""Speed and memory of a SuperDiff step against diffusers' own pipeline, side by side.

    python benchmarks/speed.py [--out benchmarks/results/speed] [--quick] [--steps 6] [--reps 3]
    superdiff bench speed ...                        # the same, from the command line

Both pipelines run on the SAME components (UNet, text encoder, VAE, scheduler config) and
the SAME per-step UNet batch: SuperDiff with N prompts under classifier-free guidance
evaluates N + 1 rows per image (N experts + the shared unconditional branch);
diffusers' `StableDiffusionPipeline` runs (N + 1) / 2 prompts with guidance when N + 1 is
even, else N + 1 prompts without guidance. Its scheduler is the diffusers counterpart of
the SuperDiff sampler (sde: EulerAncestral, ddpm: DDPM, euler: Euler, heun: Heun). Runs
alternate (diffusers, ours, diffusers, ours, ...) so that machine noise hits both.

Per step, for every case:
  time      wall time per step (between two progress-bar updates), split into the network
            (every forward of the UNet, JVPs included, timed by a wrapper around its
            `forward`) and everything else; median over steps 2..n and repetitions
  syncs     host-device synchronisations outside the network, counted with torch.profiler:
            scalar reads (aten::_local_scalar_dense: .item(), float(t), bool(t), `if t`),
            data-dependent shapes (nonzero, masked_select, unique), aten::equal, plus
            .numpy() / .tolist() (seen through a TorchFunctionMode: on the CPU they reach no
            aten op). On the CPU each is a sync only once the tensor lives on an accelerator,
            so this is an upper bound there; on CUDA the profiler's cudaStreamSynchronize /
            cudaDeviceSynchronize / synchronous cudaMemcpy events are counted instead.
  aten ops  top-level aten operators dispatched outside the network
            (both counts: difference between an n1- and an n2-step call, divided by n2 - n1,
            so per-call setup is excluded exactly)
  memory    peak memory of the call beyond what was resident before it: process RSS
            (VmHWM after resetting it, in a fresh child process with glibc's mmap
            threshold fixed, so freed tensors go back to the system) on the CPU; CUDA peak
            allocated on a GPU

Cases: SD-size latents (4x64x64) on a UNet with random weights built from a small config
("sd64"), and the bundled shapes-t2i model; every sampler/estimator at N = 1..6 on sd64 and
at N = 2 on shapes-t2i; and sd64 at N = 4 and 6 with `max_batch_size=3` for ours (keys ending
in /mb3: the UNet rows in chunks of 3, so that peak memory stays put as N grows, while
diffusers runs its whole batch). `--model sd15` runs instead an SD 1.5-size UNet (860M parameters,
random weights from SD 1.5's UNet config) at N = 2 (batch 3, the GPU target's), where the
table also gives the share of the step spent outside the network (target: at most 3% in
fp16 on a GPU). `--dtype float16` runs the networks in half precision and `--attention`
picks the UNet's attention processor (sdpa, math, xformers). `--cases KEY,...` runs those
cases (any model's; with --model or --quick, only keys among the cases those select). Writes
results_<label>.json, results_<label>.md and speed_<label>.png under --out (label: --label,
default the device type for the default suite, else the device type followed by what differs:
the --model, a --dtype other than float32, an --attention other than default, "cases" for
--cases, "quick" for --quick, e.g. cpu-quick, cpu-sd15-float16-sdpa; a --label of `<device>` or
`<device>-quick` is refused for any other configuration, so the committed default results are
never overwritten by other figures), and partial_<label>.json after every case while it runs,
which --resume continues when the settings (device, dtype, attention, steps, reps, threads) match.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from superdiff.atomic import replacing, write_text

ROOT = Path(__file__).resolve().parents[1]

#: SuperDiff sampler -> diffusers scheduler of the reference pipeline
DIFFUSERS_SCHEDULER = {"sde": "EulerAncestralDiscreteScheduler", "ddpm": "DDPMScheduler",
                       "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler"}
#: ops that make the host wait for the device when their input lives on an accelerator
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
            "aten::unique_consecutive", "aten::unique_dim", "aten::equal"}
CUDA_SYNC_EVENTS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize"}
#: Tensor methods that read device data on the host without an aten op on the CPU
HOST_READ_METHODS = {"numpy", "tolist"}
NETWORK_LABEL = "speedbench::network"
PROMPTS = ["a circle", "something red", "a square", "something blue", "a triangle", "something green"]
GUIDANCE = 7.5
#: steps and interleaved calls of the stub-network timing (cheap: no network runs)
STUB_STEPS, STUB_REPS = 20, 3


@dataclass(frozen=True)
class Case:
    model: str  # "sd64" (random 4x64x64 UNet) or "shapes-t2i" (bundled)
    sampler: str  # sde | ddpm | euler | heun
    estimator: str  # ito | kernel | ode | none
    operator: str  # and | average | or
    experts: int  # N prompts
    #: ours only: at most this many UNet rows per forward (diffusers' pipeline runs its whole batch)
    max_batch_size: int | None = None

    @property
    def key(self) -> str:
        mb = "" if self.max_batch_size is None else f"/mb{self.max_batch_size}"
        return f"{self.model}/{self.sampler}+{self.estimator}/{self.operator}/N{self.experts}{mb}"

    @property
    def rows(self) -> int:
        """UNet rows per image per step: N experts + the shared unconditional branch."""
        return self.experts + 1

    @property
    def gpu_share_target(self) -> float | None:
        """Issue 16's GPU target: outside the network at most 3% of the step, SD 1.5-size UNet, batch 3."""
        return 0.03 if self.model == "sd15" and self.experts == 2 else None

    @property
    def target(self) -> float:
        """Issue 16: outside-network time at most 1.5x diffusers' without an estimator, 3x with one."""
        return 1.5 if self.estimator == "none" else 3.0


MODELS = ("sd64", "shapes-t2i", "sd15")


def cases(quick: bool = False, model: str | None = None) -> list[Case]:
    """The default suite (sd64 at N = 1..6 and shapes-t2i at N = 2), or one model's cases:
    sd15 at N = 2 only (its batch of 3 is the GPU target's). quick: the three _QUICK paths at N = 2."""
    paths = [_PATHS[i] for i in _QUICK] if quick else _PATHS
    if model == "sd15":
        return [Case("sd15", *p, 2) for p in paths]
    if quick:
        return [Case(model or "sd64", *p, 2) for p in paths]
    out = [Case("sd64", *p, 2) for p in paths]
    if not quick:
        out += [Case("sd64", *p, n) for p in paths for n in range(1, 7) if n != 2]  # N = 1..6, every path
        out += [Case("shapes-t2i", *p, 2) for p in paths]
        # peak memory bounded by max_batch_size as N grows: 5 and 7 rows in chunks of 3
        out += [Case("sd64", *_PATHS[i], n, CHUNKED_ROWS) for i in _CHUNKED for n in (4, 6)]
    return out if model is None else [c for c in out if c.model == model]


_PATHS = [("sde", "ito", "and"), ("sde", "kernel", "and"), ("ddpm", "kernel", "and"),
          ("euler", "ode", "and"), ("heun", "ode", "and"), ("sde", "none", "average"),
          ("euler", "none", "average")]
#: the quick run's paths: an SDE estimator, the ODE estimator, no estimator
_QUICK = (0, 3, 6)
#: paths also run with max_batch_size=CHUNKED_ROWS (an SDE estimator; the ODE estimator, whose
#: finite-difference forward is chunked too)
_CHUNKED, CHUNKED_ROWS = (0, 3), 3


# --------------------------------------------------------------------------------------
# components
# --------------------------------------------------------------------------------------


def sd64_components(seed: int = 0) -> dict[str, Any]:
    """SD 1.x layout with 4x64x64 latents (512 px, VAE factor 8); random weights from a
    small config (the network's own cost is not what is measured)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from superdiff.pipelines._testing import SD_SCHEDULE, tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=64,
                                in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=4).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[4, 4, 4, 4], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        latent_channels=4, norm_num_groups=2, sample_size=512).eval()
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                      intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=100, max_position_embeddings=16)).eval()
    sched = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1)
    return dict(vae=vae, text_encoder=te, tokenizer=tiny_tokenizer(max_length=12), unet=unet, scheduler=sched)


def sd15_components(seed: int = 0) -> dict[str, Any]:
    """An SD 1.5-size UNet (SD 1.5's UNet config: 860M parameters, 4x64x64 latents) with random
    weights, and sd64's tiny VAE and scheduler with a one-layer text encoder of SD 1.5's width
    (768, its cross-attention size): the network is what the GPU target is about."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    comps = sd64_components(seed)
    torch.manual_seed(seed)
    comps["unet"] = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    torch.manual_seed(seed)
    comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=768, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=1, vocab_size=100, max_position_embeddings=16)).eval()
    return comps


def set_attention(unet: torch.nn.Module, attention: str) -> None:
    """The UNet's attention processor: "default" (diffusers' choice), "sdpa"
    (torch's scaled_dot_product_attention), "math" (plain matmul-softmax-matmul) or "xformers"."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "default":
        return
    if attention == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif attention == "math":
        unet.set_attn_processor(AttnProcessor())
    elif attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # not installed, or no kernel for this device
            raise SystemExit(f"--attention xformers: {type(e).__name__}: {e}; install xformers (the GPU extra) "
                             "or use --attention sdpa") from e
    else:
        raise ValueError(f"unknown attention {attention!r}; use default, sdpa, math or xformers")


def load_components(model: str) -> dict[str, Any]:
    if model == "sd64":
        return sd64_components()
    if model == "sd15":
        return sd15_components()
    from diffusers import StableDiffusionPipeline

    from superdiff.registry import bundled_model_path

    p = StableDiffusionPipeline.from_pretrained(bundled_model_path(model))
    return dict(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet, scheduler=p.scheduler)


class NetworkTimer:
    """Wraps `unet.forward`: times every call and labels it for the profiler.

    With `stub` on, the UNet is not run: every call returns one fixed tensor of the sample's
    shape (made once per shape), so that a step's time is the time around the network alone,
    measured directly instead of as the small difference of two large numbers."""

    def __init__(self, unet: torch.nn.Module, device: torch.device) -> None:
        self.intervals: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []  # the same intervals in this thread's CPU time
        self.inside = False
        self.sync = device.type == "cuda"
        self.stub = False
        self.stub_outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (output, pristine copy)
        inner = unet.forward

        def stub(*args: Any, **kwargs: Any):
            sample = args[0] if args else kwargs["sample"]
            key = (tuple(sample.shape), sample.dtype, sample.device)
            if key not in self.stub_outputs:
                g = torch.Generator().manual_seed(len(self.stub_outputs))
                fixed = (0.5 * torch.randn(sample.shape, generator=g)).to(sample.device, sample.dtype)
                self.stub_outputs[key] = (fixed, fixed.clone())
            out = self.stub_outputs[key][0]
            if kwargs.get("return_dict", True):
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

                return UNet2DConditionOutput(sample=out)
            return (out,)

        def forward(*args: Any, **kwargs: Any):
            if self.sync:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.thread_time()
            self.inside = True
            try:
                with torch.profiler.record_function(NETWORK_LABEL):
                    out = (stub if self.stub else inner)(*args, **kwargs)
                if self.sync:
                    torch.cuda.synchronize()
            finally:
                self.inside = False
            self.intervals.append((t0, time.perf_counter()))
            self.cpu.append((c0, time.thread_time()))
            return out

        unet.forward = forward


class StepClock:
    """A stand-in for the pipelines' progress bar: one timestamp per finished step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, iterable: Any = None, total: int | None = None) -> "StepClock":
        self.stamps, self.cpu = [], []
        return self

    def update(self, n: int = 1) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.thread_time())

    def close(self) -> None:
        pass

    def __enter__(self) -> "StepClock":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class Bench:
    """Both pipelines on shared components, one per-step batch layout per case."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 attention: str = "default") -> None:
        from diffusers import StableDiffusionPipeline

        from superdiff.pipelines import SuperDiffStableDiffusionPipeline

        comps = load_components(model)
        self.device = device
        for m in ("unet", "vae", "text_encoder"):
            comps[m].to(device=device, dtype=dtype)
        set_attention(comps["unet"], attention)
        self.timer = NetworkTimer(comps["unet"], device)
        self.clock = StepClock()
        self.ours = SuperDiffStableDiffusionPipeline(**comps, requires_safety_checker=False)
        self.theirs = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
        self.scheduler_config = dict(comps["scheduler"].config)
        for p in (self.ours, self.theirs):
            p.set_progress_bar_config(disable=True)
            p.progress_bar = self.clock  # instance attribute: the step clock
        self.size = self.ours.unet.config.sample_size * self.ours.vae_scale_factor

    def run(self, impl: str, case: Case, steps: int) -> Callable[[], Any]:
        """A zero-argument function running one call of `impl` ("ours" / "diffusers")."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        common = dict(num_inference_steps=steps, height=self.size, width=self.size, output_type="latent",
                      generator=gen)
        if impl == "ours":
            return lambda: self.ours(PROMPTS[: case.experts], guidance_scale=GUIDANCE, operator=case.operator,
                                     sampler=case.sampler, estimator=case.estimator,
                                     max_batch_size=case.max_batch_size, **common)
        import diffusers

        self.theirs.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULER[case.sampler]).from_config(self.scheduler_config)
        R = case.rows
        if R % 2 == 0:  # classifier-free guidance: R / 2 prompts, each with its unconditional row
            prompts, g = [PROMPTS[i % len(PROMPTS)] for i in range(R // 2)], GUIDANCE
        else:
            prompts, g = [PROMPTS[i % len(PROMPTS)] for i in range(R)], 1.0
        return lambda: self.theirs(prompts, guidance_scale=g, **common)

    def check_stub_outputs(self) -> None:
        """The stub's fixed outputs must come back unchanged (nothing downstream writes into a
        network output in place); otherwise its timings would not be of the same computation."""
        for fixed, pristine in self.timer.stub_outputs.values():
            if not torch.equal(fixed, pristine):
                raise RuntimeError("a pipeline modified the network's output in place; the stub timing is invalid")

    # ---- measurements ------------------------------------------------------------------
    def time_steps(self, impl: str, case: Case, steps: int) -> list[tuple[float, float, float, float]]:
        """(total, network) seconds of each step after the first, in wall time and in this
        thread's CPU time (which a descheduled process does not accrue)."""
        fn = self.run(impl, case, steps)
        self.timer.intervals, self.timer.cpu = [], []
        with torch.no_grad():
            fn()
        rows = []
        for st, iv in ((self.clock.stamps, self.timer.intervals), (self.clock.cpu, self.timer.cpu)):
            part = []
            for k in range(1, len(st)):
                lo, hi = st[k - 1], st[k]
                part.append((hi - lo, sum(b - a for a, b in iv if lo <= a < hi)))
            rows.append(part)
        return [(t, n, ct, cn) for (t, n), (ct, cn) in zip(*rows)]

    def count(self, impl: str, case: Case, steps: int) -> dict[str, int]:
        """aten ops and syncs outside the network over one call."""
        from torch.overrides import TorchFunctionMode

        timer = self.timer

        class HostReads(TorchFunctionMode):
            n = 0

            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in HOST_READ_METHODS and not timer.inside:
                    HostReads.n += 1
                return func(*args, **(kwargs or {}))

        fn = self.run(impl, case, steps)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        HostReads.n = 0
        # the timer's own torch.cuda.synchronize() around each forward (there for the timings)
        # would count as a sync of the step's: off while counting
        timer_sync, timer.sync = timer.sync, False
        try:
            with torch.no_grad(), torch.profiler.profile(activities=acts) as prof, HostReads():
                fn()
        finally:
            timer.sync = timer_sync
        return count_events(prof.events(), self.device.type == "cuda") | {"host_reads": HostReads.n}

    def memory(self, impl: str, case: Case, steps: int) -> float:
        """Peak bytes of one call beyond what was resident before it."""
        fn = self.run(impl, case, steps)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                fn()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - base)
        _trim()
        base = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        with torch.no_grad():
            fn()
        return float(_rss("VmHWM") - base)


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def count_events(events: Any, cuda: bool = False) -> dict[str, int]:
    """Top-level aten ops and sync events outside the network in a profiler event list."""
    def under(ev: Any) -> tuple[bool, bool]:  # (inside the network, has an aten ancestor)
        p, aten = ev.cpu_parent, False
        while p is not None:
            if p.name == NETWORK_LABEL:
                return True, aten
            aten = aten or p.name.startswith("aten::")
            p = p.cpu_parent
        return False, aten

    ops = syncs = 0
    for ev in events:
        name = ev.name
        is_sync = name in (CUDA_SYNC_EVENTS if cuda else SYNC_OPS)
        if not (name.startswith("aten::") or is_sync) or name == NETWORK_LABEL:
            continue
        inside, nested = under(ev)
        if inside:
            continue
        if name.startswith("aten::") and not nested:
            ops += 1
        if is_sync:
            syncs += 1
    return {"aten_ops": ops, "syncs": syncs}


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


def measure_case(bench: Bench, case: Case, steps: int, reps: int, count_steps: tuple[int, int]) -> dict[str, Any]:
    device = bench.device
    res: dict[str, Any] = {"case": asdict(case), "key": case.key}
    per: dict[str, list[tuple[float, float, float, float]]] = {"diffusers": [], "ours": []}
    for impl in ("diffusers", "ours"):  # warm-up (allocator, lazy inits), not recorded
        bench.time_steps(impl, case, 2)
    for _ in range(reps):
        for impl in ("diffusers", "ours"):
            per[impl] += bench.time_steps(impl, case, steps)
    # the same calls with the network stubbed out (NetworkTimer.stub): the time around it alone
    stub: dict[str, list[tuple[float, float, float, float]]] = {"diffusers": [], "ours": []}
    faults = {"diffusers": 0, "ours": 0}  # minor page faults of the process over the stub calls
    bench.timer.stub = True
    try:
        for impl in ("diffusers", "ours"):
            bench.time_steps(impl, case, 3)
        for _ in range(STUB_REPS):
            for impl in ("diffusers", "ours"):
                f0 = _minor_faults()
                stub[impl] += bench.time_steps(impl, case, STUB_STEPS)
                faults[impl] += _minor_faults() - f0
        bench.check_stub_outputs()
    finally:
        bench.timer.stub = False
    n1, n2 = count_steps
    for impl in ("diffusers", "ours"):
        rows = per[impl]
        c1, c2 = bench.count(impl, case, n1), bench.count(impl, case, n2)
        cpu = device.type == "cpu"
        res[impl] = {
            "step_ms": 1e3 * statistics.median(r[0] for r in rows),
            "network_ms": 1e3 * statistics.median(r[1] for r in rows),
            "outside_wall_ms": 1e3 * statistics.median(r[0] - r[1] for r in rows),
            "outside_cpu_ms": 1e3 * statistics.median(r[2] - r[3] for r in rows),
            # on the CPU: thread CPU time (a loaded machine deschedules the process for tens
            # of ms at a time, which wall time would count); on a GPU: wall time
            "outside_ms": 1e3 * statistics.median((r[2] - r[3]) if cpu else (r[0] - r[1]) for r in rows),
            "outside_ms_iqr": _iqr([1e3 * ((r[2] - r[3]) if cpu else (r[0] - r[1])) for r in rows]),
            "aten_ops_per_step": (c2["aten_ops"] - c1["aten_ops"]) / (n2 - n1),
            "syncs_per_step": (c2["syncs"] + c2["host_reads"] - c1["syncs"] - c1["host_reads"]) / (n2 - n1),
            "samples": len(rows),
            # network stubbed out: the step's own time (CPU time on a CPU, wall on a GPU) minus
            # the stub's microseconds
            "stub_outside_ms": 1e3 * statistics.median((r[2] - r[3]) if cpu else (r[0] - r[1]) for r in stub[impl]),
            "stub_samples": len(stub[impl]),
            # minor page faults per step over the stub calls (setup included, spread over
            # their steps): fresh pages the allocator maps for the step's temporaries
            "stub_faults_per_step": faults[impl] / (STUB_STEPS * STUB_REPS),
        }
    res["outside_ratio"] = res["ours"]["outside_ms"] / max(res["diffusers"]["outside_ms"], 1e-9)
    res["stub_outside_ratio"] = res["ours"]["stub_outside_ms"] / max(res["diffusers"]["stub_outside_ms"], 1e-9)
    res["target_outside_ratio"] = case.target
    for impl in ("diffusers", "ours"):  # the share of the step outside the network
        res[impl]["outside_share"] = res[impl]["outside_ms"] / max(res[impl]["step_ms"], 1e-9)
    if case.gpu_share_target is not None:
        res["target_gpu_share"] = case.gpu_share_target
    return res


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where the resource module is missing)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _iqr(v: list[float]) -> list[float]:
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
    return [q[0], q[2]]


def memory_child(model: str, keys: list[str], steps: int, device: str, dtype: str = "float32",
                 attention: str = "default") -> dict[str, dict[str, float]]:
    """Peak memory per case, diffusers and ours alternating, in a fresh process (see module doc)."""
    if not keys:
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--memory-child", model, "--steps", str(steps), "--device", device,
           "--cases", ",".join(keys), "--dtype", dtype, "--attention", attention]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_main(model: str, keys: list[str], steps: int, device: str, dtype: torch.dtype, attention: str) -> None:
    torch.set_num_threads(1)
    bench = Bench(model, torch.device(device), dtype, attention)
    by_key = {c.key: c for c in all_cases()}
    res = {}
    for k in keys:
        case = by_key[k]
        for impl in ("diffusers", "ours"):
            bench.memory(impl, case, 2)  # warm-up
        vals: dict[str, list[float]] = {"diffusers": [], "ours": []}
        for _ in range(2):
            for impl in ("diffusers", "ours"):
                vals[impl].append(bench.memory(impl, case, steps))
        res[k] = {impl: min(v) for impl, v in vals.items()}
    print(json.dumps(res))


def all_cases() -> list[Case]:
    """Every case any option selects (for --cases)."""
    return list(dict.fromkeys(cases(False) + cases(True) + cases(False, "sd15")))


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def select_cases(keys: str | None, quick: bool = False, model: str | None = None) -> list[Case]:
    """The cases to run: those --model and --quick select, or the --cases keys among them (any
    case of any model when neither option is given). A key outside what --model / --quick
    select is refused rather than run instead of them."""
    todo = cases(quick, model)
    if not keys:
        return todo
    want = list(dict.fromkeys(k for k in keys.split(",") if k))
    known = {c.key: c for c in all_cases()}
    unknown = [k for k in want if k not in known]
    if unknown or not want:
        raise ValueError(f"unknown case(s) {', '.join(unknown) or repr(keys)}; keys look like {cases(True)[0].key!r}")
    if quick or model:
        opts = " ".join(([f"--model {model}"] if model else []) + (["--quick"] if quick else []))
        pool = [c.key for c in todo]
        outside = [k for k in want if k not in pool]
        if outside:
            raise ValueError(f"--cases {', '.join(outside)}: not among the cases of {opts} ({', '.join(pool)}); "
                             f"pick from those or drop {opts}")
    return [known[k] for k in want]


def results_label(args: argparse.Namespace, device_type: str) -> str:
    """The name of a run's files (results_<label>.*). `<device>` belongs to the default suite
    (the committed CPU results are results_cpu.*) and `<device>-quick` to the default --quick
    run; without --label any other configuration is named by what differs (e.g.
    cpu-sd15-float16-sdpa-quick, cpu-cases), and a --label that takes one of those two names
    for another configuration is refused, so neither is ever overwritten by other figures."""
    parts = [device_type]
    if args.model:
        parts.append(args.model)
    if args.dtype != "float32":
        parts.append(args.dtype)
    if args.attention != "default":
        parts.append(args.attention)
    if args.cases:
        parts.append("cases")
    if args.quick:
        parts.append("quick")
    own = "-".join(parts)
    if args.label is None:
        return own
    if args.label in (device_type, f"{device_type}-quick") and args.label != own:
        raise ValueError(f"--label {args.label}: that name belongs to the default "
                         f"{'--quick run' if args.label.endswith('-quick') else 'suite'} "
                         f"(results_{args.label}.*), which this run's options would overwrite with other figures; "
                         f"give another --label or leave it out (default here: {own})")
    return args.label


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed"))
    ap.add_argument("--quick", action="store_true", help="three cases, fewer repetitions (a smoke run)")
    ap.add_argument("--steps", type=int, default=6, help="steps per timed call (default 6)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per pipeline and case (default 3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    ap.add_argument("--cases", default=None, help="comma-separated case keys (default: every case --model and "
                                                    "--quick select; with them, keys among those)")
    ap.add_argument("--model", default=None, choices=MODELS,
                    help="one model's cases (default: sd64 and shapes-t2i; sd15: the SD 1.5-size UNet at N = 2)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="the networks' dtype (default float32)")
    ap.add_argument("--attention", default="default", choices=("default", "sdpa", "math", "xformers"),
                    help="the UNet's attention processor (default: diffusers' choice)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--label", default=None, help="name of the results (default: the device type, then the "
                                                     "non-default --model, --dtype, --attention, 'cases' for --cases "
                                                     "and 'quick' for --quick, joined by '-')")
    ap.add_argument("--resume", action="store_true", help="keep the cases already in partial_<label>.json")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quiet_libraries()
    dtype = getattr(torch, args.dtype)
    if args.memory_child:
        _memory_main(args.memory_child, args.cases.split(","), args.steps, args.device, dtype, args.attention)
        return 0
    if args.steps < 3:
        raise ValueError(f"--steps must be >= 3 (the first step is not timed), got {args.steps}")
    if args.reps < 1 or args.threads < 1:
        raise ValueError(f"--reps and --threads must be >= 1, got {args.reps} and {args.threads}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    todo = select_cases(args.cases, args.quick, args.model)
    label = results_label(args, device.type)
    reps = 1 if args.quick else args.reps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    partial = out / f"partial_{label}.json"  # per-case results so far: a killed run resumes
    # what the figures depend on: a resumed run keeps only cases measured the same way
    settings = {"device": device.type, "dtype": args.dtype, "attention": args.attention, "steps": args.steps,
                "reps": reps, "threads": args.threads}
    done: dict[str, dict[str, Any]] = {}
    if args.resume and partial.is_file():
        done = {r["key"]: r for r in load_partial(partial, settings)}
    results: list[dict[str, Any]] = []
    t_start = time.time()
    bar = tqdm(total=len(todo), desc="speed cases")
    for model in dict.fromkeys(c.model for c in todo):
        mcases = [c for c in todo if c.model == model]
        bench = Bench(model, device, dtype, args.attention)
        for c in mcases:
            if c.key in done:
                results.append(done[c.key])
                bar.update()
                continue
            r = measure_case(bench, c, args.steps, reps, (2, 4))
            r["latent_shape"] = [4, bench.size // bench.ours.vae_scale_factor, bench.size // bench.ours.vae_scale_factor]
            results.append(r)
            write_json_atomic(partial, {"settings": settings, "results": results})
            bar.update()
            bar.write(f"{c.key}: outside {r['ours']['outside_ms']:.2f} ms vs {r['diffusers']['outside_ms']:.2f} ms, "
                      f"syncs {r['ours']['syncs_per_step']:.1f} vs {r['diffusers']['syncs_per_step']:.1f}")
        if not args.no_memory:
            mem = memory_child(model, [c.key for c in mcases if "memory_mb" not in done.get(c.key, {})],
                               args.steps, args.device, args.dtype, args.attention)
            for r in results:
                if r["key"] in mem:
                    m = mem[r["key"]]
                    r["memory_mb"] = {k: v / 2**20 for k, v in m.items()}
                    r["memory_ratio"] = m["ours"] / max(m["diffusers"], 1.0)
            write_json_atomic(partial, {"settings": settings, "results": results})
        del bench
    bar.close()
    doc = {
        "device": device_label(device),
        "gpu_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "attention": args.attention,
        "steps_per_call": args.steps,
        "reps": reps,
        "seconds": time.time() - t_start,
        "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    text = markdown(doc)  # before anything is written: a failure here keeps the previous results whole
    write_json_atomic(out / f"results_{label}.json", doc)
    write_text(out / f"results_{label}.md", text)
    plot(doc, out / f"speed_{label}.png")
    partial.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(text)
    return 0


def write_json_atomic(path: Path, obj: Any) -> None:
    """path written beside it and renamed: a run killed while writing (the partial file exists
    for killed runs) leaves the previous complete file, never a truncated one."""
    write_text(path, json.dumps(obj, indent=1))


def load_partial(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The cases of a partial file that --resume keeps, or a ValueError when they were measured
    with other settings (mixing them would put figures of two setups in one table)."""
    try:
        doc = json.loads(path.read_text())
        old, results = doc["settings"], doc["results"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--resume: {path} is not a partial file of this version of the benchmark; "
                         "delete it or run without --resume") from None
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        raise ValueError(f"--resume: {path} was measured with other settings ("
                         + ", ".join(f"{k} {a} there, {b} now" for k, (a, b) in diff.items())
                         + "); rerun with those settings, give another --label, or run without --resume")
    return results


def quiet_libraries() -> None:
    """Offline hub lookups, and none of the libraries' expected chatter: the tiny tokenizer
    truncates prompts (transformers and diffusers' pipelines say so), FutureWarnings."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# SuperDiff step vs diffusers: {doc['device']}", "",
             f"torch {doc['torch']}; {doc['steps_per_call']} steps per call, {doc['reps']} interleaved calls per "
             "pipeline; times are medians per step (the first step excluded). `outside` = step time minus the "
             "network's forwards, in this thread's CPU time on a CPU (wall time on a GPU; both in the JSON). "
             "`stub` = the same calls with the network replaced by a stub returning a fixed tensor "
             f"({STUB_STEPS} steps x {STUB_REPS} calls): the time around the network measured directly, not as "
             "the small difference of two large numbers (on a CPU the real network's figure moves by tens of "
             "percent from run to run). `faults` = minor page faults per step during the stub calls: pages the "
             "allocator maps afresh for the step's temporaries, whose count for the same code swings with glibc's "
             "dynamic mmap/trim thresholds (a cause of the run-to-run spread). Ratios are ours / diffusers'. "
             "Target (issue 16): outside ratio <= 1.5 "
             "without an estimator, <= 3 with one (shown for both measurements); syncs <= 2 per step; memory "
             "ratio <= 1.1 (2 on the ODE-estimator path); on a GPU, outside the network at most 3% of the step "
             "for the SD 1.5-size UNet (sd15) in fp16 at batch 3 (`outside %`).",
             "", f"Networks in {doc.get('dtype', 'float32')}, attention: {doc.get('attention', 'default')}.", ""]
    if not doc.get("gpu_available"):
        lines += ["No GPU was available to this run: CPU figures only.", ""]
    lines += ["| case | rows | network ms (diffusers / ours) | outside ms (d / ours) | ratio | outside ms, stub "
              "(d / ours) | ratio, stub | faults/step, stub (d / ours) | target | outside % of step (d / ours) "
              "| syncs/step (d / ours) | aten ops/step (d / ours) | peak MB (d / ours) | mem ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        d, o = r["diffusers"], r["ours"]
        mem = r.get("memory_mb")
        mtxt = f"{mem['diffusers']:.1f} / {mem['ours']:.1f}" if mem else "-"
        mr = f"{r['memory_ratio']:.2f}" if mem else "-"
        tgt = r["target_outside_ratio"]
        ok = "met" if r["outside_ratio"] <= tgt else "NOT met"
        if "stub_outside_ratio" in r:
            stub = f"{d['stub_outside_ms']:.2f} / {o['stub_outside_ms']:.2f} | {r['stub_outside_ratio']:.1f}"
            ok += ", stub " + ("met" if r["stub_outside_ratio"] <= tgt else "NOT met")
        else:
            stub = "- | -"
        if "stub_faults_per_step" in o:
            stub += f" | {d['stub_faults_per_step']:.1f} / {o['stub_faults_per_step']:.1f}"
        else:
            stub += " | -"
        share = "-"
        if "outside_share" in o:
            share = f"{100 * d['outside_share']:.1f} / {100 * o['outside_share']:.1f}"
            if r.get("target_gpu_share") is not None and doc.get("gpu_available"):
                share += " (3%: " + ("met" if o["outside_share"] <= r["target_gpu_share"] else "NOT met") + ")"
        lines.append(f"| {r['key']} | {r['case']['experts'] + 1} | {d['network_ms']:.1f} / {o['network_ms']:.1f} "
                     f"| {d['outside_ms']:.2f} / {o['outside_ms']:.2f} | {r['outside_ratio']:.1f} | {stub} "
                     f"| {tgt:g} ({ok}) | {share} | {d['syncs_per_step']:g} / {o['syncs_per_step']:g} "
                     f"| {d['aten_ops_per_step']:g} / {o['aten_ops_per_step']:g} | {mtxt} | {mr} |")
    lines += ["", f"Reproduce: `{doc['command']}` ({doc['seconds'] / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r for r in doc["results"] if r["case"].get("max_batch_size") is None]  # time: whole batches
    chunked = [r for r in doc["results"] if r["case"].get("max_batch_size") is not None and "memory_mb" in r]
    fig, axes = plt.subplots(1, 3 if chunked else 2, figsize=(19 if chunked else 13, 4.8))
    n2 = [r for r in res if r["case"]["experts"] == 2]
    title = "N = 2 experts (3 UNet rows per image)"
    if not n2:  # a --cases selection without N = 2: every case it ran
        n2, title = res, "every case of this run"
    labels = [r["key"].replace("/N2", "") for r in n2]
    y = range(len(n2))
    ax = axes[0]
    ax.barh([i + 0.2 for i in y], [r["diffusers"]["outside_ms"] for r in n2], 0.4, label="diffusers")
    ax.barh([i - 0.2 for i in y], [r["ours"]["outside_ms"] for r in n2], 0.4, label="SuperDiff")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time per step outside the network (ms, log)")
    ax.set_title(title)
    ax.legend()
    ax = axes[1]
    counts = Counter(_path(r) for r in res)
    paths = sorted(p for p, n in counts.items() if n > 1)  # paths measured at several N
    for m, s, e in paths:
        rows = sorted((r for r in res if _path(r) == (m, s, e)), key=lambda r: r["case"]["experts"])
        ns = [r["case"]["experts"] for r in rows]
        line = ax.plot(ns, [r["ours"]["outside_ms"] for r in rows], "o-", label=f"SuperDiff {s}+{e}")[0]
        ax.plot(ns, [r["diffusers"]["outside_ms"] for r in rows], "x--", color=line.get_color(),
                label=f"diffusers ({DIFFUSERS_SCHEDULER[s].replace('DiscreteScheduler', '')})")
    if not paths:
        ax.set_axis_off()
    ax.set_yscale("log")
    ax.set_xlabel("experts N (UNet rows per image: N + 1)")
    ax.set_ylabel("ms per step outside the network (log)")
    ax.set_title("scaling with N (sd64, 4x64x64 latents)")
    if paths:
        ax.legend(fontsize=7)
    if chunked:
        _plot_chunked_memory(axes[2], doc["results"], chunked)
    fig.suptitle(f"SuperDiff vs diffusers: {doc['device']}", fontsize=10)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _path(r: dict[str, Any]) -> tuple[str, str, str]:
    """(model, sampler, estimator) of a result: the curves the plot draws against N."""
    c = r["case"]
    return c["model"], c["sampler"], c["estimator"]


def _plot_chunked_memory(ax: Any, results: list[dict[str, Any]], chunked: list[dict[str, Any]]) -> None:
    """Peak memory against N for each path that has max_batch_size cases: ours with the whole
    batch, ours with max_batch_size, diffusers (its whole batch)."""
    for p in dict.fromkeys(_path(r) for r in chunked):
        whole = sorted((r for r in results if _path(r) == p and r["case"].get("max_batch_size") is None
                        and "memory_mb" in r), key=lambda r: r["case"]["experts"])
        parts = sorted((r for r in chunked if _path(r) == p), key=lambda r: r["case"]["experts"])
        mb = parts[0]["case"]["max_batch_size"]
        line = ax.plot([r["case"]["experts"] for r in whole], [r["memory_mb"]["ours"] for r in whole], "o-",
                       label=f"SuperDiff {p[1]}+{p[2]}")[0]
        ax.plot([r["case"]["experts"] for r in parts], [r["memory_mb"]["ours"] for r in parts], "s:",
                color=line.get_color(), label=f"SuperDiff {p[1]}+{p[2]}, max_batch_size={mb}")
        ax.plot([r["case"]["experts"] for r in whole], [r["memory_mb"]["diffusers"] for r in whole], "x--",
                color=line.get_color(), alpha=0.6, label=f"diffusers ({DIFFUSERS_SCHEDULER[p[1]].replace('DiscreteScheduler', '')})")
    ax.set_xlabel("experts N (UNet rows per image: N + 1)")
    ax.set_ylabel("peak memory of a call (MB)")
    ax.set_title("peak memory with and without max_batch_size")
    ax.legend(fontsize=7)


if __name__ == "__main__":
    from superdiff.cli import reporting_errors

    sys.exit(reporting_errors(main, "speed.py"))
