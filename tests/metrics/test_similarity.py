"""Lung NCC: exact alignment gives 1, the same points serve every transform, and the grids go through world mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import affine_from_spacing
from monai_cidir.losses.functional import global_ncc
from monai_cidir.metrics import lung_ncc, mask_points


def _image(fn, shape, spacing, origin):
    affine = affine_from_spacing(spacing, origin)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return MetaTensor(torch.as_tensor(fn(world), dtype=torch.float32)[None], affine=torch.as_tensor(affine))


def _pattern(w):
    return 100.0 * np.sin(w[..., 0] / 7.0) * np.cos(w[..., 1] / 9.0) + 3.0 * w[..., 2]


def test_exact_translation_gives_one_and_identity_less():
    """moving(q) = fixed(q - t) on another grid: the map p -> p + t aligns exactly (linear pattern along the samples)."""
    t = np.array([6.0, -4.0, 10.0])  # whole voxels of the moving grid below
    fixed = _image(_pattern, (30, 28, 20), (2.0, 2.0, 5.0), (0.0, 0.0, 0.0))
    moving = _image(lambda w: _pattern(w - t), (36, 34, 26), (2.0, 2.0, 5.0), (-6.0, -8.0, -5.0))
    mask = MetaTensor(torch.zeros(1, 30, 28, 20), affine=fixed.affine.clone())
    mask[0, 5:25, 5:23, 3:17] = 1.0
    shift = torch.as_tensor(t)
    out = lung_ncc(fixed, moving, mask, {"before": None, "aligned": lambda p: p + shift})
    assert out["aligned"] == pytest.approx(1.0, abs=1e-9)
    assert out["before"] < 0.9
    # the same number as the training NCC on those points
    points, index = mask_points(mask)
    values = fixed[0][index].double()
    assert out["before"] == pytest.approx(float(global_ncc(values, moving[0].double()[tuple(np.array(index) + np.array([[3], [4], [1]]))])), abs=1e-9)


def test_mask_points_are_a_bounded_even_subset():
    mask = MetaTensor(torch.zeros(1, 20, 20, 20), affine=torch.as_tensor(affine_from_spacing((1.0, 2.0, 3.0), (5.0, 0.0, 0.0))))
    mask[0, 2:12, 3:13, 4:14] = 1.0  # 1000 voxels
    points, index = mask_points(mask, max_points=300)
    assert 250 <= len(points) <= 300
    assert torch.allclose(points[0], torch.tensor([5.0 + 2.0, 3 * 2.0, 4 * 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        mask_points(torch.zeros(1, 4, 4, 4))
