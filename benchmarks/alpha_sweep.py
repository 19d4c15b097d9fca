"""The alpha sweep's cost and exactness: boundary band against the whole grid, on trained cIDIR models.

For every cIDIR run that ``benchmarks/compare.py`` left in ``OUTPUT/runs/<case>__cidir/`` (its
``model.pt`` and the case's datalist record), this reloads the pair and the model and runs
:class:`monai_cidir.engines.AlphaSelectionEvaluator` twice over the same 21 alphas:

* ``band``: the defaults (the boundary band, at least ``band_mm=0.1`` wide and four times the
  movement the probe saw; folding on every 4th lung point per axis);
* ``whole grid``: ``band_mm=None``, ``folding_stride=1`` (every grid point and every lung point,
  for every alpha: the cost before the band was introduced, with the same fast forward pass).

It reports each sweep's seconds, the share of grid points the band mapped per alpha, the largest
Dice difference between the two (0 when the band is exact) and whether they choose the same alpha.
Run from the repository root after ``compare.py``::

    python benchmarks/alpha_sweep.py                     # reads benchmarks/results/runs
    python benchmarks/alpha_sweep.py --output /tmp/bench --markdown sweep.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def sweep_case(run_dir: Path, num_alphas: int = 21) -> dict | None:
    """Time the band and whole-grid sweeps of one compare.py cIDIR run (None when it has no model)."""
    import torch

    from benchmarks.methods import load_case
    from monai_cidir.engines import AlphaSearch, AlphaSelectionEvaluator, load_registration_model

    spec = json.loads((run_dir / "spec.json").read_text())
    models = sorted((run_dir / "work").glob("*/model.pt"))
    if not models:
        return None
    item = load_case(spec["case"]["record"])
    model = load_registration_model(models[0])
    out = {"case": spec["case"]["name"]}
    for label, kwargs in (("band", {}), ("whole", {"band_mm": None, "folding_stride": 1})):
        ev = AlphaSelectionEvaluator(model, item, search=AlphaSearch(num_alphas), **kwargs)
        start = time.perf_counter()
        with torch.no_grad():
            curve = ev.run()
        out[f"{label}_seconds"] = time.perf_counter() - start
        out[f"{label}_rows"] = curve.rows
        out[f"{label}_alpha"] = curve.alpha
        if label == "band":
            n = math.prod(ev.shape)
            out["grid_points"] = n
            mapped = [r["points"] for r in curve.rows]
            out["band_points"] = (min(mapped), sum(mapped) / len(mapped), max(mapped))
    out["max_dice_difference"] = max(abs(a["dice"] - b["dice"]) for a, b in zip(out["band_rows"], out["whole_rows"]))
    return out


def _share(points: float, total: int) -> str:
    return f"{100 * points / total:.0f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/alpha_sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results", help="compare.py's output folder")
    p.add_argument("--num-alphas", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs = sorted((args.output / "runs").glob("*__cidir"))
    if not runs:
        print(f"no cIDIR runs under {args.output / 'runs'}: run benchmarks/compare.py first", file=sys.stderr)
        return 1
    lines = [
        f"`python benchmarks/alpha_sweep.py` ({args.num_alphas} alphas, {args.threads} threads, torch {torch.__version__})",
        "",
        "| case | grid points | mapped per alpha (band): mean (min-max) | band sweep (s) | whole-grid sweep (s) | speed-up | max Dice difference | same alpha |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        r = sweep_case(run, args.num_alphas)
        if r is None:
            print(f"skipped {run.name}: no model.pt", file=sys.stderr)
            continue
        lines.append(
            f"| {r['case']} | {r['grid_points']} | {_share(r['band_points'][1], r['grid_points'])} "
            f"({_share(r['band_points'][0], r['grid_points'])}-{_share(r['band_points'][2], r['grid_points'])}) "
            f"| {r['band_seconds']:.1f} | {r['whole_seconds']:.1f} | {r['whole_seconds'] / r['band_seconds']:.1f}x "
            f"| {r['max_dice_difference']:.1e} | {'yes' if r['band_alpha'] == r['whole_alpha'] else 'no'} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
