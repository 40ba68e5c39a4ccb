"""The protein composition benchmark (a Table-3-like table on proxies) and the sampling helper.

Rows: expert A alone, expert B alone, averaging (kappa = 1/2), SuperDiff OR with bias l = (0, 0)
(the equal mixture) and l = (1, 0) (biased towards A, as the paper's l = 1), and SuperDiff AND;
plus reference rows of real windows (A's and B's training classes and the held-out mixed
alpha/beta windows, the AND reference). Every method starts from the same x_T and noise draws
(one torch.Generator seeded per method with the same seed), the Euler-Maruyama integrator with
the full g_t noise and the Ito estimator in the centre-of-mass-free space (protein/experts.py).

Columns (protein/metrics.py): class fractions by pydssp (helical / strand / mixed / other), mean
helix and strand fraction, CA-CA mean and std, broken CA-CA bonds, clashes, valid fraction, Rg,
novelty vs the training chains (1 - max TM), diversity (1 - mean pairwise TM), TM to the nearest
held-out mixed window, the ProteinMPNN NLL proxy, and from the trace: the tracked
|log q_A - log q_B| at the end, the share of samples whose final kappa favours A (for OR: which
expert each sample ended up following) and how often kappa left [0, 1] (AND extrapolating);
for OR, the helical share among the samples following A and the strand share among those
following B (each expert's class rate, kept or not under composition).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import load_dataset
from .experts import BackboneModelExpert, compose_backbones
from .metrics import geometry_metrics, summarize, tm_score
from .pdb import write_backbone_pdb

__all__ = ["METHODS", "make_operator", "run_method", "run_bench", "write_samples", "markdown_table"]

#: method name -> (operator name, parameters)
METHODS: dict[str, tuple[str, dict]] = {
    "A (helix model)": ("single", {"index": 0, "track_all": True}),  # the log q gap needs both experts
    "B (strand model)": ("single", {"index": 1, "track_all": True}),
    "averaging (kappa=1/2)": ("average", {}),
    "SuperDiff OR, l=(0,0)": ("or", {"temperature": 1.0, "bias": [0.0, 0.0]}),
    "SuperDiff OR, l=(1,0)": ("or", {"temperature": 1.0, "bias": [1.0, 0.0]}),
    "SuperDiff AND": ("and", {}),
}
DEFAULT_EXPERTS = ("protein-a-helix", "protein-b-strand")


def make_operator(name: str, params: dict):
    from superdiff.operators import make_operator as mk

    return mk(name, **params)


def run_method(experts: list[BackboneModelExpert], operator: Any, num_samples: int, num_steps: int, seed: int,
               progress: bool = False, integrator: str = "em"):
    """(backbones [B, L, 4, 3] Angstrom, SampleOutput) for one operator; deterministic given seed.

    integrator: "em" (the benchmark's; Ito estimator), "ddpm" (kernel estimator), "euler" or
    "heun" (probability-flow ODE; ODE estimator)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    # compose_backbones refuses experts trained on different schedules (backbone_expert_set)
    return compose_backbones(experts, experts[0].schedule(), num_samples, num_steps, operator=operator, estimator=None,
                             integrator=integrator, generator=g, progress=progress)


def write_samples(folder: Path, X: np.ndarray, label: str, limit: int | None = None,
                  geometry: dict[str, np.ndarray] | None = None) -> list[Path]:
    """PDB files with each structure's pydssp string and class as remarks (geometry: geometry_metrics(X)
    when the caller already has it)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = geometry_metrics(X) if geometry is None else geometry
    paths = []
    for i, x in enumerate(X[:limit]):
        paths.append(write_backbone_pdb(folder / f"sample_{i:03d}.pdb", x, remarks=[
            f"superdiff protein: {label}", f"pydssp {g['ss'][i]} class {g['cls'][i]}"]))
    return paths


def _composition_stats(out, M: int) -> dict:
    logq = out.logq.numpy()
    kappa_last = out.trace.kappa[-1]  # [B, M]
    kA = out.trace.kappa[:, :, 0]
    stats = {"final_kappa_A": float(kappa_last[:, 0].mean()), "share_kappa_A_gt_half": float((kappa_last[:, 0] > 0.5).mean()),
             # AND may extrapolate (kappa outside [0, 1], up to its clamp): how often it had to
             "kappa_outside_01": float(((kA < -1e-9) | (kA > 1 + 1e-9)).mean())}
    if M == 2:
        stats["abs_logq_gap"] = float(np.abs(logq[:, 0] - logq[:, 1]).mean())
    return stats


def _class_by_expert(cls: np.ndarray, follows_a: np.ndarray) -> dict:
    """For OR: the share of A's class among the samples that ended up following A (final
    kappa_A > 1/2) and of B's class among the rest; compare with each expert alone.
    cls: the per-sample class of geometry_metrics."""
    a, b = cls[follows_a], cls[~follows_a]
    return {"helical_if_follows_A": float((a == "helical").mean()) if len(a) else None,
            "strand_if_follows_B": float((b == "strand").mean()) if len(b) else None}


def _tm_to_set(X: np.ndarray, refs: np.ndarray) -> float:
    return float(np.mean([max(tm_score(x, r) for r in refs) for x in X]))


def run_bench(out_dir: str | Path, num_samples: int = 48, num_steps: int = 200, seed: int = 0,
              experts: tuple[str, str] = DEFAULT_EXPERTS, pdb_per_method: int = 8, mpnn: bool = True,
              progress: bool = True, methods: list[str] | None = None) -> dict:
    """Run every method, write PDBs, table.md, table.json and plots under out_dir; returns the JSON."""
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ex = [BackboneModelExpert.from_pretrained(n) for n in experts]
    ds = load_dataset()
    ref_chains = ds.real_chains()
    rng = np.random.default_rng(seed)

    def pick(cls: str) -> np.ndarray:
        W = ds.windows(cls, real=True)
        return W[np.sort(rng.choice(len(W), min(num_samples, len(W)), replace=False))]

    mixed_all = ds.windows("mixed", real=True)
    rows: dict[str, dict] = {}
    geoms: dict[str, dict] = {}  # method -> geometry_metrics of its samples
    traces = {}
    t_all = time.perf_counter()
    for name in (methods or list(METHODS)):
        op_name, params = METHODS[name]
        t0 = time.perf_counter()
        X, out = run_method(ex, make_operator(op_name, params), num_samples, num_steps, seed, progress)
        secs = time.perf_counter() - t0
        Xn = X.numpy()
        geo = geometry_metrics(Xn)
        row = summarize(Xn, ref_chains, mpnn=mpnn, seed=seed, geometry=geo)
        row["tm_to_mixed_ref"] = _tm_to_set(Xn, mixed_all)
        row.update(_composition_stats(out, len(ex)))
        if op_name == "or" and len(ex) == 2:
            row.update(_class_by_expert(geo["cls"], out.trace.kappa[-1][:, 0] > 0.5))
        row["sampling_seconds"] = round(secs, 2)
        row["forward_calls"] = out.trace.meta["forward_calls"]
        rows[name] = row
        geoms[name] = geo
        traces[name] = out.trace
        write_samples(out_dir / "samples" / _slug(name), Xn, name, pdb_per_method, geometry=geo)
        if progress:
            print(f"{name}: {secs:.1f} s; helical {row['helical']:.2f} strand {row['strand']:.2f} "
                  f"mixed {row['mixed']:.2f} valid {row['valid']:.2f}")
    refs = {"real helical windows (A's data)": pick("helical"), "real strand windows (B's data)": pick("strand"),
            "real mixed windows (held out; AND reference)": pick("mixed")}
    ref_rows = {}
    for name, W in refs.items():
        r = summarize(W, None, mpnn=mpnn, seed=seed)
        r["tm_to_mixed_ref"] = None
        ref_rows[name] = r
    result = {
        "config": {"experts": list(experts), "num_samples": num_samples, "num_steps": num_steps, "seed": seed,
                   "integrator": "em", "estimator": "ito", "space": "centre-of-mass-free, d = 3(4L-1)",
                   "methods": {k: METHODS[k] for k in rows}, "torch": torch.__version__},
        "methods": rows,
        "references": ref_rows,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    (out_dir / "table.json").write_text(json.dumps(_round(result), indent=2) + "\n")
    (out_dir / "table.md").write_text(markdown_table(_round(result)))
    _plots(out_dir, geoms, traces, rows)
    for name, tr in traces.items():  # composed methods only, first 8 samples (the plots use 16)
        if tr.meta["operator"] in ("or", "and"):
            tr.select(list(range(min(8, tr.batch_size)))).save(out_dir / "traces" / f"{_slug(name)}.json")
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def _round(obj: Any, nd: int = 3) -> Any:
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, dict):
        return {k: _round(v, nd) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, nd) for v in obj]
    return obj


COLUMNS = [("helical", "helical"), ("strand", "strand"), ("mixed", "mixed"), ("other", "other"),
           ("helix_frac", "H frac"), ("strand_frac", "E frac"), ("valid", "valid"),
           ("ca_ca_mean", "CA-CA (A)"), ("ca_ca_std", "CA-CA sd"), ("clashes", "clashes"), ("rg", "Rg (A)"),
           ("novelty", "novelty"), ("diversity", "diversity"), ("tm_to_mixed_ref", "TM to mixed ref"),
           ("mpnn_nll", "MPNN NLL (proxy)"), ("abs_logq_gap", "|logqA-logqB|"), ("share_kappa_A_gt_half", "kappa_A>1/2"),
           ("kappa_outside_01", "kappa outside [0,1]"),
           ("helical_if_follows_A", "helical if following A"), ("strand_if_follows_B", "strand if following B")]


def markdown_table(result: dict) -> str:
    cfg = result["config"]

    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [
        "# Protein backbones: SuperDiff composition of two small backbone models (proxy metrics)",
        "",
        f"Experts: {', '.join(cfg['experts'])}; {cfg['num_samples']} samples of 32 residues per method, "
        f"{cfg['num_steps']} Euler-Maruyama steps (full g_t noise), Ito estimator in the centre-of-mass-free "
        f"space, seed {cfg['seed']}. Reproduce: `superdiff protein bench --out <dir> --num {cfg['num_samples']} "
        f"--steps {cfg['num_steps']} --seed {cfg['seed']}`.",
        "",
        "Class fractions by pydssp on each sample (helical: H>=0.25, E<0.05; strand: E>=0.25, H<0.05; mixed: "
        "H>=0.15, E>=0.15). valid = no CA-CA bond outside [3.6, 4.0] A and no backbone clash (< 2.5 A). "
        "novelty = 1 - max TM-score to the training chains; diversity = 1 - mean pairwise TM. "
        "kappa_A>1/2 = share of samples whose final kappa favours A (for OR: the expert each sample "
        "ended up following); for OR, 'helical if following A' and 'strand if following B' are the class shares "
        "within those two groups, to compare with A and B alone. "
        "MPNN NLL is a PROXY (mean NLL/residue of ProteinMPNN's own design at T=0.1): no folding model "
        "(ESMFold/AlphaFold) is available offline, so designability is NOT measured.",
        "",
        head, sep,
    ]
    for name, row in result["methods"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(k)) for k, _ in COLUMNS) + " |")
    for name, row in result["references"].items():
        lines.append(f"| *{name}* | " + " | ".join(fmt(row.get(k)) for k, _ in COLUMNS) + " |")
    lines += ["", f"Total benchmark time {result['total_seconds']} s (1 CPU thread)."]
    return "\n".join(lines) + "\n"


def _plots(out_dir: Path, geoms: dict[str, dict], traces: dict, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    bottom = np.zeros(len(names))
    for cls, col in (("helical", "tab:red"), ("strand", "tab:blue"), ("mixed", "tab:purple"), ("other", "tab:gray")):
        v = np.array([rows[n][cls] for n in names])
        ax.bar(range(len(names)), v, bottom=bottom, color=col, label=cls)
        bottom += v
    ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=7)
    ax.set_ylabel("fraction of samples")
    ax.set_title("pydssp class of generated backbones")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_dir / "classes.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), sharex=True, sharey=True)
    for ax, n in zip(np.atleast_1d(axes), names):
        g = geoms[n]
        ax.scatter(g["h"], g["e"], s=8)
        ax.set_title(n, fontsize=7)
        ax.set_xlabel("helix fraction")
    np.atleast_1d(axes)[0].set_ylabel("strand fraction")
    fig.tight_layout()
    fig.savefig(out_dir / "ss_scatter.png", dpi=110)
    plt.close(fig)

    comp = [n for n in names if traces[n].meta["operator"] in ("or", "and")]
    if comp:
        fig, axes = plt.subplots(2, len(comp), figsize=(3.2 * len(comp), 5), squeeze=False)
        for j, n in enumerate(comp):
            tr = traces[n]
            x = np.arange(tr.kappa.shape[0])
            axes[0, j].plot(x, tr.kappa[:, :16, 0], lw=0.6, alpha=0.6)
            axes[0, j].set_title(f"{n}\nkappa_A per sample", fontsize=7)
            gap = tr.logq[:, :16, 0] - tr.logq[:, :16, 1]
            axes[1, j].plot(np.arange(len(gap)), gap, lw=0.5, alpha=0.5)
            axes[1, j].set_title("log q_A - log q_B", fontsize=7)
            axes[1, j].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / "traces.png", dpi=110)
        plt.close(fig)
