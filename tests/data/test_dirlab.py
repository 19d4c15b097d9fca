"""DIR-LAB loading: original layout/naming, raw format, geometry, landmarks, errors.

The decisive check: the real DIR-LAB landmark files (../shared), loaded through the same code path
as full cases, reproduce the literature's no-registration TRE per case to 0.01 mm.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.data import (
    DIRLAB_CASES,
    DIRLabCase,
    DIRLabDataset,
    LoadDIRLabd,
    dirlab_affine,
    dirlab_datalist,
    find_dirlab_case,
    read_dirlab_image,
)

# ----------------------------------------------------------------------------- helpers


def _hu(shape):
    """A linear HU field f(i, j, k) = i + 2j + 3k - 500: trilinear sampling reproduces it exactly."""
    i, j, k = (np.arange(n).reshape([-1 if a == b else 1 for b in range(3)]) for a, n in enumerate(shape))
    return (i + 2 * j + 3 * k - 500).astype(np.int16)


def _write_img(path: Path, hu_xyz: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = (hu_xyz.astype(np.int32) + 1024).astype("<i2")
    raw.transpose(2, 1, 0).tofile(path)  # DIR-LAB: (z, y, x) on disk, x fastest


def _write_landmarks(path: Path, vox1: np.ndarray, style: str) -> None:
    """Original DIR-LAB text: 1-based voxel x y z, tab separated, CRLF (cases 6-10 pad with spaces/tabs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "1-5":
        lines = ["\t".join(str(int(v)) for v in row) for row in vox1]
    else:
        lines = ["\t".join(f"{int(v):4d}" for v in row) + "\t" for row in vox1]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())


def _random_voxels(rng, size, n):
    return np.stack([rng.integers(1, s + 1, n) for s in size], axis=1)  # 1-based


@pytest.fixture(scope="module")
def dirlab_case1(tmp_path_factory):
    """A full-size DIR-LAB case 1 in its original layout and naming (26 MB; tests must not modify it)."""
    rng = np.random.default_rng(0)
    size = DIRLAB_CASES[1].size
    root = tmp_path_factory.mktemp("dirlab_case1") / "dirlab"
    hu = _hu(size)
    _write_img(root / "Case1Pack" / "Images" / "case1_T00_s.img", hu)
    _write_img(root / "Case1Pack" / "Images" / "case1_T50_s.img", hu + 7)
    v00, v50 = _random_voxels(rng, size, 300), _random_voxels(rng, size, 300)
    _write_landmarks(root / "Case1Pack" / "ExtremePhases" / "Case1_300_T00_xyz.txt", v00, "1-5")
    _write_landmarks(root / "Case1Pack" / "ExtremePhases" / "Case1_300_T50_xyz.txt", v50, "1-5")
    # decoys that must not be picked up: other phases, the 75-landmark sampled files
    _write_landmarks(root / "Case1Pack" / "Sampled4D" / "case1_4D-75_T00.txt", v00[:75], "1-5")
    (root / "Case1Pack" / "Images" / "case1_T10_s.img").write_bytes(b"\0" * 8)
    return root, hu, v00, v50


# ----------------------------------------------------------------------------- table


def test_builtin_table_matches_shared_tsv(shared_dir):
    with open(shared_dir / "data" / "dirlab_cases.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == len(DIRLAB_CASES) == 10
    for row in rows:
        c = DIRLAB_CASES[int(row["case"])]
        assert c.size == (int(row["size_x"]), int(row["size_y"]), int(row["size_z"]))
        assert c.spacing == (float(row["spacing_x_mm"]), float(row["spacing_y_mm"]), float(row["spacing_z_mm"]))
        assert c.initial_tre_mean_mm == float(row["initial_tre_mean_mm"])
        assert c.initial_tre_sd_mm == float(row["initial_tre_sd_mm"])
        assert c.observer_error_mm == float(row["observer_error_mm"])


def test_affine_convention():
    a = dirlab_affine(6)
    np.testing.assert_allclose(a, np.diag([-0.97, -0.97, 2.5, 1.0]))


# ----------------------------------------------------------------------------- the check that matters


def test_real_landmarks_reproduce_initial_tre(shared_dir, tmp_path):
    """Zero displacement: per-case mean (and SD) landmark distance = the literature's values to 0.01 mm."""
    src = shared_dir / "data" / "dirlab_landmarks"
    root = tmp_path / "dirlab"
    for f in src.iterdir():  # unpack as users do: Case<N>Pack (Case8Deploy), files in a sub-folder
        case = int(re.match(r"case(\d+)_", f.name, re.IGNORECASE).group(1))
        folder = root / (f"Case{case}Deploy" if case == 8 else f"Case{case}Pack") / "ExtremePhases"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f.name)
    loader = LoadDIRLabd(allow_missing_keys=True)
    records = dirlab_datalist(root, range(1, 11), require_images=False)
    assert [r["name"] for r in records] == [f"dirlab_case{c:02d}" for c in range(1, 11)]
    for rec in records:
        item = loader(rec)
        f, m = item["fixed_landmarks"], item["moving_landmarks"]
        assert f.shape == m.shape == (300, 3) and f.dtype == torch.float64
        tre = torch.linalg.norm(f - m, dim=1)
        info = DIRLAB_CASES[rec["case"]]
        assert abs(tre.mean().item() - info.initial_tre_mean_mm) <= 0.01, (rec["case"], tre.mean().item())
        assert abs(tre.std(correction=0).item() - info.initial_tre_sd_mm) <= 0.01, (rec["case"], tre.std().item())


# ----------------------------------------------------------------------------- generated full case


def test_generated_case_item(dirlab_case1):
    root, hu, v00, v50 = dirlab_case1
    ds = DIRLabDataset(root, cases=[1])
    assert len(ds) == 1
    item = ds[0]
    assert item["name"] == "dirlab_case01" and item["case"] == 1
    fixed, moving = item["fixed_image"], item["moving_image"]
    assert fixed.shape == (1, 256, 256, 94) and fixed.dtype == torch.float32
    np.testing.assert_array_equal(fixed[0].numpy(), hu.astype(np.float32))  # HU = raw - 1024, (x, y, z) order
    np.testing.assert_array_equal(moving[0].numpy(), hu.astype(np.float32) + 7)
    np.testing.assert_allclose(fixed.affine.numpy(), dirlab_affine(1))

    # landmarks: world = affine @ (voxel - 1)
    expected = torch.tensor((v00 - 1) * np.array([-0.97, -0.97, 2.5]), dtype=torch.float64)
    torch.testing.assert_close(item["fixed_landmarks"], expected, rtol=0, atol=1e-9)

    # the image sampled at the landmark world position is the value at that voxel
    mapping = CoordinateMapping.from_image(fixed)
    values = mapping.sample(fixed, item["fixed_landmarks"].to(torch.float64))[0]
    i, j, k = (v00 - 1).T
    torch.testing.assert_close(values, torch.tensor(hu[i, j, k], dtype=torch.float64), rtol=0, atol=1e-6)

    # zero-displacement TRE equals the closed form from voxel differences and spacing
    tre = torch.linalg.norm(item["fixed_landmarks"] - item["moving_landmarks"], dim=1)
    closed = np.linalg.norm((v00 - v50) * np.array([0.97, 0.97, 2.5]), axis=1)
    np.testing.assert_allclose(tre.numpy(), closed, rtol=0, atol=1e-9)


def test_geometry_matches_an_mhd_sidecar_read_by_itk(dirlab_case1):
    """Our affine is what ITKReader gives the same file through an .mhd header (origin 0, identity direction)."""
    root, hu, _, _ = dirlab_case1
    img_path = Path(find_dirlab_case(root, 1)["fixed_image"])
    mhd = img_path.with_suffix(".mhd")
    mhd.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 256 256 94\nElementType = MET_SHORT\n"
        "ElementSpacing = 0.97 0.97 2.5\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"ElementDataFile = {img_path.name}\n"
    )
    via_itk = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(mhd))
    ours = read_dirlab_image(img_path, 1)
    np.testing.assert_allclose(np.asarray(via_itk.affine), ours.affine.numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(via_itk[0]) - 1024, ours[0].numpy())


@pytest.fixture
def tiny_case8(tmp_path, monkeypatch):
    """Case 8 shrunk to 6x5x4 voxels (patched table) in its original naming: Case8Deploy, case8_T00.img,
    case8_dirLab300_T00_xyz.txt."""
    monkeypatch.setitem(DIRLAB_CASES, 8, DIRLabCase(8, (6, 5, 4), (0.97, 0.97, 2.5), 0.0, 0.0, 0.0))
    root = tmp_path / "dirlab"
    hu = _hu((6, 5, 4))
    _write_img(root / "Case8Deploy" / "Images" / "case8_T00.img", hu)
    _write_img(root / "Case8Deploy" / "Images" / "case8_T50.img", hu)
    vox = np.array([[1, 1, 1], [6, 5, 4], [3, 2, 4]])
    _write_landmarks(root / "Case8Deploy" / "ExtremePhases" / "case8_dirLab300_T00_xyz.txt", vox, "6-10")
    _write_landmarks(root / "Case8Deploy" / "ExtremePhases" / "case8_dirLab300_T50_xyz.txt", vox, "6-10")
    return root, hu, vox


def test_case8_deploy_folder_and_cases_6_10_naming(tiny_case8):
    root, hu, vox = tiny_case8
    item = DIRLabDataset(root, cases=[8])[0]
    assert item["fixed_image"].shape == (1, 6, 5, 4)
    np.testing.assert_array_equal(item["fixed_image"][0].numpy(), hu)
    expected = torch.tensor((vox - 1) * np.array([-0.97, -0.97, 2.5]), dtype=torch.float64)
    torch.testing.assert_close(item["moving_landmarks"], expected, rtol=0, atol=1e-9)


def test_user_transform_runs_after_loading(dirlab_case1):
    root = dirlab_case1[0]
    ds = DIRLabDataset(root, cases=[1], transform=lambda d: {**d, "n": int(d["fixed_landmarks"].shape[0])})
    assert ds[0]["n"] == 300


# ----------------------------------------------------------------------------- errors


def test_wrong_size_file_error_names_file_and_byte_counts(tiny_case8):
    root = tiny_case8[0]
    path = root / "Case8Deploy" / "Images" / "case8_T50.img"
    with open(path, "r+b") as f:
        f.truncate(100)
    ds = DIRLabDataset(root, cases=[8])
    with pytest.raises(ValueError) as e:
        ds[0]
    msg = str(e.value)
    assert str(path) in msg and "has 100 bytes" in msg and f"expected {6 * 5 * 4 * 2} bytes" in msg


def test_missing_case_folder_error(dirlab_case1):
    root = dirlab_case1[0]
    with pytest.raises(FileNotFoundError) as e:
        DIRLabDataset(root, cases=[1, 2])
    assert "Case2Pack" in str(e.value) and str(root) in str(e.value) and "Case1Pack" in str(e.value)


def test_missing_file_error(tiny_case8):
    root = tiny_case8[0]
    (root / "Case8Deploy" / "ExtremePhases" / "case8_dirLab300_T50_xyz.txt").unlink()
    with pytest.raises(FileNotFoundError) as e:
        find_dirlab_case(root, 8)
    assert "case8_dirLab300_T50_xyz.txt" in str(e.value) and str(root / "Case8Deploy") in str(e.value)


def test_duplicate_file_error(tiny_case8):
    root = tiny_case8[0]
    shutil.copy(root / "Case8Deploy" / "Images" / "case8_T00.img", root / "Case8Deploy" / "case8_T00.img")
    with pytest.raises(ValueError, match="found 2 times"):
        find_dirlab_case(root, 8)


def test_unknown_case_number():
    with pytest.raises(ValueError, match="one of"):
        dirlab_affine(11)
