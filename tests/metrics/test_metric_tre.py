"""TargetRegistrationError on closed-form landmark sets, a known grid and the DIR-LAB landmark files."""

from __future__ import annotations

import csv
import doctest
import math

import numpy as np
import pytest
import torch

import monai_cidir.metrics.registration_error as registration_error
from monai.data import MetaTensor
from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing
from monai_cidir.metrics import TargetRegistrationError, snap_to_voxel, target_registration_error

DT = torch.float64


def test_identity_gives_tre_before_equal_after():
    g = torch.Generator().manual_seed(0)
    fixed = 100 * torch.rand(2, 30, 3, generator=g, dtype=DT)
    moving = fixed + torch.randn(2, 30, 3, generator=g, dtype=DT) * 4
    zero_displacement = torch.zeros_like(fixed)
    before = TargetRegistrationError()(fixed, moving)
    after = TargetRegistrationError()(fixed + zero_displacement, moving)
    torch.testing.assert_close(before, after)
    expected = np.linalg.norm((fixed - moving).numpy(), axis=-1).mean(axis=1)[:, None]
    np.testing.assert_allclose(before.numpy(), expected, rtol=1e-14)


def test_known_translation():
    fixed = torch.rand(3, 50, 3, dtype=DT) * 200 - 100
    t = torch.tensor([3.0, -4.0, 12.0], dtype=DT)  # |t| = 13 mm
    metric = TargetRegistrationError()
    case_means = metric(fixed, fixed + t)
    assert case_means.shape == (3, 1)
    torch.testing.assert_close(case_means, torch.full((3, 1), 13.0, dtype=DT))
    stats = metric.statistics()
    assert stats["count"] == 150
    for name in ("mean", "median", "min", "max", "p95"):
        assert stats[name] == pytest.approx(13.0, rel=1e-12)
    assert stats["std"] == pytest.approx(0.0, abs=1e-12)
    # a registration that recovers the translation exactly
    metric.reset()
    assert float(TargetRegistrationError()(fixed + t, fixed + t).max()) == 0.0


def test_aggregation_over_cases_and_landmarks_with_unequal_counts():
    ex = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    pred_a = torch.zeros(4, 3, dtype=DT)
    target_a = pred_a + torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)[:, None] * ex
    pred_b = torch.ones(2, 3, dtype=DT)
    target_b = pred_b + 10 * ex
    metric = TargetRegistrationError()
    out = metric([pred_a, pred_b], [target_a, target_b])  # a list of per-case sets
    torch.testing.assert_close(out, torch.tensor([[2.5], [10.0]], dtype=DT))
    landmarks = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 10.0])
    assert float(metric.aggregate()) == pytest.approx(6.25)  # mean over cases
    assert float(metric.aggregate(over="landmarks")) == pytest.approx(landmarks.mean())
    assert float(metric.aggregate("std", over="landmarks")) == pytest.approx(landmarks.std())
    assert float(metric.aggregate("p95", over="landmarks")) == pytest.approx(np.percentile(landmarks, 95))
    assert float(metric.aggregate("median", over="landmarks")) == pytest.approx(np.median(landmarks))
    assert float(metric.aggregate("std")) == pytest.approx(np.std([2.5, 10.0]))
    assert float(metric.aggregate("max")) == 10.0
    case_means, distances = metric.get_buffer()
    assert case_means.shape == (2, 1) and distances.shape == (6, 1)
    # accumulation over calls, then reset
    metric(pred_a[None], target_a[None])
    assert float(metric.aggregate()) == pytest.approx((2.5 + 10.0 + 2.5) / 3)
    metric.reset()
    with pytest.raises(ValueError, match="no TRE"):
        metric.aggregate()
    with pytest.raises(ValueError, match="unknown statistic"):
        TargetRegistrationError(statistic="p101")


def _grid():
    # spacing (2, 3, 5), non-trivial origin, direction: 90 degrees about z and x flipped
    direction = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return affine_from_spacing((2.0, 3.0, 5.0), origin=(10.0, -20.0, 30.0), direction=direction)


def test_snapping_on_a_known_grid():
    affine = _grid()
    mapping = CoordinateMapping(affine, (20, 20, 20))
    index = torch.tensor([[3.4, 5.6, 7.5], [-0.5, -0.6, 0.49], [9.0, 9.0, 9.0]], dtype=DT)
    snapped_index = torch.tensor([[3.0, 6.0, 8.0], [0.0, -1.0, 0.0], [9.0, 9.0, 9.0]], dtype=DT)  # halves go up
    pred = mapping.index_to_world(index)
    target = mapping.index_to_world(snapped_index)
    torch.testing.assert_close(snap_to_voxel(pred, mapping), target)
    # unsnapped: the residual index offset times the spacing (the direction is a rotation/flip)
    residual = (index - snapped_index) * torch.tensor([2.0, 3.0, 5.0], dtype=DT)
    expected = residual.norm(dim=-1)
    torch.testing.assert_close(target_registration_error(pred, target), expected)
    assert float(expected[0]) == pytest.approx(math.sqrt(0.8**2 + 1.2**2 + 2.5**2))
    # snapped: exactly on the target voxels
    image = MetaTensor(torch.zeros(1, 20, 20, 20), affine=torch.as_tensor(affine))
    for grid in (mapping, affine, torch.as_tensor(affine), image):
        metric = TargetRegistrationError(snap=True, moving_grid=grid)
        assert float(metric(pred, target).max()) == pytest.approx(0.0, abs=1e-12)
    # the snapped TRE is the distance of the snapped prediction to the target
    target_off = target + torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    assert float(TargetRegistrationError(snap=True, moving_grid=affine)(pred, target_off)) == pytest.approx(1.0)


def test_snapping_grids_per_call_and_per_case():
    affine_a = affine_from_spacing((1.0, 1.0, 1.0))
    affine_b = affine_from_spacing((4.0, 4.0, 4.0))
    pred = torch.tensor([[[1.4, 0.0, 0.0]], [[1.4, 0.0, 0.0]]], dtype=DT)  # (B=2, N=1, 3)
    target = torch.zeros_like(pred)
    metric = TargetRegistrationError(snap=True)
    with pytest.raises(ValueError, match="moving_grid"):
        metric(pred, target)
    out = metric(pred, target, moving_grid=[affine_a, affine_b])  # 1.4 -> 1.0 mm; 1.4 -> 0 mm
    torch.testing.assert_close(out, torch.tensor([[1.0], [0.0]], dtype=DT))
    out = metric(pred, target, moving_grid=np.stack([affine_b, affine_a]))  # (B, 4, 4)
    torch.testing.assert_close(out, torch.tensor([[0.0], [1.0]], dtype=DT))
    with pytest.raises(ValueError, match="3 moving grids for 2 cases"):
        metric(pred, target, moving_grid=[affine_a] * 3)


def test_input_errors_are_explicit():
    with pytest.raises(ValueError, match=r"\(2, 5, 3\).*\(2, 4, 3\)"):
        TargetRegistrationError()(torch.zeros(2, 5, 3), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"\(N, 3\) or \(B, N, 3\)"):
        TargetRegistrationError()(torch.zeros(5, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="target landmarks"):
        TargetRegistrationError()(torch.zeros(5, 3))


def test_docstring_examples():
    assert doctest.testmod(registration_error).failed == 0


def _dirlab_landmarks(folder, case):
    if case <= 5:
        names = (f"Case{case}_300_T00_xyz.txt", f"Case{case}_300_T50_xyz.txt")
    else:
        names = (f"case{case}_dirLab300_T00_xyz.txt", f"case{case}_dirLab300_T50_xyz.txt")
    return [np.loadtxt(folder / n) - 1.0 for n in names]  # 1-based voxel indices -> 0-based


def test_dirlab_initial_tre_matches_the_literature(shared_dir):
    """Zero displacement on the real DIR-LAB landmark files reproduces the published initial TRE."""
    rows = list(csv.DictReader(open(shared_dir / "data" / "dirlab_cases.tsv"), delimiter="\t"))
    unsnapped, snapped = TargetRegistrationError(), TargetRegistrationError(snap=True)
    for row in rows:
        spacing = [float(row[f"spacing_{a}_mm"]) for a in "xyz"]
        mapping = CoordinateMapping(affine_from_spacing(spacing), [int(row[f"size_{a}"]) for a in "xyz"])
        t00, t50 = (mapping.index_to_world(torch.as_tensor(x)) for x in _dirlab_landmarks(shared_dir / "data" / "dirlab_landmarks", int(row["case"])))
        case_metric = TargetRegistrationError()
        case_metric(t00, t50)
        assert float(case_metric.aggregate()) == pytest.approx(float(row["initial_tre_mean_mm"]), abs=0.006)
        assert float(case_metric.aggregate("std", over="landmarks")) == pytest.approx(float(row["initial_tre_sd_mm"]), abs=0.006)
        unsnapped(t00, t50)
        snapped(t00, t50, moving_grid=mapping)  # landmarks sit on voxel centres: snapping changes nothing
    torch.testing.assert_close(snapped.get_buffer()[1], unsnapped.get_buffer()[1])
    expected = np.mean([float(r["initial_tre_mean_mm"]) for r in rows])
    assert float(unsnapped.aggregate()) == pytest.approx(expected, abs=0.006)  # 8.46 mm over the 10 cases
