"""Image similarity losses on intensities sampled at points."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from monai.utils import LossReduction

from monai_cidir.losses.functional import _as_reduction, global_ncc

__all__ = ["GlobalNCCLoss"]


class GlobalNCCLoss(_Loss):
    """Negative global normalised cross-correlation over the sampled points (as IDIR).

    ``loss = -mean((f - mean f)(m - mean m)) / (std_f * std_m + eps)``, computed over the last
    dimension, i.e. over all points of one batch at once (not windowed). Constant inputs give
    ``0`` with finite gradients (see :func:`monai_cidir.losses.functional.global_ncc`).
    Minimum ``-1`` when the moving values are an increasing affine function of the fixed ones.

    Args:
        eps: added to ``std_f * std_m`` (absolute, squared intensity units); default ``1e-6``.
        reduction: how the per-row losses of a ``(B, N)`` input are combined: ``"mean"``
            (default), ``"sum"`` or ``"none"`` (shape ``(B,)``; a 0-d tensor for an ``(N,)`` input).

    Example::

        >>> x = torch.linspace(0, 1, 100)
        >>> float(GlobalNCCLoss()(x, 2 * x + 1))  # doctest: +ELLIPSIS
        -0.99999...
    """

    def __init__(self, eps: float = 1e-6, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=_as_reduction(reduction).value)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, found {eps}")
        self.eps = float(eps)

    def forward(self, fixed_values: torch.Tensor, moving_values: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            fixed_values: fixed-image intensities at the points, ``(N,)`` or ``(B, N)``.
            moving_values: moving-image intensities at the mapped points, same shape.

        Returns:
            the reduced loss (see ``reduction``).

        Raises:
            ValueError: when the shapes differ.
        """
        loss = -global_ncc(fixed_values, moving_values, eps=self.eps)
        if self.reduction == LossReduction.MEAN.value:
            return loss.mean()
        if self.reduction == LossReduction.SUM.value:
            return loss.sum()
        return loss
