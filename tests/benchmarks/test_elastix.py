"""elastix peer runner (benchmarks/peers/elastix.py): geometry (RAS <-> LPS) and a known translation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.peers.elastix import (  # noqa: E402
    elastix_available,
    elastix_parameter_maps,
    metatensor_to_itk,
    register_elastix,
)
from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing, ras_to_lps  # noqa: E402

pytestmark = pytest.mark.skipif(not elastix_available(), reason="itk-elastix not installed (the 'bench' extra)")


def _affine() -> np.ndarray:
    # LPS-like storage as ITK files give it: x and y axes flipped in RAS, anisotropic spacing
    return affine_from_spacing((2.0, 2.2, 3.0), origin=(40.0, 20.0, -10.0), direction=np.diag([-1.0, -1.0, 1.0]))


def test_metatensor_to_itk_geometry_is_lps():
    c, s = np.cos(0.2), np.sin(0.2)
    affine = affine_from_spacing((1.5, 2.0, 3.0), origin=(-20.0, 10.0, 5.0), direction=np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))
    img = MetaTensor(torch.arange(6 * 5 * 4, dtype=torch.float32).reshape(1, 6, 5, 4), affine=torch.as_tensor(affine))
    itk_img = metatensor_to_itk(img)
    import itk

    arr = itk.array_view_from_image(itk_img)  # (Z, Y, X)
    assert arr[3, 2, 1] == img[0, 1, 2, 3]
    index = np.array([1.0, 2.0, 3.0])
    expected = ras_to_lps(affine[:3, :3] @ index + affine[:3, 3])
    assert np.allclose(np.array(itk_img.TransformIndexToPhysicalPoint([1, 2, 3])), expected)


def test_parameter_maps_presets():
    default, lung = elastix_parameter_maps("default"), elastix_parameter_maps("lung", max_iterations=7)
    assert default[0]["Transform"] == ["AffineTransform"] and default[1]["Transform"] == ["BSplineTransform"]
    assert default[1]["Metric"][0] == "AdvancedMattesMutualInformation"
    assert lung[1]["Metric"] == ["AdvancedNormalizedCorrelation", "TransformBendingEnergyPenalty"]
    assert float(lung[1]["FinalGridSpacingInPhysicalUnits"][0]) < float(default[1]["FinalGridSpacingInPhysicalUnits"][0])
    assert lung[0]["MaximumNumberOfIterations"] == ["7"] and lung[1]["MaximumNumberOfIterations"] == ["7"]
    with pytest.raises(ValueError, match="unknown elastix preset"):
        elastix_parameter_maps("fast")


def test_translation_recovered_in_ras():
    from scipy.ndimage import gaussian_filter, map_coordinates

    rng = np.random.default_rng(0)
    shape = (40, 36, 28)
    affine = _affine()
    vol = (gaussian_filter(rng.normal(size=shape), 2.0) * 2000).astype(np.float32)
    fixed = MetaTensor(torch.from_numpy(vol)[None], affine=torch.as_tensor(affine))
    mapping = CoordinateMapping.from_image(fixed)
    t = torch.tensor([3.0, -2.0, 1.5], dtype=torch.float64)  # RAS mm: fixed p corresponds to moving p + t
    grid = mapping.world_grid(dtype=torch.float64).reshape(-1, 3)
    index = mapping.world_to_index(grid - t).numpy().T
    moving_arr = map_coordinates(vol, index, order=3, mode="nearest").reshape(shape).astype(np.float32)
    moving = MetaTensor(torch.from_numpy(moving_arr)[None], affine=torch.as_tensor(affine))
    result = register_elastix(fixed, moving, preset="default", max_iterations=60)
    points = mapping.index_to_world(torch.tensor([[20.0, 18.0, 14.0], [12.0, 10.0, 9.0], [27.0, 25.0, 18.0]]))
    moved = result.transform_points(points)
    # a wrong LPS/RAS flip or the inverse direction would be off by about 2 |t| = 7.8 mm
    err = (moved - (points + t)).norm(dim=1)
    assert err.max() < 0.8 and err.mean() < 0.45
    field = result.displacement_field()
    assert field.shape == (*shape, 3)
    sampled = mapping.sample(field.permute(3, 0, 1, 2), points.float()).T.double()
    assert torch.allclose(points + sampled, moved, atol=1e-3)
    assert result.seconds > 0
