"""`superdiff protein sample|bench`: compose backbone models from the command line.

    superdiff protein sample --operator or --bias 0 0 --num 8 --out outputs/protein-or
    superdiff protein sample --operator and --num 8 --out outputs/protein-and
    superdiff protein sample --operator single --index 1 --num 8 --out outputs/protein-b
    superdiff protein bench --out benchmarks/results/protein_bench            # the committed table
    superdiff protein bench --out /tmp/pb --check benchmarks/results/protein_bench/table.json

Only the standard library is imported here; torch and the models load inside the commands.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("protein", help="compose protein backbone diffusion models (OR / AND / averaging / single)")
    psub = p.add_subparsers(dest="protein_command", required=True)

    s = psub.add_parser("sample", help="sample composed backbones; write PDBs, metrics (JSON + Markdown), trace plot")
    s.add_argument("--experts", nargs="+", default=["protein-a-helix", "protein-b-strand"],
                   help="bundled protein model names or model directories (config.json + model.safetensors)")
    s.add_argument("--operator", choices=["or", "and", "average", "single"], default="or")
    s.add_argument("--bias", type=float, nargs="+", default=None, help="OR log-weights l_i (one per expert)")
    s.add_argument("--temperature", type=float, default=None, help="OR temperature T (default 1)")
    s.add_argument("--weights", type=float, nargs="+", default=None, help="averaging weights (default 1/M)")
    s.add_argument("--index", type=int, default=None, help="expert index for --operator single (default 0)")
    s.add_argument("--num", type=int, default=8, help="number of backbones")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--integrator", choices=["em", "ddpm", "euler", "heun"], default="em",
                   help="em: Euler-Maruyama with the Ito estimator (default, as the benchmark); ddpm: ancestral "
                        "steps with the kernel estimator; euler/heun: probability-flow ODE with the ODE estimator")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-mpnn", action="store_true", help="skip the ProteinMPNN proxy")
    s.add_argument("--out", default="outputs/protein-sample")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_sample)

    b = psub.add_parser("bench", help="Table-3-like benchmark: A, B, averaging, OR (l=0, l=1), AND + references")
    b.add_argument("--out", default="benchmarks/results/protein_bench")
    b.add_argument("--num", type=int, default=48, help="samples per method")
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--pdb-per-method", type=int, default=8)
    b.add_argument("--no-mpnn", action="store_true", help="skip the ProteinMPNN proxy")
    b.add_argument("--check", default=None, help="a committed table.json: exit 1 unless this run reproduces it")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_bench)


#: the operator flags each --operator takes (the others are refused, not ignored)
_OPERATOR_FLAGS = {"or": {"temperature", "bias"}, "average": {"weights"}, "single": {"index"}, "and": set()}


def _operator(args):
    from superdiff.operators import make_operator

    given = {k for k in ("temperature", "bias", "weights", "index") if getattr(args, k) is not None}
    foreign = sorted(given - _OPERATOR_FLAGS[args.operator])
    if foreign:
        uses = sorted(o for o, fl in _OPERATOR_FLAGS.items() if foreign[0] in fl)
        raise ValueError(f"--{foreign[0]}: operator {args.operator} does not take it (it is for: {', '.join(uses)}); "
                         "remove it or choose one of those operators")
    if args.operator == "or":
        return make_operator("or", temperature=1.0 if args.temperature is None else args.temperature, bias=args.bias)
    if args.operator == "average":
        return make_operator("average", weights=args.weights)
    if args.operator == "single":
        return make_operator("single", index=0 if args.index is None else args.index)
    return make_operator("and")


def _sample(args) -> int:
    import torch

    from .bench import run_method, write_samples
    from .data import load_dataset
    from .experts import BackboneModelExpert
    from .metrics import geometry_metrics, summarize

    torch.set_num_threads(1)
    if args.num < 1 or args.steps < 1:
        raise ValueError(f"--num and --steps must be >= 1, got {args.num} and {args.steps}")
    experts = [BackboneModelExpert.from_pretrained(n) for n in args.experts]
    if args.bias is not None and len(args.bias) != len(experts):
        raise ValueError(f"--bias needs one value per expert ({len(experts)}), got {len(args.bias)}")
    out_dir = Path(args.out)
    X, out = run_method(experts, _operator(args), args.num, args.steps, args.seed, progress=not args.quiet,
                        integrator=args.integrator)
    Xn = X.numpy()
    geo = geometry_metrics(Xn)
    paths = write_samples(out_dir, Xn, f"{args.operator} of {', '.join(args.experts)}", geometry=geo)
    ref = load_dataset().real_chains()
    row = summarize(Xn, ref, mpnn=not args.no_mpnn, seed=args.seed, geometry=geo)
    row.update({"operator": out.trace.meta["operator"], "operator_params": out.trace.meta["operator_params"],
                "experts": args.experts, "steps": args.steps, "seed": args.seed,
                "integrator": out.trace.meta["integrator"], "estimator": out.trace.meta["estimator"]})
    (out_dir / "metrics.json").write_text(json.dumps(row, indent=2) + "\n")
    md = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in row.items()]
    (out_dir / "metrics.md").write_text("\n".join(md) + "\n")
    out.trace.save(out_dir / "trace.json")
    out.trace.plot(out_dir / "trace.png", title=f"protein {args.operator}")
    print(json.dumps({k: row[k] for k in ("helical", "strand", "mixed", "other", "valid", "novelty")}, indent=2))
    print(f"wrote {len(paths)} PDB files, metrics.json, metrics.md, trace.json and trace.png to {out_dir}")
    return 0


def table_diffs(ref: dict, new: dict, tol: float = 0.0015) -> list[str]:
    """Metrics of the table.json `ref` that `new` does not reproduce (floats within `tol`; a NaN,
    e.g. the diversity of a one-sample set, reproduces a NaN). Timings are not compared."""
    diffs = []
    for section in ("methods", "references"):
        for name, row in ref[section].items():
            for k, v in row.items():
                if k in ("sampling_seconds",):
                    continue
                w = new[section].get(name, {}).get(k)
                if isinstance(v, float) and isinstance(w, float) and (
                        abs(v - w) <= tol or (math.isnan(v) and math.isnan(w))):
                    continue
                if v != w:
                    diffs.append(f"{section}/{name}/{k}: committed {v}, now {w}")
    return diffs


def _bench(args) -> int:
    from .bench import run_bench

    if args.check and not Path(args.check).is_file():  # before the run, not after it
        raise ValueError(f"--check {args.check}: no such file (a table.json of an earlier `protein bench` run)")
    if args.num < 1 or args.steps < 1 or args.pdb_per_method < 0:
        raise ValueError(f"--num and --steps must be >= 1 and --pdb-per-method >= 0, got {args.num}, {args.steps} "
                         f"and {args.pdb_per_method}")

    run_bench(args.out, args.num, args.steps, args.seed, pdb_per_method=args.pdb_per_method,
              mpnn=not args.no_mpnn, progress=not args.quiet)
    print(Path(args.out, "table.md").read_text())
    if args.check:
        ref = json.loads(Path(args.check).read_text())
        new = json.loads(Path(args.out, "table.json").read_text())
        diffs = table_diffs(ref, new)
        if diffs:
            print("NOT reproduced:\n  " + "\n  ".join(diffs), file=sys.stderr)
            return 1
        print(f"reproduced {args.check} (all metrics within 0.0015)")
    return 0
