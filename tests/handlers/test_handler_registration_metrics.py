"""The Ignite handlers report the same numbers as their metrics, on a tiny Engine."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from ignite.engine import Engine

import monai_cidir.handlers.registration_metrics as registration_metrics
from monai_cidir.coordinates import affine_from_spacing
from monai_cidir.handlers import JacobianFoldingHandler, TargetRegistrationErrorHandler
from monai_cidir.metrics import JacobianDeterminantMetric, TargetRegistrationError

DT = torch.float64


def _landmark_batches():
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in (2, 1, 3):  # three iterations of different batch sizes
        fixed = 50 * torch.rand(b, 20, 3, generator=g, dtype=DT)
        moving = fixed + 3 * torch.randn(b, 20, 3, generator=g, dtype=DT)
        batches.append({"pred": fixed, "target": moving})
    return batches


@pytest.mark.parametrize("statistic, over", [("mean", "cases"), ("p95", "landmarks"), ("std", "landmarks")])
def test_tre_handler_matches_metric(statistic, over):
    batches = _landmark_batches()
    engine = Engine(lambda e, batch: batch)
    handler = TargetRegistrationErrorHandler(
        statistic=statistic, over=over, output_transform=lambda o: (o["pred"], o["target"])
    )
    handler.attach(engine, "tre")
    state = engine.run(batches, max_epochs=2)  # reset per epoch: the second epoch's value equals the first's

    metric = TargetRegistrationError()
    for batch in batches:
        metric(batch["pred"], batch["target"])
    assert state.metrics["tre"] == pytest.approx(float(metric.aggregate(statistic, over)), rel=1e-12)
    distances = np.concatenate([np.linalg.norm((b["pred"] - b["target"]).numpy(), axis=-1).ravel() for b in batches])
    if (statistic, over) == ("p95", "landmarks"):
        assert state.metrics["tre"] == pytest.approx(np.percentile(distances, 95), rel=1e-12)
    case_means, landmark_distances = state.metric_details["tre"]
    assert case_means.shape == (6, 1) and landmark_distances.shape == (120, 1)


def test_tre_handler_snaps_with_per_iteration_grids():
    grid = affine_from_spacing((4.0, 4.0, 4.0))
    pred = torch.tensor([[[1.4, 0.0, 9.0]]], dtype=DT)  # snaps to (0, 0, 8)
    target = torch.zeros_like(pred)
    engine = Engine(lambda e, batch: batch)
    TargetRegistrationErrorHandler(snap=True).attach(engine, "tre_snapped")
    TargetRegistrationErrorHandler().attach(engine, "tre")
    state = engine.run([(pred, target, grid)])
    assert state.metrics["tre_snapped"] == pytest.approx(8.0)
    assert state.metrics["tre"] == pytest.approx(float(np.hypot(1.4, 9.0)))
    engine = Engine(lambda e, batch: batch)
    TargetRegistrationErrorHandler(snap=True, moving_grid=grid, output_transform=lambda o: o[:2]).attach(engine, "t")
    assert engine.run([(pred, target, None)]).metrics["t"] == pytest.approx(8.0)


def test_jacobian_handler_matches_metric():
    g = torch.Generator().manual_seed(1)
    batches = [0.7 * torch.randn(b, 30, 3, 3, generator=g, dtype=DT) for b in (2, 3)]
    engine = Engine(lambda e, batch: {"jacobian": batch, "loss": 0.0})
    JacobianFoldingHandler(output_transform=lambda o: o["jacobian"]).attach(engine, "folding")
    JacobianFoldingHandler(statistic="det_min", output_transform=lambda o: (o["jacobian"], None)).attach(engine, "det_min")
    state = engine.run(batches)
    metric = JacobianDeterminantMetric()
    for batch in batches:
        metric(batch)
    dets = torch.cat([(b + torch.eye(3, dtype=DT)).det().reshape(-1) for b in batches])
    per_case = torch.cat([((b + torch.eye(3, dtype=DT)).det() <= 0).double().mean(1) for b in batches])
    assert 0 < state.metrics["folding"] < 1
    assert state.metrics["folding"] == pytest.approx(float(metric.aggregate()), rel=1e-12)
    assert state.metrics["folding"] == pytest.approx(float(per_case.mean()), rel=1e-12)
    assert state.metrics["det_min"] == pytest.approx(float(dets.min()), rel=1e-12)
    assert state.metric_details["folding"][0].shape == (5, 1)


def test_mapping_outputs_and_unexpected_outputs():
    pred = torch.zeros(1, 2, 3, dtype=DT)
    jac = torch.zeros(1, 4, 3, 3, dtype=DT)
    jac[0, :3, 1, 1] = -1.0  # 3 of 4 points collapse: det 0
    engine = Engine(lambda e, batch: {"y_pred": pred, "y": pred + 2.0, "jac": jac})
    TargetRegistrationErrorHandler().attach(engine, "tre")
    JacobianFoldingHandler(output_transform=lambda o: {"y_pred": o["jac"]}).attach(engine, "folding")
    state = engine.run([0])
    assert state.metrics["tre"] == pytest.approx(2 * np.sqrt(3))
    assert state.metrics["folding"] == pytest.approx(0.75)

    engine = Engine(lambda e, batch: batch)
    TargetRegistrationErrorHandler().attach(engine, "tre")
    with pytest.raises(ValueError, match="y_pred"):
        engine.run([{"pred": pred}])
    engine = Engine(lambda e, batch: batch)
    TargetRegistrationErrorHandler().attach(engine, "tre")
    with pytest.raises(ValueError, match=r"\(y_pred, y\)"):
        engine.run([[pred]])


def test_docstring_examples():
    assert doctest.testmod(registration_metrics).failed == 0


def test_alpha_curve_tre_refuses_unpaired_landmarks():
    from monai_cidir.handlers import AlphaCurveTRE

    with pytest.raises(ValueError, match="as many fixed as moving landmarks"):
        AlphaCurveTRE(torch.zeros(5, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="at least one"):
        AlphaCurveTRE(torch.zeros(0, 3), torch.zeros(0, 3))
