"""DICOM series reading: the geometry comes from every slice's ImagePositionPatient / ImageOrientationPatient.

Each series is written with pydicom from a known integer volume and RAS affine; the reference is a
NIfTI written by nibabel from the same array and affine and read by MONAI's ITK reader. "Same voxels
at the same world positions" is checked voxel by voxel: every index of the DICOM read is mapped
through its affine to world and through the NIfTI's inverse affine to an index, which must be an
integer, and the two values must be equal.
"""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import LoadImage

from monai_cidir.data import DicomSeriesReader, list_dicom_series, load_pair_datalist, write_dicom_series
from monai_cidir.transforms import LoadRegistrationPaird


def _volume(shape=(12, 10, 7), seed=0) -> np.ndarray:
    """Integer HU with air, lung and tissue, different along every axis (a flip cannot pass)."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1000, 400, size=shape).astype(np.float32)
    vol[0, 0, 0] = -1024.0
    return vol


def _rotation(axis_angle_deg=(20.0, -10.0, 35.0)) -> np.ndarray:
    ax, ay, az = np.radians(axis_angle_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


AFFINES = {
    # a supine axial CT as scanners write it: LPS rows +x, columns +y, slices +z -> RAS diag(-1, -1, 1)
    "axial": np.array([[-0.8, 0, 0, 120.0], [0, -0.8, 0, 95.5], [0, 0, 2.0, -310.0], [0, 0, 0, 1]]),
    # slices stacked against the normal of the row x column plane (left-handed index frame)
    "axial_left_handed": np.array([[0.8, 0, 0, -120.0], [0, -0.8, 0, 95.5], [0, 0, 2.0, -310.0], [0, 0, 0, 1]]),
    "oblique": np.block([[_rotation() @ np.diag([0.7, 0.9, 2.5]), np.array([[10.0], [-20.0], [30.0]])], [np.zeros((1, 3)), np.ones((1, 1))]]),
}


def _nifti(tmp_path, vol, affine) -> torch.Tensor:
    path = tmp_path / "reference.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(path))
    return LoadImage(reader="ITKReader", image_only=True, dtype=np.float32)(str(path))


def _read(path, **kwargs) -> torch.Tensor:
    return LoadImage(image_only=True, dtype=np.float32)(str(path), reader=DicomSeriesReader(**kwargs))


def assert_same_world_voxels(image, reference) -> None:
    """Every voxel of ``image`` lies on a voxel of ``reference`` with the same value (and the grids match)."""
    a, b = np.asarray(image.affine, dtype=np.float64), np.asarray(reference.affine, dtype=np.float64)
    to_ref = np.linalg.inv(b) @ a
    np.testing.assert_allclose(to_ref, np.round(to_ref), atol=2e-3, err_msg="the grids do not coincide in world space")
    shape = image.shape[-3:]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    ref_idx = np.round(idx @ to_ref[:3, :3].T + to_ref[:3, 3]).astype(int)
    assert ((ref_idx >= 0) & (ref_idx < np.array(reference.shape[-3:]))).all(), "voxels outside the reference grid"
    values = np.asarray(image).reshape(shape)[tuple(idx.T)]
    ref_values = np.asarray(reference).reshape(reference.shape[-3:])[tuple(ref_idx.T)]
    np.testing.assert_array_equal(values, ref_values)


@pytest.mark.parametrize("orientation", sorted(AFFINES))
@pytest.mark.parametrize("spacing_between_slices", ["positive", "negative", None])
@pytest.mark.parametrize("file_order", ["ascending", "descending", "shuffled"])
def test_series_matches_nifti_of_same_array_and_affine(tmp_path, orientation, spacing_between_slices, file_order):
    vol, affine = _volume(), AFFINES[orientation]
    write_dicom_series(vol, affine, tmp_path / "ct", spacing_between_slices=spacing_between_slices, file_order=file_order)
    image = _read(tmp_path / "ct")
    assert_same_world_voxels(image, _nifti(tmp_path, vol, affine))
    # the slice axis runs from the first slice's position to the last: the affine is the written one
    # (up to the reversal of k when the slices run against the row x column normal)
    got = np.asarray(image.affine)
    if orientation == "axial_left_handed":
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1, vol.shape[2] - 1
        got = got @ flip
    np.testing.assert_allclose(got, affine, atol=1e-3)


def test_real_orientation_errors_are_caught_by_the_check(tmp_path):
    """The world-position check itself fails on a mirrored slice axis (what ITK 5.4 returns for a
    negative SpacingBetweenSlices): a test that can fail."""
    vol, affine = _volume(), AFFINES["axial"]
    write_dicom_series(vol, affine, tmp_path / "ct", spacing_between_slices="negative")
    image = _read(tmp_path / "ct")
    mirrored = image.clone()
    a = np.asarray(image.affine).copy()
    a[:3, 3] += a[:3, 2] * (vol.shape[2] - 1)
    a[:3, 2] *= -1  # ITK's geometry: the slice axis reversed, the voxels in ascending order
    mirrored.affine = torch.as_tensor(a)
    with pytest.raises(AssertionError):
        assert_same_world_voxels(mirrored, _nifti(tmp_path, vol, affine))


def test_pair_loader_reads_a_negative_spacing_reversed_series_like_the_nifti(tmp_path):
    vol, affine = _volume((16, 14, 9), seed=1), AFFINES["axial"]
    write_dicom_series(vol, affine, tmp_path / "fixed_dicom", spacing_between_slices="negative", file_order="descending")
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(tmp_path / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(tmp_path / "moving.nii.gz"))
    load = LoadRegistrationPaird()
    from_dicom = load({"fixed_image": str(tmp_path / "fixed_dicom"), "moving_image": str(tmp_path / "moving.nii.gz")})
    from_nifti = load({"fixed_image": str(tmp_path / "fixed.nii.gz"), "moving_image": str(tmp_path / "moving.nii.gz")})
    assert from_dicom["fixed_image"].shape == from_nifti["fixed_image"].shape == (1, 16, 14, 9)
    torch.testing.assert_close(from_dicom["fixed_image"].as_tensor(), from_nifti["fixed_image"].as_tensor())
    torch.testing.assert_close(
        torch.as_tensor(from_dicom["fixed_image"].affine, dtype=torch.float64),
        torch.as_tensor(from_nifti["fixed_image"].affine, dtype=torch.float64),
        atol=1e-3,
        rtol=0,
    )
    assert from_dicom["name"] == "fixed_dicom"


def _two_series(folder):
    vol = _volume()
    write_dicom_series(vol, AFFINES["axial"], folder, series_uid="1.2.3.4.1", description="thorax 2mm")
    write_dicom_series(vol[:, :, :5] + 7, AFFINES["axial"], folder / "second", series_uid="1.2.3.4.2", description="thorax mip")
    return vol


def test_folder_with_two_series_stops_listing_each(tmp_path):
    _two_series(tmp_path / "ct")
    with pytest.raises(ValueError) as e:
        _read(tmp_path / "ct")
    msg = str(e.value)
    for said in ("2 image series", "1.2.3.4.1 'thorax 2mm' (7 slices)", "1.2.3.4.2 'thorax mip' (5 slices)", "fixed_series_uid"):
        assert said in msg
    assert [(s.uid, len(s)) for s in list_dicom_series(tmp_path / "ct")] == [("1.2.3.4.1", 7), ("1.2.3.4.2", 5)]


def test_datalist_series_uid_picks_the_series(tmp_path):
    vol = _two_series(tmp_path / "ct")
    nib.save(nib.Nifti1Image(vol.astype(np.int16), AFFINES["axial"]), str(tmp_path / "moving.nii.gz"))
    record = {"name": "p1", "fixed_image": "ct", "moving_image": "moving.nii.gz", "fixed_series_uid": "1.2.3.4.2"}
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [record]}))
    [rec] = load_pair_datalist(tmp_path / "datalist.json")
    item = LoadRegistrationPaird()(rec)
    assert item["fixed_image"].shape == (1, 12, 10, 5)
    np.testing.assert_array_equal(np.asarray(item["fixed_image"][0]), vol[:, :, :5] + 7)
    rec["fixed_series_uid"] = "9.9.9"
    with pytest.raises(ValueError, match=r"(?s)fixed_image: .*no series with SeriesInstanceUID '9.9.9'.*1\.2\.3\.4\.1"):
        LoadRegistrationPaird()(rec)
    record["fixed_series_uid"] = 12
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [record]}))
    with pytest.raises(ValueError, match="'fixed_series_uid' must be a SeriesInstanceUID string"):
        load_pair_datalist(tmp_path / "datalist.json")


def test_one_slice_file_reads_its_series(tmp_path):
    vol = _two_series(tmp_path / "ct")
    image = _read(tmp_path / "ct" / "slice_0003.dcm")
    np.testing.assert_array_equal(np.asarray(image), vol)


def test_missing_slice_is_resampled_to_a_regular_grid_with_a_log_line(tmp_path, caplog):
    vol, affine = _volume(), AFFINES["axial"]
    files = write_dicom_series(vol, affine, tmp_path / "ct")
    files[3].unlink()  # slice k = 3 missing: gaps 2, 2, 4, 2, 2 mm
    with caplog.at_level(logging.WARNING, logger="monai_cidir.data.dicom"):
        image = _read(tmp_path / "ct")
    assert "uneven slice gaps (2 to 4 mm): 6 slices resampled linearly to 7 at 2 mm" in caplog.text
    np.testing.assert_allclose(np.asarray(image.affine), affine, atol=1e-3)
    got = np.asarray(image)
    keep = [0, 1, 2, 4, 5, 6]
    np.testing.assert_array_equal(got[:, :, keep], vol[:, :, keep])
    np.testing.assert_allclose(got[:, :, 3], 0.5 * (vol[:, :, 2] + vol[:, :, 4]), atol=1e-4)


def test_gantry_tilt_is_shifted_onto_a_regular_grid(tmp_path, caplog):
    """Slice k's origin drifts by k pixels along the rows: each slice is moved back in its plane."""
    vol, affine = _volume((14, 10, 5)), AFFINES["axial"]
    write_dicom_series(vol, affine, tmp_path / "ct")
    for f in sorted((tmp_path / "ct").glob("*.dcm")):
        ds = pydicom.dcmread(str(f))
        k = int(ds.InstanceNumber) - 1
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ipp[0] += k * 0.8  # LPS x grows along the rows: one column per slice
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.save_as(str(f))
    with caplog.at_level(logging.WARNING, logger="monai_cidir.data.dicom"):
        image = _read(tmp_path / "ct")
    assert "gantry tilt" in caplog.text
    np.testing.assert_allclose(np.asarray(image.affine), affine, atol=1e-3)
    got = np.asarray(image)
    for k in range(5):  # written voxel (i, k) now sits at column i + k
        np.testing.assert_allclose(got[k:, :, k], vol[: 14 - k, :, k], atol=1e-3)


def test_two_volumes_in_one_series_stop(tmp_path):
    vol = _volume()
    write_dicom_series(vol, AFFINES["axial"], tmp_path / "ct", series_uid="1.2.3")
    write_dicom_series(vol + 1, AFFINES["axial"], tmp_path / "ct" / "phase50", series_uid="1.2.3")
    with pytest.raises(ValueError, match="(?s)7 slice\\(s\\) lie at the position of another.*several volumes"):
        _read(tmp_path / "ct")


def test_rescale_slope_intercept_and_the_itk_decoder_fallback(tmp_path, monkeypatch):
    vol, affine = _volume(), AFFINES["axial"]
    write_dicom_series(vol, affine, tmp_path / "ct")
    for f in (tmp_path / "ct").glob("*.dcm"):  # stored as unsigned HU + 1024, as many scanners write
        ds = pydicom.dcmread(str(f))
        stored = (ds.pixel_array.astype(np.int32) + 1024).astype(np.uint16)
        ds.PixelRepresentation, ds.RescaleIntercept = 0, -1024
        ds.PixelData = stored.tobytes()
        ds.save_as(str(f))
    np.testing.assert_array_equal(np.asarray(_read(tmp_path / "ct")), vol)

    def no_codec(self):
        raise RuntimeError("no pixel data handler for this transfer syntax")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_codec))
    np.testing.assert_array_equal(np.asarray(_read(tmp_path / "ct")), vol)


def test_folder_without_dicom_and_missing_geometry_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="found none among its files"):
        _read(tmp_path / "empty")
    write_dicom_series(_volume(), AFFINES["axial"], tmp_path / "ct")
    f = tmp_path / "ct" / "slice_0002.dcm"
    ds = pydicom.dcmread(str(f))
    del ds.ImagePositionPatient
    ds.save_as(str(f))
    with pytest.raises(ValueError, match="slice_0002.dcm: the slice has no valid ImagePositionPatient"):
        _read(tmp_path / "ct")
