"""A full-size chest CT pair (512 x 512 x N) through the bundle as users run it: wall, peak memory, every stage.

The case: the shared chest CT (``../shared/data/chest_ct.nii.gz``, 256 x 256 x 64 at 1.68 x 1.68 x 5 mm)
is moved by :func:`monai_cidir.data.make_realistic_pair` (sliding breathing motion of 15 mm, a rigid
offset of 1 deg and 10 + 5 mm, 300 exact landmark pairs) on its own grid; both scans are then resampled
(trilinear) to what a scanner exports: 512 x 512 x N voxels of 0.977 x 0.977 x (315 / (N - 1)) mm
(N = 141: 2.25 mm slices; the 500 mm field of view of a 512 matrix), air (-1024 HU) where the source
has no data, -2048 HU outside the 250 mm reconstruction circle, a patient table (a dense 6 mm shell
over foam) under the back, int16 NIfTI. The datalist gives the images and landmarks, no masks, so the
run computes both lung masks as a user's run would.

The script then runs ``python -m monai.bundle run training`` with the bundle's defaults on that
datalist, measures its wall time and peak resident memory (``getrusage`` of the child), and reads
each stage's seconds from the run's log (the ``monai_cidir.engines`` timing lines) and
``metrics.json``: cohort pre-check, reading, lung masks (compute + check + report + overlay),
affine, training, alpha selection, export, and what remains (start-up, config, writing).

Run from the repository root; one command per case::

    python benchmarks/full_size.py                   # 512 x 512 x 141: benchmarks/results/full_size/full_size_141.{md,json}
    python benchmarks/full_size.py --slices 400      # the memory case
    python benchmarks/full_size.py --skip-run        # only build (or reuse) the pair
    python benchmarks/full_size.py --tag before      # results named full_size_141_before.*

The pair is written once under ``--data`` (default ``/tmp/cidir_full_size``) and reused. Without
the shared chest CT it says so and exits with status 0 (nothing measured).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bundles" / "cidir_lung_ct" / "configs" / "train.json"
MATRIX = 512
PIXEL_MM = 500.0 / MATRIX  # a 500 mm reconstruction field of view
PADDING_HU = -2048
AIR_HU = -1024

#: the log lines that time a stage (monai_cidir.engines), and the stage each gives
STAGE_LINES = {
    "pre-check": r"cohort pre-check: .* in ([\d.]+) s",
    "reading": r": loaded in ([\d.]+) s",
}
#: metrics.json entries that time a stage
STAGE_METRICS = {
    "lung masks": "seconds_masks",
    "affine": "seconds_affine",
    "selection": "seconds_selection",
    "export": "seconds_export",
}


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.compare import DEFAULT_SHARED

    p = argparse.ArgumentParser(prog="python benchmarks/full_size.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chest-ct", type=Path, default=DEFAULT_SHARED / "data" / "chest_ct.nii.gz")
    p.add_argument("--slices", type=int, default=141, help="N of 512 x 512 x N (141: 2.25 mm slices; 400 for the memory case)")
    p.add_argument("--data", type=Path, default=Path("/tmp/cidir_full_size"), help="where the pairs are written (reused)")
    p.add_argument("--output", type=Path, default=None, help="the bundle's output_dir (default DATA/out_<N>)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "full_size")
    p.add_argument("--tag", default="", help="variant name appended to the result files")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-run", action="store_true", help="only build (or reuse) the pair")
    p.add_argument(
        "--dicom", action="store_true",
        help="give the fixed scan as a DICOM series written as Philips exports it (SpacingBetweenSlices negative, files in descending order)",
    )
    p.add_argument("--train-arg", action="append", default=[], help="extra command-line words of the bundle run (repeatable)")
    return p


# ---------------------------------------------------------------------------- the pair
def _target_affine(source_affine: np.ndarray, source_shape, slices: int) -> np.ndarray:
    """The 512 x 512 x N grid's affine: the source's directions and centre, 0.977 mm pixels, its z extent in N slices."""
    direction = source_affine[:3, :3] / np.linalg.norm(source_affine[:3, :3], axis=0)
    z_extent = (source_shape[2] - 1) * np.linalg.norm(source_affine[:3, 2])
    spacing = np.array([PIXEL_MM, PIXEL_MM, z_extent / (slices - 1)])
    centre = source_affine[:3, :3] @ ((np.asarray(source_shape, dtype=float) - 1) / 2) + source_affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = direction * spacing
    out[:3, 3] = centre - out[:3, :3] @ ((np.array([MATRIX, MATRIX, slices], dtype=float) - 1) / 2)
    return out


def _resample(volume: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray, slices: int) -> np.ndarray:
    """Trilinear resampling onto the target grid (axis-aligned grids: one diagonal index map), air outside."""
    from scipy import ndimage

    index_map = np.linalg.inv(source_affine) @ target_affine
    if not np.allclose(index_map[:3, :3], np.diag(np.diag(index_map[:3, :3])), atol=1e-9):
        raise ValueError("full_size: the source and target grids must share their axes")
    return ndimage.affine_transform(
        volume.astype(np.float32), np.diag(index_map[:3, :3]), offset=index_map[:3, 3], output_shape=(MATRIX, MATRIX, slices),
        order=1, mode="constant", cval=float(AIR_HU),
    )  # fmt: skip


def _scanner_background(volume: np.ndarray, affine: np.ndarray, table_y: float) -> np.ndarray:
    """Padding outside the reconstruction circle, and a patient table (world y below ``table_y``) inside it."""
    n = volume.shape[0]
    ij = np.arange(n, dtype=np.float64)
    i, j = np.meshgrid(ij, ij, indexing="ij")
    xy = affine[:2, :2] @ np.stack([i.ravel(), j.ravel()]) + affine[:2, 3:4]
    centre = affine[:2, :2] @ np.full(2, (n - 1) / 2) + affine[:2, 3]
    radius = np.hypot(*(xy - centre[:, None])).reshape(n, n)
    y = xy[1].reshape(n, n)
    x = np.abs(xy[0] - centre[0]).reshape(n, n)
    # a curved carbon shell (6 mm, +200 HU) over foam (-800 HU), 450 mm wide, 40 mm deep
    sag = 0.0006 * x**2  # the shell curves up at the sides
    depth = table_y - y + sag
    shell = (x < 225) & (((depth >= 0) & (depth < 6)) | ((depth >= 34) & (depth < 40)))
    foam = (x < 225) & (depth >= 6) & (depth < 34)
    volume[foam] = -800.0
    volume[shell] = 200.0
    volume[radius > 250.0] = PADDING_HU
    return volume


def _write_nifti(volume: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(np.round(volume).astype(np.int16), affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def make_case(chest_ct: Path, data: Path, slices: int) -> Path:
    """Write the 512 x 512 x ``slices`` pair (images, landmark CSVs) and its datalist into ``data``; the datalist path."""
    from monai.transforms import LoadImage

    from monai_cidir.data import make_realistic_pair, save_landmarks, write_pair_datalist

    name = f"full_512x512x{slices}"
    start = time.perf_counter()
    ct = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(chest_ct))
    pair = make_realistic_pair(ct, seed=3, amplitude_mm=15.0, translation_mm=(0.0, 10.0, 5.0), rotation_deg=(1.0, 0.0, 0.5), noise_hu=15.0)
    body = ct[0].numpy() > -500
    ys = (np.asarray(ct.affine)[:3, :3] @ np.argwhere(body).T + np.asarray(ct.affine)[:3, 3:4])[1]
    table_y = float(ys.min()) - 4.0  # 4 mm under the back
    records = {"name": name}
    for key, side in (("fixed_image", "inhale"), ("moving_image", "exhale")):
        image = pair[key]
        src_affine = np.asarray(image.affine, dtype=np.float64)
        target = _target_affine(src_affine, image.shape[1:], slices)
        volume = _resample(image[0].numpy(), src_affine, target, slices)
        # the moving scan's table sits where the moving field of view puts it (the patient moved, the table did not)
        shift = float(target[1, 3] - _target_affine(np.asarray(pair["fixed_image"].affine, dtype=np.float64), image.shape[1:], slices)[1, 3])
        volume = _scanner_background(volume, target, table_y + shift)
        path = data / f"{name}_{side}.nii.gz"
        _write_nifti(volume, target, path)
        records[key] = str(path)
    for key, side in (("fixed_landmarks", "inhale"), ("moving_landmarks", "exhale")):
        records[key] = str(save_landmarks(data / f"{name}_{side}_landmarks.csv", pair[key]))
    datalist = write_pair_datalist(data / f"datalist_{slices}.json", [records])
    print(f"wrote {name} to {data} in {time.perf_counter() - start:.0f} s", flush=True)
    return datalist


# ---------------------------------------------------------------------------- the run
def run_bundle(datalist: Path, output: Path, threads: int, extra: list[str]) -> dict:
    """Run the bundle's training workflow on ``datalist``; wall (s), peak RSS (GiB), log text, exit status."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIG), "--datalist", str(datalist),
           "--output_dir", str(output), "--overwrite", "true", *extra]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("running:", " ".join(cmd), flush=True)
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "bundle.log"
    print(f"log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child: the bundle run
    log = log_path.read_text()
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-4000:]}")
    return {"wall_s": wall, "peak_rss_gib": peak_kib / 2**20, "exit": proc.returncode, "log": log}


def stage_seconds(log: str, metrics: dict) -> dict:
    """Seconds per stage from the log's timing lines and ``metrics.json``."""
    out = {}
    for stage, pattern in STAGE_LINES.items():
        found = [float(v) for v in re.findall(pattern, log)]
        if found:
            out[stage] = sum(found)
    for stage, key in STAGE_METRICS.items():
        if metrics.get(key) is not None:
            out[stage] = float(metrics[key])
    if metrics.get("seconds_training") is not None:  # it includes the affine fit
        out["training"] = float(metrics["seconds_training"]) - out.get("affine", 0.0)
    return out


STAGE_ORDER = ("pre-check", "reading", "lung masks", "affine", "training", "selection", "export")


def markdown(result: dict) -> str:
    stages = result["stages"]
    rest = result["wall_s"] - sum(stages.get(s, 0.0) for s in STAGE_ORDER)
    head = "| " + " | ".join(("shape", *STAGE_ORDER, "rest", "wall (s)", "peak memory (GiB)", "status", "TRE (mm)", "lung Dice", "export error max (mm)")) + " |"
    cells = [result["shape"], *(f"{stages[s]:.1f}" if s in stages else "n/a" for s in STAGE_ORDER), f"{rest:.1f}", f"{result['wall_s']:.0f}",
             f"{result['peak_rss_gib']:.2f}", result.get("status", "?"), f"{result.get('tre_before', float('nan')):.2f} -> {result.get('tre_after', float('nan')):.2f}",
             f"{result.get('dice', float('nan')):.4f}", f"{result.get('export_interpolation_max_mm', float('nan')):.3f}"]  # fmt: skip
    return "\n".join([head, "|" + "---|" * (len(cells)), "| " + " | ".join(cells) + " |"])


def dicom_variant(datalist: Path) -> Path:
    """The same pair with its fixed scan as a DICOM series (negative SpacingBetweenSlices, descending files): reused."""
    from monai.transforms import LoadImage

    from monai_cidir.data import write_dicom_series

    out = datalist.with_name(datalist.stem + "_dicom.json")
    if out.is_file():
        return out
    record = dict(json.loads(datalist.read_text())["training"][0])
    fixed = LoadImage(reader="ITKReader", image_only=True)(str(datalist.parent / record["fixed_image"]))
    folder = datalist.parent / (Path(record["fixed_image"]).name.split(".")[0] + "_dicom")
    write_dicom_series(np.asarray(fixed), np.asarray(fixed.affine), folder, spacing_between_slices="negative", file_order="descending")
    record.update(fixed_image=folder.name, name=record["name"] + "_dicom")
    out.write_text(json.dumps({"training": [record]}, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.chest_ct.is_file():
        print(f"skipped: the shared chest CT is not at {args.chest_ct} (give --chest-ct)")
        return 0
    args.data.mkdir(parents=True, exist_ok=True)
    datalist = args.data / f"datalist_{args.slices}.json"
    if not datalist.is_file():
        datalist = make_case(args.chest_ct, args.data, args.slices)
    if args.dicom:
        datalist = dicom_variant(datalist)
    if args.skip_run:
        return 0
    output = args.output or args.data / f"out_{args.slices}{'_dicom' if args.dicom else ''}"
    run = run_bundle(datalist, output, args.threads, args.train_arg)
    name = json.loads(datalist.read_text())["training"][0]["name"]
    metrics_path = output / name / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    result = {
        "shape": f"512 x 512 x {args.slices}",
        "command": f"python benchmarks/full_size.py --slices {args.slices}{' --dicom' if args.dicom else ''}",
        "threads": args.threads,
        "wall_s": run["wall_s"],
        "peak_rss_gib": run["peak_rss_gib"],
        "exit": run["exit"],
        "stages": stage_seconds(run["log"], metrics),
        "status": metrics.get("status", "no metrics.json"),
        "tre_before": metrics.get("tre_before_mean"),
        "tre_after": metrics.get("tre_after_mean"),
        "dice": metrics.get("dice"),
        "ncc_after": metrics.get("ncc_after"),
        "lung_ml": [metrics.get("fixed_lung_ml"), metrics.get("moving_lung_ml")],
        "export_interpolation_max_mm": metrics.get("export_interpolation_max_mm"),
        "load_1min": os.getloadavg()[0],
    }
    table = markdown(result)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"full_size_{args.slices}" + ("_dicom" if args.dicom else "") + (f"_{args.tag}" if args.tag else "")
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(f"`{result['command']}`, {args.threads} threads, load average {result['load_1min']:.1f} at the end\n\n{table}\n")
    print(f"wrote {args.results / stem}.md/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
