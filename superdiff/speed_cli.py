"""`superdiff bench speed`: the speed and memory benchmark against diffusers (benchmarks/speed.py).

The benchmark lives in the repository's benchmarks/ folder (not part of an installed wheel);
this subcommand runs it from the checkout the package was installed from, passing every
argument after `speed` through (`superdiff bench speed --help` lists them). It joins the
`bench` group when another module has created it, else creates it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

SPEED_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _speed(args: argparse.Namespace) -> int:
    if not SPEED_SCRIPT.is_file():
        raise ValueError(f"benchmarks/speed.py is not next to this installation ({SPEED_SCRIPT} is missing); "
                         "run the benchmark from a source checkout: pip install -e . then superdiff bench speed")
    spec = importlib.util.spec_from_file_location("superdiff_bench_speed", SPEED_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.main(list(args.speed_args))


def add_parser(sub) -> None:
    bench = sub.choices.get("bench") or sub.add_parser("bench", help="benchmarks (run from a source checkout)")
    groups = [a for a in bench._actions if isinstance(a, argparse._SubParsersAction)]
    bsub = groups[0] if groups else bench.add_subparsers(dest="bench", required=True)
    s = bsub.add_parser("speed", add_help=False, prefix_chars="+",  # every option goes to benchmarks/speed.py
                        help="time per step outside the network, host syncs, aten ops and peak memory of a SuperDiff "
                             "step vs diffusers' own pipeline (= python benchmarks/speed.py ARGS)")
    s.add_argument("speed_args", nargs=argparse.REMAINDER, help="arguments of benchmarks/speed.py")
    s.set_defaults(func=_speed)
