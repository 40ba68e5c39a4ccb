"""The paper's three comparisons, reproduced on this repository's own models, in one report.

    python benchmarks/report.py --quick      # < 10 min on 2 cores -> benchmarks/results/report/quick/
    python benchmarks/report.py --full       # -> benchmarks/results/report/ (what the README cites)
    python benchmarks/report.py --quick --check   # rerun quick, compare with the committed quick figures
    superdiff bench report [--quick|--full] [--check]

Sections (each seeded; images are generated in batches through the same SuperDiff
pipelines that `superdiff generate` and the studio use, image i with its own generator):

1. OR of two half-data models (the paper's CIFAR-10 comparison, Table 1): `shapes-half-a`
   (circles, squares) OR `shapes-half-b` (triangles, crosses) against `shapes-full` (same
   recipe and budget on all four shapes), a random pick of one half per image, and each half
   alone. Metrics against renders of the training distribution: the shapes FID (Frechet
   distance in the features of the shipped shapes classifier, `superdiff.shapes.features`),
   the total variation between the oracle's shape histogram and the exact uniform one, the
   rate of clean shapes, and within-class size and position statistics. Several seeds; mean
   and spread (sd over seeds). A data-vs-data FID at the same sample size gives the floor.
2. AND on the four held-out colour-shape pairs (the paper's Stable Diffusion comparison,
   Table 2) with `shapes-t2i-pairs`, a text-to-image model whose captions include joint
   prompts of seen pairs: the joint prompt as a user writes it ("a circle and something red",
   "a circle that is red"), averaging, SuperDiff OR and AND. Headline: both attributes right
   AND a clean shape (`oracle.OracleResult.matches(..., clean=True)`); lenient rate beside it.
3. Steps to quality: OR proportion error and AND success against the number of steps for
   every sampler/estimator pair, on exact Gaussian mixtures and on the bundled models.
4. (--full) the repository's other benchmarks: estimator accuracy, composition methods on
   shapes-t2i, and the protein OR table (the paper's third comparison, Table 3).

Paper figures are from docs/superdiff-math.md section 6 (``PAPER``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from superdiff.compose import Composition, run_composition  # noqa: E402
from superdiff.images import image_grid  # noqa: E402
from superdiff.model_loading import ModelCache  # noqa: E402
from superdiff.shapes import features, oracle, world  # noqa: E402

OUT_FULL = ROOT / "benchmarks" / "results" / "report"
OUT_QUICK = OUT_FULL / "quick"

MODES: dict[str, dict] = {
    "quick": {
        "or_seeds": [0, 1], "or_images": 128, "or_steps": 25, "ref_images": 2000,
        "and_images": 8, "and_steps": 25, "and_extra_rows": False,
        "gmm_d": 16, "gmm_or_samples": 1000, "gmm_and_samples": 300, "gmm_steps": [10, 25, 50],
        "gmm_reference_steps": [], "bundled_steps": [10, 25], "bundled_reference_steps": [],
        "curve_or_images": 16, "curve_and_images": 8, "curve_and_pairs": [("red", "circle")],
    },
    "full": {
        "or_seeds": [0, 1, 2], "or_images": 256, "or_steps": 50, "ref_images": 4000,
        "and_images": 16, "and_steps": 25, "and_extra_rows": True,
        "gmm_d": 16, "gmm_or_samples": 2000, "gmm_and_samples": 500, "gmm_steps": [10, 25, 50, 100],
        "gmm_reference_steps": [1000], "bundled_steps": [10, 25, 50], "bundled_reference_steps": [1000],
        "curve_or_images": 16, "curve_and_images": 8, "curve_and_pairs": [("red", "circle")],
    },
}

#: How far a quick rerun may move from the committed quick figures (--check). Sampling is
#: seeded, so differences come only from floating-point nondeterminism across machines and
#: thread counts; rates move in steps of 1/images.
TOLERANCES = {"fid_rel": 0.05, "rate_abs": 0.07, "tv_abs": 0.05, "curve_abs": 0.13, "curve_ode_abs": 0.26}
#: curve_ode_abs: the bundled curves of the ODE estimator (8 images a point). Its finite-difference
#: JVP divides float32 rounding by eps ~ 3e-4, so the same code on another CPU (other SIMD paths in
#: the UNet's convolutions) can move borderline images: heun + ode at 10 steps gave AND 0.375 /
#: lenient 0.75 on the committed run and 0.5 / 1.0 on a later session's CPU, for the commit that
#: made the committed figures as for the newest one. Two images of 8, not one.

PAPER = {
    "cifar": {"source": "CIFAR-10 FID (SDE), superdiff-math.md section 6",
              "fid": {"half A alone": 15.33, "half B alone": 13.50, "full-data model": 3.50,
                      "random pick of a half": 3.99, "SuperDiff OR": 4.00}},
    "and": {"source": "Stable Diffusion v1-4, 20 pairs, TIFA (higher is better)",
            "tifa": {"SuperDiff AND": 39.92, "averaging": 32.48, "joint prompt": 27.58},
            "clip": {"SuperDiff AND": 24.79, "averaging": 24.23, "joint prompt": 23.87}},
    "protein": {"source": "Proteus + FrameDiff, designable fraction",
                "designable": {"SuperDiff OR (l=1)": 0.976, "model A alone (Proteus)": 0.928,
                               "averaging": 0.740, "model B alone (FrameDiff)": 0.392}},
}

SECTIONS = ("or", "and", "and_t2i", "steps")
#: "steps" split in two processes: exact mixtures and bundled models (assembled into "steps").
STEP_PARTS = ("steps_gmm", "steps_bundled")
SAMPLERS = [("sde", "ito"), ("sde", "kernel"), ("ddpm", "kernel"), ("euler", "ode"), ("heun", "ode")]
#: The reference algorithm of the paper: Euler-Maruyama SDE with the Ito estimator.
REFERENCE = ("sde", "ito")


def _log(msg: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _to_np(images) -> np.ndarray:
    return oracle.to_numpy_images(images)


def _mean_sd(vals) -> dict:
    v = np.asarray(vals, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": [float(x) for x in v]}


# ---------------------------------------------------------------------------------------
# 1. OR of the half-data models (CIFAR-10 analogue)
# ---------------------------------------------------------------------------------------
def unet_samples(cache: ModelCache, models: list[str], operator: str, seeds, steps: int,
                 sampler: str = "sde", estimator: str | None = None, batch: int = 128) -> np.ndarray:
    """Images [N,3,32,32] in [0,1] from bundled UNet2D models, image i from generator seeds[i]."""
    pipe, kind, _ = cache.pipeline(models[0], models[1:], "float32")
    pipe.set_progress_bar_config(disable=True)
    out = []
    seeds = list(seeds)
    for i in range(0, len(seeds), batch):
        chunk = seeds[i : i + batch]
        res = pipe(batch_size=len(chunk), num_inference_steps=steps, generator=_generators(chunk), operator=operator,
                   sampler=sampler, estimator=estimator, output_type="np")
        out.append(_to_np(res.images))
    return np.concatenate(out)


def distribution_metrics(images: np.ndarray, ref: dict, clf) -> dict:
    r = oracle.classify(images)
    stats = features.within_class_stats(images, r)
    err = features.within_class_error(stats, ref["stats"])
    feats = features.project(features.features(images, clf), ref["projection"])
    return {"fid": features.frechet_distance(feats, ref["features"]),
            "class_tv": features.class_tv(r.shape_ids[~r.empty]),
            "clean": float(r.clean.mean()),
            "share_half_a": float(np.isin(r.shape_ids, [world.SHAPES.index(s) for s in world.SHAPE_HALVES["a"]]).mean()),
            "size_mean_err": err["size_mean"], "size_sd_err": err["size_sd"], "position_sd_err": err["position_sd"],
            "histogram": np.bincount(r.shape_ids, minlength=len(world.SHAPES)).tolist()}


def _training(name: str) -> dict:
    """A bundled model's training.json (the hyperparameters its training script recorded)."""
    from superdiff import registry

    path = Path(registry.bundled_model_path(name)) / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _budget(model: str, against: str) -> str:
    """"N steps of batch b on n images, as <against>" or the differences, from both training.json."""
    hm, ha = _training(model).get("hyperparameters", {}), _training(against).get("hyperparameters", {})
    keys = ("steps", "batch", "lr", "dataset_size", "ema", "min_snr")
    if not hm:
        return "training record not found"
    own = f"{hm.get('steps')} steps of batch {hm.get('batch')} on {hm.get('dataset_size')} rendered images"
    diff = [k for k in keys if hm.get(k) != ha.get(k)]
    if not diff:
        return f"{own}, the same recipe and budget as `{against}`"
    return own + f"; differs from `{against}` in " + ", ".join(f"{k} ({hm.get(k)} vs {ha.get(k)})" for k in diff)


def section_or_halves(cfg: dict, cache: ModelCache, out: Path, full_model: str) -> dict:
    clf = features.load_classifier()
    data = world.make_dataset(np.random.default_rng([2025, 1]), cfg["ref_images"])
    rr = oracle.classify(data.images)
    ref_feats = features.features(data.images, clf)
    proj = features.principal_projection(ref_feats, features.FD_COMPONENTS)
    ref = {"features": features.project(ref_feats, proj), "projection": proj,
           "stats": features.within_class_stats(data.images, rr)}
    methods = ["half A alone", "half B alone", full_model, "random pick of a half", "SuperDiff OR"]
    per: dict[str, list[dict]] = {m: [] for m in methods + ["data (floor)"]}
    n, steps = cfg["or_images"], cfg["or_steps"]
    grids = {}
    for seed in cfg["or_seeds"]:
        seeds = [seed * 100_000 + i for i in range(n)]
        t0 = time.time()
        a = unet_samples(cache, ["shapes-half-a"], "single", seeds, steps)
        b = unet_samples(cache, ["shapes-half-b"], "single", seeds, steps)
        f = unet_samples(cache, [full_model], "single", seeds, steps)
        o = unet_samples(cache, ["shapes-half-a", "shapes-half-b"], "or", seeds, steps)
        pick = np.random.default_rng([seed, 99]).integers(0, 2, size=n).astype(bool)
        rnd = np.where(pick[:, None, None, None], b, a)
        floor = world.make_dataset(np.random.default_rng([2025, 2, seed]), n).images
        sets = dict(zip(methods, [a, b, f, rnd, o]))
        sets["data (floor)"] = floor
        for m, imgs in sets.items():
            per[m].append(distribution_metrics(imgs, ref, clf))
        if seed == cfg["or_seeds"][0]:
            grids = {m: imgs[:32] for m, imgs in sets.items()}
        _log(f"OR halves seed {seed}: {n} images x 4 models in {time.time() - t0:.0f} s; "
             + ", ".join(f"{m} FID {per[m][-1]['fid']:.2f}" for m in sets))
    keys = ["fid", "class_tv", "clean", "share_half_a", "size_mean_err", "size_sd_err", "position_sd_err"]
    summary = {m: {k: _mean_sd([r[k] for r in rows]) for k in keys} for m, rows in per.items()}
    _grid_figure(grids, out / "or_halves_samples.png", "First 32 samples per method (seed 0)")
    _bar_figure(summary, out / "or_halves_fid.png", methods + ["data (floor)"])
    return {"methods": methods, "full_model": full_model, "images_per_seed": n, "seeds": cfg["or_seeds"],
            "steps": steps, "sampler": "sde (Euler-Maruyama), ito estimator for OR", "ref_images": cfg["ref_images"],
            "summary": summary, "per_seed": per}


# ---------------------------------------------------------------------------------------
# 2. AND on the held-out pairs
# ---------------------------------------------------------------------------------------
def t2i_samples(cache: ModelCache, model: str, prompts: list[str], operator: str, seeds, steps: int,
                guidance: float = 4.0, sampler: str = "sde", estimator: str | None = None,
                joint_template: str | None = None, batch: int = 48) -> np.ndarray:
    pipe, kind, _ = cache.pipeline(model, [], "float32")
    pipe.set_progress_bar_config(disable=True)
    out = []
    seeds = list(seeds)
    for i in range(0, len(seeds), batch):
        chunk = seeds[i : i + batch]
        kw = {"joint_template": joint_template} if joint_template else {}
        res = pipe(prompt=prompts, num_images_per_prompt=len(chunk), num_inference_steps=steps,
                   generator=_generators(chunk), operator=operator, guidance_scale=guidance, sampler=sampler,
                   estimator=estimator, output_type="np", **kw)
        out.append(_to_np(res.images))
    return np.concatenate(out)


def and_methods(colour: str, shape: str, extra: bool, and_model: str) -> dict[str, dict]:
    sp, cp = f"a {shape}", f"something {colour}"
    m = {
        'joint prompt "{} and {}"': {"prompts": [sp, cp], "operator": "joint", "joint_template": "{} and {}"},
        'joint prompt "{} that is {}"': {"prompts": [sp, colour], "operator": "joint", "joint_template": "{} that is {}"},
        "averaging": {"prompts": [sp, cp], "operator": "average"},
        "SuperDiff OR": {"prompts": [sp, cp], "operator": "or"},
        "SuperDiff AND": {"prompts": [sp, cp], "operator": "and"},
    }
    if extra:
        m['held-out caption "a <colour> <shape>" (not a joint prompt)'] = {"prompts": [world.caption(colour, shape)], "operator": "single"}
        m['joint prompt "{} and {}" on shapes-t2i (no two-part captions)'] = {
            "prompts": [sp, cp], "operator": "joint", "joint_template": "{} and {}", "model": "shapes-t2i"}
    return m


def pair_scores(images: np.ndarray, colour: str, shape: str) -> dict:
    r = oracle.classify(images)
    s, c = r.matches(shape=shape), r.matches(colour=colour)
    both_clean = r.matches(colour=colour, shape=shape, clean=True)
    return {"both_clean": float(both_clean.mean()), "both": float((s & c).mean()), "shape_only": float((s & ~c).mean()),
            "colour_only": float((~s & c).mean()), "neither": float((~s & ~c).mean()), "clean": float(r.clean.mean())}


def section_and(cfg: dict, cache: ModelCache, out: Path, and_model: str, tag: str = "", extra_rows: bool | None = None,
                demo: bool = True) -> dict:
    n, steps = cfg["and_images"], cfg["and_steps"]
    extra = cfg["and_extra_rows"] if extra_rows is None else extra_rows
    rows, grids = [], {}
    for colour, shape in world.HELD_OUT:
        t0 = time.time()
        for name, spec in and_methods(colour, shape, extra, and_model).items():
            imgs = t2i_samples(cache, spec.get("model", and_model), spec["prompts"], spec["operator"], range(n), steps,
                               joint_template=spec.get("joint_template"))
            row = {"pair": f"{colour} {shape}", "method": name, "images": n, **pair_scores(imgs, colour, shape)}
            rows.append(row)
            if name == "SuperDiff AND" and (colour, shape) == world.HELD_OUT[0]:
                _clean_strip(imgs[:16], out / f"and_clean_flag{tag}.png")
            grids.setdefault(name, []).append(imgs[:8])
        _log(f"AND {colour} {shape}: {time.time() - t0:.0f} s; "
             + ", ".join(f"{r['method'][:24]} {r['both_clean']:.2f}" for r in rows if r["pair"] == f"{colour} {shape}"))
    names = list(dict.fromkeys(r["method"] for r in rows))
    keys = ["both_clean", "both", "shape_only", "colour_only", "neither", "clean"]
    summary = {m: {k: float(np.mean([r[k] for r in rows if r["method"] == m])) for k in keys} for m in names}
    _grid_figure({m: np.concatenate(g) for m, g in grids.items()}, out / f"and_samples{tag}.png",
                 "First 8 images per held-out pair (red circle, green square, blue triangle, yellow cross)")
    demo = demo_check(cache) if demo else None
    return {"model": and_model, "images_per_pair": n, "steps": steps, "guidance": 4.0, "sampler": "sde",
            "methods": names, "rows": rows, "summary": summary, "demo": demo}


def demo_check(cache: ModelCache) -> dict:
    """The README demo (`bash scripts/run.sh demo`: "a circle" AND "something red", 8 images, seed 0)."""
    comp = Composition.from_dict({"model": "shapes-t2i", "prompts": ["a circle", "something red"], "operator": "and",
                                  "num_images": 8, "seed": 0})
    res = run_composition(comp, cache, progress=False)
    r = oracle.classify(res.images)
    return {"composition": comp.to_dict(), "red_circle_clean": int(r.matches("red", "circle", clean=True).sum()),
            "red_circle_lenient": int(r.matches("red", "circle").sum()), "images": len(res.images),
            "clean_fit": [round(float(x), 3) for x in r.clean_fit]}


# ---------------------------------------------------------------------------------------
# 3. Steps to quality
# ---------------------------------------------------------------------------------------
#: The text-to-image model of the bundled AND curves: the fully trained shapes-t2i (the
#: 1500-step shapes-t2i-pairs makes almost no clean shapes, so its curves would be flat at 0).
CURVE_AND_MODEL = "shapes-t2i"


def section_steps(cfg: dict, cache: ModelCache, out: Path, and_model: str = CURVE_AND_MODEL,
                  parts: tuple[str, ...] = ("gmm", "bundled")) -> dict:
    from _gmm import shared_mode_experts

    from superdiff.experts import GaussianMixtureExpert
    from superdiff.operators import OrOperator
    from superdiff.sampling import sample
    from superdiff.schedules import VESigma, make_betas

    d = cfg["gmm_d"]
    sch = VESigma.from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear"))
    g = torch.Generator().manual_seed(5)
    a, b = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))[0].T * 4
    e1 = GaussianMixtureExpert(a[None], 0.25)
    e2 = GaussianMixtureExpert(b[None], 0.25)
    and_experts, centres = shared_mode_experts(d, 2)
    gmm: dict[str, dict] = {}
    integ = {"sde": "em", "ddpm": "ddpm", "euler": "euler", "heun": "heun"}
    for sampler, est in (SAMPLERS if "gmm" in parts else []):
        key = f"{sampler}+{est}"
        gmm[key] = {"or_error": {}, "and_rate": {}}
        for n in list(cfg["gmm_steps"]) + (list(cfg["gmm_reference_steps"]) if (sampler, est) == REFERENCE else []):
            t0 = time.time()
            o = sample([e1, e2], sch, n, operator=OrOperator(weights=[0.3, 0.7]), estimator=est, integrator=integ[sampler],
                       shape=(cfg["gmm_or_samples"], d), generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                       progress=False)
            frac = float(((o.samples - a).norm(dim=1) < (o.samples - b).norm(dim=1)).double().mean())
            o2 = sample(and_experts, sch, n, operator="and", estimator=est, integrator=integ[sampler],
                        shape=(cfg["gmm_and_samples"], d), generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                        progress=False)
            near = torch.cdist(o2.samples, centres).argmin(1)
            gmm[key]["or_error"][n] = abs(frac - 0.3)
            gmm[key]["and_rate"][n] = float((near == len(centres) - 1).double().mean())
            _log(f"GMM {key} {n} steps: OR error {abs(frac - 0.3):.3f}, AND rate {gmm[key]['and_rate'][n]:.3f} "
                 f"({time.time() - t0:.1f} s)")
    bundled: dict[str, dict] = {}
    for sampler, est in (SAMPLERS if "bundled" in parts else []):
        key = f"{sampler}+{est}"
        bundled[key] = {"or_error": {}, "and_rate": {}, "and_lenient": {}}
        steps = list(cfg["bundled_steps"]) + (list(cfg["bundled_reference_steps"]) if (sampler, est) == REFERENCE else [])
        for n in steps:
            t0 = time.time()
            imgs = unet_samples(cache, ["shapes-half-a", "shapes-half-b"], "or", range(cfg["curve_or_images"]), n,
                                sampler=sampler, estimator=est)
            share = float(distribution_share_a(imgs))
            rates, lenient = [], []
            for colour, shape in cfg["curve_and_pairs"]:
                ims = t2i_samples(cache, and_model, [f"a {shape}", f"something {colour}"], "and",
                                  range(cfg["curve_and_images"]), n, sampler=sampler, estimator=est)
                sc = pair_scores(ims, colour, shape)
                rates.append(sc["both_clean"])
                lenient.append(sc["both"])
            bundled[key]["or_error"][n] = abs(share - 0.5)
            bundled[key]["and_rate"][n] = float(np.mean(rates))
            bundled[key]["and_lenient"][n] = float(np.mean(lenient))
            _log(f"bundled {key} {n} steps: OR |share A - 0.5| {abs(share - 0.5):.3f}, AND both+clean "
                 f"{bundled[key]['and_rate'][n]:.3f} ({time.time() - t0:.0f} s)")
    if len(parts) == 2:
        _curves_figure(gmm, bundled, out / "steps_curves.png")
    return {"gmm": gmm, "bundled": bundled, "gmm_d": d, "schedule": "VE (SD scaled_linear betas)",
            "or_weights": [0.3, 0.7], "bundled_or": "shapes-half-a OR shapes-half-b, |share of half-A shapes - 0.5|",
            "bundled_and": f"{and_model} AND on {[' '.join(p) for p in cfg['curve_and_pairs']]}, both attributes right and clean",
            "images": {"or": cfg["curve_or_images"], "and_per_pair": cfg["curve_and_images"]}}


def distribution_share_a(images: np.ndarray) -> float:
    r = oracle.classify(images)
    return float(np.isin(r.shape_ids, [world.SHAPES.index(s) for s in world.SHAPE_HALVES["a"]]).mean())


# ---------------------------------------------------------------------------------------
# 4. The other benchmarks (full mode)
# ---------------------------------------------------------------------------------------
EXISTING = {
    "estimator accuracy": [sys.executable, "benchmarks/estimator_accuracy.py"],
    "composition methods on shapes-t2i": [sys.executable, "benchmarks/compose_shapes.py"],
    "protein OR (Table 3 proxy)": [sys.executable, "-m", "superdiff", "protein", "bench", "--out",
                                   "benchmarks/results/protein_bench"],
}
EXISTING_OUTPUT = {"estimator accuracy": "benchmarks/results/estimator_accuracy.md",
                   "composition methods on shapes-t2i": "benchmarks/results/compose_shapes.md",
                   "protein OR (Table 3 proxy)": "benchmarks/results/protein_bench/table.md"}


def run_existing(skip: bool) -> dict:
    res = {}
    for name, cmd in EXISTING.items():
        if skip:
            res[name] = {"ran": False, "output": EXISTING_OUTPUT[name]}
            continue
        t0 = time.time()
        _log(f"running {' '.join(cmd[1:])}")
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        res[name] = {"ran": True, "returncode": p.returncode, "seconds": round(time.time() - t0, 1),
                     "output": EXISTING_OUTPUT[name], "stderr_tail": p.stderr[-500:] if p.returncode else ""}
    return res


def protein_summary() -> dict | None:
    path = ROOT / "benchmarks" / "results" / "protein_bench" / "table.json"
    if not path.is_file():
        return None
    t = json.loads(path.read_text())["methods"]
    pick = {}
    for name, m in t.items():
        pick[name] = {k: m.get(k) for k in ("helical", "strand", "mixed") if k in m}
    return pick


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _grid_figure(sets: dict[str, np.ndarray], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    rows = []
    for name, imgs in sets.items():
        pil = [Image.fromarray((im.transpose(1, 2, 0) * 255).round().astype(np.uint8)) for im in imgs]
        g = image_grid(pil, cols=len(pil), scale=2)
        label = Image.new("RGB", (g.width, 14), "white")
        ImageDraw.Draw(label).text((2, 1), name, fill="black")
        rows += [label, g]
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, sum(r.height for r in rows) + 16), "white")
    ImageDraw.Draw(canvas).text((2, 2), title, fill="black")
    y = 16
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    canvas.save(path)


def _clean_strip(images: np.ndarray, path: Path) -> None:
    """Images with the oracle's shape name and clean_fit under each (red: below CLEAN_FIT)."""
    from PIL import Image, ImageDraw

    r = oracle.classify(images)
    canvas = Image.new("RGB", (len(images) * 100, 116), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        pil = Image.fromarray((im.transpose(1, 2, 0) * 255).round().astype(np.uint8)).resize((96, 96), Image.NEAREST)
        canvas.paste(pil, (i * 100, 0))
        ok = r.clean_fit[i] >= oracle.CLEAN_FIT
        draw.text((i * 100 + 2, 100), f"{r.shape[i]} {r.clean_fit[i]:.3f}", fill="black" if ok else "red")
    canvas.save(path)


def _bar_figure(summary: dict, path: Path, methods: list[str]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for k, (key, label) in enumerate([("fid", "shapes FID (lower is better)"), ("class_tv", "class histogram TV"),
                                      ("clean", "clean shapes")]):
        means = [summary[m][key]["mean"] for m in methods]
        sds = [summary[m][key]["sd"] for m in methods]
        ax[k].bar(range(len(methods)), means, yerr=sds, color="tab:blue", capsize=3)
        ax[k].set_xticks(range(len(methods)), [m.replace(" ", "\n", 2) for m in methods], fontsize=7)
        ax[k].set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves_figure(gmm: dict, bundled: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [(gmm, "or_error", "exact mixtures: OR |fraction - 0.3|"), (gmm, "and_rate", "exact mixtures: AND shared-mode rate"),
              (bundled, "or_error", "half models: OR |share A - 0.5|"), (bundled, "and_rate", "shapes-t2i: AND both right + clean")]
    for k, (res, key, title) in enumerate(panels):
        for name, rec in res.items():
            xs = sorted(int(s) for s in rec[key])
            ax[k].plot(xs, [rec[key][s] if s in rec[key] else rec[key][str(s)] for s in xs], marker="o", label=name)
        ax[k].set_xscale("log")
        ax[k].set_xlabel("steps")
        ax[k].set_title(title, fontsize=9)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# the Markdown report
# ---------------------------------------------------------------------------------------
def _pm(rec: dict, fmt: str = "{:.2f}") -> str:
    return (fmt + " ± " + fmt).format(rec["mean"], rec["sd"])


def verdicts(res: dict) -> dict:
    """For each comparison: does our ordering reproduce the paper's? (computed, not written by hand)"""
    out = {}
    s = res["or_halves"]["summary"]
    full = res["or_halves"]["full_model"]
    fid = {m: s[m]["fid"]["mean"] for m in res["or_halves"]["methods"]}
    sd = {m: s[m]["fid"]["sd"] for m in res["or_halves"]["methods"]}
    halves = min(fid["half A alone"], fid["half B alone"])
    or_vs_random = abs(fid["SuperDiff OR"] - fid["random pick of a half"]) <= 2 * max(sd["SuperDiff OR"], sd["random pick of a half"], 1e-9)
    out["cifar"] = {
        "OR beats each half alone": fid["SuperDiff OR"] < halves,
        "OR within 2 sd of the random pick": bool(or_vs_random),
        "full-data model at least as good as OR": fid[full] <= fid["SuperDiff OR"] + sd["SuperDiff OR"],
    }
    for key in ("and", "and_t2i"):
        if key not in res:
            continue
        a = res[key]["summary"]
        for metric, label in (("both_clean", "headline"), ("both", "lenient")):
            joint = max(v[metric] for k, v in a.items() if k.startswith("joint prompt") and "shapes-t2i" not in k)
            out[f"{key} ({label})"] = {"AND beats averaging": a["SuperDiff AND"][metric] > a["averaging"][metric],
                                       "AND beats the best joint prompt": a["SuperDiff AND"][metric] > joint,
                                       "averaging beats the best joint prompt": a["averaging"][metric] > joint}
    prot = res.get("protein")
    if prot:
        cls = {k: (v.get("helical") or 0.0) + (v.get("strand") or 0.0) for k, v in prot.items()}
        pick = lambda prefix: max(v for k, v in cls.items() if k.startswith(prefix))  # noqa: E731
        best_or = pick("SuperDiff OR")
        out["protein"] = {"OR (best bias) beats model A alone": best_or > pick("A ("),
                          "model A alone beats averaging": pick("A (") > pick("averaging"),
                          "OR beats averaging": best_or > pick("averaging"),
                          "averaging beats model B alone": pick("averaging") > pick("B (")}
    return out


def write_markdown(res: dict, path: Path, mode: str) -> None:
    L: list[str] = []
    cmd = "python benchmarks/report.py --" + mode
    L += [f"# SuperDiff on our own models: the paper's three comparisons ({mode} mode)", "",
          f"Generated by `{cmd}` (also `superdiff bench report --{mode}`): {res['cpu_seconds']:.0f} CPU seconds "
          f"in one thread per section (the sections' wall times sum to {res['seconds']:.0f} s on a machine shared with "
          f"other jobs; {res['machine']}). "
          "Every number below comes from this run; paper numbers are from "
          "`docs/superdiff-math.md` section 6. Oracle: `superdiff.shapes.oracle`; **headline = both attributes "
          f"right and a clean shape** (clean_fit >= {oracle.CLEAN_FIT}, threshold chosen on renders morphed "
          "between two shapes, `superdiff/shapes/morph.py`), lenient rate (argmax attributes only) beside it.", ""]
    v = res["verdicts"]
    # --- 1
    o = res["or_halves"]
    s = o["summary"]
    L += ["## 1. OR of two half-data models (paper: CIFAR-10, Table 1)", "",
          f"`shapes-half-a` (circles, squares) and `shapes-half-b` (triangles, crosses) against `{o['full_model']}` "
          f"({_budget(o['full_model'], 'shapes-half-a')}; `python scripts/train_shapes_halves.py --half full`). "
          f"{o['images_per_seed']} images per method and seed, seeds {o['seeds']}, {o['steps']} SDE steps; "
          f"reference: {o['ref_images']} renders of the training distribution. Mean ± sd over seeds. "
          f"Shapes FID: Frechet distance of the shapes classifier's features in the top {features.FD_COMPONENTS} principal "
          "directions of the reference features. `data (floor)` is a fresh set of renders of the same size: the FID a "
          "perfect model would get at this sample size.", "",
          "| method | shapes FID | paper FID (CIFAR-10) | class histogram TV | clean shapes | share of half-A shapes "
          "| size mean err (px) | size sd err (px) | position sd err (px) |",
          "|---|---|---|---|---|---|---|---|---|"]
    paper_name = {o["full_model"]: "full-data model"}
    for m in o["methods"] + ["data (floor)"]:
        p = PAPER["cifar"]["fid"].get(paper_name.get(m, m))
        r = s[m]
        L.append(f"| {m} | {_pm(r['fid'])} | {p if p is not None else '-'} | {_pm(r['class_tv'], '{:.3f}')} | "
                 f"{_pm(r['clean'], '{:.2f}')} | {_pm(r['share_half_a'], '{:.2f}')} | {_pm(r['size_mean_err'])} | "
                 f"{_pm(r['size_sd_err'])} | {_pm(r['position_sd_err'])} |")
    L += ["", "Ordering against the paper's (A 15.33, B 13.50 >> random 3.99 ≈ OR 4.00 > full 3.50): "
          + "; ".join(f"{k}: **{'yes' if ok else 'no'}**" for k, ok in v["cifar"].items()) + ".", "",
          "![FID, class TV and clean rate](or_halves_fid.png)", "", "![samples](or_halves_samples.png)", ""]
    # --- 2
    L += ["## 2. AND of two prompts on the held-out pairs (paper: Stable Diffusion, Table 2)", ""]
    for key in ("and", "and_t2i"):
        if key not in res:
            continue
        a = res[key]
        if key == "and":
            L += [f"### `{a['model']}` (two-part captions: the fair joint-prompt baseline)", "",
                  f"Model `{a['model']}`: the text-to-image recipe of `shapes-t2i` with two-part captions of seen pairs in "
                  "training (`python scripts/train_shapes_t2i.py --captions two-part`), so \"a circle and something red\" "
                  "and \"a circle that is red\" are sentences its tokenizer and text encoder know; none of the four pairs "
                  f"below was ever seen. Training: {_budget(a['model'], 'shapes-t2i')}; how clean its shapes are is in "
                  "the clean-shape column."]
        else:
            L += [f"### `{a['model']}` (the bundled model: no two-part captions, its tokenizer splits \"and\")", "",
                  "The same table on the fully trained `shapes-t2i`, whose shapes are clean often enough for the "
                  "headline to separate the methods; its joint prompt is the user-written sentence too, which this "
                  "model never saw in training (the unfair baseline the issue describes)."]
        L += [f"Prompts \"a <shape>\" and \"something <colour>\"; {a['images_per_pair']} images per "
              f"pair and method (seeds 0..{a['images_per_pair'] - 1}), {a['steps']} SDE steps, guidance {a['guidance']}.",
              "", "| method | both right + clean (headline) | both right (lenient) | shape only | colour only | neither "
              "| clean shapes | paper TIFA | paper CLIP |", "|---|---|---|---|---|---|---|---|---|"]
        for m in a["methods"]:
            r = a["summary"][m]
            pk = "joint prompt" if m.startswith("joint prompt") and "shapes-t2i" not in m else m
            pt, pc = PAPER["and"]["tifa"].get(pk, "-"), PAPER["and"]["clip"].get(pk, "-")
            L.append(f"| {m} | **{r['both_clean']:.1%}** | {r['both']:.1%} | {r['shape_only']:.1%} | "
                     f"{r['colour_only']:.1%} | {r['neither']:.1%} | {r['clean']:.1%} | {pt} | {pc} |")
        L += ["", "Per pair (headline / lenient):", "", "| pair | " + " | ".join(a["methods"]) + " |",
              "|---|" + "---|" * len(a["methods"])]
        for c, sh in world.HELD_OUT:
            by = {r["method"]: r for r in a["rows"] if r["pair"] == f"{c} {sh}"}
            L.append(f"| {c} {sh} | " + " | ".join(f"{by[m]['both_clean']:.0%} / {by[m]['both']:.0%}" for m in a["methods"]) + " |")
        L += [""]
        for label in ("headline", "lenient"):
            L.append(f"Ordering against the paper's (AND > averaging > joint prompt on TIFA and CLIP), {label}: "
                     + "; ".join(f"{k}: **{'yes' if ok else 'no'}**" for k, ok in v[f"{key} ({label})"].items()) + ".")
            L.append("")
        tag = "" if key == "and" else "_t2i"
        L += [f"![AND samples](and_samples{tag}.png)", "",
              f"The clean flag on the first AND images of the first pair (oracle's shape name and clean_fit; red: "
              f"below {oracle.CLEAN_FIT}, i.e. an in-between shape such as a four-lobed blob):", "",
              f"![clean flag](and_clean_flag{tag}.png)", ""]
    dm = res["and"]["demo"]
    L += [f"README demo (`bash scripts/run.sh demo`: shapes-t2i, \"a circle\" AND \"something red\", 8 images, seed 0): "
          f"**{dm['red_circle_clean']}/{dm['images']}** red circles that are clean, {dm['red_circle_lenient']}/{dm['images']} "
          "lenient.", ""]
    # --- 3
    st = res.get("steps")
    if st is None:
        L += ["## 3. Steps to quality", "", "Not run (the steps section did not finish in this run).", ""]
    else:
        L += ["## 3. Steps to quality", "",
              f"Exact Gaussian mixtures in d = {st['gmm_d']} ({st['schedule']}): OR with weights (0.3, 0.7), error "
              "|fraction in expert 1's mode - 0.3|; AND of two experts sharing one mode (paper Figure 2 geometry), rate "
              f"in the shared mode. Bundled models: {st['bundled_or']} ({st['images']['or']} images); {st['bundled_and']} "
              f"({st['images']['and_per_pair']} images per pair). Reference algorithm: SDE + Itô.", ""]
        for label, res_k in [("exact mixtures", st["gmm"]), ("bundled models", st["bundled"])]:
            if not res_k:
                L += [f"{label}: not finished in this run (the quick report has these curves).", ""]
                continue
            for key, title in [("or_error", "OR proportion error (lower is better)"), ("and_rate", "AND success (higher is better)"),
                               ("and_lenient", "AND success, lenient (both attributes right, any shape quality)")]:
                if not all(key in rec for rec in res_k.values()):
                    continue
                steps = sorted({int(x) for rec in res_k.values() for x in rec[key]})
                L += [f"{label}, {title}:", "", "| sampler+estimator | " + " | ".join(map(str, steps)) + " |",
                      "|---|" + "---|" * len(steps)]
                for name, rec in res_k.items():
                    vals = {int(x): y for x, y in rec[key].items()}
                    L.append(f"| {name} | " + " | ".join(f"{vals[x]:.3f}" if x in vals else "" for x in steps) + " |")
                L.append("")
        cfg = res["settings"]
        L += [steps_claim(st), "",
              f"Sampling noise of these rates: OR fraction sd sqrt(0.3 x 0.7 / {cfg['gmm_or_samples']}) = "
              f"{np.sqrt(0.21 / cfg['gmm_or_samples']):.3f}; AND rate near 0.98, sd "
              f"{np.sqrt(0.98 * 0.02 / cfg['gmm_and_samples']):.3f} ({cfg['gmm_and_samples']} samples); bundled OR share sd "
              f"{np.sqrt(0.25 / cfg['curve_or_images']):.3f} ({cfg['curve_or_images']} images).", "",
              "![steps curves](steps_curves.png)", ""]
    # --- 4
    L += ["## 4. Proteins (paper: Table 3) and the other benchmarks", ""]
    prot = res.get("protein")
    if prot:
        L += ["Protein OR (committed output of `superdiff protein bench`; designability needs a folding model that "
              "is not available offline, so the classes are proxies):", "",
              "| method | helical | strand | mixed |", "|---|---|---|---|"]
        for name, m in prot.items():
            L.append(f"| {name} | " + " | ".join(str(m.get(k, "-")) for k in ("helical", "strand", "mixed")) + " |")
        L += ["", "Paper (designable fraction): " + ", ".join(f"{k} {x}" for k, x in PAPER["protein"]["designable"].items())
              + ". Ours, by the share of samples in a recognisable class (helical + strand) as the proxy: "
              + "; ".join(f"{k}: **{'yes' if ok else 'no'}**" for k, ok in v.get("protein", {}).items()) + ".", ""]
    for name, rec in res.get("existing", {}).items():
        ran = f"rerun in {rec['seconds']} s, exit {rec['returncode']}" if rec.get("ran") else "committed output, not rerun"
        # relative to the report's own folder, wherever --out put it
        link = Path(os.path.relpath(ROOT / rec["output"], path.parent.resolve())).as_posix()
        L.append(f"- {name}: [{rec['output']}]({link}) ({ran})")
    path.write_text("\n".join(L) + "\n")


def steps_claim(st: dict) -> str:
    """Test "the composition at 25-50 steps is as good as the reference algorithm at 1000"."""
    lines = []
    for label, res_k in [("exact mixtures", st["gmm"]), ("bundled models", st["bundled"])]:
        if not res_k:
            continue
        ref = res_k[f"{REFERENCE[0]}+{REFERENCE[1]}"]
        ks = {int(x) for x in ref["and_rate"]}
        if 1000 not in ks:
            lines.append(f"- {label}: no 1000-step reference run in this mode (see the full report).")
            continue
        for key, better in [("or_error", "lower"), ("and_rate", "higher")]:
            r1000 = ref[key][1000] if 1000 in ref[key] else ref[key]["1000"]
            best = {}
            for name, rec in res_k.items():
                vals = {int(x): y for x, y in rec[key].items()}
                cand = [vals[x] for x in (25, 50) if x in vals]
                if cand:
                    best[name] = min(cand) if better == "lower" else max(cand)
            lines.append(f"- {label}, {key}: reference at 1000 steps {r1000:.3f}; best of 25/50 steps: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
    return "Claim \"25-50 steps are as good as the reference at 1000\":\n\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------
# check (quick mode against the committed quick figures)
# ---------------------------------------------------------------------------------------
def compare(new: dict, old: dict) -> list[str]:
    """Differences beyond ``TOLERANCES`` between two quick results (empty list: reproduced)."""
    bad = []
    for m, rec in old["or_halves"]["summary"].items():
        n = new["or_halves"]["summary"][m]
        f0, f1 = rec["fid"]["mean"], n["fid"]["mean"]
        if abs(f1 - f0) > TOLERANCES["fid_rel"] * max(f0, 1e-9):
            bad.append(f"OR halves {m}: FID {f1:.3f} vs committed {f0:.3f}")
        for k in ("class_tv",):
            if abs(n[k]["mean"] - rec[k]["mean"]) > TOLERANCES["tv_abs"]:
                bad.append(f"OR halves {m}: {k} {n[k]['mean']:.3f} vs {rec[k]['mean']:.3f}")
        if abs(n["clean"]["mean"] - rec["clean"]["mean"]) > TOLERANCES["rate_abs"]:
            bad.append(f"OR halves {m}: clean {n['clean']['mean']:.3f} vs {rec['clean']['mean']:.3f}")
    for part in ("and", "and_t2i"):
        for m, rec in old.get(part, {}).get("summary", {}).items():
            for k in ("both_clean", "both"):
                if abs(new[part]["summary"][m][k] - rec[k]) > TOLERANCES["rate_abs"]:
                    bad.append(f"AND ({part}) {m}: {k} {new[part]['summary'][m][k]:.3f} vs {rec[k]:.3f}")
    for part in ("gmm", "bundled"):
        for name, rec in old["steps"][part].items():
            for key in ("or_error", "and_rate", "and_lenient"):
                for s, val in rec.get(key, {}).items():
                    nv = new["steps"][part][name][key][s]
                    tol = TOLERANCES["curve_ode_abs" if part == "bundled" and name.endswith("+ode") else "curve_abs"]
                    if abs(nv - val) > tol:
                        bad.append(f"steps {part} {name} {key} at {s}: {nv:.3f} vs {val:.3f}")
    return bad


def run(mode: str, out: Path, and_model: str = "shapes-t2i-pairs", full_model: str = "shapes-full",
        skip_existing: bool = False, sections: tuple[str, ...] = SECTIONS) -> dict:
    """Run ``sections`` of ``mode``, each written to ``out/section_<name>.json``; then build
    report.json and report.md from every section file in ``out`` (sections may run in
    separate processes at the same time; the last one to finish writes the full report)."""
    cfg = MODES[mode]
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    cache = ModelCache(max_models=4)
    t0 = time.time()
    for name in sections:
        t1, c1 = time.time(), time.process_time()
        if name == "or":
            body = section_or_halves(cfg, cache, out, full_model)
        elif name == "and":
            body = section_and(cfg, cache, out, and_model)
        elif name == "and_t2i":
            body = section_and(cfg, cache, out, "shapes-t2i", tag="_t2i", extra_rows=False, demo=False)
        elif name == "steps":
            body = section_steps(cfg, cache, out)
        elif name in STEP_PARTS:
            body = section_steps(cfg, cache, out, parts=(name.split("_")[1],))
        else:
            body = run_existing(skip_existing)
        rec = {"mode": mode, "seconds": round(time.time() - t1, 1), "cpu_seconds": round(time.process_time() - c1, 1),
               "body": body}
        (out / f"section_{name}.json").write_text(json.dumps(rec, indent=1, default=str))
    res = assemble(out, mode)
    _log(f"wrote {out}/report.json" + (" and report.md" if "verdicts" in res else "") + f" ({time.time() - t0:.0f} s this run)")
    return res


SECTION_KEYS = {"or": "or_halves", "and": "and", "and_t2i": "and_t2i", "steps": "steps", "existing": "existing"}


def assemble(out: Path, mode: str) -> dict:
    """report.json (+ report.md once the three comparisons are there) from the section files."""
    res: dict = {"mode": mode, "settings": MODES[mode], "tolerances": TOLERANCES, "paper": PAPER,
                 "machine": f"{os.cpu_count()} CPU cores visible, torch {torch.__version__}, 1 thread per process",
                 "section_seconds": {}, "section_cpu_seconds": {}}
    for name, key in SECTION_KEYS.items():
        f = out / f"section_{name}.json"
        if f.is_file():
            rec = json.loads(f.read_text())
            if rec.get("mode") == mode:
                res[key] = rec["body"]
                res["section_seconds"][name] = rec["seconds"]
                res["section_cpu_seconds"][name] = rec["cpu_seconds"]
    parts = [out / f"section_{n}.json" for n in STEP_PARTS]
    if "steps" not in res and all(f.is_file() for f in parts):
        recs = [json.loads(f.read_text()) for f in parts]
        if all(r.get("mode") == mode for r in recs):
            res["steps"] = dict(recs[1]["body"], gmm=recs[0]["body"]["gmm"])
            for n, r in zip(STEP_PARTS, recs):
                res["section_seconds"][n], res["section_cpu_seconds"][n] = r["seconds"], r["cpu_seconds"]
            _json_keys_to_int(res)
            _curves_figure(res["steps"]["gmm"], res["steps"]["bundled"], out / "steps_curves.png")
    elif "steps" not in res and parts[0].is_file():  # the bundled-model part did not finish
        rec = json.loads(parts[0].read_text())
        if rec.get("mode") == mode:
            res["steps"] = rec["body"]
            res["section_seconds"]["steps_gmm"], res["section_cpu_seconds"]["steps_gmm"] = rec["seconds"], rec["cpu_seconds"]
            _curves_figure(res["steps"]["gmm"], {}, out / "steps_curves.png")
    _json_keys_to_int(res)
    if mode == "full" and "existing" not in res:
        res["existing"] = run_existing(skip=True)
    res["protein"] = protein_summary()
    res["seconds"] = sum(v for k, v in res["section_seconds"].items() if k != "existing")
    res["cpu_seconds"] = sum(v for k, v in res["section_cpu_seconds"].items() if k != "existing")
    if all(k in res for k in ("or_halves", "and")):
        res["verdicts"] = verdicts(res)
        write_markdown(res, out / "report.md", mode)
    (out / "report.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def _json_keys_to_int(res: dict) -> dict:
    """JSON turns the step-count keys into strings; turn them back."""
    for part in ("gmm", "bundled"):
        for rec in res.get("steps", {}).get(part, {}).values():
            for key in ("or_error", "and_rate", "and_lenient"):
                if key in rec:
                    rec[key] = {int(k): v for k, v in rec[key].items()}
    return res


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick mode (< 10 min on 2 cores; the default)")
    g.add_argument("--full", action="store_true", help="the full mode (what the README cites)")
    ap.add_argument("--check", action="store_true",
                    help="quick mode into a scratch folder, then compare with the committed quick figures")
    ap.add_argument("--out", default=None, help="output folder (default: benchmarks/results/report[/quick])")
    ap.add_argument("--and-model", default="shapes-t2i-pairs")
    ap.add_argument("--full-model", default="shapes-full")
    ap.add_argument("--skip-existing", action="store_true", help="--full: do not rerun the other benchmarks")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated subset of {','.join(SECTIONS)},existing to (re)run; the others are kept "
                         "from the output folder's section files (default: all; --full adds existing; '' only "
                         "rebuilds the report)")
    args = ap.parse_args(argv)
    mode = "full" if args.full else "quick"
    if args.check and mode != "quick":
        ap.error("--check compares a quick run with the committed quick figures; drop --full")
    committed = OUT_QUICK / "report.json"
    if args.check and not committed.is_file():
        ap.error(f"no committed quick figures at {committed}; run `python benchmarks/report.py --quick` first")
    out = Path(args.out) if args.out else (OUT_FULL if mode == "full" else OUT_QUICK)
    if args.check and not args.out:
        out = ROOT / "outputs" / "report-check"
    if args.check and out.resolve() == OUT_QUICK.resolve():
        ap.error(f"--check --out {args.out}: that is the committed quick figures' folder, which the check would "
                 "overwrite and then compare with itself; give a scratch folder or leave --out out")
    if args.check:
        for flag, value, default in (("--full-model", args.full_model, "shapes-full"),
                                     ("--and-model", args.and_model, "shapes-t2i-pairs")):
            if value != default:
                ap.error(f"--check compares with the committed quick figures, made with {flag} {default}; "
                         f"drop {flag} {value} (or run without --check)")
    if args.check:
        for f in out.glob("section_*.json"):
            f.unlink()
    sections = tuple(x for x in args.sections.split(",") if x) if args.sections is not None else (
        SECTIONS + (("existing",) if mode == "full" else ()))
    unknown = set(sections) - set(SECTIONS) - set(STEP_PARTS) - {"existing"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}, existing")
    if args.check and set(sections) != set(SECTIONS):
        ap.error("--check reruns every quick section; drop --sections")
    res = run(mode, out, args.and_model, args.full_model, args.skip_existing, sections)
    if args.check:
        old = _json_keys_to_int(json.loads(committed.read_text()))
        bad = compare(_json_keys_to_int(json.loads(json.dumps(res, default=str))), old)
        if bad:
            print("quick figures NOT reproduced within tolerances:\n  " + "\n  ".join(bad))
            return 1
        print(f"quick figures reproduced within tolerances {TOLERANCES}")
    return 0


if __name__ == "__main__":
    from superdiff.cli import reporting_errors

    sys.exit(reporting_errors(main, "report.py"))
