"""The benchmark's one evaluator (benchmarks/methods.py) on closed-form cases."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.methods import TRECurveHandler, evaluate_registration, folding_fraction, warped_mask_dice  # noqa: E402
from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing  # noqa: E402


def _oblique_affine() -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return affine_from_spacing((1.5, 2.0, 3.0), origin=(-20.0, 10.0, 5.0), direction=rot)


def test_folding_fraction_linear_fields_oblique_grid():
    mapping = CoordinateMapping(_oblique_affine(), (12, 10, 8))
    world = mapping.world_grid(dtype=torch.float64)
    folded = torch.tensor([[-2.0, 0.1, 0.0], [0.0, 0.2, 0.0], [0.3, 0.0, -0.1]], dtype=torch.float64)  # det(I+M) < 0
    smooth = torch.tensor([[0.2, 0.1, 0.0], [0.0, -0.3, 0.1], [0.0, 0.2, 0.4]], dtype=torch.float64)
    assert torch.linalg.det(torch.eye(3, dtype=torch.float64) + folded) < 0
    assert folding_fraction(world @ folded.T, mapping) == 1.0
    assert folding_fraction(world @ smooth.T, mapping, slab=3) == 0.0


def test_folding_fraction_quadratic_field_matches_closed_form():
    # u_x = c * (p_x - x0)^2: det(I + J) = 1 + 2 c (p_x - x0) <= 0 where p_x <= x0 - 1 / (2c).
    mapping = CoordinateMapping(_oblique_affine(), (20, 16, 10))
    world = mapping.world_grid(dtype=torch.float64)
    c, x0 = 0.05, float(world[..., 0].mean())
    field = torch.zeros_like(world)
    field[..., 0] = c * (world[..., 0] - x0) ** 2
    mask = torch.zeros(mapping.spatial_shape, dtype=torch.bool)
    mask[1:-1, 1:-1, 1:-1] = True  # central differences are exact for a quadratic away from the border
    expected = float((world[..., 0][mask] <= x0 - 1 / (2 * c)).double().mean())
    assert 0.05 < expected < 0.95
    assert folding_fraction(field.float(), mapping, mask, slab=4) == pytest.approx(expected, abs=1e-12)


def _box_mask(shape, lo, hi, affine) -> MetaTensor:
    m = torch.zeros(1, *shape)
    m[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1.0
    return MetaTensor(m, affine=torch.as_tensor(affine))


def test_warped_mask_dice_translation_is_exact():
    fixed_affine = affine_from_spacing((2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0))
    moving_affine = affine_from_spacing((2.0, 2.0, 3.0), origin=(-4.0, 2.0, 0.0))  # a different grid
    shape = (16, 14, 10)
    fixed_mask = _box_mask(shape, (4, 4, 2), (10, 9, 7), fixed_affine)  # 6 x 5 x 5 voxels
    # the same box 3 voxels further along x in world space: world x in [14, 24] mm -> moving index 9..14
    moving_mask = _box_mask(shape, (9, 3, 2), (15, 8, 7), moving_affine)
    item = {"fixed_image": fixed_mask, "fixed_mask": fixed_mask, "moving_mask": moving_mask}
    shift = torch.zeros(*shape, 3)
    shift[..., 0] = 6.0  # fixed p -> moving p + 6 mm along x
    assert warped_mask_dice(item, shift, chunk=333) == pytest.approx(1.0)
    # zero field: overlap is 3 of 6 voxels along x -> Dice = 2 * 75 / (150 + 150)
    assert warped_mask_dice(item, torch.zeros(*shape, 3)) == pytest.approx(0.5)


def test_evaluate_registration_tre_statistics():
    affine = affine_from_spacing((2.0, 2.0, 2.0))
    shape = (10, 10, 10)
    mask = _box_mask(shape, (2, 2, 2), (8, 8, 8), affine)
    fixed_lm = torch.rand(50, 3, dtype=torch.float64) * 10 + 4
    moving_lm = fixed_lm + torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    item = {
        "fixed_image": mask, "moving_image": mask, "fixed_mask": mask, "moving_mask": mask,
        "fixed_landmarks": fixed_lm, "moving_landmarks": moving_lm,
    }  # fmt: skip
    out = evaluate_registration(item, moving_lm + torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), torch.zeros(*shape, 3))
    assert out["tre_before_mean"] == pytest.approx(5.0)
    assert out["tre_before_sd"] == pytest.approx(0.0, abs=1e-9)
    assert out["tre_mean"] == pytest.approx(2.0)
    assert out["tre_p95"] == pytest.approx(2.0)
    assert out["dice"] == pytest.approx(1.0) and out["dice_before"] == pytest.approx(1.0)
    assert out["folding"] == 0.0


class _ShiftModel:
    """phi(p) = p + alpha * (1, 0, 0) mm: TRE against p + (0.5, 0, 0) is |alpha - 0.5|."""

    def transform_points(self, points, alpha):
        return torch.as_tensor(points, dtype=torch.float64) + torch.tensor([alpha, 0.0, 0.0], dtype=torch.float64)


def test_tre_curve_handler_values_and_time_limit():
    fixed = torch.zeros(5, 3, dtype=torch.float64)
    handler = TRECurveHandler(fixed, fixed + torch.tensor([0.5, 0.0, 0.0]), alphas=[0.0, 0.5, 1.0], every_seconds=0.0, time_limit=0.2)
    engine = Engine(lambda e, b: time.sleep(0.02))
    engine.model = _ShiftModel()
    handler.attach(engine)
    engine.run(range(1000), max_epochs=1)
    assert handler.stopped_by_time_limit
    assert 0.2 <= handler.train_seconds < 0.6
    assert 5 <= handler.iterations < 30
    assert handler.rows[0]["iteration"] == 0 and handler.rows[-1]["iteration"] == handler.iterations
    assert handler.rows[-1]["tre"] == pytest.approx([0.5, 0.0, 0.5])
    assert [p[2] for p in handler.curve(0.9)] == pytest.approx([0.5] * len(handler.rows))
    times = [p[0] for p in handler.curve(0.5)]
    assert times == sorted(times) and times[0] == 0.0
