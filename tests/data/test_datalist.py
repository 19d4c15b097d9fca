"""Pair datalists: relative paths, errors naming the missing file, and the dataset's loaded items."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing
from monai_cidir.data import RegistrationPairDataset, load_pair_datalist, save_landmarks, write_pair_datalist


def _nifti(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def pair_dir(tmp_path):
    """A datalist with relative paths to a NIfTI pair (different grids), masks and CSV landmarks."""
    root = tmp_path / "study"
    f_aff = affine_from_spacing((1.5, 1.5, 3.0), origin=(-20.0, -15.0, 10.0))
    m_aff = affine_from_spacing((1.0, 1.2, 2.0), origin=(-18.0, -14.0, 12.0), direction=np.diag([-1.0, 1.0, 1.0]))
    i, j, k = np.meshgrid(np.arange(16), np.arange(14), np.arange(10), indexing="ij")
    fixed = (5 * i - 3 * j + 7 * k - 800).astype(np.int16)
    _nifti(root / "p1" / "inhale.nii.gz", fixed, f_aff)
    _nifti(root / "p1" / "exhale.nii.gz", np.full((20, 18, 14), -1000, np.int16) + np.arange(14, dtype=np.int16), m_aff)
    mask = np.zeros((16, 14, 10), np.uint8)
    mask[3:12, 2:10, 2:8] = 1
    _nifti(root / "p1" / "inhale_lungs.nii.gz", mask, f_aff)
    vox = np.array([[2.0, 3.0, 4.0], [10.0, 1.0, 8.0]])
    world = torch.as_tensor(vox @ f_aff[:3, :3].T + f_aff[:3, 3])  # nibabel affine = RAS
    save_landmarks(root / "p1" / "inhale.csv", world)
    record = {
        "name": "p1",
        "fixed_image": "p1/inhale.nii.gz",
        "moving_image": "p1/exhale.nii.gz",
        "fixed_mask": "p1/inhale_lungs.nii.gz",
        "fixed_landmarks": "p1/inhale.csv",
        "meta": {"weight": 0.5},
    }
    (root / "datalist.json").write_text(json.dumps({"training": [record, {**record, "name": None}]}))
    return root, fixed, mask, vox, world


def test_relative_paths_resolved_against_the_datalist_folder(pair_dir, monkeypatch, tmp_path):
    root = pair_dir[0]
    monkeypatch.chdir(tmp_path)  # not the datalist's folder
    records = load_pair_datalist(root / "datalist.json")
    assert records[0]["fixed_image"] == str((root / "p1" / "inhale.nii.gz").resolve())
    assert records[0]["meta"] == {"weight": 0.5} and records[0]["name"] == "p1"
    assert "moving_mask" not in records[0]


def test_dataset_items_follow_the_contract(pair_dir):
    root, fixed, mask, vox, world = pair_dir
    ds = RegistrationPairDataset(root / "datalist.json")
    assert len(ds) == 2
    item = ds[0]
    assert item["name"] == "p1"
    img = item["fixed_image"]
    assert img.shape == (1, 16, 14, 10) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[0].numpy(), fixed)
    assert item["moving_image"].shape == (1, 20, 18, 14)
    np.testing.assert_array_equal(item["fixed_mask"][0].numpy(), mask.astype(np.float32))
    torch.testing.assert_close(item["fixed_landmarks"], world.to(torch.float64), rtol=0, atol=1e-5)
    mapping = CoordinateMapping.from_image(img)
    torch.testing.assert_close(mapping.world_to_index(item["fixed_landmarks"]), torch.as_tensor(vox), rtol=0, atol=1e-5)
    i, j, k = vox.T
    expected = torch.as_tensor(5 * i - 3 * j + 7 * k - 800.0)
    torch.testing.assert_close(mapping.sample(img, item["fixed_landmarks"])[0], expected, rtol=0, atol=1e-3)


def test_dataset_applies_user_transform_after_loading(pair_dir):
    count = lambda d: {**d, "n": len(d["fixed_landmarks"])}  # noqa: E731
    ds = RegistrationPairDataset(pair_dir[0] / "datalist.json", transform=count)
    assert ds[1]["n"] == 2


def test_missing_file_error_names_record_key_and_path(pair_dir):
    root = pair_dir[0]
    (root / "p1" / "inhale_lungs.nii.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_pair_datalist(root / "datalist.json")
    msg = str(e.value)
    assert "record 0 (p1)" in msg and "fixed_mask" in msg and str(root / "p1" / "inhale_lungs.nii.gz") in msg


def test_invalid_datalists(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        load_pair_datalist(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pair_datalist(bad)
    bad.write_text(json.dumps({"validation": []}))
    with pytest.raises(ValueError, match="'training'"):
        load_pair_datalist(bad)
    bad.write_text(json.dumps({"training": [{"fixed_image": "a.nii.gz"}]}))
    with pytest.raises(ValueError, match="moving_image"):
        load_pair_datalist(bad)


def test_write_then_load_round_trip(pair_dir, tmp_path):
    root = pair_dir[0]
    records = load_pair_datalist(root / "datalist.json")
    out = write_pair_datalist(root / "copy" / "list.json", records, key="test")
    stored = json.loads(out.read_text())["test"][0]
    assert stored["fixed_image"] == "../p1/inhale.nii.gz"  # relative to the new datalist's folder
    assert load_pair_datalist(out, key="test") == records
