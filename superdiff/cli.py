"""Command line: `superdiff generate|batch|ui|protein|gmm-demo` (also `python -m superdiff ...`).

Subcommands that live in other modules register themselves through an
``add_parser(subparsers)`` function; those modules import nothing heavy at import time, so
`superdiff --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the subcommands' counts), refused with the value given."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import run_demo

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: a file, not a folder; give a folder for the demo's plots and JSON")

    summary = run_demo(args.out, num_samples=args.samples, num_steps=args.steps, seed=args.seed,
                       estimator=args.estimator, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/samples.png, {args.out}/trace_or.png, {args.out}/trace_and.png and the traces as JSON")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="superdiff", description="Compose diffusion models at sampling time (SuperDiff).")
    p.add_argument("--version", action="version", version=f"superdiff {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("gmm-demo", help="the 2-D Gaussian-mixture OR/AND demo (paper Figure 2): scatter + trace plots")
    d.add_argument("--out", default="outputs/gmm-demo", help="output folder (default: outputs/gmm-demo)")
    d.add_argument("--samples", type=positive_int, default=2000, help="samples per operator (default 2000)")
    d.add_argument("--steps", type=positive_int, default=100, help="sampling steps (default 100)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--estimator", choices=["kernel", "ito"], default=None, help="default: the package default")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    import importlib

    for module in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a module not written yet or an optional extra missing
            if e.name and (e.name == module or module.startswith(e.name + ".")):
                continue
            raise
        mod.add_parser(sub)
    return p


#: modules providing further subcommands via add_parser(subparsers)
_SUBCOMMAND_MODULES = ("superdiff.generate_cli", "superdiff.ui.cli", "superdiff.protein.cli", "superdiff.bench_cli")


#: a comma-separated list of numbers starting with a minus sign ("-1,2", "-0.5,1.5e-1")
_NEGATIVE_LIST = re.compile(r"-\d*\.?\d+(?:[eE][-+]?\d+)?(?:,[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)+")


def glue_negative_lists(argv: list[str]) -> list[str]:
    """argv with "--flag -1,2" written "--flag=-1,2": argparse takes a value that starts with a
    minus sign for an option unless it is a single number, so the documented
    `--kappa-clamp -1,2` (and negative --weights / --bias lists) would be refused."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_LIST.fullmatch(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def reporting_errors(run, prog: str) -> int:
    """run()'s exit status, or 2 with one "PROG: error: ..." line (no traceback) for bad input
    or a file or model folder that is not there (ValueError, FileNotFoundError): the command
    line's and the benchmark scripts' way of refusing what they were given."""
    try:
        return run()
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(glue_negative_lists(list(sys.argv[1:] if argv is None else argv)))
    return reporting_errors(lambda: args.func(args), "superdiff")


if __name__ == "__main__":
    sys.exit(main())
