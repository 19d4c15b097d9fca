"""Lung masks of the threshold backend on real scans: plausibility, crops, gas, padding, and overlays to look at.

For every real CT in ``../shared/data`` (the chest CT, the abdominal CT with bowel gas, both scans
of the real lung pair) this computes ``LungMask(backend="threshold")``, its plausibility report
(:func:`monai_cidir.transforms.lung_mask_report`) and the time, and writes an overlay PNG. On the
chest CT it also checks, without external ground truth:

* every crop that cuts the lungs (from each side a quarter and a half into the lungs' box, one
  corner): Dice of the crop's mask against the crop of the whole scan's mask;
* zoomed reconstructions: a circle of padding (-2048 and -3024 HU) cutting body and lungs;
* the lowest slices (lung bases beside stomach and bowel gas): gas voxels taken as lung.

With ``--register`` it also runs the bundle's main job (``train.json`` defaults) on two pairs
given **without masks**, so the threshold masks and the checks run as a user meets them:

* ``real_pair``: the real lung pair (baseline -> follow-up; one lung in view, cut by the border);
  its landmarks are held back, so the table reports the landmark-free checks;
* ``chest_crop``: the chest CT cropped through both lungs (left, right and posterior sides cut),
  with a smooth synthetic breathing motion (``make_breathing_pair``, 10 mm, exact landmarks).

Run from the repository root (about 30 s on 2 cores; about 4 min more with ``--register``)::

    python benchmarks/lung_masks.py                      # writes benchmarks/results/lung_masks*.{md,png}
    python benchmarks/lung_masks.py --register           # + the two bundle runs (under benchmarks/results/runs/)
    python benchmarks/lung_masks.py --shared /path/to/shared --output /tmp/masks
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SCANS = {
    "chest_ct": "chest_ct.nii.gz",
    "abdomen_ct": "abdomen_ct_3mm.nii.gz",
    "real_pair_baseline": "real_lung_pair/baseline.mha",
    "real_pair_followup": "real_lung_pair/followup.mha",
}


def _metatensor(array: np.ndarray, affine: np.ndarray):
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)[None]), affine=torch.as_tensor(affine))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def crop(hu: np.ndarray, affine: np.ndarray, sl: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``(hu[sl], the affine of the crop)`` by MONAI's ``SpatialCrop`` (which updates the affine)."""
    from monai.transforms import SpatialCrop

    out = SpatialCrop(roi_slices=list(sl))(_metatensor(hu, affine))
    return np.ascontiguousarray(out[0].numpy()), out.affine.numpy()


def lung_cuts(mask: np.ndarray) -> dict[str, tuple]:
    """Crops that cut the lungs: from each side of every array axis a quarter and a half into the lungs' box, one corner."""
    idx = np.nonzero(mask)
    lo, hi = [int(i.min()) for i in idx], [int(i.max()) for i in idx]
    cuts = {}
    for axis in range(3):
        for frac in (0.25, 0.5):
            width = frac * (hi[axis] - lo[axis])
            for side, part in (("low", slice(int(lo[axis] + width), None)), ("high", slice(None, int(hi[axis] - width) + 1))):
                sl = [slice(None)] * 3
                sl[axis] = part
                cuts[f"axis {axis} {side} side, {int(100 * frac)}%"] = tuple(sl)
    cuts["corner (axes 0 and 1)"] = (slice(int(lo[0] + 0.3 * (hi[0] - lo[0])), None), slice(None, int(hi[1] - 0.3 * (hi[1] - lo[1])) + 1), slice(None))
    return cuts


def scan_rows(shared: Path, out: Path) -> tuple[list[str], dict]:
    """One row per real scan (mask report, seconds) and its overlay PNG."""
    from monai.transforms import LoadImage

    from monai_cidir.engines.export import plot_lung_masks
    from monai_cidir.transforms import LungMask, lung_mask_report

    rows, loaded = [], {}
    for case, rel in SCANS.items():
        path = shared / "data" / rel
        if not path.is_file():
            print(f"skipped {case}: {path} not found", file=sys.stderr)
            continue
        image = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
        start = time.perf_counter()
        mask = LungMask(backend="threshold")(image)
        seconds = time.perf_counter() - start
        r = lung_mask_report(mask, image)
        loaded[case] = (image, mask)
        png = out / f"lung_masks_{case}.png"
        plot_lung_masks([(case, image, mask)], png, title=f"{rel}: {r.volume_ml:.0f} mL, {'plausible' if r.plausible else 'IMPLAUSIBLE'}", slices=4)
        sides = "".join(r.border_sides) or "-"
        verdict = "yes" if r.plausible else "no: " + "; ".join(p.split(":")[0] for p in r.problems)
        rows.append(
            f"| {case} | {tuple(image.shape[1:])} | {seconds:.2f} | {r.volume_ml:.0f} | {len(r.components_ml)} | {100 * r.border_fraction:.0f}% ({sides}) "
            f"| {r.median_hu:.0f} / {r.air_hu:.0f} | {verdict} | `{png.name}` |"
        )
        print(rows[-1], flush=True)
    return rows, loaded


def chest_checks(image, mask, out: Path) -> list[str]:
    """Crops, zoomed padding and the lung bases beside gas, on the chest CT."""
    from scipy import ndimage

    from monai_cidir.engines.export import plot_lung_masks
    from monai_cidir.transforms import lung_mask_report
    from monai_cidir.transforms.lung_threshold import threshold_lung_mask

    hu, affine, full = image[0].numpy(), image.affine.numpy(), mask[0].numpy() > 0
    lines, shown = [], []
    for name, sl in lung_cuts(full).items():
        sub, aff = crop(hu, affine, sl)
        start = time.perf_counter()
        m = threshold_lung_mask(sub, aff)
        png = ""
        if name in ("axis 0 low side, 50%", "axis 1 high side, 50%", "corner (axes 0 and 1)"):
            png = f"`lung_masks_chest_crop{len(shown)}.png`"
            shown.append((name, _metatensor(sub, aff), _metatensor(m, aff)))
        lines.append(f"| crop: {name} | {sub.shape} | {time.perf_counter() - start:.2f} | {_dice(m, full[sl]):.4f} | {png} |")
    x, y = np.meshgrid(np.arange(hu.shape[0]), np.arange(hu.shape[1]), indexing="ij")
    circle = (x - hu.shape[0] / 2) ** 2 + (y - hu.shape[1] / 2) ** 2 > (0.3 * hu.shape[0]) ** 2
    circle = np.repeat(circle[..., None], hu.shape[2], axis=2)
    for pad in (-2048.0, -3024.0):
        m = threshold_lung_mask(np.where(circle, pad, hu).astype(np.float32), affine)
        cut = (full & circle).sum() / full.sum()
        lines.append(
            f"| zoomed: padding {pad:.0f} HU outside a circle ({100 * cut:.0f}% of the lungs outside) | {hu.shape} | | "
            f"{_dice(m, full & ~circle):.4f} | padding in mask: {int((m & circle).sum())} voxels{'; `lung_masks_chest_crop3.png`' if pad == -2048.0 else ''} |"
        )
        if pad == -2048.0:
            shown.append(("zoomed, -2048 padding", _metatensor(np.where(circle, pad, hu), affine), _metatensor(m, affine)))
    near_lung = ndimage.binary_dilation(full, iterations=3)
    for top in (8, 10, 14):
        sub, aff = crop(hu, affine, (slice(None), slice(None), slice(0, top)))
        gas = (sub < -600) & ~near_lung[..., :top]
        labels, _ = ndimage.label(gas)
        border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))
        gas &= ~np.isin(labels, border)
        m = threshold_lung_mask(sub, aff)
        r = lung_mask_report(_metatensor(m, aff), _metatensor(sub, aff))
        lines.append(
            f"| lowest {top} slices: lung bases and gas | {sub.shape} | | {_dice(m, full[..., :top]):.4f} | gas in mask: {int((m & gas).sum())} "
            f"of {int(gas.sum())} voxels; {r.volume_ml:.0f} mL, {'plausible' if r.plausible else 'flagged implausible'} |"
        )
    for k, (name, img, m) in enumerate(shown):
        plot_lung_masks([(name, img, m)], out / f"lung_masks_chest_crop{k}.png", title=f"chest CT, {name}", slices=3)
    return lines


def registration_rows(shared: Path, work: Path) -> list[str]:
    """The bundle's main job on the two mask-less pairs; one table row each from its metrics.json."""
    import json
    import os
    import subprocess

    from monai.data import MetaTensor
    from monai.transforms import LoadImage, SpatialCrop

    from monai_cidir.data.phantom import make_breathing_pair

    work.mkdir(parents=True, exist_ok=True)
    pair = shared / "data" / "real_lung_pair"
    lists = {"real_pair": work / "real_pair.json"}
    lists["real_pair"].write_text(json.dumps({"training": [{"name": "real_pair", "fixed_image": str(pair / "baseline.mha"), "moving_image": str(pair / "followup.mha")}]}))
    chest = LoadImage(image_only=True, ensure_channel_first=True)(str(shared / "data" / "chest_ct.nii.gz"))
    cropped = SpatialCrop(roi_slices=[slice(60, 200), slice(0, 180), slice(None)])(chest)  # cuts both lungs
    cropped = MetaTensor(cropped.as_tensor().clone(), affine=cropped.affine.clone())
    datalist = make_breathing_pair(cropped, seed=0, amplitude_mm=10.0, output_dir=work / "chest_crop", name="chest_crop", overwrite=True)["datalist"]
    records = json.loads(Path(datalist).read_text())["training"]
    for r in records:  # no masks: the bundle computes them
        r.pop("fixed_mask", None), r.pop("moving_mask", None)
    lists["chest_crop"] = work / "chest_crop" / "datalist_without_masks.json"
    lists["chest_crop"].write_text(json.dumps({"training": records}))
    rows = []
    config = REPO / "bundles" / "cidir_lung_ct" / "configs" / "train.json"
    for name, path in lists.items():
        out = work / f"outputs_{name}"
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(config), "--datalist", str(path), "--output_dir", str(out), "--overwrite", "true"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
        seconds = time.perf_counter() - start
        m = json.loads((out / name / "metrics.json").read_text()) if (out / name / "metrics.json").is_file() else {}
        tre = f"{m['tre_before_mean']:.2f} -> {m['tre_after_mean']:.2f}" if "tre_after_mean" in m else "held back"
        rows.append(
            f"| {name} | {proc.returncode} | {m.get('status', 'n/a')} | {m.get('fixed_lung_ml', float('nan')):.0f} / {m.get('moving_lung_ml', float('nan')):.0f} "
            f"| {m.get('ncc_before', float('nan')):.3f} / {m.get('ncc_affine', float('nan')):.3f} / {m.get('ncc_after', float('nan')):.3f} "
            f"| {m.get('dice_before', float('nan')):.3f} / {m.get('dice_affine', float('nan')):.3f} / {m.get('dice', float('nan')):.3f} "
            f"| {tre} | {m.get('seconds_training', float('nan')):.0f} / {m.get('seconds_selection', float('nan')):.0f} / {m.get('seconds_export', float('nan')):.0f} | {seconds:.0f} |"
        )
        print(rows[-1], flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/lung_masks.py", description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the shared folder (holds data/)")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--register", action="store_true", help="also run the bundle on the two mask-less pairs")
    p.add_argument("--work", type=Path, default=None, help="where --register writes data and outputs (default OUTPUT/runs/lung_masks)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not (args.shared / "data").is_dir():
        print(f"no shared data at {args.shared / 'data'}: nothing to measure", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    lines = [
        f"`python benchmarks/lung_masks.py` (threshold backend, {args.threads} threads)",
        "",
        "| scan | shape | seconds | volume (mL) | components | surface on the border (sides) | median / air HU | plausible | overlay |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows, loaded = scan_rows(args.shared, args.output)
    lines += rows
    if "chest_ct" in loaded:
        lines += ["", "Chest CT, no external ground truth: each mask against the whole scan's mask (cropped alike).", ""]
        lines += ["| case | shape | seconds | Dice | notes |", "| --- | --- | --- | --- | --- |"]
        lines += chest_checks(*loaded["chest_ct"], args.output)
    if args.register:
        lines += [
            "",
            "The bundle's main job (`train.json` defaults) on pairs given without masks:",
            "",
            "| pair | exit | status | lung mL fixed / moving | NCC before / affine / after | Dice before / affine / after | TRE (mm) | training / selection / export (s) | wall (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += registration_rows(args.shared, (args.work or args.output / "runs" / "lung_masks").resolve())
    text = "\n".join(lines) + "\n"
    print(text)
    (args.output / "lung_masks.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
