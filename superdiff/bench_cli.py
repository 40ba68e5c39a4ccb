"""`superdiff bench ...`: the benchmarks of the repository's benchmarks/ folder.

The benchmark scripts are not part of an installed wheel; these subcommands run them from the
checkout the package was installed from (`pip install -e .`), with the same options:

    superdiff bench report [--quick | --full] [--check] ...   = python benchmarks/report.py
    superdiff bench speed ARGS                                = python benchmarks/speed.py ARGS
    superdiff bench breakdown ARGS                            = python benchmarks/step_breakdown.py ARGS
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The module benchmarks/<name>.py of the source checkout, or a ValueError saying how to get it."""
    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"benchmarks/{name}.py is not next to this installation ({path} is missing); run it from "
                         f"a source checkout: pip install -e . then superdiff bench {name}")
    spec = importlib.util.spec_from_file_location(f"superdiff_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _report(args: argparse.Namespace) -> int:
    argv = ["--full" if args.full else "--quick"] + (["--check"] if args.check else [])
    for flag in ("out", "sections", "and_model", "full_model"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    return load_benchmark("report").main(argv + (["--skip-existing"] if args.skip_existing else []),
                                         prog="superdiff bench report")


def _speed(args: argparse.Namespace) -> int:
    return load_benchmark("speed").main(list(args.speed_args), prog="superdiff bench speed")


def _breakdown(args: argparse.Namespace) -> int:
    return load_benchmark("step_breakdown").main(list(args.breakdown_args), prog="superdiff bench breakdown")


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (run from a source checkout)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    r = bsub.add_parser("report", help="the paper's three comparisons on the bundled models, one Markdown report "
                                       "(= python benchmarks/report.py)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="quick mode (the default; < 10 CPU minutes)")
    mode.add_argument("--full", action="store_true", help="full mode (what the README cites)")
    r.add_argument("--check", action="store_true", help="rerun quick mode, compare with the committed quick figures")
    r.add_argument("--out", default=None, help="output folder (default: benchmarks/results/report[/quick])")
    r.add_argument("--sections", default=None, help="comma-separated subset of or,and,and_t2i,steps,existing to rerun")
    r.add_argument("--and-model", default=None, help="text-to-image model of the AND table (default shapes-t2i-pairs)")
    r.add_argument("--full-model", default=None, help="the all-data model of the OR table (default shapes-full)")
    r.add_argument("--skip-existing", action="store_true", help="--full: do not rerun the other benchmarks")
    r.set_defaults(func=_report)
    s = bsub.add_parser("speed", add_help=False, prefix_chars="+",  # every option goes to benchmarks/speed.py
                        help="time per step outside the network, host syncs, aten ops and peak memory of a SuperDiff "
                             "step vs diffusers' own pipeline (= python benchmarks/speed.py ARGS)")
    s.add_argument("speed_args", nargs=argparse.REMAINDER, help="arguments of benchmarks/speed.py")
    s.set_defaults(func=_speed)
    b = bsub.add_parser("breakdown", add_help=False, prefix_chars="+",
                        help="where a SuperDiff step's time outside the network goes, part by part "
                             "(= python benchmarks/step_breakdown.py ARGS)")
    b.add_argument("breakdown_args", nargs=argparse.REMAINDER, help="arguments of benchmarks/step_breakdown.py")
    b.set_defaults(func=_breakdown)
