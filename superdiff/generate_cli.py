"""`superdiff generate` (one composition) and `superdiff batch` (a job file).

Only argparse is imported at module level; the work happens in compose.py and batch.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace("|", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


class quiet_libraries:
    """With `on`: the loaders' progress bars, warnings and log lines (diffusers,
    transformers, huggingface_hub, Python warnings) are switched off for the block, so
    `--quiet` prints only our own lines and errors."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> "quiet_libraries":
        if not self.on:
            return self
        import logging
        import os
        import warnings

        self._env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._levels = {}
        for name in ("huggingface_hub", "accelerate", "torch"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        self._verbosity, self._bars = [], []
        for mod in ("diffusers.utils.logging", "transformers.utils.logging", "huggingface_hub.utils"):
            try:
                m = __import__(mod, fromlist=["disable_progress_bar"])
            except ImportError:
                continue
            if hasattr(m, "set_verbosity_error"):  # configures the library's root logger first
                self._verbosity.append((m, m.get_verbosity()))
                m.set_verbosity_error()
            fn = getattr(m, "disable_progress_bars", None) or getattr(m, "disable_progress_bar", None)
            if fn is not None:
                fn()
                self._bars.append(m)
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.on:
            return
        import logging
        import os

        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        for m, level in self._verbosity:
            m.set_verbosity(level)
        for m in self._bars:
            fn = getattr(m, "enable_progress_bars", None) or getattr(m, "enable_progress_bar", None)
            if fn is not None:
                fn()
        if self._env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = self._env
        self._w.__exit__(*exc)


def _composition_from_args(args: argparse.Namespace):
    from .compose import draw_seed, prepare_composition, split_foreign_params
    from .images import read_png_composition

    if args.from_png and args.config:
        raise ValueError("give --from-png or --config, not both (flags given with either override its fields)")
    if args.from_png:
        base = read_png_composition(args.from_png).to_dict()
    elif args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {args.config}: {e}") from None
        base = base.get("composition", base) if isinstance(base, dict) else base
        if not isinstance(base, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of composition fields (as in "
                             f"composition.json or the studio's settings), got a JSON {type(base).__name__}")
        base = {k: v for k, v in base.items() if k != "superdiff_version"}  # a PNG's superdiff chunk as it is
    else:
        base = {}
    flags = {"model": args.model, "prompts": args.prompt, "operator": args.operator, "extra_models": args.extra_model,
             "weights": args.weights, "bias": args.bias, "temperature": args.temperature, "lift": args.lift,
             "estimator": args.estimator, "sampler": args.sampler, "steps": args.steps,
             "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt, "seed": args.seed,
             "num_images": args.num_images, "height": args.height, "width": args.width, "dtype": args.dtype,
             "joint_template": args.joint_template, "single_index": args.single_index,
             "adapters": args.lora, "switch_every": args.switch_every,
             "compose": args.compose, "and_mode": args.and_mode, "corrector": args.corrector}
    if args.kappa_clamp is not None:
        flags["kappa_clamp"] = False if args.kappa_clamp.lower() in ("none", "off", "false") else _floats(args.kappa_clamp)
    for i, p in enumerate(args.prompt or []):
        if not p.strip():
            raise ValueError(f"prompts: --prompt number {i + 1} is empty; give a prompt (an unconditional model "
                             "takes no --prompt at all)")
    d = dict(base)
    d.update({k: v for k, v in flags.items() if v is not None and v != []})
    d.update(dict(args.set or []))
    if not args.from_png and not args.config and "prompts" not in d and "compose" not in d \
            and d.get("model", "shapes-t2i") == "shapes-t2i":
        from .compose import DEFAULT_COMPOSITION

        defaults = DEFAULT_COMPOSITION.to_dict()
        if str(d.get("operator", "")).lower().strip() in ("merge", "switch"):  # one expert: one prompt
            defaults["prompts"] = defaults["prompts"][:1]
        d = {**defaults, **d}
    explicit = {k for k, v in flags.items() if v is not None and v != []} | set(dict(args.set or []))
    if "prompts" in explicit and "adapters" not in explicit and base.get("adapters"):
        _replace_prompts_of_adapters(d, base, "the PNG" if args.from_png else "the config")
    d, dropped = split_foreign_params(d, explicit)  # a parameter the operator does not use: refused if given now
    for k, _ in dropped:
        print(f"superdiff generate: note: {k} (from {'the PNG' if args.from_png else 'the config'}) is not used by "
              f"operator {d.get('operator', 'and')} and was dropped", file=sys.stderr)
    seed, drawn = draw_seed(d.get("seed"))
    if drawn:
        print(f"superdiff generate: seed -1: drew seed {seed} (recorded in the PNGs)", file=sys.stderr)
        d["seed"] = seed
    named = bool(args.operator) or "operator" in dict(args.set or []) or "operator" in base
    comp, notes = prepare_composition(d, named)
    for note in notes:
        print(f"superdiff generate: note: {note}", file=sys.stderr)
    return comp


def _replace_prompts_of_adapters(d: dict[str, Any], base: dict[str, Any], src: str) -> None:
    """New prompts over a base (--from-png / --config) whose LoRAs came as "<lora:...>" tags:
    each such adapter is tied to its own prompt, which the new prompts replace. As in A1111,
    where the LoRAs are the tags in the prompt box, new prompts with tags bring their own LoRAs
    (the base's adapters are dropped); new prompts without any tag are refused with the tags to
    repeat, rather than sampling the old prompts under the new record."""
    from .a1111 import ROW_LORA_TAG
    from .compose import BASE_ADAPTER

    prompts = d.get("prompts")
    prompts = [prompts] if isinstance(prompts, str) else prompts if isinstance(prompts, list) else []
    if any(isinstance(p, str) and ROW_LORA_TAG.search(p) for p in prompts):
        d.pop("adapters", None)  # the new prompts' tags are the LoRAs now
        return
    adapters = base["adapters"] if isinstance(base["adapters"], list) else [base["adapters"]]
    tied = [a for a in adapters if isinstance(a, dict) and a.get("prompt") is not None]
    if not tied:
        return  # adapters for every prompt (--lora): they apply to the new prompts as well
    was = "; ".join(f"{a['prompt']!r} <lora:{a['path']}:{float(a.get('scale', 1.0)):g}>"
                    if a.get("path") != BASE_ADAPTER else f"{a['prompt']!r} (base model)" for a in tied)
    first = next((a for a in tied if a.get("path") != BASE_ADAPTER), tied[0])
    raise ValueError(f"adapters: the LoRAs of {src} belong to its own prompts ({was}), which --prompt replaces; "
                     f"repeat the LoRA tags in the new prompts, e.g. --prompt 'a square <lora:{first['path']}:"
                     f"{float(first.get('scale', 1.0)):g}>' (a prompt without a tag is the base model), or drop the "
                     "LoRAs with --set 'adapters=[]'")


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be a folder (an existing file, or a file on its path) or
    that is not writable, before any model loads: otherwise the images are lost after sampling."""
    import os

    for p in (out, *out.parents):
        if not p.exists():
            continue
        if not p.is_dir():
            what = "is a file" if p == out else f"names a folder inside {p}, which is a file"
            raise ValueError(f"--out {out} {what}, not a folder; give a folder (new or existing) for the images")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out}: cannot write in {p}; give a folder you can write to")
        return


def _outputs(out: Path, comp: Any) -> list[Path]:
    """Every file `superdiff generate` writes into `out` for `comp`."""
    return [*(out / f"image_{i:03d}.png" for i in range(comp.num_images)), out / "grid.png", out / "trace.json",
            out / "trace.png", out / "composition.json", out / "oracle.json"]


def _generate(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .compose import run_composition
    from .images import image_grid, read_png_composition, save_png
    from .model_loading import ModelCache

    comp = _composition_from_args(args)
    out = Path(args.out)
    _check_out(out)
    source = source_pixels = None
    if args.from_png:  # read before anything is written; never overwrite it
        src = Path(args.from_png)
        hit = next((p for p in _outputs(out, comp) if p.exists() and p.samefile(src)), None)
        if hit is not None:
            raise ValueError(f"--out {out}: the run would overwrite the source image {args.from_png} (as "
                             f"{hit.name}); give another --out folder")
        source = read_png_composition(src)
        with Image.open(src) as im:
            source_pixels = np.asarray(im.convert("RGB"))
    print(f"superdiff generate: {comp.describe()} on {comp.model}, {comp.num_images} image(s), "
          f"{comp.steps} steps -> {out}", file=sys.stderr)
    with quiet_libraries(args.quiet):
        res = run_composition(comp, ModelCache(), progress=not args.quiet)
    paths = []
    for i, (im, rec) in enumerate(zip(res.images, res.records)):
        paths.append(save_png(im, out / f"image_{i:03d}.png", rec))
    scale = max(1, 256 // max(res.images[0].size))
    grid = image_grid(res.images, scale=scale, labels=[f"seed {r.seed}" for r in res.records])
    # the whole run as it ran (guidance used, LoRA hashes): --from-png grid.png regenerates every image;
    # its infotext names the images' size, not the grid canvas's
    save_png(grid, out / "grid.png", res.composition, size=res.images[0].size)
    res.trace.save(out / "trace.json")
    with quiet_libraries(args.quiet):  # matplotlib's warnings (e.g. a glyph missing for a CJK prompt)
        res.trace.plot(out / "trace.png", samples=min(4, len(res.images)),
                       title=f"FORMULA: {comp.compose}" if comp.compose else
                       f"{comp.operator.upper()}: " + " | ".join(comp.prompts or [comp.model]))
    (out / "composition.json").write_text(res.composition.to_json(indent=2))
    shapes = Path(comp.model).name.startswith("shapes-")  # the bundled shapes world has an exact oracle
    wrote = ["grid.png", "trace.json", "trace.png", "composition.json"]
    (out / "oracle.json").unlink(missing_ok=True)  # an earlier run's labels never sit beside these images
    if shapes and res.images[0].size[0] != res.images[0].size[1]:
        print("oracle: skipped (the shapes oracle classifies square images)")
    elif shapes:
        from .shapes import oracle

        r = oracle.classify(res.images)
        labels = [("(empty)" if e else f"{c} {s}") for c, s, e in zip(r.colour, r.shape, r.empty)]
        counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
        clean = [bool(c) for c in r.clean]  # a clean shape, not an in-between one (the headline measure)
        clean_counts = {lab: sum(c for la, c in zip(labels, clean) if la == lab) for lab in counts}
        (out / "oracle.json").write_text(json.dumps({"labels": labels, "clean": clean, "counts": counts,
                                                     "clean_counts": clean_counts}, indent=2))
        wrote.append("oracle.json")
        print("oracle: " + ", ".join(f"{lab} {n}/{len(labels)} ({clean_counts[lab]} with a clean shape)"
                                     for lab, n in counts.items()))
    print(f"wrote {len(paths)} image(s), {', '.join(wrote[:-1])} and {wrote[-1]} in {out} ({res.seconds:.1f} s)")
    changed = bool(args.from_png) and comp != source
    if changed:
        print(f"regenerated {args.from_png} with changed settings (no pixel comparison)")
    if args.from_png and comp.num_images == 1 and not changed:
        same = np.array_equal(source_pixels, np.asarray(res.images[0].convert("RGB")))
        print(f"reproduced {args.from_png}: {'identical pixels' if same else 'PIXELS DIFFER'}")
        if not same:
            return 1
    return 0


def _batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    _check_out(Path(args.out))  # a file, or a folder that cannot be written: refused before any job runs
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0 (images to generate in this run), got {args.limit}")
    with quiet_libraries(args.quiet):
        s = run_batch(args.jobs, args.out, progress=not args.quiet, limit=args.limit)
    if s.rank != 0:
        return 0  # process 0 reports for all
    done = s.generated + s.skipped + s.recovered
    msg = (f"superdiff batch: {s.tasks} image task(s) in {s.world_size} process(es): {s.generated} generated, "
           f"{s.skipped} already done, {s.recovered} recovered, {s.failed} failed; {s.invalid_lines} invalid "
           f"job line(s); {len(s.failed_jobs)} job/method(s) failed; {s.seconds:.1f} s")
    print(msg, file=sys.stderr)
    if s.failed_jobs:
        print("failed: " + ", ".join(s.failed_jobs), file=sys.stderr)
    if done == 0 and (s.failed or s.invalid_lines or s.tasks == 0):
        print("superdiff batch: nothing could run", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .a1111 import SAMPLER_LABELS

    g = sub.add_parser(
        "generate", help="one composition: PNGs with their parameters, a grid and the trace",
        description="Generate one composition. Without --prompt / --model / --config: the bundled shapes-t2i "
                    "model, 'a circle' AND 'something red'. Every default below is the composition's own; a "
                    "--config or --from-png file supplies the values its flags leave out.",
        epilog="A1111 prompt syntax: --prompt 'a circle AND something red' makes one expert per part "
               "(':0.7' suffixes are weights) and needs --operator: and is SuperDiff AND, average is A1111's "
               "averaging. LoRA tags: <lora:NAME:SCALE>, and A1111's <lora:NAME:TE:UNET> / "
               "<lora:NAME:unet=SCALE>, whose UNet multiplier is the scale (adapter experts take denoiser-only "
               "LoRAs, so the text-encoder multiplier changes nothing); a DyLoRA dyn= is refused.")
    g.add_argument("--model", help="bundled model name, local diffusers directory or hub id (default: shapes-t2i)")
    g.add_argument("--prompt", action="append",
                   help="a prompt (one expert); repeat for each expert. '<lora:NAME:SCALE>' in a prompt makes it "
                        "that adapter's expert. With --from-png / --config, --prompt replaces the prompts and "
                        "their LoRA tags: a record whose LoRAs came as tags needs them repeated in the new "
                        "prompts (or --set 'adapters=[]' to drop them) (default: 'a circle', 'something red' on "
                        "shapes-t2i; 'a circle' alone for merge / switch, which make one expert)")
    g.add_argument("--extra-model", action="append",
                   help="another UNet checkpoint as an expert; repeatable (default: none)")
    g.add_argument("--operator", choices=["or", "and", "average", "single", "joint", "composite", "merge", "switch"],
                   help="default: and; composite / merge / switch are the multi-LoRA baselines (need --lora)")
    g.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA adapter as an expert on the model's own network (a .safetensors file, its folder "
                        "or a bundled adapter: lora-orange, lora-outline), at SCALE (default 1); repeat per expert. "
                        "Each adapter is one expert per prompt, all in one batched forward per step")
    g.add_argument("--switch-every", type=int, help="operator switch: steps between adapter changes (default: 1)")
    g.add_argument("--weights", type=_floats,
                   help="OR mixture weights / average weights, e.g. 0.3,0.7 (default: equal)")
    g.add_argument("--bias", type=_floats, help="OR log-weight bias per expert (default: 0 each)")
    g.add_argument("--temperature", type=float, help="OR temperature T, inf allowed (default: 1)")
    g.add_argument("--lift", type=float, help="AND: log q_1 - log q_2 target offset (default: 0)")
    g.add_argument("--kappa-clamp", help="AND kappa clamp 'lo,hi' or 'none' (default: -1,2)")
    g.add_argument("--single-index", type=int, help="expert index for operator single, from 0 (default: 0)")
    g.add_argument("--joint-template",
                   help="joint prompt template, e.g. '{0} that looks like {1}' (default: the prompts joined by "
                        "'and')")
    g.add_argument("--estimator", choices=["kernel", "ito", "ode", "none"],
                   help="log-density estimator (default: the sampler's own: ito for sde, kernel for ddpm, ode for ode/euler/heun)")
    g.add_argument("--sampler", choices=list(SAMPLER_LABELS),
                   help="sde (Euler-Maruyama, the paper's), ddpm (ancestral), ode/euler, heun (default: sde)")
    g.add_argument("--steps", type=int, help="sampler steps (default: 25)")
    g.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float,
                   help="classifier-free guidance scale; Flux with guidance embedding: its embedded guidance "
                        "(default: a bundled model's measured scale, 4.0; else the family's diffusers default: "
                        "SD 7.5, SDXL 5.0, SD3 7.0, Flux 3.5)")
    g.add_argument("--negative-prompt", help="(default: none)")
    g.add_argument("--seed", type=int, help="image i uses seed + i; -1 draws a random seed and records it "
                                             "(default: 0)")
    g.add_argument("--num-images", "-n", type=int, help="(default: 1)")
    g.add_argument("--height", type=int, help="(default: the model's)")
    g.add_argument("--width", type=int, help="(default: the model's)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="(default: float32)")
    g.add_argument("--compose", metavar="FORMULA",
                   help="a formula over prompts instead of --prompt/--operator, e.g. "
                        "'(\"a circle\" & \"something red\") | \"a square\":0.5' (& AND, | OR, ~ NOT, :weight; "
                        "docs/correctors.md; default: none)")
    g.add_argument("--and-mode", choices=["superdiff", "product"],
                   help="what & means in --compose: SuperDiff's equal density (default) or the product of the experts")
    g.add_argument("--corrector", metavar="SPEC",
                   help="particle / MCMC corrector after each step: smc (4 particles), smc:K, ula, hmc, joined by + "
                        "(e.g. smc:8+ula), or a JSON object of its fields (default: none)")
    g.add_argument("--set", type=_kv, action="append", metavar="FIELD=VALUE",
                   help="any composition field (JSON value), e.g. --set 'kappa_clamp=[-1,2]' (default: none)")
    g.add_argument("--config", help="a composition JSON, e.g. exported from the studio (default: none)")
    g.add_argument("--from-png", help="reproduce an image from the parameters in its PNG text chunks (default: none)")
    g.add_argument("--out", default="outputs/generate",
                   help="output folder, created if needed; never the --from-png image's own file names "
                        "(default: outputs/generate)")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars, no library warnings: only the result lines and errors (default: off)")
    g.set_defaults(func=_generate)

    b = sub.add_parser(
        "batch", help="many compositions from a JSONL/CSV job file; resumable; shards under accelerate",
        description="Run every job of JOBS (JSONL or CSV, one composition per line, optional 'methods' "
                    "sweep) into --out. Rerun the same command to resume. Scale out with "
                    "`accelerate launch --num_processes N -m superdiff batch ...`.")
    b.add_argument("jobs", help="job file (.jsonl or .csv)")
    b.add_argument("--out", required=True, help="output folder: images/, manifest.jsonl, summary.json")
    b.add_argument("--limit", type=int, help="generate at most this many images that are not done yet (per "
                   "process); finished images do not count, so rerunning the same command goes on")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_batch)
