"""The lung-mask plausibility report: numbers against closed forms, and what happens to an implausible mask."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import affine_from_spacing
from monai_cidir.transforms import CheckLungMask, CheckLungMaskd, LungMask, LungMaskError, lung_mask_report

SPACING = (2.0, 2.5, 4.0)
SHAPE = (60, 50, 40)


def _scene(lung_hu: float = -850.0, direction=None, box=(slice(10, 30), slice(10, 40), slice(5, 35))):
    """A body (40 HU) in outside air (-1000 HU) with one box-shaped 'lung' of ``lung_hu``; returns (image, mask)."""
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[4:-4, 4:-4, :] = 40.0
    hu[box] = lung_hu
    mask = np.zeros(SHAPE, dtype=np.float32)
    mask[box] = 1.0
    affine = torch.as_tensor(affine_from_spacing(SPACING, (10.0, -20.0, 30.0), direction))
    meta = {"filename_or_obj": "/data/p1/inhale.nii.gz"}
    return MetaTensor(torch.from_numpy(hu[None]), affine=affine, meta=meta), MetaTensor(torch.from_numpy(mask[None]), affine=affine.clone())


def test_report_numbers_match_closed_forms():
    image, mask = _scene()
    r = lung_mask_report(mask, image)
    voxel_ml = np.prod(SPACING) / 1000.0
    assert r.volume_ml == pytest.approx(20 * 30 * 30 * voxel_ml)  # 1440 mL
    assert r.components_ml == [pytest.approx(20 * 30 * 30 * voxel_ml, abs=0.05)]
    # bounding box of the voxel centres: origin + index * spacing
    assert r.bbox_mm == [[10.0 + 10 * 2.0, -20.0 + 10 * 2.5, 30.0 + 5 * 4.0], [10.0 + 29 * 2.0, -20.0 + 39 * 2.5, 30.0 + 34 * 4.0]]
    assert r.border_fraction == 0.0 and r.border_sides == []
    assert r.median_hu == -850.0 and r.air_hu == -1000.0
    assert r.plausible and r.source == "given" and r.image == "/data/p1/inhale.nii.gz"


@pytest.mark.parametrize(
    "direction, low_z_side",
    [(None, "I"), (np.diag([-1.0, -1.0, 1.0]), "I"), (np.diag([1.0, 1.0, -1.0]), "S")],
)
def test_border_fraction_and_sides(direction, low_z_side):
    """A lung cut at the array's first z face: share of its surface on that face, named in anatomy."""
    box = (slice(10, 30), slice(10, 40), slice(0, 30))
    image, mask = _scene(direction=direction, box=box)
    r = lung_mask_report(mask, image)
    surface = 20 * 30 * 30 - 18 * 28 * 28  # voxels of the box with a face outside it (border counts as outside)
    on_face = 20 * 30  # the box's z = 0 layer lies on the array's face
    assert r.border_fraction == pytest.approx(on_face / surface)
    assert r.border_sides == [low_z_side]


@pytest.mark.parametrize(
    "lung_hu, volume_box, expected",
    [
        (-990.0, None, "within 40 HU of this scan's air"),  # gas, at the level of the outside air
        (-100.0, None, "is soft tissue"),  # not aerated
        (-850.0, (slice(10, 15), slice(10, 15), slice(5, 15)), "mL of lung, expected at least 300 mL"),
    ],
)
def test_implausible_masks_are_named(lung_hu, volume_box, expected):
    kwargs = {"box": volume_box} if volume_box else {}
    image, mask = _scene(lung_hu=lung_hu, **kwargs)
    r = lung_mask_report(mask, image)
    assert not r.plausible and any(expected in p for p in r.problems), r.problems


def test_empty_mask_and_grid_mismatch():
    image, mask = _scene()
    empty = MetaTensor(torch.zeros_like(mask.as_tensor()), affine=mask.affine.clone())
    assert lung_mask_report(empty, image).problems == ["the mask is empty"]
    with pytest.raises(ValueError, match="expected the same grid"):
        lung_mask_report(mask, MetaTensor(torch.zeros(1, 5, 5, 5), affine=image.affine.clone()))


def test_computed_implausible_mask_stops_with_the_image_named():
    image, _ = _scene(lung_hu=-990.0)  # only gas-like air inside the body
    computed = LungMask(backend="threshold")(image)
    assert computed.meta["lung_mask_backend"] == "threshold"
    with pytest.raises(LungMaskError, match=r"/data/p1/inhale\.nii\.gz \(computed \(threshold\)\).*aerated lung.*datalist"):
        CheckLungMask()(computed, image)


def test_given_implausible_mask_warns_and_is_kept(caplog):
    image, mask = _scene(lung_hu=-100.0)
    with caplog.at_level(logging.WARNING, logger="monai_cidir.transforms"):
        out = CheckLungMask()(mask, image)
    assert out is mask and out.meta["lung_mask_report"]["plausible"] is False
    assert any(rec.levelno == logging.WARNING and "implausible lung mask of /data/p1/inhale.nii.gz (given)" in rec.message for rec in caplog.records)
    with pytest.raises(LungMaskError):
        CheckLungMask(on_implausible="raise")(mask, image)


def test_dictionary_twin_checks_each_mask_with_its_image():
    image, mask = _scene()
    small_image, small_mask = _scene(box=(slice(10, 12), slice(10, 12), slice(5, 7)))
    item = {"name": "p1", "fixed_image": image, "fixed_mask": mask, "moving_image": small_image, "moving_mask": small_mask}
    out = CheckLungMaskd(("fixed_mask", "moving_mask"), on_implausible="warn")(item)
    assert out["fixed_mask"].meta["lung_mask_report"]["plausible"] is True
    assert out["moving_mask"].meta["lung_mask_report"]["plausible"] is False
    with pytest.raises(ValueError, match="must pair with keys"):
        CheckLungMaskd(("fixed_mask", "moving_mask"), image_keys="fixed_image")
    with pytest.raises(ValueError, match="on_implausible"):
        CheckLungMask(on_implausible="ignore")


def test_report_on_a_fine_grid_with_padding_matches_the_whole_array_measures():
    """0.9 mm pixels (the air level is found on the working grid) and a lung cut by the reconstruction circle's
    padding and the first z face: the report's crop gives the measures of the whole array."""
    from monai_cidir.transforms.lung_quality import _surface_on_border

    shape, spacing = (90, 80, 30), (0.9, 0.9, 2.0)
    rng = np.random.default_rng(0)
    hu = (np.full(shape, -1000.0) + rng.normal(0, 10, shape)).astype(np.float32)
    hu[10:-10, 10:-10, :] = 40.0
    mask = np.zeros(shape, dtype=bool)
    mask[20:50, 15:60, 0:20] = True
    hu[mask] = -850.0
    hu[:, 55:, :] = -2048.0  # padding cuts the lung's far side
    mask[:, 55:, :] = False
    affine = torch.as_tensor(affine_from_spacing(spacing))
    image = MetaTensor(torch.from_numpy(hu[None]), affine=affine)
    r = lung_mask_report(MetaTensor(torch.from_numpy(mask[None].astype(np.float32)), affine=affine.clone()), image)
    expected, _ = _surface_on_border(mask, hu > -1500.0)
    assert r.border_fraction == pytest.approx(expected) and expected > 0.1
    assert r.border_sides == ["I"]
    outside = np.ones(shape, dtype=bool)
    outside[10:-10, 10:-10, :] = False
    outside[:, 55:, :] = False
    assert abs(r.air_hu - float(np.median(hu[outside]))) < 1.0  # the outside air's median, within 1 HU
    assert r.median_hu == -850.0
