"""The threshold lung mask on what real scans hold: crops through the lungs, gas, padding, one lung in view.

No external ground truth is needed: a crop's mask must agree with the crop of the whole scan's
mask, bowel gas is gas wherever the crop puts it, padding is not air. The real scans come from
``../shared`` (skipped without it); the synthetic phantom runs everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from monai_cidir.data.phantom import generate_breathing_phantom
from monai_cidir.transforms import CheckLungMask, LungMask, LungMaskError, lung_mask_report
from monai_cidir.transforms.lung_threshold import _slice_hull, threshold_lung_mask

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.lung_masks import crop as _crop  # noqa: E402  (the crops the benchmark reports)
from benchmarks.lung_masks import lung_cuts as _lung_cuts  # noqa: E402


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


# ----------------------------------------------------------------------------------------------
# synthetic: the phantom (runs without ../shared)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_item():
    return generate_breathing_phantom(seed=3)


@pytest.fixture(scope="module")
def phantom(phantom_item):
    image = phantom_item["fixed_image"]
    return image[0].numpy(), image.affine.numpy(), phantom_item["fixed_mask"][0].numpy() > 0


def test_phantom_crops_keep_the_lungs(phantom):
    """Lungs cut by the field of view on any side are still lungs (the border-touching rule removed them all)."""
    hu, affine, truth = phantom
    for name, sl in _lung_cuts(truth).items():
        sub, aff = _crop(hu, affine, sl)
        assert _dice(threshold_lung_mask(sub, aff), truth[sl]) >= 0.97, name  # measured 0.985-0.996


@pytest.mark.parametrize("pad", [-2048.0, -3024.0])
def test_padding_outside_the_reconstruction_circle_is_not_air(phantom, pad):
    """A zoomed reconstruction: the circle cuts body and lungs; padding is neither air nor tissue."""
    hu, affine, truth = phantom
    x, y = np.meshgrid(np.arange(hu.shape[0]), np.arange(hu.shape[1]), indexing="ij")
    outside = (x - hu.shape[0] / 2) ** 2 + (y - hu.shape[1] / 2) ** 2 > (0.25 * hu.shape[0]) ** 2
    outside = np.repeat(outside[..., None], hu.shape[2], axis=2)
    assert (truth & outside).sum() > 0.1 * truth.sum()  # the circle really cuts the lungs
    padded = np.where(outside, pad, hu).astype(np.float32)
    mask = threshold_lung_mask(padded, affine)
    assert not (mask & outside).any()
    assert _dice(mask, truth & ~outside) >= 0.97  # measured 0.99


def test_contrast_and_both_phases(phantom, phantom_item):
    """Contrast-enhanced soft tissue and vessels (+250 HU) change nothing; the exhale phase is found as well."""
    hu, affine, truth = phantom
    enhanced = np.where(hu > -200.0, hu + 250.0, hu).astype(np.float32)
    assert _dice(threshold_lung_mask(enhanced, affine), truth) >= 0.97
    moving = phantom_item["moving_image"]
    got = threshold_lung_mask(moving[0].numpy(), moving.affine.numpy())
    assert _dice(got, phantom_item["moving_mask"][0].numpy() > 0) >= 0.97


def test_slice_hull_matches_skimage_up_to_boundary_ties():
    """The row-extremes hull contains skimage's convex_hull_image and differs only on its edge."""
    from skimage.morphology import convex_hull_image

    rng = np.random.default_rng(0)
    for _ in range(50):
        body = np.zeros((60, 70), dtype=bool)
        for _ in range(rng.integers(2, 6)):
            r, c = rng.integers(0, 50), rng.integers(0, 60)
            body[r : r + rng.integers(3, 12), c : c + rng.integers(3, 12)] = True
        ours, ref = _slice_hull(body), convex_hull_image(body)
        assert (ours >= ref).all() and (ours >= body).all()
        extra = ours & ~ref
        assert not (extra & ndimage.binary_erosion(ours)).any()  # only pixels on the hull's boundary


def test_block_mean_keeps_world_positions():
    """A coarse voxel is the mean of its block, centred where the block's voxels are: a linear ramp in world x
    reads back its world x at every coarse centre (blocks of the last voxels repeat the edge: left out)."""
    from monai_cidir.coordinates import affine_from_spacing
    from monai_cidir.transforms.lung_threshold import block_mean

    affine = affine_from_spacing((0.8, 0.9, 1.1), (5.0, -7.0, 3.0), np.diag([-1.0, -1.0, 1.0]))
    shape, factors = (13, 10, 9), (2, 3, 1)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    ramp = (idx @ affine[:3, :3].T + affine[:3, 3])[..., 0].astype(np.float32)
    coarse, coarse_affine = block_mean(ramp, affine, factors)
    assert coarse.shape == (7, 4, 9)
    cidx = np.stack(np.meshgrid(*[np.arange(n) for n in coarse.shape], indexing="ij"), -1).astype(np.float64)
    expected = (cidx @ coarse_affine[:3, :3].T + coarse_affine[:3, 3])[..., 0]
    full = (slice(0, 6), slice(0, 3), slice(None))  # blocks without repeated edge voxels
    np.testing.assert_allclose(coarse[full], expected[full], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(coarse_affine[:3, :3], axis=0), [1.6, 2.7, 1.1])


def test_upsample_mask_puts_a_coarse_box_on_its_fine_voxels():
    """Trilinear weights cut at 0.5: a slab of coarse voxels becomes exactly the fine voxels of its blocks
    (along each axis; a box's corners, where the weights multiply, are rounded off)."""
    from monai_cidir.transforms.lung_threshold import upsample_mask

    factors, shape = (2, 3, 2), (16, 17, 13)  # the last two axes cut the repeated edge blocks
    for axis, (a, b) in enumerate(((2, 5), (1, 4), (3, 6))):
        coarse = np.zeros((8, 6, 7), dtype=bool)
        coarse[(slice(None),) * axis + (slice(a, b),)] = True
        expected = np.zeros(shape, dtype=bool)
        expected[(slice(None),) * axis + (slice(a * factors[axis], b * factors[axis]),)] = True
        assert np.array_equal(upsample_mask(coarse, factors, shape), expected), axis


def test_fine_scans_are_segmented_on_the_working_grid(phantom_item):
    """The phantom at 0.93 mm pixels: the 2.8 mm working grid's mask agrees with the full-resolution one."""
    from monai_cidir.transforms.lung_threshold import WORKING_SPACING_MM

    image, truth = phantom_item["fixed_image"], phantom_item["fixed_mask"][0].numpy() > 0
    hu = np.repeat(np.repeat(image[0].numpy(), 3, axis=0), 3, axis=1)  # 2.8 -> 0.93 mm pixels
    affine = image.affine.numpy() @ np.diag([1 / 3, 1 / 3, 1.0, 1.0])
    affine[:3, 3] = image.affine.numpy()[:3, 3] - image.affine.numpy()[:3, :2] @ np.array([1 / 3, 1 / 3])
    fine_truth = np.repeat(np.repeat(truth, 3, axis=0), 3, axis=1)
    working = threshold_lung_mask(hu, affine)
    full = threshold_lung_mask(hu, affine, working_spacing_mm=None)
    assert WORKING_SPACING_MM == 2.0
    assert _dice(working, full) >= 0.98  # measured 0.99
    assert _dice(working, fine_truth) >= 0.97 and _dice(full, fine_truth) >= 0.97


# ----------------------------------------------------------------------------------------------
# real scans (../shared)
# ----------------------------------------------------------------------------------------------
def _load(path):
    from monai.transforms import LoadImage

    return LoadImage(image_only=True, ensure_channel_first=True)(str(path))


@pytest.fixture(scope="module")
def chest(shared_dir):
    image = _load(shared_dir / "data" / "chest_ct.nii.gz")
    hu, affine = image[0].numpy(), image.affine.numpy()
    return hu, affine, threshold_lung_mask(hu, affine)


def test_chest_ct_crops_agree_with_the_whole_scan(chest):
    """Every crop that cuts the lungs (each side, both lungs halved, one lung, a corner): Dice >= 0.97 in the crop."""
    hu, affine, full = chest
    dice = {}
    for name, sl in _lung_cuts(full).items():
        sub, aff = _crop(hu, affine, sl)
        dice[name] = _dice(threshold_lung_mask(sub, aff), full[sl])
    assert min(dice.values()) >= 0.97, dice  # measured 0.982-1.000


def test_chest_ct_lung_bases_with_bowel_gas(chest):
    """The lowest slices: lung bases beside stomach/bowel gas; the gas is never lung, too little lung is said."""
    hu, affine, full = chest
    near_lung = ndimage.binary_dilation(full, iterations=3)
    for top in (8, 10, 14):
        sub, aff = _crop(hu, affine, (slice(None), slice(None), slice(0, top)))
        gas = (sub < -600) & ~near_lung[..., :top]
        labels, _ = ndimage.label(gas)
        at_border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))
        inner_gas = gas & ~np.isin(labels, at_border)  # gas inside the body, not outside air
        assert inner_gas.sum() > 300  # the scan really holds gas there
        mask = threshold_lung_mask(sub, aff)
        assert not (mask & inner_gas).any()
        report = lung_mask_report(_metatensor(mask, aff), _metatensor(sub, aff))
        assert report.plausible == (report.volume_ml >= 300.0), report  # 33 / 114 mL flagged, 495 mL fine


def test_abdomen_bowel_gas_is_never_lung(shared_dir):
    """Lung bases only, gas-filled bowel: the mask holds no bowel gas and the check stops with a clear error."""
    image = _load(shared_dir / "data" / "abdomen_ct_3mm.nii.gz")
    hu = image[0].numpy()
    mask = LungMask(backend="threshold")(image)
    m = mask[0].numpy() > 0
    # bowel gas: air components inside the body that reach below the lung bases (the lowest 80% of the slices)
    air = hu < -500
    labels, _ = ndimage.label(air)
    at_border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))
    low = np.unique(labels[..., : int(0.8 * hu.shape[2])])
    bowel = np.isin(labels, np.setdiff1d(low, np.concatenate([at_border, [0]])))
    assert bowel.sum() * 27e-3 > 300  # mL of gas in view
    assert not (m & bowel).any()
    assert m[..., : int(0.85 * hu.shape[2])].sum() == 0  # nothing low in the abdomen
    with pytest.raises(LungMaskError, match=r"abdomen_ct_3mm\.nii\.gz.*mL of lung, expected at least 300 mL"):
        CheckLungMask()(mask, image)


@pytest.mark.parametrize("scan", ["baseline", "followup"])
def test_real_lung_pair_one_lung_touching_the_border(shared_dir, scan):
    """One lung in view, cut by the crop, -2048 padding: a plausible mask of that lung (was empty)."""
    image = _load(shared_dir / "data" / "real_lung_pair" / f"{scan}.mha")
    hu = image[0].numpy()
    mask = LungMask(backend="threshold")(image)
    m = mask[0].numpy() > 0
    report = lung_mask_report(mask, image)
    assert report.plausible, report.problems
    assert 2500.0 < report.volume_ml < 5000.0  # measured 3332 / 3947 mL (one large lung)
    assert len(report.components_ml) == 1 and report.border_sides  # one lung, cut by the field of view
    assert not (m & (hu <= -1500)).any()
    # outside air (connected to the slices' corners) is not lung
    labels, _ = ndimage.label((hu < -900) & (hu > -1500))
    outside = np.isin(labels, np.setdiff1d(labels[[0, -1]][:, [0, -1]], [0]))
    assert outside.sum() > 10000 and not (m & outside).any()


def _metatensor(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.asarray(array, dtype=np.float32)[None]), affine=torch.as_tensor(affine))
