"""CropToMask(d): box + margin in mm, affines kept right, landmarks unaffected; HU window; preset chain."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing
from monai_cidir.transforms import CropToMask, CropToMaskd, ScaleHU, ScaleHUd, pair_preprocessing


def _oblique(spacing=(1.0, 1.25, 2.5), origin=(-30.0, 12.0, 40.0), deg=25.0):
    t = math.radians(deg)
    rot = np.array([[math.cos(t), 0.0, math.sin(t)], [0.0, 1.0, 0.0], [-math.sin(t), 0.0, math.cos(t)]])
    return torch.as_tensor(affine_from_spacing(spacing, origin=origin, direction=rot @ np.diag([-1.0, -1.0, 1.0])))


@pytest.fixture
def item():
    affine = _oblique()
    shape = (20, 16, 10)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    image = MetaTensor(torch.as_tensor(10.0 * i + 3.0 * j - 7.0 * k - 600.0)[None].float(), affine=affine)
    mask = torch.zeros(1, *shape)
    mask[0, 5:12, 4:9, 3:6] = 1.0
    mask = MetaTensor(mask, affine=affine)
    mapping = CoordinateMapping(affine, shape)
    index = torch.tensor([[6.0, 5.0, 4.0], [10.5, 7.25, 3.5], [5.0, 4.0, 3.0]], dtype=torch.float64)
    landmarks = mapping.index_to_world(index)  # (N, 3) float64 world RAS mm, as loaded landmarks are
    return {"fixed_image": image, "fixed_mask": mask, "fixed_landmarks": landmarks}


def test_box_with_margin_in_mm(item):
    # margin 2.5 mm = (2.5, 2, 1) voxels for spacing (1, 1.25, 2.5): index box [5-2.5, 11+2.5] -> [2, 14], etc.
    out = CropToMaskd(["fixed_image", "fixed_mask"], mask_key="fixed_mask", margin_mm=2.5)(item)
    assert out["fixed_image"].shape == (1, 13, 9, 5)
    assert out["fixed_mask"].shape == (1, 13, 9, 5)
    np.testing.assert_array_equal(out["fixed_image"].numpy(), item["fixed_image"][:, 2:15, 2:11, 2:7].numpy())
    assert float(out["fixed_mask"].sum()) == float(item["fixed_mask"].sum())
    # affine: the crop's voxel (0, 0, 0) is the original voxel (2, 2, 2)
    orig = CoordinateMapping.from_image(item["fixed_image"])
    new = CoordinateMapping.from_image(out["fixed_image"])
    torch.testing.assert_close(
        new.index_to_world(torch.zeros(3, dtype=torch.float64)),
        orig.index_to_world(torch.full((3,), 2.0, dtype=torch.float64)),
    )


def test_landmarks_do_not_move_and_sample_the_same_values(item):
    before = CoordinateMapping.from_image(item["fixed_image"]).sample(item["fixed_image"], item["fixed_landmarks"])
    out = CropToMaskd(["fixed_image", "fixed_mask"], mask_key="fixed_mask", margin_mm=2.5)(item)
    assert out["fixed_landmarks"] is item["fixed_landmarks"]
    after = CoordinateMapping.from_image(out["fixed_image"]).sample(out["fixed_image"], out["fixed_landmarks"])
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    i, j, k = torch.tensor([[6.0, 5.0, 4.0], [10.5, 7.25, 3.5], [5.0, 4.0, 3.0]], dtype=torch.float64).T
    torch.testing.assert_close(after[0], 10 * i + 3 * j - 7 * k - 600, rtol=0, atol=1e-3)  # linear field: exact


def test_other_grid_is_cropped_to_the_same_world_box(item):
    other_affine = _oblique(spacing=(1.5, 0.8, 2.0), origin=(-35.0, 8.0, 35.0), deg=-10.0)
    other = MetaTensor(torch.rand(1, 24, 30, 14), affine=other_affine)
    crop = CropToMask(margin_mm=4.0)
    box = crop.world_box(item["fixed_mask"])
    out = crop(other, item["fixed_mask"])
    assert out.shape[1:] != other.shape[1:]
    idx = CoordinateMapping.from_image(out).world_to_index(box)
    full = CoordinateMapping.from_image(other).world_to_index(box)
    for axis in range(3):
        n_out, n_full = out.shape[1 + axis], other.shape[1 + axis]
        lo, hi = float(idx[:, axis].min()), float(idx[:, axis].max())
        # where the box lies inside the image, the crop covers it with less than one voxel to spare
        if float(full[:, axis].min()) >= 0:
            assert -1e-6 <= lo < 1.0
        else:
            assert int(out.shape[1 + axis]) > 0 and lo < 0  # clamped at the image border
        if float(full[:, axis].max()) <= n_full - 1:
            assert n_out - 2 < hi <= n_out - 1 + 1e-6


def test_margin_clamped_at_the_image_border(item):
    out = CropToMask(margin_mm=100.0)(item["fixed_image"], item["fixed_mask"])
    assert out.shape == item["fixed_image"].shape


def test_empty_mask_error(item):
    empty = MetaTensor(torch.zeros_like(item["fixed_mask"].as_tensor()), affine=item["fixed_mask"].affine)
    with pytest.raises(ValueError, match="empty mask"):
        CropToMask()(item["fixed_image"], empty)
    with pytest.raises(KeyError, match="moving_mask"):
        CropToMaskd(["fixed_image"], mask_key="moving_mask")(item)


def test_scale_hu_closed_form():
    x = torch.tensor([-2000.0, -1000.0, -250.0, 500.0, 3000.0])
    torch.testing.assert_close(ScaleHU()(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    narrow = ScaleHU(-1000.0, 0.0, -1.0, 1.0)
    torch.testing.assert_close(narrow(torch.tensor([-500.0, 100.0])), torch.tensor([0.0, 1.0]))


def test_scale_hud_keeps_affine(item):
    out = ScaleHUd(["fixed_image"])(item)
    torch.testing.assert_close(out["fixed_image"].affine, item["fixed_image"].affine)
    assert 0.0 <= float(out["fixed_image"].min()) and float(out["fixed_image"].max()) <= 1.0
    torch.testing.assert_close(out["fixed_image"][0, 6, 5, 4], torch.tensor((60.0 + 15 - 28 - 600 + 1000) / 1500))


def test_pair_preprocessing_chain(item):
    data = dict(item)
    data["moving_image"] = item["fixed_image"].clone()
    data["moving_mask"] = item["fixed_mask"].clone()
    pre = pair_preprocessing(crop_margin_mm=2.5, moving_crop_margin_mm=5.0, pixdim=2.0)
    out = pre(data)
    spacing = CoordinateMapping.from_image(out["fixed_image"]).spacing
    torch.testing.assert_close(spacing, torch.full((3,), 2.0, dtype=torch.float64))
    assert out["fixed_image"].dtype == out["fixed_mask"].dtype == torch.float32
    assert out["fixed_image"].shape == out["fixed_mask"].shape
    assert set(torch.unique(out["fixed_mask"]).tolist()) <= {0.0, 1.0}
    assert out["moving_image"].shape[1:] >= out["fixed_image"].shape[1:]  # larger margin on the moving side
    assert 0.0 <= float(out["fixed_image"].min()) and float(out["moving_image"].max()) <= 1.0
    assert out["fixed_landmarks"] is item["fixed_landmarks"]
