"""Target registration error (TRE) of landmark pairs, in world millimetres."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from monai.utils import convert_to_tensor

from monai.metrics import CumulativeIterationMetric

from monai_cidir.coordinates import CoordinateMapping

__all__ = ["TargetRegistrationError", "target_registration_error", "snap_to_voxel", "as_coordinate_mapping", "summarize"]

GridLike = Union[CoordinateMapping, torch.Tensor, np.ndarray]

_STATISTICS = ("mean", "std", "median", "max", "min", "p<q> (percentile q, e.g. p95)")


def as_coordinate_mapping(grid: GridLike) -> CoordinateMapping:
    """Turn what describes an image grid into a :class:`~monai_cidir.coordinates.CoordinateMapping`.

    Args:
        grid: a ``CoordinateMapping``; a channel-first MetaTensor ``(C, X, Y, Z)`` (its ``affine``);
            or a 4x4 index-to-world affine (RAS mm), array or tensor. Only the index <-> world
            part of the mapping is used for snapping, so an affine alone is enough.

    Returns:
        the mapping.

    Raises:
        ValueError: when ``grid`` is none of these.
    """
    if isinstance(grid, CoordinateMapping):
        return grid
    if hasattr(grid, "affine") and getattr(grid, "ndim", 0) == 4:
        return CoordinateMapping.from_image(grid)
    affine = grid.detach().cpu() if isinstance(grid, torch.Tensor) else np.asarray(grid, dtype=np.float64)
    if tuple(affine.shape) != (4, 4):
        raise ValueError(
            "expected the moving image's grid as a CoordinateMapping, a channel-first MetaTensor or a "
            f"4x4 index-to-world affine; found {type(grid).__name__} of shape {tuple(getattr(grid, 'shape', ()))}"
        )
    # the spatial shape only sets the normalised frame, which snapping does not use
    return CoordinateMapping(affine, (2, 2, 2))


def snap_to_voxel(points: torch.Tensor, grid: GridLike) -> torch.Tensor:
    """Move world points to the centre of the nearest voxel of ``grid`` (the DIR-LAB convention).

    The rounding happens in ``grid``'s continuous index space (``floor(index + 0.5)``, so exact
    halves go up), then the points are mapped back to world millimetres.

    Args:
        points: world RAS mm, ``(..., 3)``.
        grid: the moving image's grid, see :func:`as_coordinate_mapping`.

    Returns:
        the snapped points, same shape and dtype.
    """
    mapping = as_coordinate_mapping(grid)
    index = mapping.world_to_index(points.to(torch.float64))
    return mapping.index_to_world(torch.floor(index + 0.5)).to(points.dtype)


def target_registration_error(
    pred: torch.Tensor, target: torch.Tensor, snap_grid: GridLike | None = None
) -> torch.Tensor:
    """Euclidean distances (mm) between predicted and target landmark positions.

    Args:
        pred: predicted positions (e.g. fixed landmarks pushed through the transform),
            world RAS mm, ``(..., N, 3)``.
        target: target positions (the moving image's landmarks), same shape.
        snap_grid: when given, ``pred`` is first snapped to the nearest voxel of this grid
            (the moving image), see :func:`snap_to_voxel`.

    Returns:
        the distances, ``(..., N)``, float64.

    Raises:
        ValueError: when the shapes differ or the last dimension is not 3.
    """
    pred = _as_points(pred, "y_pred").to(torch.float64)
    target = _as_points(target, "y").to(torch.float64)
    if pred.shape != target.shape:
        raise ValueError(
            f"predicted and target landmarks must have the same shape (..., N, 3); "
            f"found {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if snap_grid is not None:
        pred = snap_to_voxel(pred, snap_grid)
    return torch.linalg.vector_norm(pred - target, dim=-1)


def summarize(values: torch.Tensor, statistic: str) -> torch.Tensor:
    """One statistic of a 1-D tensor: ``mean``, ``std`` (population, ddof=0), ``median``, ``max``, ``min``
    or ``p<q>`` (the q-th percentile, linear interpolation as numpy's default), as a 0-d tensor.

    Raises:
        ValueError: for an unknown statistic or an empty tensor.
    """
    values = values.reshape(-1).to(torch.float64)
    if values.numel() == 0:
        raise ValueError("no values to aggregate: call the metric on some data first")
    if statistic == "mean":
        return values.mean()
    if statistic == "std":
        return values.std(correction=0)
    if statistic == "median":
        return torch.quantile(values, 0.5)
    if statistic == "max":
        return values.max()
    if statistic == "min":
        return values.min()
    if statistic.startswith("p"):
        try:
            q = float(statistic[1:])
        except ValueError:
            q = -1.0
        if 0.0 <= q <= 100.0:
            return torch.quantile(values, q / 100.0)
    raise ValueError(f"unknown statistic {statistic!r}; expected one of {_STATISTICS}")


def _as_points(x: Any, name: str) -> torch.Tensor:
    x = convert_to_tensor(x, track_meta=False)
    if x.ndim < 2 or x.shape[-1] != 3:
        raise ValueError(f"{name}: expected landmark positions of shape (N, 3) or (B, N, 3), found {tuple(x.shape)}")
    return x.detach()


class TargetRegistrationError(CumulativeIterationMetric):
    """Target registration error of landmark pairs: each case's mean distance in world mm.

    ``metric(y_pred, y)`` takes the predicted positions of the landmarks (the fixed image's
    landmarks mapped by the registration, ``p + u(p)``) and their target positions (the moving
    image's landmarks), both ``(B, N, 3)``, ``(N, 3)`` (one case) or a list of per-case ``(N_b, 3)``,
    in world RAS mm; it returns each case's mean TRE ``(B, 1)`` and accumulates. Without a
    registration (``y_pred`` = fixed landmarks) it gives the TRE before registration.

    Aggregation, ``aggregate(statistic=None, over=None)``:

    * ``over="cases"`` (default): the statistic of the per-case mean TREs, so the default
      ``aggregate()`` is the mean over cases (the DIR-LAB cohort number);
    * ``over="landmarks"``: the statistic of all landmark distances pooled (for one case: its
      mean, SD, 95th percentile, ... over its landmarks, as DIR-LAB tables report).
    * ``statistic``: ``"mean"``, ``"std"`` (population SD, ddof=0, which reproduces the
      literature's DIR-LAB initial SDs), ``"median"``, ``"max"``, ``"min"`` or ``"p<q>"``
      (e.g. ``"p95"``; linear interpolation). :meth:`statistics` returns all of them as a dict.

    Snapped TRE (``snap=True``): the predicted position is rounded to the nearest voxel centre
    of the moving image (in its index space, via ``CoordinateMapping``; halves round up) before
    the distance is taken, the DIR-LAB convention; it needs the moving image's grid, given at
    construction (``moving_grid``) or per call (``metric(y_pred, y, moving_grid=...)``, one grid
    or a sequence with one per case).

    Buffers (``get_buffer()``, also the handler's ``metric_details``): ``[case_means (B, 1),
    landmark_distances (M, 1)]``.

    Args:
        snap: snap the predicted landmarks to the moving image's voxels.
        moving_grid: the moving image's grid: ``CoordinateMapping``, channel-first MetaTensor,
            or its 4x4 index-to-world affine (RAS mm).
        statistic: the default statistic of :meth:`aggregate`.
        over: the default population of :meth:`aggregate`: ``"cases"`` or ``"landmarks"``.

    Example::

        >>> tre = TargetRegistrationError()
        >>> fixed = torch.zeros(1, 4, 3)
        >>> moving = fixed + torch.tensor([3.0, 4.0, 0.0])
        >>> tre(fixed, moving)
        tensor([[5.]], dtype=torch.float64)
        >>> float(tre.aggregate())
        5.0
    """

    def __init__(
        self,
        snap: bool = False,
        moving_grid: GridLike | None = None,
        statistic: str = "mean",
        over: str = "cases",
    ) -> None:
        super().__init__()
        self.snap = bool(snap)
        self.moving_grid = None if moving_grid is None else as_coordinate_mapping(moving_grid)
        summarize(torch.zeros(1), statistic)  # validate early
        self.statistic = statistic
        self.over = self._check_over(over)

    @staticmethod
    def _check_over(over: str) -> str:
        if over not in ("cases", "landmarks"):
            raise ValueError(f"over must be 'cases' or 'landmarks', found {over!r}")
        return over

    def _grids(self, moving_grid: Any, num_cases: int) -> list[CoordinateMapping | None]:
        if not self.snap:
            return [None] * num_cases
        grid = self.moving_grid if moving_grid is None else moving_grid
        if grid is None:
            raise ValueError(
                "snap=True needs the moving image's grid: pass moving_grid (a CoordinateMapping, a "
                "MetaTensor or its 4x4 affine) to TargetRegistrationError(...) or to the call"
            )
        if isinstance(grid, (list, tuple)):
            if len(grid) != num_cases:
                raise ValueError(f"got {len(grid)} moving grids for {num_cases} cases")
            return [as_coordinate_mapping(g) for g in grid]
        if isinstance(grid, (torch.Tensor, np.ndarray)) and not hasattr(grid, "affine") and grid.ndim == 3:
            if grid.shape[0] != num_cases:
                raise ValueError(f"got {grid.shape[0]} moving affines for {num_cases} cases")
            return [as_coordinate_mapping(g) for g in grid]
        mapping = as_coordinate_mapping(grid)
        return [mapping] * num_cases

    def _case_distances(self, y_pred: Any, y: Any, moving_grid: Any = None) -> list[torch.Tensor]:
        if y is None:
            raise ValueError("TargetRegistrationError needs target landmarks: metric(y_pred, y)")
        if isinstance(y_pred, (list, tuple)) or isinstance(y, (list, tuple)):
            if len(y_pred) != len(y):
                raise ValueError(f"got {len(y_pred)} predicted and {len(y)} target landmark sets")
            preds = [_as_points(p, "y_pred") for p in y_pred]
            targets = [_as_points(t, "y") for t in y]
        else:
            pred, target = _as_points(y_pred, "y_pred"), _as_points(y, "y")
            if pred.shape != target.shape:
                raise ValueError(
                    f"predicted and target landmarks must have the same shape (B, N, 3); "
                    f"found {tuple(pred.shape)} and {tuple(target.shape)}"
                )
            if pred.ndim == 2:
                pred, target = pred[None], target[None]
            if pred.ndim != 3:
                raise ValueError(f"expected landmark positions of shape (N, 3) or (B, N, 3), found {tuple(pred.shape)}")
            preds, targets = list(pred), list(target)
        grids = self._grids(moving_grid, len(preds))
        return [target_registration_error(p, t, g) for p, t, g in zip(preds, targets, grids)]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> list[torch.Tensor]:
        distances = self._case_distances(y_pred, y, kwargs.get("moving_grid"))
        case_means = torch.stack([d.mean() for d in distances])[:, None]
        return [case_means, torch.cat(distances)[:, None]]

    def __call__(  # type: ignore[override]
        self, y_pred: Any, y: Any = None, moving_grid: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        """Compute and accumulate the TRE of a batch of cases.

        Args:
            y_pred: predicted landmark positions, ``(B, N, 3)``, ``(N, 3)`` or a list of ``(N_b, 3)``.
            y: target landmark positions, same layout.
            moving_grid: the moving image grid(s) for ``snap=True`` (overrides the constructor's).

        Returns:
            each case's mean TRE in mm, ``(B, 1)`` float64.

        Raises:
            ValueError: for mismatched shapes or a missing grid when snapping.
        """
        case_means, landmarks = self._compute_tensor(y_pred, y, moving_grid=moving_grid)
        self.extend(case_means, landmarks)
        return case_means

    def aggregate(self, statistic: str | None = None, over: str | None = None) -> torch.Tensor:  # type: ignore[override]
        """One statistic of the accumulated TREs (see the class docstring), a 0-d float64 tensor.

        Raises:
            ValueError: when nothing was accumulated or for an unknown statistic.
        """
        statistic = self.statistic if statistic is None else statistic
        over = self._check_over(self.over if over is None else over)
        buffers = self.get_buffer()
        if buffers is None:
            raise ValueError("no TRE to aggregate: call the metric on some landmarks first")
        case_means, landmarks = buffers
        return summarize(case_means if over == "cases" else landmarks, statistic)

    def statistics(
        self, over: str = "landmarks", percentiles: Sequence[float] = (95.0,)
    ) -> dict[str, float]:
        """All statistics at once: ``mean, std, median, min, max, p<q>...`` and ``count``, as floats.

        Args:
            over: ``"landmarks"`` (default, pooled distances) or ``"cases"`` (per-case means).
            percentiles: the percentiles to include.
        """
        names = ["mean", "std", "median", "min", "max"] + [f"p{q:g}" for q in percentiles]
        out = {name: float(self.aggregate(name, over)) for name in names}
        buffers = self.get_buffer()
        out["count"] = int(buffers[0 if over == "cases" else 1].shape[0])
        return out
