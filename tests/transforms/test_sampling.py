"""RandPointsInMask(d): inside the mask (checked through world_to_index), uniform, reproducible, dilation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing
from monai_cidir.transforms import RandPointsInMask, RandPointsInMaskd, dilate_mask_mm


@pytest.fixture
def mask():
    """Two blocks (120 and 360 voxels) on an oblique anisotropic grid."""
    t = math.radians(30.0)
    rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    affine = affine_from_spacing((0.8, 1.1, 2.5), origin=(-40.0, 25.0, -10.0), direction=rot @ np.diag([-1, -1, 1]))
    m = torch.zeros(1, 24, 20, 12)
    m[0, 2:6, 3:8, 1:7] = 1.0  # 4*5*6 = 120 voxels
    m[0, 12:20, 5:14, 4:9] = 1.0  # 8*9*5 = 360 voxels
    return MetaTensor(m, affine=torch.as_tensor(affine))


def _voxels_of(mask, points):
    idx = CoordinateMapping.from_image(mask).world_to_index(points.to(torch.float64))
    return idx, torch.round(idx).long()


def test_points_inside_the_mask_and_uniform(mask):
    sampler = RandPointsInMask(num_points=40_000, dtype=torch.float64)
    sampler.set_random_state(seed=0)
    pts = sampler(mask)
    assert pts.shape == (40_000, 3) and pts.dtype == torch.float64
    idx, vox = _voxels_of(mask, pts)
    assert bool((mask[0][vox[:, 0], vox[:, 1], vox[:, 2]] == 1).all())
    # uniform over the volume: the two blocks get 120/480 and 360/480 of the points
    frac_small = float((vox[:, 0] < 10).double().mean())
    assert abs(frac_small - 0.25) < 0.01
    # jitter: continuous positions spread uniformly over each voxel's cell
    offset = idx - vox
    assert float(offset.abs().max()) <= 0.5
    uniform_sd = torch.full((3,), math.sqrt(1 / 12), dtype=torch.float64)
    torch.testing.assert_close(offset.std(dim=0), uniform_sd, atol=0.01, rtol=0)


def test_float32_default_and_voxel_centres(mask):
    s64 = RandPointsInMask(1000, dtype=torch.float64).set_random_state(seed=5)
    s32 = RandPointsInMask(1000).set_random_state(seed=5)
    p32 = s32(mask)
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), s64(mask), rtol=0, atol=1e-4)
    centres = RandPointsInMask(500, jitter=False, dtype=torch.float64).set_random_state(seed=1)(mask)
    idx, vox = _voxels_of(mask, centres)
    torch.testing.assert_close(idx, vox.double(), rtol=0, atol=1e-9)


def test_reproducible_with_set_random_state(mask):
    a = RandPointsInMask(100).set_random_state(seed=42)
    b = RandPointsInMask(100).set_random_state(seed=42)
    first_a, first_b = a(mask), b(mask)
    torch.testing.assert_close(first_a, first_b, rtol=0, atol=0)
    second_a = a(mask)
    assert not torch.equal(first_a, second_a)  # a new draw per call
    torch.testing.assert_close(second_a, b(mask), rtol=0, atol=0)
    torch.testing.assert_close(a(mask, randomize=False), second_a, rtol=0, atol=0)


def test_voxel_list_cached_and_invalidated_by_in_place_edits(mask):
    sampler = RandPointsInMask(2000).set_random_state(seed=0)
    sampler(mask)
    cached = sampler._voxels
    sampler(mask)
    assert sampler._voxels is cached  # not recomputed
    mask[0, 12:20] = 0.0  # in-place edit: only the small block is left
    pts = sampler(mask)
    assert sampler._voxels is not cached and len(sampler._voxels) == 120
    _, vox = _voxels_of(mask, pts)
    assert bool((vox[:, 0] < 10).all())


def test_dilation_closed_form_counts():
    m = np.zeros((9, 9, 9), bool)
    m[4, 4, 4] = True
    assert dilate_mask_mm(m, (1.0, 1.0, 1.0), 1.0).sum() == 7
    assert dilate_mask_mm(m, (1.0, 1.0, 1.0), math.sqrt(2)).sum() == 19
    # anisotropic: radius 2 mm with 2.5 mm slices stays in-plane: x^2 + y^2 <= 4 -> 13 voxels
    assert dilate_mask_mm(m, (1.0, 1.0, 2.5), 2.0).sum() == 13
    assert dilate_mask_mm(m, (1.0, 1.0, 2.5), 0.0).sum() == 1


def test_dilation_equals_a_full_volume_distance_transform():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    m = np.zeros((40, 30, 20), bool)
    m[0:15, 10:25, 8:20] = rng.random((15, 15, 12)) > 0.7  # touches two borders
    full = ndimage.distance_transform_edt(~m, sampling=(0.8, 1.1, 2.5)) <= 4.0 + 1e-9
    np.testing.assert_array_equal(dilate_mask_mm(m, (0.8, 1.1, 2.5), 4.0), full)


def test_points_in_dilated_mask(mask):
    sampler = RandPointsInMask(20_000, dilation_mm=3.0, dtype=torch.float64).set_random_state(seed=3)
    pts = sampler(mask)
    _, vox = _voxels_of(mask, pts)
    mapping = CoordinateMapping.from_image(mask)
    # every chosen voxel centre lies within 3 mm of a mask voxel centre (brute force in world mm)
    centres = mapping.index_to_world(vox.unique(dim=0).double())
    mask_centres = mapping.index_to_world(torch.nonzero(mask[0]).double())
    nearest = torch.cdist(centres, mask_centres).min(dim=1).values
    assert float(nearest.max()) <= 3.0 + 1e-9
    outside = mask[0][vox[:, 0], vox[:, 1], vox[:, 2]] == 0
    assert 0.2 < float(outside.double().mean()) < 0.9  # the dilation is really used
    assert len(sampler._voxels) == int(dilate_mask_mm(mask[0].numpy() > 0, mapping.spacing.tolist(), 3.0).sum())


def test_dict_version(mask):
    moving = MetaTensor(mask.as_tensor().clone(), affine=mask.affine.clone())
    data = {"fixed_mask": mask, "moving_mask": moving}
    t = RandPointsInMaskd(["fixed_mask", "moving_mask"], num_points=300).set_random_state(seed=7)
    out = t(data)
    assert out["fixed_mask_points"].shape == out["moving_mask_points"].shape == (300, 3)
    assert not torch.equal(out["fixed_mask_points"], out["moving_mask_points"])  # independent draws
    again = RandPointsInMaskd(["fixed_mask", "moving_mask"], num_points=300).set_random_state(seed=7)(data)
    torch.testing.assert_close(again["moving_mask_points"], out["moving_mask_points"], rtol=0, atol=0)
    one = RandPointsInMaskd("fixed_mask", num_points=50).set_random_state(seed=1)(data)
    assert one["points"].shape == (50, 3)
    named = RandPointsInMaskd("fixed_mask", num_points=50, points_keys="xyz").set_random_state(seed=1)(data)
    torch.testing.assert_close(named["xyz"], one["points"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pair one-to-one"):
        RandPointsInMaskd(["fixed_mask", "moving_mask"], points_keys="points")


def test_errors(mask):
    empty = MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty mask"):
        RandPointsInMask(10)(empty)
    with pytest.raises(ValueError, match="num_points"):
        RandPointsInMask(0)
