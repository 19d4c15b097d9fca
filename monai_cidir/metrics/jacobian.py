"""Folding and Jacobian-determinant statistics of a displacement field."""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import convert_to_tensor

from monai.metrics import CumulativeIterationMetric

from monai_cidir.losses.functional import jacobian_determinant

__all__ = ["JacobianDeterminantMetric"]

_STATISTICS = ("folding", "folded_count", "det_min", "det_max", "det_mean", "det_std")


class JacobianDeterminantMetric(CumulativeIterationMetric):
    """Folding fraction and determinant statistics of ``det(I + J)`` per case.

    ``metric(y_pred)`` takes displacement Jacobians ``(B, N, 3, 3)`` with
    ``[b, n, i, j] = du_i / dx_j`` (any number of point dimensions, e.g. a dense grid
    ``(B, X, Y, Z, 3, 3)``; an ``(N, 3, 3)`` tensor is one case; or a list of per-case tensors)
    and returns each case's folding fraction ``(B, 1)``: the fraction of points with
    ``det(I + J) <= threshold`` (``threshold=0`` by default). The determinant is the closed
    form of :func:`monai_cidir.losses.functional.jacobian_determinant`.

    ``aggregate(statistic=None)``, statistic one of:

    * ``"folding"`` (default): mean over cases of the per-case folding fractions;
    * ``"folded_count"``: the total number of folded points;
    * ``"det_min"``, ``"det_max"``: over all points of all cases;
    * ``"det_mean"``, ``"det_std"``: over all points pooled (population SD, ddof=0).

    :meth:`statistics` returns them all as a dict. Buffers (``get_buffer()``, the handler's
    ``metric_details``), each ``(B, 1)`` per case: ``[folding, count, folded, det_min, det_max,
    det_mean, det_std]``.

    Args:
        threshold: a point folds when ``det(I + J) <= threshold``.
        statistic: the default statistic of :meth:`aggregate`.

    Example::

        >>> jac = torch.zeros(1, 4, 3, 3)
        >>> jac[0, :2, 0, 0] = -2.0  # two of four points mirror x: det = -1
        >>> m = JacobianDeterminantMetric()
        >>> m(jac)
        tensor([[0.5000]], dtype=torch.float64)
        >>> float(m.aggregate("det_min"))
        -1.0
    """

    def __init__(self, threshold: float = 0.0, statistic: str = "folding") -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.statistic = self._check_statistic(statistic)

    @staticmethod
    def _check_statistic(statistic: str) -> str:
        if statistic not in _STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; expected one of {_STATISTICS}")
        return statistic

    @staticmethod
    def _cases(y_pred: Any) -> list[torch.Tensor]:
        def check(x: Any) -> torch.Tensor:
            x = convert_to_tensor(x, track_meta=False).detach()
            if x.ndim < 3 or tuple(x.shape[-2:]) != (3, 3):
                raise ValueError(
                    "expected displacement Jacobians of shape (B, N, 3, 3) or (N, 3, 3), "
                    f"found {tuple(x.shape)}"
                )
            return x

        if isinstance(y_pred, (list, tuple)):
            return [check(x).reshape(-1, 3, 3) for x in y_pred]
        x = check(y_pred)
        if x.ndim == 3:
            return [x]
        return [case.reshape(-1, 3, 3) for case in x]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> list[torch.Tensor]:
        rows = []
        for jac in self._cases(y_pred):
            if jac.shape[0] == 0:
                raise ValueError("a case without points: expected at least one Jacobian per case")
            det = jacobian_determinant(jac.to(torch.float64))
            folded = (det <= self.threshold).sum().to(torch.float64)
            n = float(det.numel())
            rows.append(
                torch.stack(
                    [folded / n, torch.tensor(n, dtype=torch.float64), folded, det.min(), det.max(), det.mean(), det.std(correction=0)]
                )
            )
        table = torch.stack(rows)  # (B, 7)
        return [table[:, k : k + 1] for k in range(table.shape[1])]

    def __call__(self, y_pred: Any, y: Any = None, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Compute and accumulate a batch of cases.

        Args:
            y_pred: displacement Jacobians, see the class docstring.
            y: unused (accepted for the ``(y_pred, y)`` convention of MONAI handlers).

        Returns:
            each case's folding fraction, ``(B, 1)`` float64.

        Raises:
            ValueError: for a wrongly shaped input.
        """
        columns = self._compute_tensor(y_pred)
        self.extend(*columns)
        return columns[0]

    def aggregate(self, statistic: str | None = None) -> torch.Tensor:  # type: ignore[override]
        """One statistic (see the class docstring) as a 0-d float64 tensor.

        Raises:
            ValueError: when nothing was accumulated or for an unknown statistic.
        """
        statistic = self._check_statistic(self.statistic if statistic is None else statistic)
        buffers = self.get_buffer()
        if buffers is None:
            raise ValueError("no Jacobians to aggregate: call the metric on some data first")
        folding, count, folded, det_min, det_max, det_mean, det_std = (b.reshape(-1) for b in buffers)
        if statistic == "folding":
            return folding.mean()
        if statistic == "folded_count":
            return folded.sum()
        if statistic == "det_min":
            return det_min.min()
        if statistic == "det_max":
            return det_max.max()
        total = count.sum()
        mean = (count * det_mean).sum() / total
        if statistic == "det_mean":
            return mean
        second = (count * (det_std.square() + det_mean.square())).sum() / total
        return (second - mean.square()).clamp_min(0.0).sqrt()

    def statistics(self) -> dict[str, float]:
        """All statistics of :meth:`aggregate` and the point ``count``, as floats."""
        out = {name: float(self.aggregate(name)) for name in _STATISTICS}
        out["count"] = int(self.get_buffer()[1].sum())
        return out
