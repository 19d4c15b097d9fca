"""Regularisers of a displacement field, evaluated on its derivatives at sampled points.

They take derivative tensors rather than a field, so they work for any representation
(an INR with exact forward-mode derivatives, finite differences on a grid, ...). Pass
derivatives in millimetres (``CoordinateMapping.jacobian_to_world`` / ``hessian_to_world``)
so a regularisation weight means the same for every voxel size.

Every regulariser's ``forward`` accepts ``weight=``: one non-negative weight per point
(e.g. ``lambda(alpha_n)`` when each point has its own alpha); the ``"mean"`` reduction is
then ``mean_n(weight_n * R_n)`` (weights are not normalised).
"""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from monai.utils import LossReduction

from monai_cidir.losses.functional import (
    _as_reduction,
    bending_energy,
    hyperelastic_terms,
    jacobian_penalty,
    weighted_reduction,
)

__all__ = ["BendingEnergyRegularizer", "JacobianRegularizer", "HyperelasticRegularizer"]


class _PointwiseRegularizer(_Loss):
    def __init__(self, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=_as_reduction(reduction).value)

    def _reduce(self, values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return weighted_reduction(values, weight, self.reduction)


class BendingEnergyRegularizer(_PointwiseRegularizer):
    """Bending energy from exact Hessians: per point ``sum_{i,j,k} H[n, i, j, k]^2``.

    For a symmetric Hessian this is ``sum_i u_i,xx^2 + u_i,yy^2 + u_i,zz^2 + 2 (u_i,xy^2 + u_i,xz^2 + u_i,yz^2)``
    (every mixed term twice), the clean definition; the point values are then reduced.

    Args:
        reduction: ``"mean"`` over points (default), ``"sum"`` or ``"none"`` (per point).

    Example::

        >>> h = torch.zeros(10, 3, 3, 3)
        >>> h[:, 0, 0, 1] = h[:, 0, 1, 0] = 1.0  # u_x = x*y: u_x,xy = 1
        >>> float(BendingEnergyRegularizer()(h))
        2.0
    """

    def forward(self, hessian: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the regulariser.

        Args:
            hessian: ``(..., 3, 3, 3)``, ``[n, i, j, k] = d2u_i / dx_j dx_k`` (1/mm).
            weight: optional per-point weight of shape ``(...)`` (see the module docstring).

        Returns:
            the reduced energy (1/mm^2 for millimetre derivatives).

        Raises:
            ValueError: for a wrongly shaped Hessian or weight.
        """
        return self._reduce(bending_energy(hessian), weight)


class JacobianRegularizer(_PointwiseRegularizer):
    """Jacobian-determinant regulariser: per point ``|det(I + J) - 1|``, then reduced.

    Args:
        reduction: ``"mean"`` over points (default), ``"sum"`` or ``"none"`` (per point).

    Example::

        >>> j = torch.diag(torch.tensor([1.0, 0.0, 0.0])).expand(5, 3, 3)  # x stretched x2
        >>> float(JacobianRegularizer()(j))
        1.0
    """

    def forward(self, jacobian: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the regulariser.

        Args:
            jacobian: displacement Jacobians ``(..., 3, 3)``, ``[n, i, j] = du_i / dx_j``.
            weight: optional per-point weight of shape ``(...)``.

        Returns:
            the reduced penalty (dimensionless).

        Raises:
            ValueError: for a wrongly shaped Jacobian or weight.
        """
        return self._reduce(jacobian_penalty(jacobian), weight)


class HyperelasticRegularizer(_PointwiseRegularizer):
    """Hyperelastic regulariser (Burger, Modersitzki, Ruthotto 2013) on displacement Jacobians.

    With ``phi = I + J``, per point::

        alpha_length * 0.5 * ||J||_F^2
        + alpha_area * sum_{columns c of cof(phi)} max(||c||^2 - 1, 0)^2
        + alpha_volume * (det(phi) - 1)^4 / det(phi)^2

    Rotations cost only the length term; area and volume terms vanish for any rotation.

    Folding: the volume term is infinite at ``det(phi) = 0`` and undefined below. Here it is
    evaluated on ``smooth_clamp_determinant(det, det_epsilon)``: the exact determinant where
    ``det >= det_epsilon`` and, below, a smooth (C1), strictly increasing extension bounded
    below by ``det_epsilon / 2``. Folded points therefore get a large finite penalty (at most
    about 326 for the default ``det_epsilon=0.1``) whose gradient increases ``det``; the
    result and its gradients are finite for every input.

    Args:
        alpha_length: weight of the length term.
        alpha_area: weight of the area term.
        alpha_volume: weight of the volume term.
        det_epsilon: start of the smooth determinant clamp, in (0, 1).
        reduction: ``"mean"`` over points (default), ``"sum"`` or ``"none"`` (per point).

    Example::

        >>> import math
        >>> c, s = math.cos(0.3), math.sin(0.3)
        >>> rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        >>> reg = HyperelasticRegularizer(alpha_length=0.0)
        >>> float(reg((rot - torch.eye(3))[None])) < 1e-12  # area and volume vanish for a rotation
        True
    """

    def __init__(
        self,
        alpha_length: float = 1.0,
        alpha_area: float = 1.0,
        alpha_volume: float = 1.0,
        det_epsilon: float = 0.1,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=reduction)
        for name, value in (("alpha_length", alpha_length), ("alpha_area", alpha_area), ("alpha_volume", alpha_volume)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, found {value}")
        if not 0.0 < det_epsilon < 1.0:
            raise ValueError(f"det_epsilon must be in (0, 1), found {det_epsilon}")
        self.alpha_length = float(alpha_length)
        self.alpha_area = float(alpha_area)
        self.alpha_volume = float(alpha_volume)
        self.det_epsilon = float(det_epsilon)

    def terms(self, jacobian: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted per-point ``length``, ``area`` and ``volume`` terms (for logging), each ``(...)``."""
        length, area, volume = hyperelastic_terms(jacobian, self.det_epsilon)
        return {"length": length, "area": area, "volume": volume}

    def forward(self, jacobian: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the regulariser.

        Args:
            jacobian: displacement Jacobians ``(..., 3, 3)``, ``[n, i, j] = du_i / dx_j``.
            weight: optional per-point weight of shape ``(...)``.

        Returns:
            the reduced energy (dimensionless).

        Raises:
            ValueError: for a wrongly shaped Jacobian or weight.
        """
        length, area, volume = hyperelastic_terms(jacobian, self.det_epsilon)
        values = self.alpha_length * length + self.alpha_area * area + self.alpha_volume * volume
        return self._reduce(values, weight)
