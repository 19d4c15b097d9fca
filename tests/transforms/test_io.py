"""LoadRegistrationPaird: NIfTI / MHA / NRRD / DICOM series with different geometries, masks, landmarks.

Ground truth comes from SimpleITK, independent of MONAI: an image is written with a known spacing,
origin and (oblique) direction; a landmark at a known voxel must come out at the world point ITK
assigns to that voxel (LPS -> RAS), and the loaded image sampled there must give the voxel's value.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_cidir.coordinates import CoordinateMapping, lps_to_ras, ras_to_lps
from monai_cidir.data import save_landmarks
from monai_cidir.transforms import LoadRegistrationPaird

sitk = pytest.importorskip("SimpleITK")


def _rot(axis: int, deg: float) -> np.ndarray:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


FIXED_GEOM = dict(size=(12, 10, 8), spacing=(0.9, 1.1, 2.0), origin=(-50.0, 30.0, -20.0), direction=_rot(2, 15.0))
MOVING_GEOM = dict(size=(9, 11, 7), spacing=(1.3, 1.0, 2.5), origin=(10.0, -5.0, 40.0), direction=_rot(0, -10.0))
VOXELS = np.array([[0, 0, 0], [3, 7, 5], [11, 9, 7], [6, 2, 1]])  # 0-based, inside both grids below
MOVING_VOXELS = np.array([[0, 0, 0], [8, 10, 6], [4, 5, 3]])


def _linear_hu(size):
    """HU f(i, j, k) = i + 2j + 3k - 1000 on an (X, Y, Z) grid: trilinear sampling reproduces it exactly."""
    i, j, k = (np.arange(n).reshape([-1 if a == b else 1 for b in range(3)]) for a, n in enumerate(size))
    return (i + 2 * j + 3 * k - 1000).astype(np.int16)


def _sitk_image(values_xyz: np.ndarray, geom: dict):
    img = sitk.GetImageFromArray(np.ascontiguousarray(values_xyz.transpose(2, 1, 0)))  # sitk arrays are (z, y, x)
    img.SetSpacing([float(s) for s in geom["spacing"]])
    img.SetOrigin([float(o) for o in geom["origin"]])
    img.SetDirection(np.asarray(geom["direction"], dtype=float).flatten().tolist())
    return img


def _write_dicom_series(img, folder: Path) -> Path:
    folder.mkdir(parents=True)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    tags = {
        "0008|0060": "CT",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1.2468",
        "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1357",
        "0020|0037": "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])),
        "0018|0050": str(img.GetSpacing()[2]),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        s.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def _write(img, path: Path) -> Path:
    if path.suffix == "" and path.name.startswith("dicom"):
        return _write_dicom_series(img, path)
    sitk.WriteImage(img, str(path))
    return path


def _itk_world_ras(img, voxels) -> torch.Tensor:
    """ITK's physical point (LPS) of each voxel, converted to RAS: the independent ground truth."""
    lps = [img.TransformContinuousIndexToPhysicalPoint([float(v) for v in row]) for row in voxels]
    return lps_to_ras(torch.tensor(lps, dtype=torch.float64))


@pytest.mark.parametrize("fixed_name", ["fixed.nii.gz", "fixed.mha", "fixed.nrrd", "dicom_fixed"])
def test_formats_geometry_and_landmarks(tmp_path, fixed_name):
    fixed_hu, moving_hu = _linear_hu(FIXED_GEOM["size"]), _linear_hu(MOVING_GEOM["size"]) + 100
    fixed_img, moving_img = _sitk_image(fixed_hu, FIXED_GEOM), _sitk_image(moving_hu, MOVING_GEOM)
    fixed_path = _write(fixed_img, tmp_path / fixed_name)
    moving_path = _write(moving_img, tmp_path / "moving.mha")
    truth_f, truth_m = _itk_world_ras(fixed_img, VOXELS), _itk_world_ras(moving_img, MOVING_VOXELS)

    # fixed landmarks as DIR-LAB voxels (1-based), moving landmarks as CSV world LPS mm
    dirlab_txt = tmp_path / "fixed_xyz.txt"
    dirlab_txt.write_bytes("".join("\t".join(str(v + 1) for v in r) + "\r\n" for r in VOXELS).encode())
    csv_path = save_landmarks(tmp_path / "moving.csv", truth_m)
    record = {
        "fixed_image": str(fixed_path),
        "moving_image": str(moving_path),
        "fixed_landmarks": str(dirlab_txt),
        "moving_landmarks": str(csv_path),
    }
    item = LoadRegistrationPaird()(record)

    for key, img, hu in (("fixed_image", fixed_img, fixed_hu), ("moving_image", moving_img, moving_hu)):
        t = item[key]
        assert t.shape == (1, *hu.shape) and t.dtype == torch.float32
        np.testing.assert_array_equal(t[0].numpy(), hu)  # values and (x, y, z) axis order
    torch.testing.assert_close(item["fixed_landmarks"], truth_f, rtol=0, atol=1e-4)
    torch.testing.assert_close(item["moving_landmarks"], truth_m, rtol=0, atol=1e-4)
    assert item["fixed_landmarks"].dtype == torch.float64

    # sampling each image at its landmarks' world positions gives the voxel values
    for key, lm, vox, hu in (
        ("fixed_image", "fixed_landmarks", VOXELS, fixed_hu),
        ("moving_image", "moving_landmarks", MOVING_VOXELS, moving_hu),
    ):
        values = CoordinateMapping.from_image(item[key]).sample(item[key], item[lm])[0]
        expected = torch.tensor(hu[tuple(vox.T)], dtype=torch.float64)
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-3)
    assert item["name"] == ("fixed" if not fixed_name.startswith("dicom") else "dicom_fixed")


def test_elastix_index_refers_to_the_matching_image(tmp_path):
    """Fixed landmarks are mapped with the fixed image, moving landmarks with the moving image."""
    fixed_img = _sitk_image(_linear_hu(FIXED_GEOM["size"]), FIXED_GEOM)
    moving_img = _sitk_image(_linear_hu(MOVING_GEOM["size"]), MOVING_GEOM)
    _write(fixed_img, tmp_path / "f.nii.gz")
    _write(moving_img, tmp_path / "m.nii.gz")
    for name, vox in (("f_idx.txt", VOXELS), ("m_idx.txt", MOVING_VOXELS)):
        (tmp_path / name).write_text(f"index\n{len(vox)}\n" + "".join(" ".join(map(str, r)) + "\n" for r in vox))
    item = LoadRegistrationPaird()(
        {
            "fixed_image": str(tmp_path / "f.nii.gz"),
            "moving_image": str(tmp_path / "m.nii.gz"),
            "fixed_landmarks": str(tmp_path / "f_idx.txt"),
            "moving_landmarks": str(tmp_path / "m_idx.txt"),
            "name": "pair7",
        }
    )
    torch.testing.assert_close(item["fixed_landmarks"], _itk_world_ras(fixed_img, VOXELS), rtol=0, atol=1e-4)
    torch.testing.assert_close(item["moving_landmarks"], _itk_world_ras(moving_img, MOVING_VOXELS), rtol=0, atol=1e-4)
    assert item["name"] == "pair7"


def test_masks_binarised_and_resampled_onto_the_image_grid(tmp_path):
    fixed_img = _sitk_image(_linear_hu(FIXED_GEOM["size"]), FIXED_GEOM)
    _write(fixed_img, tmp_path / "f.nii.gz")
    _write(fixed_img, tmp_path / "m.nii.gz")
    labels = np.zeros(FIXED_GEOM["size"], np.uint8)
    labels[2:6, 3:8, 1:5] = 1  # "right lung"
    labels[7:11, 3:8, 1:5] = 2  # "left lung"
    _write(_sitk_image(labels, FIXED_GEOM), tmp_path / "f_mask.nii.gz")
    # the moving mask is stored on a 2x coarser grid covering the same space (a different grid)
    coarse = dict(FIXED_GEOM, size=(6, 5, 4), spacing=tuple(2 * s for s in FIXED_GEOM["spacing"]))
    offset = FIXED_GEOM["direction"] @ (0.5 * np.asarray(FIXED_GEOM["spacing"]))  # centre of a 2x2x2 block
    coarse["origin"] = tuple(np.asarray(FIXED_GEOM["origin"]) + offset)
    coarse_labels = np.zeros(coarse["size"], np.uint8)
    coarse_labels[1:3, 1:4, 0:2] = 5
    _write(_sitk_image(coarse_labels, coarse), tmp_path / "m_mask.mha")
    item = LoadRegistrationPaird()(
        {
            "fixed_image": str(tmp_path / "f.nii.gz"),
            "moving_image": str(tmp_path / "m.nii.gz"),
            "fixed_mask": str(tmp_path / "f_mask.nii.gz"),
            "moving_mask": str(tmp_path / "m_mask.mha"),
        }
    )
    fm, mm = item["fixed_mask"], item["moving_mask"]
    assert fm.dtype == mm.dtype == torch.float32
    np.testing.assert_array_equal(fm[0].numpy(), (labels > 0).astype(np.float32))
    assert mm.shape == item["moving_image"].shape
    torch.testing.assert_close(torch.as_tensor(mm.affine), torch.as_tensor(item["moving_image"].affine))
    # nearest-neighbour upsampling by 2 of the coarse block: fine voxels 2..5, 2..7, 0..3
    expected = np.zeros(FIXED_GEOM["size"], np.float32)
    expected[2:6, 2:8, 0:4] = 1.0
    np.testing.assert_array_equal(mm[0].numpy(), expected)


def test_already_loaded_values_pass_through(tmp_path):
    img = _sitk_image(_linear_hu(FIXED_GEOM["size"]), FIXED_GEOM)
    _write(img, tmp_path / "f.nii.gz")
    path = str(tmp_path / "f.nii.gz")
    first = LoadRegistrationPaird()({"fixed_image": path, "moving_image": path})
    pts = torch.zeros(2, 3, dtype=torch.float64)
    again = LoadRegistrationPaird()({**first, "fixed_landmarks": pts})
    assert again["fixed_image"] is first["fixed_image"]
    assert again["fixed_landmarks"] is pts or torch.equal(again["fixed_landmarks"], pts)


def test_errors_name_the_file(tmp_path):
    img = _sitk_image(_linear_hu(FIXED_GEOM["size"]), FIXED_GEOM)
    _write(img, tmp_path / "f.nii.gz")
    load = LoadRegistrationPaird()
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load({"fixed_image": str(tmp_path / "f.nii.gz"), "moving_image": str(tmp_path / "missing.nii.gz")})
    with pytest.raises(KeyError, match="moving_image"):
        load({"fixed_image": str(tmp_path / "f.nii.gz")})
    (tmp_path / "garbage.mha").write_text("not an image")
    with pytest.raises(RuntimeError, match="garbage.mha"):
        load({"fixed_image": str(tmp_path / "f.nii.gz"), "moving_image": str(tmp_path / "garbage.mha")})
    two_d = sitk.GetImageFromArray(np.zeros((4, 5), np.int16))
    sitk.WriteImage(two_d, str(tmp_path / "flat.mha"))
    with pytest.raises(ValueError, match=r"single-channel 3-D.*flat.mha"):
        load({"fixed_image": str(tmp_path / "f.nii.gz"), "moving_image": str(tmp_path / "flat.mha")})


def test_lps_csv_matches_itk_convention(tmp_path):
    """A CSV written by save_landmarks holds exactly ITK's (LPS) physical points."""
    img = _sitk_image(_linear_hu(FIXED_GEOM["size"]), FIXED_GEOM)
    ras = _itk_world_ras(img, VOXELS)
    path = save_landmarks(tmp_path / "lm.csv", ras)
    rows = np.loadtxt(path, delimiter=",", skiprows=1)
    lps = np.array([img.TransformContinuousIndexToPhysicalPoint([float(v) for v in r]) for r in VOXELS])
    np.testing.assert_allclose(rows, lps, atol=1e-5)
    np.testing.assert_allclose(ras_to_lps(ras).numpy(), lps, atol=1e-9)


def test_a_mask_whose_grid_does_not_cover_its_image_is_an_error_naming_the_mask(tmp_path):
    """Issue 26: a mask on another grid used to end as "the lung mask is empty" naming the image. Now: the
    mask file, both grids and the overlap, at loading (before training)."""
    fixed_img = _sitk_image(_linear_hu(FIXED_GEOM["size"]), FIXED_GEOM)
    _write(fixed_img, tmp_path / "f.nii.gz")
    labels = np.zeros(FIXED_GEOM["size"], np.uint8)
    labels[2:10, 2:8, 1:7] = 1
    far = dict(FIXED_GEOM, origin=(250.0, 30.0, -20.0))  # another scan's grid: 300 mm to the side
    _write(_sitk_image(labels, far), tmp_path / "far_mask.nii.gz")
    record = {"fixed_image": str(tmp_path / "f.nii.gz"), "moving_image": str(tmp_path / "f.nii.gz")}
    with pytest.raises(ValueError) as err:
        LoadRegistrationPaird()({**record, "fixed_mask": str(tmp_path / "far_mask.nii.gz")})
    msg = str(err.value)
    assert msg.startswith(f"fixed_mask: the mask {tmp_path / 'far_mask.nii.gz'} is on another grid than fixed_image and is empty once resampled")
    assert "its grid covers 0% of the image's field of view" in msg and "0% of its nonzero voxels lie inside the image" in msg
    assert "Mask grid: shape (12, 10, 8), spacing (0.9, 1.1, 2) mm, origin (-250.0, -30.0, -20.0) mm RAS" in msg  # LPS -> RAS
    assert f"image grid ({tmp_path / 'f.nii.gz'}): shape (12, 10, 8), spacing (0.9, 1.1, 2) mm, origin (50.0, -30.0, -20.0) mm RAS" in msg
    # a grid over one corner of the image: the mask is not empty once resampled, but cannot hold the image's lungs
    corner = dict(FIXED_GEOM, size=(5, 4, 3))
    _write(_sitk_image(np.ones(corner["size"], np.uint8), corner), tmp_path / "corner_mask.mha")
    with pytest.raises(ValueError, match=r"corner_mask.mha is on another grid than moving_image and does not cover its image: its grid covers (\d)% "):
        LoadRegistrationPaird()({**record, "moving_mask": str(tmp_path / "corner_mask.mha")})
