"""The real baseline/follow-up pair without its landmarks: does cIDIR converge where elastix does?

``../shared/data/real_lung_pair/`` holds two real lung CT scans and nothing else (their landmarks
and masks are held back for scoring). Without landmarks this script checks what can be checked:

* lung NCC (fixed lung, 100K points) before, after the affine pre-alignment and after each method;
* Dice of the lung masks (computed by the threshold backend) after each method;
* the distance between the cIDIR and the elastix displacement at every fixed lung point (mean,
  95th percentile): two methods that converge to the same anatomy agree to about a voxel;
* the time breakdown of cIDIR (affine, training, alpha selection, export) and elastix's time.

Run from the repository root (about 4 minutes on 2 idle cores)::

    python benchmarks/real_pair.py                      # writes benchmarks/results/real_pair.md
    python benchmarks/real_pair.py --pair /data/pair --output /tmp/out
    python benchmarks/real_pair.py --model /tmp/cidir_real_pair_x/real_pair/model.pt --no-elastix --tag rescore \
        --alphas 0,0.0127,0.0183,0.0379     # a trained model again, at other alphas; nothing retrained

cIDIR runs with the bundle's training budget (read from ``train.json``: 600 iterations x 2000
points, the regularizer on 500 of them); elastix with its default maps (no mask, the setting that
scored best on this pair), see :mod:`benchmarks.peers.elastix`.
"""

from __future__ import annotations

import argparse
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
#: the bundle's training budget: this script runs what ``python -m monai.bundle run training`` runs
BUNDLE_DEFAULTS = {
    k: v
    for k, v in json.loads((REPO / "bundles" / "cidir_lung_ct" / "configs" / "train.json").read_text()).items()
    if k in ("max_iterations", "num_points", "regularization_points")
}


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.compare import DEFAULT_SHARED

    p = argparse.ArgumentParser(prog="python benchmarks/real_pair.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", type=Path, default=DEFAULT_SHARED / "data" / "real_lung_pair", help="folder with baseline.mha and followup.mha")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-iterations", type=int, default=BUNDLE_DEFAULTS["max_iterations"])
    p.add_argument("--num-points", type=int, default=BUNDLE_DEFAULTS["num_points"])
    p.add_argument("--no-elastix", action="store_true")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="register_patient option (VALUE in JSON), repeatable")
    p.add_argument("--tag", default="", help="variant name: writes real_pair_<tag>.md/json instead of real_pair.md/json")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="alphas at which the lung NCC is also reported")
    p.add_argument("--log-floor", type=float, default=None, help="the log-uniform prior's floor for this run (default: monai_cidir's LOG_FLOOR)")
    p.add_argument("--model", type=Path, default=None, help="score this trained model.pt (its metrics.json beside it) instead of training one")
    p.add_argument("--elastix-cache", type=Path, default=None, help="elastix's lung displacement, reused when present (default OUTPUT/real_pair_elastix.npz)")
    return p


def _elastix_reference(item: dict, lung: torch.Tensor, args) -> dict | None:
    """elastix default on the pair: displacement at the lung points, Dice, lung NCC, seconds (cached in an .npz)."""
    from benchmarks.methods import warped_mask_dice
    from benchmarks.peers.elastix import elastix_available, register_elastix
    from monai_cidir.metrics.similarity import lung_ncc

    cache = args.elastix_cache or args.output / "real_pair_elastix.npz"
    if cache.is_file():
        data = dict(np.load(cache))
        if data["displacement"].shape == tuple(lung.shape):
            print(f"elastix: reusing {cache}")
            return data
    if not elastix_available():
        return None
    result = register_elastix(item["fixed_image"], item["moving_image"], None, preset="default", num_threads=args.threads)
    ncc = lung_ncc(item["fixed_image"], item["moving_image"], item["fixed_mask"], {"elastix": lambda p: result.transform_points(p).float()})
    data = {
        "displacement": (result.transform_points(lung) - lung).numpy(),
        "seconds": np.float64(result.seconds),
        "dice": np.float64(warped_mask_dice(item, result.displacement_field())),
        "ncc": np.float64(ncc["elastix"]),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    fixed_path, moving_path = args.pair / "baseline.mha", args.pair / "followup.mha"
    for f in (fixed_path, moving_path):
        if not f.is_file():
            print(f"skipped: {f} not found")
            return 0
    from benchmarks.methods import load_case
    from monai_cidir.coordinates import CoordinateMapping
    from monai_cidir.engines import load_registration_model, register_patient
    from monai_cidir.metrics.similarity import lung_ncc

    item = load_case({"name": "real_pair", "fixed_image": str(fixed_path), "moving_image": str(moving_path)})
    fmap = CoordinateMapping.from_image(item["fixed_image"])
    from benchmarks.compare import _engine_options

    options = {
        "max_iterations": args.max_iterations,
        "num_points": args.num_points,
        "regularization_points": BUNDLE_DEFAULTS["regularization_points"],
        **_engine_options(args.option),
    }
    from monai_cidir.engines import alphas as alpha_defaults

    if args.log_floor is not None:  # the module default every prior of this process reads
        alpha_defaults.LOG_FLOOR = float(args.log_floor)
    if args.model is not None:  # rescore a trained model: its own metrics.json gives the chosen alpha and the times
        metrics_path = args.model.parent / "metrics.json"
        if not args.model.is_file() or not metrics_path.is_file():
            raise SystemExit(f"--model: expected a trained model.pt with metrics.json beside it, found {args.model}")
        metrics, wall = json.loads(metrics_path.read_text()), float("nan")
        options = {"model": str(args.model), **{k: metrics.get(k) for k in ("iterations", "num_points")}}
    else:
        work = Path(tempfile.mkdtemp(prefix="cidir_real_pair_"))
        start = time.perf_counter()
        metrics = register_patient(item, work, overwrite=True, **options)
        wall = time.perf_counter() - start
        print(f"trained model kept in {work / 'real_pair' / 'model.pt'} (rescore it with --model; delete the folder when done)", flush=True)
    model = load_registration_model(args.model or work / "real_pair" / "model.pt")
    alpha = float(metrics["alpha"])
    lung = fmap.world_grid(dtype=torch.float64)[item["fixed_mask"][0].as_tensor() > 0]
    cidir_u = model.displacement(lung, alpha)
    transforms = {"before": None, "cIDIR": lambda p: model.transform_points(p.double(), alpha).float()}
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    for a in alphas:
        transforms[f"cIDIR alpha {a:g}"] = lambda p, a=a: model.transform_points(p.double(), a).float()
    row = {
        "alpha": alpha, "wall_s": wall, "dice_cidir": metrics.get("dice"), "options": options,
        "seconds": {k: metrics.get(f"seconds_{k}") for k in ("affine", "training", "selection", "export")},
        "ncc_affine": metrics.get("ncc_affine"), "lung_points": int(len(lung)),
        "log_floor": model.info.get("alpha_prior", {}).get("log_floor", alpha_defaults.LOG_FLOOR),
    }  # fmt: skip
    elastix = None if args.no_elastix else _elastix_reference(item, lung, args)
    if elastix is not None:
        elastix_u = torch.from_numpy(elastix["displacement"])
        d = (cidir_u - elastix_u).norm(dim=1).numpy()
        row.update(seconds_elastix=float(elastix["seconds"]), dice_elastix=float(elastix["dice"]), ncc_elastix=float(elastix["ncc"]),
                   distance_mean=float(d.mean()), distance_p95=float(np.percentile(d, 95)),
                   elastix_motion_mean=float(elastix_u.norm(dim=1).mean()))  # fmt: skip
    row["ncc"] = lung_ncc(item["fixed_image"], item["moving_image"], item["fixed_mask"], transforms)
    if elastix is not None:
        row["ncc"]["elastix default"] = row["ncc_elastix"]
    row["cidir_motion_mean"] = float(cidir_u.norm(dim=1).mean())
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"real_pair_{args.tag}" if args.tag else "real_pair"
    (args.output / f"{stem}.json").write_text(json.dumps(row, indent=1, default=repr))
    path = write_report(row, args, stem)
    print(json.dumps(row, indent=1, default=repr))
    print(f"wrote {path}")
    return 0


def write_report(row: dict, args, stem: str = "real_pair") -> Path:
    import platform

    s = row["seconds"]
    ncc = row["ncc"]
    lines = [
        "# The real lung CT pair without landmarks: cIDIR against elastix",
        "",
        f"`python benchmarks/real_pair.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"{args.threads} threads; cIDIR options {json.dumps(row['options'], default=repr)}, log-uniform floor {row.get('log_floor')}, elastix default maps without a mask.",
        "",
        "| method | lung NCC | lung-mask Dice | time (s) |",
        "|---|---|---|---|",
        f"| before | {ncc['before']:.3f} | - | - |",
        f"| cIDIR affine pre-alignment | {row['ncc_affine']:.3f} | - | {s['affine']:.1f} |",
        f"| cIDIR (alpha {row['alpha']:.2f} by lung Dice) | {ncc['cIDIR']:.3f} | {row['dice_cidir']:.3f} | "
        f"{s['affine'] + s['training'] + s['selection'] + s['export']:.1f} (affine {s['affine']:.1f}, training {s['training']:.1f}, "
        f"selection {s['selection']:.1f}, export {s['export']:.1f}) |",
    ]
    lines += [f"| cIDIR at alpha {k.split()[-1]} | {v:.3f} | - | - |" for k, v in ncc.items() if k.startswith("cIDIR alpha")]
    if "distance_mean" in row:
        lines += [
            f"| elastix default | {ncc['elastix default']:.3f} | {row['dice_elastix']:.3f} | {row['seconds_elastix']:.1f} |",
            "",
            f"Distance between the cIDIR and elastix displacements at the {row['lung_points']} fixed lung voxels: mean "
            f"{row['distance_mean']:.2f} mm, 95th percentile {row['distance_p95']:.2f} mm (mean displacement: cIDIR "
            f"{row['cidir_motion_mean']:.1f} mm, elastix {row['elastix_motion_mean']:.1f} mm).",
        ]
    path = args.output / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
