"""Ignite handlers for the registration metrics (thin wrappers, the math lives in ``monai_cidir.metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from monai.handlers import IgniteMetricHandler
from monai.utils import IgniteInfo, min_version, optional_import

from monai_cidir.metrics.jacobian import JacobianDeterminantMetric
from monai_cidir.metrics.registration_error import GridLike, TargetRegistrationError

reinit__is_reduced, _ = optional_import(
    "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "reinit__is_reduced", as_type="decorator"
)

__all__ = ["TargetRegistrationErrorHandler", "JacobianFoldingHandler", "AlphaCurveTRE"]


class TargetRegistrationErrorHandler(IgniteMetricHandler):
    """Landmark TRE (mm) accumulated over an Ignite engine's iterations.

    Wraps :class:`monai_cidir.metrics.TargetRegistrationError`; at the end of the epoch
    ``engine.state.metrics[name]`` holds ``metric.aggregate(statistic, over)`` (the mean over
    cases by default) and, with ``save_details``, ``engine.state.metric_details[name]`` the
    buffers ``[case_means (B, 1), landmark_distances (M, 1)]``.

    ``output_transform`` must turn ``engine.state.output`` into ``(y_pred, y)``, a mapping with
    the keys ``"y_pred"`` and ``"y"`` (Ignite's convention), or ``(y_pred, y, moving_grid)``
    (per-iteration moving grids for snapping), where ``y_pred`` and ``y`` are landmark positions
    ``(B, N, 3)`` in world mm.

    Args:
        snap: snap the predicted landmarks to the moving image's voxels (DIR-LAB convention).
        moving_grid: the moving image's grid for snapping (CoordinateMapping, MetaTensor or 4x4 affine).
        statistic: ``"mean"``, ``"std"``, ``"median"``, ``"max"``, ``"min"`` or ``"p<q>"``.
        over: ``"cases"`` or ``"landmarks"``.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y[, moving_grid])``.
        save_details: store the buffers in ``engine.state.metric_details``.

    Example::

        >>> from ignite.engine import Engine
        >>> data = [(torch.zeros(1, 5, 3), torch.full((1, 5, 3), 2.0))]
        >>> engine = Engine(lambda e, batch: batch)
        >>> TargetRegistrationErrorHandler().attach(engine, "tre")
        >>> round(engine.run(data).metrics["tre"], 6)  # |(2, 2, 2)| = 2 sqrt(3)
        3.464102
    """

    def __init__(
        self,
        snap: bool = False,
        moving_grid: GridLike | None = None,
        statistic: str = "mean",
        over: str = "cases",
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = TargetRegistrationError(snap=snap, moving_grid=moving_grid, statistic=statistic, over=over)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """Accumulate ``(y_pred, y)`` or ``(y_pred, y, moving_grid)``.

        Raises:
            ValueError: when ``output`` has another length.
        """
        if not isinstance(output, (list, tuple)) or len(output) not in (2, 3):
            raise ValueError(
                "TargetRegistrationErrorHandler expects output_transform to return (y_pred, y) or "
                f"(y_pred, y, moving_grid); found {type(output).__name__}"
                + (f" of length {len(output)}" if isinstance(output, (list, tuple)) else "")
            )
        moving_grid = output[2] if len(output) == 3 else None
        self.metric_fn(output[0], output[1], moving_grid=moving_grid)


class JacobianFoldingHandler(IgniteMetricHandler):
    """Folding fraction (``det(I + J) <= threshold``) accumulated over an Ignite engine's iterations.

    Wraps :class:`monai_cidir.metrics.JacobianDeterminantMetric`; ``engine.state.metrics[name]``
    holds ``metric.aggregate(statistic)`` (mean per-case folding fraction by default; also
    ``"det_min"``, ``"det_std"``, ...).

    ``output_transform`` must turn ``engine.state.output`` into the displacement Jacobians
    ``(B, N, 3, 3)``: a tensor, ``(jacobians, None)`` (MONAI's ``(y_pred, y)`` form), a list
    of per-case tensors, or a mapping with the key ``"y_pred"`` (Ignite's convention).

    Args:
        threshold: a point folds when ``det(I + J) <= threshold``.
        statistic: see :class:`~monai_cidir.metrics.JacobianDeterminantMetric`.
        output_transform: maps ``engine.state.output`` to the Jacobians.
        save_details: store the per-case buffers in ``engine.state.metric_details``.

    Example::

        >>> from ignite.engine import Engine
        >>> jac = torch.zeros(1, 4, 3, 3)
        >>> jac[0, 0, 2, 2] = -1.5  # one of four points: det = -0.5
        >>> engine = Engine(lambda e, batch: {"jacobian": batch})
        >>> JacobianFoldingHandler(output_transform=lambda o: o["jacobian"]).attach(engine, "folding")
        >>> engine.run([jac]).metrics["folding"]
        0.25
    """

    required_output_keys = ("y_pred",)

    def __init__(
        self,
        threshold: float = 0.0,
        statistic: str = "folding",
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = JacobianDeterminantMetric(threshold=threshold, statistic=statistic)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        """Accumulate a batch of Jacobians (a tensor, ``(tensor, None)`` or a list of per-case tensors)."""
        if isinstance(output, (list, tuple)) and (len(output) == 1 or (len(output) == 2 and output[1] is None)):
            output = output[0]  # (y_pred,) from a mapping, or MONAI's (y_pred, None)
        self.metric_fn(output)


class AlphaCurveTRE:
    """The landmark TRE (mm) of every alpha the selection scores: the TRE-vs-alpha curve.

    Attached to an :class:`~monai_cidir.engines.AlphaSelectionEvaluator` (as one of its
    ``val_handlers``), it maps the fixed landmarks through the model at each iteration's alpha and
    adds ``tre`` (mean over landmarks, :class:`~monai_cidir.metrics.TargetRegistrationError`) to the
    iteration's output and to its row of the evaluator's curve, so ``alpha_curve.csv`` gets a
    ``tre`` column and the run reports the oracle alpha (the lowest TRE scored) beside the chosen
    one. It only reports: the key metric still chooses.

    Args:
        fixed_landmarks: ``(N, 3)`` world mm (RAS), in the fixed image.
        moving_landmarks: ``(N, 3)`` world mm, the corresponding points in the moving image.

    Example::

        >>> tre = AlphaCurveTRE(item["fixed_landmarks"], item["moving_landmarks"])  # doctest: +SKIP
        >>> evaluator = AlphaSelectionEvaluator(model, item, val_handlers=[tre])  # doctest: +SKIP
        >>> [(r["alpha"], r["tre"]) for r in evaluator.run().rows]  # doctest: +SKIP
    """

    def __init__(self, fixed_landmarks, moving_landmarks) -> None:
        self.fixed = torch.as_tensor(fixed_landmarks, dtype=torch.float64).reshape(-1, 3)
        self.moving = torch.as_tensor(moving_landmarks, dtype=torch.float64).reshape(-1, 3)
        if self.fixed.shape != self.moving.shape or self.fixed.shape[0] == 0:
            raise ValueError(f"AlphaCurveTRE needs as many fixed as moving landmarks (at least one), found {tuple(self.fixed.shape)} and {tuple(self.moving.shape)}")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine) -> None:
        alpha = engine.state.output["alpha"]
        moved = engine.model.transform_points(self.fixed, alpha).to(torch.float64).cpu()
        metric = TargetRegistrationError(over="landmarks")
        metric(moved[None], self.moving[None])
        tre = float(metric.aggregate("mean"))
        engine.state.output["tre"] = tre
        engine.curve.rows[-1]["tre"] = tre
