"""The conditioning gap: one conditioned training against networks trained at one alpha each.

cIDIR's claim is that one network trained over the alpha prior, queried at alpha, is as good as a
network trained at that alpha alone (IDIR mode: the prior collapsed to ``AlphaPrior(a, a)``), at
equal training time (the same iterations and points per step). For each case this script trains

* the conditioned model once (the engine's defaults plus ``--option`` overrides) and scores TRE
  at every alpha of the selection grid, the alpha chosen by lung Dice and the oracle alpha;
* one IDIR-mode network per alpha of ``--alphas`` (same network class, same options).

and writes ``conditioning.md`` (the table: TRE of both at each alpha, the gap, training seconds),
``conditioning.json`` and ``conditioning_<case>.png`` (TRE against alpha) to ``--output``::

    python benchmarks/compare.py --cases realistic --estimate        # makes the realistic cases once
    python benchmarks/conditioning.py --cases real_r0,real_r1,real_r2,real_r3
    python benchmarks/conditioning.py --cases real_r0 --option alpha_distribution='"log-uniform"' --tag loguniform

IDIR-mode results are cached per (case, alpha, options) in ``--output/idir_cache.json`` so that
variants of the conditioned model are compared against the same single-alpha networks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/conditioning.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="realistic", help="compare.py case groups or names (realistic, real_r0, chest_m0, ...)")
    p.add_argument("--alphas", default="0,0.5,1", help="alphas of the IDIR-mode networks")
    p.add_argument("--num-alphas", type=int, default=21, help="the conditioned model's TRE-vs-alpha grid")
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON", help="register_patient option for every training (repeatable)")
    p.add_argument("--cidir-option", action="append", default=[], metavar="KEY=JSON", help="option for the conditioned training only")
    p.add_argument("--tag", default="default", help="name of this variant in the outputs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--data-dir", type=Path, default=None, help="where compare.py's cases are (default OUTPUT/data)")
    p.add_argument("--no-idir", action="store_true", help="only the conditioned model")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="phantom size for phantom cases (tests)")
    return p


def _tre(model, item, alpha: float) -> float:
    target = torch.as_tensor(item["moving_landmarks"], dtype=torch.float64)
    return float((model.transform_points(item["fixed_landmarks"], alpha) - target).norm(dim=1).mean())


def _train(item, options: dict, workdir: Path) -> tuple[dict, object]:
    """register_patient on one pair; returns its metrics and the trained model (reloaded from ``model.pt``)."""
    from monai_cidir.engines import load_registration_model, register_patient

    opts = dict(export_images=False, overwrite=True, resume=False, checkpoint_interval=10**9)
    opts.update(options)

    metrics = register_patient(item, workdir, **opts)
    return metrics, load_registration_model(Path(workdir) / str(item.get("name") or "pair") / "model.pt")


def run_case(case: dict, args, options: dict, cidir_options: dict, cache: dict) -> dict:
    """Train the conditioned model and the IDIR-mode networks on one case; return its rows."""
    from benchmarks.methods import load_case
    from monai_cidir.engines import alpha_grid
    from monai_cidir.engines.alphas import DEFAULT_DISTRIBUTION

    item = load_case(case["record"])
    grid = alpha_grid(0.0, 1.0, args.num_alphas, cidir_options.get("alpha_distribution", options.get("alpha_distribution", DEFAULT_DISTRIBUTION)))
    with tempfile.TemporaryDirectory(prefix="cidir_conditioning_") as work:  # the trained models are not kept
        return _run_case(case, item, grid, Path(work), args, options, cidir_options, cache)


def _run_case(case: dict, item: dict, grid: list, work: Path, args, options: dict, cidir_options: dict, cache: dict) -> dict:
    t0 = time.perf_counter()
    metrics, model = _train(item, {**options, **cidir_options, "num_alphas": args.num_alphas}, work / "cidir")
    curve = [_tre(model, item, a) for a in grid]
    best = int(np.argmin(curve))
    out = {
        "case": case["name"],
        "tag": args.tag,
        "options": options,
        "cidir_options": cidir_options,
        "grid": grid,
        "cidir_curve": curve,
        "alpha_selected": float(metrics["alpha"]),
        "tre_selected": _tre(model, item, float(metrics["alpha"])),
        "alpha_oracle": grid[best],
        "tre_oracle": curve[best],
        "tre_before": float((torch.as_tensor(item["fixed_landmarks"]) - torch.as_tensor(item["moving_landmarks"])).norm(dim=1).mean()),
        "seconds_training": metrics.get("seconds_training"),
        "seconds_affine": metrics.get("seconds_affine"),
        "seconds_selection": metrics.get("seconds_selection"),
        "seconds_total": time.perf_counter() - t0,
        "idir": {},
    }
    print(f"{case['name']} [{args.tag}] cIDIR: TRE {out['tre_before']:.2f} -> {out['tre_selected']:.2f} mm at alpha {out['alpha_selected']:.3g} "
          f"(oracle {out['tre_oracle']:.2f} at {out['alpha_oracle']:.3g}); curve {' '.join(f'{v:.2f}' for v in curve[::5])}", flush=True)
    if args.no_idir:
        return out
    for a in [float(v) for v in args.alphas.split(",")]:
        key = hashlib.sha1(json.dumps([case["name"], a, options], sort_keys=True).encode()).hexdigest()[:16]
        if key not in cache:
            m, net = _train(item, {**options, "alpha_range": (a, a), "alpha": a, "num_alphas": 0}, work / f"idir_{a}")
            cache[key] = {"alpha": a, "tre": _tre(net, item, a), "seconds_training": m.get("seconds_training")}
        out["idir"][str(a)] = {**cache[key], "cidir": _tre(model, item, a)}  # the conditioned model queried at a
        cidir = out["idir"][str(a)]["cidir"]
        print(f"  alpha {a:.3g}: IDIR-mode {cache[key]['tre']:.2f} mm, cIDIR {cidir:.2f} mm, gap {cidir - cache[key]['tre']:+.2f}", flush=True)
    return out


def _plot(row: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(row["grid"], row["cidir_curve"], marker=".", label="cIDIR, one training over alpha")
    if row["idir"]:
        ax.plot([v["alpha"] for v in row["idir"].values()], [v["tre"] for v in row["idir"].values()], "s", color="C3", label="trained at that alpha alone")
    ax.axvline(row["alpha_selected"], ls="--", color="gray", lw=1, label=f"chosen by lung Dice ({row['alpha_selected']:.3g})")
    ax.set_xlabel("alpha")
    positive = [g for g in row["grid"] if g > 0]
    if positive and min(positive) < 0.05 * max(positive):  # log-spaced grid
        ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlim(-0.5 * min(positive), 1.2 * max(positive))  # no empty negative half
    ax.set_ylabel("mean TRE (mm)")
    ax.set_title(f"{row['case']} [{row['tag']}]: TRE vs alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], output: Path, command: str) -> Path:
    """Append this variant's rows to ``conditioning.json`` and rewrite ``conditioning.md`` from all of them."""
    store = output / "conditioning.json"
    previous = json.loads(store.read_text()) if store.is_file() else []
    keep = [r for r in previous if (r["case"], r["tag"]) not in {(x["case"], x["tag"]) for x in rows}]
    allrows = keep + [{**r, "command": command} for r in rows]
    store.write_text(json.dumps(allrows, indent=1, default=repr))  # options may hold a network partial
    md = ["# The conditioning gap: cIDIR queried at alpha vs a network trained at that alpha alone", "",
          "Produced by the commands below (`python benchmarks/conditioning.py ...`), 2 CPU threads. TRE in mm (mean over the "
          "landmarks); gap = cIDIR - IDIR-mode (negative: cIDIR better). Equal training: the same iterations and points per step.", "",
          "| case | variant | alpha | IDIR-mode TRE | cIDIR TRE | gap | cIDIR chosen alpha (TRE) | oracle alpha (TRE) | training s (cIDIR / IDIR) |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in allrows:
        for key, v in r["idir"].items() or [("-", None)]:
            if v is None:
                continue
            cidir = v.get("cidir", r["cidir_curve"][int(np.argmin([abs(g - v["alpha"]) for g in r["grid"]]))])
            md.append(
                f"| {r['case']} | {r['tag']} | {v['alpha']:.3g} | {v['tre']:.2f} | {cidir:.2f} | {cidir - v['tre']:+.2f} | "
                f"{r['alpha_selected']:.3g} ({r['tre_selected']:.2f}) | {r['alpha_oracle']:.3g} ({r['tre_oracle']:.2f}) | "
                f"{r['seconds_training']:.0f} / {v['seconds_training']:.0f} |"
            )
    md += ["", "## TRE against alpha (cIDIR, one training)", "", "Every other alpha of the selection grid (log-spaced for a log-uniform prior)."]
    for grid in sorted({tuple(r["grid"]) for r in allrows}):
        md += ["", "| case | variant | TRE before | " + " | ".join(f"{a:.3g}" for a in grid[::2]) + " |", "|---|---|---|" + "---|" * len(grid[::2])]
        for r in (r for r in allrows if tuple(r["grid"]) == grid):
            md.append(f"| {r['case']} | {r['tag']} | {r['tre_before']:.2f} | " + " | ".join(f"{v:.2f}" for v in r["cidir_curve"][::2]) + " |")
    md += ["", "## Commands", ""] + sorted({f"- `{r['command']}`" for r in allrows})
    path = output / "conditioning.md"
    path.write_text("\n".join(md) + "\n")
    for r in rows:
        _plot(r, output / f"conditioning_{r['case']}_{r['tag']}.png")
    return path


def main(argv=None) -> int:
    import shlex

    from benchmarks import compare

    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    options, cidir_options = compare._engine_options(args.option), compare._engine_options(args.cidir_option)
    extra = (["--data-dir", str(args.data_dir)] if args.data_dir else []) + (
        ["--phantom-shape", *map(str, args.phantom_shape)] if args.phantom_shape else []
    )
    cargs = compare.build_parser().parse_args(["--cases", args.cases, "--output", str(args.output), *extra])
    cases, skipped = compare.prepare_cases(cargs)
    for s in skipped:
        print(f"skipped {s}")
    cache_path = args.output / "idir_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows = []
    for case in cases:
        rows.append(run_case(case, args, options, cidir_options, cache))
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1))
    command = "python benchmarks/conditioning.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if rows:
        print(f"wrote {write_report(rows, args.output, command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
