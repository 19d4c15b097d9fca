"""The bundle registers a pair whose fixed scan is a DICOM series exactly as the same pair in NIfTI.

The series is written the way the failing clinical export was: negative SpacingBetweenSlices
(0018,0088), as Philips scanners write it, and files in descending slice order. ITK 5.4 reads such
a series mirrored superior-inferior; the project's reader must give the NIfTI's voxels and affine,
so the whole run (masks, training, selection, TRE) is the same to the last digit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from monai.transforms import LoadImage

from monai_cidir.data import write_dicom_series
from monai_cidir.engines.bundle import make_phantom_cohort

CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "cidir_lung_ct" / "configs"
TINY = {
    "device": "cpu",
    "max_iterations": 40,
    "num_points": 600,
    "num_alphas": 5,
    "affine_prealign": "false",
    "log_every": 20,
}


def _run(tmp_path: Path, name: str, datalist: Path) -> dict:
    out = tmp_path / f"outputs_{name}"
    run("training", config_file=str(CONFIGS / "train.json"), dataset_dir=str(datalist.parent), datalist=str(datalist), output_dir=str(out), **TINY)
    [patient] = [p for p in out.iterdir() if (p / "metrics.json").is_file()]
    return json.loads((patient / "metrics.json").read_text())


def test_dicom_series_fixed_scan_registers_like_the_nifti(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    make_phantom_cohort(data, num_patients=1, shape=(48, 48, 32), spacing=(5.6, 5.6, 8.0), num_landmarks=50)
    nifti_list = data / "datalist.json"
    [record] = json.loads(nifti_list.read_text())["training"]
    fixed = LoadImage(reader="ITKReader", image_only=True)(str(data / record["fixed_image"]))
    write_dicom_series(np.asarray(fixed), np.asarray(fixed.affine), data / "fixed_dicom", spacing_between_slices="negative", file_order="descending")
    dicom_record = {**record, "fixed_image": "fixed_dicom"}
    dicom_list = data / "datalist_dicom.json"
    dicom_list.write_text(json.dumps({"training": [dicom_record]}))

    from_nifti = _run(tmp_path, "nifti", nifti_list)
    from_dicom = _run(tmp_path, "dicom", dicom_list)
    assert from_dicom["status"] == from_nifti["status"] == "ok"
    assert from_nifti["tre_after_mean"] < 0.5 * from_nifti["tre_before_mean"]  # it registered at all
    # DICOM stores positions as decimal strings (IPP to 1e-4 mm here), so the affines agree to 1e-4 mm and
    # the runs to about 1e-5 (measured: TRE 0.738367 / 0.738360 mm); a mirrored slice axis gives Dice ~0.1
    for key in ("tre_before_mean", "dice_before", "fixed_lung_ml"):
        assert from_dicom[key] == pytest.approx(from_nifti[key], abs=1e-6), key
    for key in ("tre_after_mean", "dice", "folding", "ncc_after"):
        assert from_dicom[key] == pytest.approx(from_nifti[key], abs=2e-4), key
    assert from_dicom["alpha"] == pytest.approx(from_nifti["alpha"], abs=1e-9)
    # the exported field lies on the fixed grid read from the series: the NIfTI's
    import nibabel as nib

    a = nib.load(str(tmp_path / "outputs_dicom" / record["name"] / "displacement.nii.gz")).affine
    b = nib.load(str(tmp_path / "outputs_nifti" / record["name"] / "displacement.nii.gz")).affine
    np.testing.assert_allclose(a, b, atol=1e-4)
    torch.testing.assert_close(
        torch.as_tensor(np.asarray(nib.load(str(tmp_path / "outputs_dicom" / record["name"] / "displacement.nii.gz")).dataobj)),
        torch.as_tensor(np.asarray(nib.load(str(tmp_path / "outputs_nifti" / record["name"] / "displacement.nii.gz")).dataobj)),
        atol=1e-3,
        rtol=0,
    )
