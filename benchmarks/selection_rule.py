"""Does the lung-Dice rule pick a good alpha? The TRE it loses against the oracle, per tie tolerance.

For trained models (``model.pt`` of the bundle or of ``benchmarks/compare.py``) whose pair has
landmarks, the selection evaluator scores the usual 21-alpha grid of the model's own prior once,
with :class:`~monai_cidir.handlers.AlphaCurveTRE` attached, so every alpha has its lung Dice and its
landmark TRE. The choice of :class:`~monai_cidir.handlers.AlphaChoice` is then replayed for several
``tie_tolerance`` values, and the table gives the chosen alpha, its TRE and
the loss against the oracle (the lowest TRE on the grid). Nothing is retrained.

Run from the repository root::

    python benchmarks/selection_rule.py --bundle-output outputs            # the quick start's patients
    python benchmarks/selection_rule.py --compare-runs benchmarks/results/realistic_070/runs
    python benchmarks/selection_rule.py --bundle-output /tmp/long --tolerances 1e-4,5e-4,1e-3 --markdown rule.md
    python benchmarks/selection_rule.py --curves benchmarks/results/cuda_h200/alpha_curve_paper_*.csv

``--curves`` replays stored ``alpha_curve.csv`` files that have a ``tre`` column (what a bundle run on
a pair with landmarks writes), e.g. the curves a GPU run brought back, without their models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def _bundle_cases(output_dir: Path, dataset_dir: Path):
    """(label, model.pt, item) for every patient of a bundle run on a datalist with landmarks."""
    from monai_cidir.engines.bundle import make_dataset

    items = {it["name"]: it for it in make_dataset(str(dataset_dir), str(dataset_dir / "datalist.json"), "datalist")}
    for model in sorted(output_dir.glob("*/model.pt")):
        name = model.parent.name
        if name in items:
            yield f"{output_dir.name}/{name}", model, items[name]


def _compare_cases(runs_dir: Path):
    """(label, model.pt, item) for every cIDIR run of benchmarks/compare.py."""
    from benchmarks.methods import load_case

    for run in sorted(runs_dir.glob("*__cidir")):
        spec = json.loads((run / "spec.json").read_text())
        for model in sorted((run / "work").glob("*/model.pt")):
            yield f"{runs_dir.parent.name}/{spec['case']['name']}", model, load_case(spec["case"]["record"])


def _stored_curves(paths: list[Path]):
    """(label, rows) of alpha_curve.csv files with a tre column."""
    import csv

    for path in paths:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
        if not rows or "tre" not in rows[0]:
            raise SystemExit(f"{path}: expected an alpha_curve.csv with a 'tre' column, found columns {sorted(rows[0]) if rows else 'none'}")
        yield path.stem, rows


def score_curve(model_path: Path, item: dict, num_alphas: int = 21) -> list[dict]:
    """Rows (alpha, dice, folding, tre) of the model's grid; masks computed when the pair has none."""
    import torch

    from monai_cidir.engines import AlphaSearch, AlphaSelectionEvaluator, load_registration_model, model_prior
    from monai_cidir.engines.quality import prepare_lung_masks
    from monai_cidir.handlers import AlphaCurveTRE

    model = load_registration_model(model_path)
    item, _ = prepare_lung_masks(item, "threshold")
    prior = model_prior(model)
    tre = AlphaCurveTRE(item["fixed_landmarks"], item["moving_landmarks"])
    evaluator = AlphaSelectionEvaluator(model, item, prior=prior, search=AlphaSearch(num_alphas), val_handlers=[tre])
    with torch.no_grad():
        return evaluator.run().rows


def replay(rows: list[dict], tolerances: list[float]) -> dict:
    """The oracle and, per tolerance, the alpha AlphaChoice picks, its TRE and the loss (mm)."""
    from monai_cidir.handlers import AlphaChoice

    oracle = min(rows, key=lambda r: r["tre"])
    out = {"oracle_alpha": oracle["alpha"], "oracle_tre": oracle["tre"], "rules": {}}
    for tol in tolerances:
        chosen = AlphaChoice(tie_tolerance=tol).choose(rows)
        out["rules"][tol] = {"alpha": chosen["alpha"], "tre": chosen["tre"], "loss": chosen["tre"] - oracle["tre"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/selection_rule.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle-output", type=Path, action="append", default=[], help="a bundle output folder (repeatable)")
    p.add_argument("--dataset-dir", type=Path, default=REPO / "data" / "cidir_phantom", help="the bundle runs' dataset (default: the phantom)")
    p.add_argument("--compare-runs", type=Path, action="append", default=[], help="a compare.py runs folder (repeatable)")
    p.add_argument("--curves", type=Path, nargs="+", default=[], help="stored alpha_curve.csv files with a tre column")
    p.add_argument("--tolerances", default="1e-4,2e-4,5e-4,1e-3", help="tie tolerances to replay")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    tolerances = [float(t) for t in args.tolerances.split(",")]
    cases = [c for d in args.bundle_output for c in _bundle_cases(d, args.dataset_dir)]
    cases += [c for d in args.compare_runs for c in _compare_cases(d)]
    if not cases and not args.curves:
        p.error("no trained model with landmarks found: give --bundle-output, --compare-runs or --curves")
    head = ["case", "oracle alpha: TRE (mm)"] + [f"tol {t:g}: alpha, TRE, loss" for t in tolerances]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    curves = [(label, lambda model=model, item=item: score_curve(model, item)) for label, model, item in cases]
    curves += [(label, lambda rows=rows: rows) for label, rows in _stored_curves(args.curves)]
    for label, rows in curves:
        r = replay(rows(), tolerances)
        cells = [label, f"{r['oracle_alpha']:.3g}: {r['oracle_tre']:.3f}"]
        cells += [f"{v['alpha']:.3g}, {v['tre']:.3f}, +{v['loss']:.3f}" for v in r["rules"].values()]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
