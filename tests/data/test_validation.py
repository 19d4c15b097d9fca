"""Bad inputs stop before training with a message naming the key, the file and what was expected."""

from __future__ import annotations

import gzip
import json
import logging

import nibabel as nib
import numpy as np
import pytest

from monai_cidir.coordinates import affine_from_spacing
from monai_cidir.data import load_pair_datalist
from monai_cidir.data.validation import check_image_file, check_image_values, check_pair_names
from monai_cidir.transforms import LoadRegistrationPaird


def _ct(shape=(12, 10, 8), seed=0):
    """A small CT-like volume in HU: air around a body with lung-like values."""
    rng = np.random.default_rng(seed)
    data = np.full(shape, -1000.0, np.float32)
    data[2:-2, 2:-2, 1:-1] = 40.0
    data[3:6, 3:-3, 2:-2] = -850.0
    return data + rng.normal(0, 5, shape).astype(np.float32)


def _nifti(path, data, spacing=(2.0, 2.0, 3.0)):
    nib.save(nib.Nifti1Image(data, affine_from_spacing(spacing)), str(path))
    return path


def _mha(path, data, spacing="2 2 3"):
    """A MetaImage written by hand, so the header says exactly what the test wants."""
    x, y, z = data.shape
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"ElementSpacing = {spacing}\nDimSize = {x} {y} {z}\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + np.ascontiguousarray(data.transpose(2, 1, 0), dtype="<f4").tobytes())
    return path


def _load(tmp_path, fixed, moving=None):
    moving = moving or _nifti(tmp_path / "moving.nii.gz", _ct(seed=1))
    return LoadRegistrationPaird()({"name": "p", "fixed_image": str(fixed), "moving_image": str(moving)})


def test_a_good_pair_loads(tmp_path):
    item = _load(tmp_path, _mha(tmp_path / "fixed.mha", _ct()))
    assert tuple(item["fixed_image"].shape) == (1, 12, 10, 8)


def test_nan_voxels_are_refused_naming_the_file(tmp_path):
    data = _ct()
    data[4, 4, 4] = np.nan
    data[5, 5, 5] = np.inf
    path = _mha(tmp_path / "fixed.mha", data)  # float MetaImage keeps NaN and inf
    with pytest.raises(ValueError, match=r"fixed_image: .*fixed\.mha has 2 non-finite voxel") as e:
        _load(tmp_path, path)
    assert "finite" in str(e.value)


def test_truncated_gzip_is_refused_instead_of_reading_zeros(tmp_path):
    path = _nifti(tmp_path / "fixed.nii.gz", _ct(shape=(40, 40, 30)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(OSError, match=r"fixed_image: .*fixed\.nii\.gz is truncated or corrupt"):
        _load(tmp_path, path)
    with gzip.open(path, "rb") as f:  # what the check guards against: the stream really is cut
        with pytest.raises(EOFError):
            f.read()


@pytest.mark.parametrize("spacing", ["1 -2 3", "0 2 3"])
def test_non_positive_spacing_is_refused(tmp_path, spacing):
    path = _mha(tmp_path / "fixed.mha", _ct(), spacing=spacing)
    with pytest.raises(ValueError, match=r"fixed_image: .*fixed\.mha has voxel spacing .* expected positive"):
        _load(tmp_path, path)


def test_constant_and_non_hu_images_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"moving_image: .*moving\.nii\.gz is constant"):
        _load(tmp_path, _nifti(tmp_path / "fixed.nii.gz", _ct()), _nifti(tmp_path / "moving.nii.gz", np.zeros((12, 10, 8), np.float32)))
    scaled = (_ct() + 1000.0) / 1400.0  # intensities in [0, 1]: not HU
    with pytest.raises(ValueError, match=r"none below -400: expected a CT in Hounsfield units"):
        _load(tmp_path, _nifti(tmp_path / "fixed.nii.gz", scaled))
    check_image_values(scaled, "fixed_image", ct=False)  # allowed where HU are not required


def test_pair_names_must_be_plain_unique_folder_names():
    check_pair_names(["case1", "patient 2", "p-3_b.v2"])
    for bad in ["../../x", "/abs/path", "a/b", "a\\b", "..", ".hidden", "", " lead"]:
        with pytest.raises(ValueError, match="invalid pair name"):
            check_pair_names([bad], "datalist.json")
    with pytest.raises(ValueError, match=r"unique .* repeated: \['p1'\]"):
        check_pair_names(["p1", "p2", "p1"])
    with pytest.raises(ValueError, match="cohort is empty"):
        check_pair_names([], "datalist.json")


def _datalist(tmp_path, records):
    _nifti(tmp_path / "f.nii.gz", _ct())
    _nifti(tmp_path / "m.nii.gz", _ct(seed=1))
    (tmp_path / "f.csv").write_text("x,y,z\n1,2,3\n")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": records}))
    return path


def test_datalist_refuses_unknown_keys_bad_names_and_empty_lists(tmp_path, caplog):
    pair = {"fixed_image": "f.nii.gz", "moving_image": "m.nii.gz"}
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'fixed_landmark' \(did you mean 'fixed_landmarks'\?\).*known keys"):
        load_pair_datalist(_datalist(tmp_path, [{**pair, "fixed_landmark": "f.csv"}]))
    with pytest.raises(ValueError, match=r"datalist .*datalist\.json.*repeated: \['p'\]"):
        load_pair_datalist(_datalist(tmp_path, [{**pair, "name": "p"}, {**pair, "name": "p"}]))
    with pytest.raises(ValueError, match=r"invalid pair name\(s\) \['\.\./\.\./x'\]"):
        load_pair_datalist(_datalist(tmp_path, [{**pair, "name": "../../x"}]))
    with pytest.raises(ValueError, match="cohort is empty"):
        load_pair_datalist(_datalist(tmp_path, []))
    with caplog.at_level(logging.WARNING):
        (rec,) = load_pair_datalist(_datalist(tmp_path, [{**pair, "fixed_landmarks": "f.csv", "meta": {"site": 3}}]))
    assert rec["meta"] == {"site": 3}
    assert "TRE needs both" in caplog.text and "fixed_landmarks" in caplog.text


def test_check_image_file_passes_a_good_file_once(tmp_path, monkeypatch):
    """A good file is read once (the gzip stream and the header); a rewritten file is read again."""
    import os

    from monai_cidir.data import validation

    reads = []
    for name in ("_check_gzip", "_nifti_spacing"):
        original = getattr(validation, name)
        monkeypatch.setattr(validation, name, lambda *a, _f=original, _n=name: reads.append(_n) or _f(*a))
    path = _nifti(tmp_path / "f.nii.gz", _ct())
    assert check_image_file(path, "fixed_image") is None
    assert reads == ["_check_gzip", "_nifti_spacing"]
    check_image_file(path, "fixed_image")  # cached: same size and mtime
    assert reads == ["_check_gzip", "_nifti_spacing"]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed since: checked again
    check_image_file(path, "fixed_image")
    assert reads == ["_check_gzip", "_nifti_spacing"] * 2
    check_image_file(tmp_path, "dicom folder")  # folders are left to the reader
    assert len(reads) == 4


def test_the_cohort_is_checked_as_a_whole_before_any_training(tmp_path):
    """Two patients, the second with a truncated image and unpaired landmarks: both reported at once, nothing trained."""
    from monai_cidir.data import RegistrationPairDataset
    from monai_cidir.engines import run_cohort

    _nifti(tmp_path / "f.nii.gz", _ct())
    _nifti(tmp_path / "m.nii.gz", _ct(seed=1))
    bad = _nifti(tmp_path / "cut.nii.gz", _ct(shape=(40, 40, 30), seed=2))
    bad.write_bytes(bad.read_bytes()[:3000])
    (tmp_path / "f.csv").write_text("x,y,z\n1,2,3\n4,5,6\n")
    (tmp_path / "m.csv").write_text("x,y,z\n1,2,3\n")
    records = [
        {"name": "good", "fixed_image": "f.nii.gz", "moving_image": "m.nii.gz"},
        {"name": "bad", "fixed_image": "f.nii.gz", "moving_image": "cut.nii.gz", "fixed_landmarks": "f.csv", "moving_landmarks": "m.csv"},
    ]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": records}))
    with pytest.raises(ValueError, match=r"2 input problem\(s\), nothing was trained") as e:
        run_cohort(RegistrationPairDataset(tmp_path / "datalist.json"), tmp_path / "out", max_iterations=5)
    assert "2 fixed landmarks" in str(e.value) and "cut.nii.gz is truncated" in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="selection_mode must be"):
        run_cohort(RegistrationPairDataset(tmp_path / "datalist.json"), tmp_path / "out", selection_mode="max")


def test_a_nan_scan_of_the_last_patient_stops_the_cohort_before_the_first_trains(tmp_path):
    from monai_cidir.data import RegistrationPairDataset
    from monai_cidir.engines import run_cohort

    _nifti(tmp_path / "f.nii.gz", _ct())
    _nifti(tmp_path / "m.nii.gz", _ct(seed=1))
    data = _ct(seed=3)
    data[1, 2, 3] = np.nan
    _mha(tmp_path / "nan.mha", data)
    records = [{"name": "first", "fixed_image": "f.nii.gz", "moving_image": "m.nii.gz"},
               {"name": "last", "fixed_image": "f.nii.gz", "moving_image": "nan.mha"}]  # fmt: skip
    (tmp_path / "datalist.json").write_text(json.dumps({"training": records}))
    with pytest.raises(ValueError, match=r"last: moving_image: .*nan\.mha has 1 non-finite voxel"):
        run_cohort(RegistrationPairDataset(tmp_path / "datalist.json"), tmp_path / "out", max_iterations=5)
    assert not (tmp_path / "out").exists()


def test_the_cohort_pre_check_reads_each_image_once(tmp_path, monkeypatch):
    """The pre-check reads and checks every image; the pairs it keeps are loaded from what it read, not read again."""
    from monai.transforms import LoadImage

    from monai_cidir.data import RegistrationPairDataset
    from monai_cidir.engines import registration

    for i in range(3):
        _nifti(tmp_path / f"f{i}.nii.gz", _ct(seed=2 * i))
        _nifti(tmp_path / f"m{i}.nii.gz", _ct(seed=2 * i + 1))
    records = [{"name": f"p{i}", "fixed_image": f"f{i}.nii.gz", "moving_image": f"m{i}.nii.gz"} for i in range(3)]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": records}))
    dataset = RegistrationPairDataset(tmp_path / "datalist.json")
    reads = []
    original = LoadImage.__call__
    monkeypatch.setattr(LoadImage, "__call__", lambda self, filename, *a, **k: reads.append(str(filename)) or original(self, filename, *a, **k))
    monkeypatch.setattr(registration, "PRELOAD_BYTES", 0)  # keep the first pair only: the others are read again
    preloaded = registration._precheck_cohort(dataset)
    assert sorted(preloaded) == [0] and len(reads) == 6  # every image read and checked before training
    items = [load() for load in registration._patients(dataset, preloaded)]
    assert len(reads) == 6 + 4  # the first pair from the pre-check, the two others read again
    expected = [dataset[i] for i in range(3)]
    for item, ref in zip(items, expected):
        assert item["name"] == ref["name"]
        for key in ("fixed_image", "moving_image"):
            assert np.array_equal(item[key].numpy(), ref[key].numpy()) and np.allclose(item[key].affine, ref[key].affine)
            assert item[key].meta["filename_or_obj"] == ref[key].meta["filename_or_obj"]
    monkeypatch.setattr(registration, "PRELOAD_BYTES", 2**30)
    reads.clear()
    preloaded = registration._precheck_cohort(dataset)
    [load() for load in registration._patients(dataset, preloaded)]
    assert len(reads) == 6  # all three kept: each image read once
