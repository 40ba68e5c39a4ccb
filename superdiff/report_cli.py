"""`superdiff bench report`: the paper's three comparisons on the bundled models (benchmarks/report.py).

The report lives in the repository's benchmarks/ folder (not part of an installed wheel); this
subcommand runs it from the checkout the package was installed from, with the same options.
It joins the `bench`
group when another module has created it (e.g. `superdiff bench speed`), else creates it.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

REPORT_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"


def _report(args: argparse.Namespace) -> int:
    if not REPORT_SCRIPT.is_file():
        raise ValueError(f"benchmarks/report.py is not next to this installation ({REPORT_SCRIPT} is missing); "
                         "run the report from a source checkout: pip install -e . then superdiff bench report")
    spec = importlib.util.spec_from_file_location("superdiff_bench_report", REPORT_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--full" if args.full else "--quick"] + (["--check"] if args.check else [])
    for flag in ("out", "sections", "and_model", "full_model"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    return mod.main(argv + (["--skip-existing"] if args.skip_existing else []))


def add_parser(sub) -> None:
    bench = sub.choices.get("bench") or sub.add_parser("bench", help="benchmarks (run from a source checkout)")
    groups = [a for a in bench._actions if isinstance(a, argparse._SubParsersAction)]
    bsub = groups[0] if groups else bench.add_subparsers(dest="bench", required=True)
    r = bsub.add_parser("report", help="the paper's three comparisons on the bundled models, one Markdown report "
                                       "(= python benchmarks/report.py)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="quick mode (the default; < 10 CPU minutes)")
    mode.add_argument("--full", action="store_true", help="full mode (what the README cites)")
    r.add_argument("--check", action="store_true", help="rerun quick mode, compare with the committed quick figures")
    r.add_argument("--out", default=None, help="output folder (default: benchmarks/results/report[/quick])")
    r.add_argument("--sections", default=None, help="comma-separated subset of or,and,steps,existing to rerun")
    r.add_argument("--and-model", default=None, help="text-to-image model of the AND table (default shapes-t2i-pairs)")
    r.add_argument("--full-model", default=None, help="the all-data model of the OR table (default shapes-full)")
    r.add_argument("--skip-existing", action="store_true", help="--full: do not rerun the other benchmarks")
    r.set_defaults(func=_report)
