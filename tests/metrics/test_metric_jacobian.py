"""JacobianDeterminantMetric on analytic fields with known folding."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import monai_cidir.metrics.jacobian as jacobian_module
from monai_cidir.metrics import JacobianDeterminantMetric

DT = torch.float64


def _jacobians_of(field, points):
    """Displacement Jacobians [n, i, j] = du_i/dx_j by autograd."""
    return torch.stack([torch.autograd.functional.jacobian(field, p) for p in points])


def _quadratic_case(k=2.0, n=41):
    # u(x) = (0.5 k x^2, 0, 0): det(I + J) = 1 + k x; on x in linspace(-1, 1, 41) it folds for x <= -1/k
    x = torch.linspace(-1, 1, n, dtype=DT)
    points = torch.stack([x, 0.3 * torch.ones_like(x), -0.2 * torch.ones_like(x)], dim=-1)
    return _jacobians_of(lambda p: torch.stack([0.5 * k * p[0] ** 2, 0 * p[0], 0 * p[0]]), points)


def test_folding_fraction_and_det_statistics_of_a_known_field():
    jac = _quadratic_case()
    metric = JacobianDeterminantMetric()
    out = metric(jac[None])
    assert out.shape == (1, 1)
    assert float(out) == pytest.approx(11 / 41)  # x = -1, -0.95, ..., -0.5: 11 of 41 points
    stats = metric.statistics()
    assert stats["folded_count"] == 11 and stats["count"] == 41
    assert stats["det_min"] == pytest.approx(-1.0) and stats["det_max"] == pytest.approx(3.0)
    assert stats["det_mean"] == pytest.approx(1.0, abs=1e-14)
    # det = 1 + 2x: SD = 2 SD(x), SD(x)^2 = 0.05^2 * 2 * sum_{k=1}^{20} k^2 / 41 = 0.35
    assert stats["det_std"] == pytest.approx(2 * math.sqrt(0.35), rel=1e-12)
    # a threshold counts nearly-folded points too: det <= 0.55 <=> x <= -0.225 -> 16 points
    assert float(JacobianDeterminantMetric(threshold=0.55)(jac)) == pytest.approx(16 / 41)


def test_identity_and_rigid_fields_do_not_fold():
    metric = JacobianDeterminantMetric()
    metric(torch.zeros(2, 7, 3, 3, dtype=DT))
    c, s = math.cos(0.4), math.sin(0.4)
    rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=DT)
    metric((rot - torch.eye(3, dtype=DT)).expand(1, 5, 3, 3))
    stats = metric.statistics()
    assert stats["folding"] == 0.0 and stats["folded_count"] == 0
    assert stats["det_min"] == pytest.approx(1.0) and stats["det_max"] == pytest.approx(1.0)
    assert stats["det_std"] == pytest.approx(0.0, abs=1e-7)


def test_batches_grids_lists_and_pooled_statistics():
    g = torch.Generator().manual_seed(0)
    case_a = _quadratic_case()  # 11/41 folded
    case_b = 0.6 * torch.randn(5, 4, 3, 3, 3, generator=g, dtype=DT)  # a dense 5x4x3 grid
    metric = JacobianDeterminantMetric()
    out = metric([case_a, case_b])
    det_a = (case_a + torch.eye(3, dtype=DT)).det()
    det_b = (case_b + torch.eye(3, dtype=DT)).det().reshape(-1)
    fold_b = float((det_b <= 0).double().mean())
    torch.testing.assert_close(out, torch.tensor([[11 / 41], [fold_b]], dtype=DT))
    # a batch-first tensor with grid point dimensions gives the same per-case numbers
    torch.testing.assert_close(JacobianDeterminantMetric()(case_b[None]), out[1:])
    both = torch.cat([det_a, det_b]).numpy()
    assert float(metric.aggregate()) == pytest.approx((11 / 41 + fold_b) / 2)
    assert float(metric.aggregate("det_mean")) == pytest.approx(both.mean(), rel=1e-12)
    assert float(metric.aggregate("det_std")) == pytest.approx(both.std(), rel=1e-10)
    assert float(metric.aggregate("det_min")) == pytest.approx(both.min())
    assert float(metric.aggregate("folded_count")) == float((both <= 0).sum())
    assert len(metric.get_buffer()) == 7


def test_errors_and_docstring_examples():
    with pytest.raises(ValueError, match=r"\(B, N, 3, 3\).*\(4, 9\)"):
        JacobianDeterminantMetric()(torch.zeros(4, 9))
    with pytest.raises(ValueError, match="unknown statistic"):
        JacobianDeterminantMetric(statistic="max")
    with pytest.raises(ValueError, match="no Jacobians"):
        JacobianDeterminantMetric().aggregate()
    assert doctest.testmod(jacobian_module).failed == 0
