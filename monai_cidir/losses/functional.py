"""Functional core of the similarity and regularisation terms: every formula lives here once.

All functions work on plain tensors with arbitrary leading dimensions, so they apply to a
batch of sampled points ``(N, ...)``, a batch of cases ``(B, N, ...)`` or a dense grid
``(X, Y, Z, ...)`` alike. Derivative conventions (shared with ``monai_cidir.networks``):

* ``jacobian[..., i, j] = du_i / dx_j`` of the displacement ``u`` (dimensionless when ``u`` and
  ``x`` are in the same unit, e.g. millimetres);
* ``hessian[..., i, j, k] = d2u_i / dx_j dx_k`` (1/mm for millimetres);
* the deformation is ``phi(x) = x + u(x)``, so its gradient is ``I + jacobian``.

The module wrappers in :mod:`monai_cidir.losses.image_dissimilarity` and
:mod:`monai_cidir.losses.regularization` add MONAI's ``reduction`` and per-point weights.
"""

from __future__ import annotations

import torch

from monai.utils import LossReduction

__all__ = [
    "global_ncc",
    "deformation_gradient",
    "determinant_3x3",
    "cofactor_matrix",
    "jacobian_determinant",
    "smooth_clamp_determinant",
    "bending_energy",
    "jacobian_penalty",
    "hyperelastic_terms",
    "hyperelastic_energy",
    "weighted_reduction",
]


def _check_matrix_field(x: torch.Tensor, name: str, trailing: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, found {type(x).__name__}")
    if x.ndim < len(trailing) or tuple(x.shape[-len(trailing) :]) != trailing:
        shape = "(..., " + ", ".join(str(t) for t in trailing) + ")"
        raise ValueError(f"{name}: expected a tensor of shape {shape}, found {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, found dtype {x.dtype}")


# --------------------------------------------------------------------------- similarity
def global_ncc(fixed: torch.Tensor, moving: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Global normalised cross-correlation over the last dimension (the sampled points), as in IDIR.

    ``ncc = mean((f - mean f)(m - mean m)) / (std_f * std_m + eps)`` with population standard
    deviations. A constant input gives ``ncc = 0`` with finite (zero) gradients: the standard
    deviations are taken as ``sqrt(max(var, tiny))``, whose gradient is zero below ``tiny``
    instead of the ``inf * 0 = NaN`` of ``sqrt(0)``.

    Args:
        fixed: intensities of the fixed image at the points, shape ``(..., N)``.
        moving: intensities of the warped moving image at the same points, same shape.
        eps: added to the denominator (squared intensity units, absolute); the default is
            negligible for intensities in HU or in [0, 1].

    Returns:
        the NCC per leading index, shape ``fixed.shape[:-1]``, in [-1, 1].

    Raises:
        ValueError: when the shapes differ or there is no point dimension.
    """
    if not isinstance(fixed, torch.Tensor) or not isinstance(moving, torch.Tensor):
        raise TypeError(
            f"global_ncc: expected torch.Tensors, found {type(fixed).__name__} and {type(moving).__name__}"
        )
    if fixed.shape != moving.shape:
        raise ValueError(
            f"global_ncc: fixed and moving values must have the same shape (..., N); "
            f"found {tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    if fixed.ndim < 1 or fixed.shape[-1] < 1:
        raise ValueError(f"global_ncc: expected values of shape (N,) or (B, N) with N >= 1, found {tuple(fixed.shape)}")
    dtype = torch.promote_types(fixed.dtype, moving.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    f = fixed.to(dtype)
    m = moving.to(dtype)
    f = f - f.mean(dim=-1, keepdim=True)
    m = m - m.mean(dim=-1, keepdim=True)
    tiny = torch.finfo(dtype).tiny
    cov = (f * m).mean(dim=-1)
    std_f = (f * f).mean(dim=-1).clamp_min(tiny).sqrt()
    std_m = (m * m).mean(dim=-1).clamp_min(tiny).sqrt()
    return cov / (std_f * std_m + eps)


# --------------------------------------------------------------------------- 3x3 algebra
def deformation_gradient(jacobian: torch.Tensor) -> torch.Tensor:
    """``I + J``: the gradient of ``phi(x) = x + u(x)`` from the displacement Jacobian ``(..., 3, 3)``."""
    _check_matrix_field(jacobian, "jacobian", (3, 3))
    return jacobian + torch.eye(3, dtype=jacobian.dtype, device=jacobian.device)


def determinant_3x3(matrix: torch.Tensor) -> torch.Tensor:
    """Determinant of ``(..., 3, 3)`` matrices by the rule of Sarrus.

    Closed form (a polynomial), so it and its gradient (the cofactor matrix) are exact and
    finite for every input, singular matrices included, unlike the LU-based ``torch.linalg.det``.
    """
    _check_matrix_field(matrix, "matrix", (3, 3))
    a = matrix
    return (
        a[..., 0, 0] * (a[..., 1, 1] * a[..., 2, 2] - a[..., 1, 2] * a[..., 2, 1])
        - a[..., 0, 1] * (a[..., 1, 0] * a[..., 2, 2] - a[..., 1, 2] * a[..., 2, 0])
        + a[..., 0, 2] * (a[..., 1, 0] * a[..., 2, 1] - a[..., 1, 1] * a[..., 2, 0])
    )


def cofactor_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Cofactor matrix ``cof(A) = det(A) A^-T`` of ``(..., 3, 3)`` matrices, defined for singular ``A`` too.

    Column ``j`` of ``cof(A)`` is the cross product of the other two columns of ``A`` (cyclic
    order): ``cof[:, 0] = a1 x a2``, ``cof[:, 1] = a2 x a0``, ``cof[:, 2] = a0 x a1``, so column
    ``j`` is the (oriented) area element spanned by the images of the two other axes.
    """
    _check_matrix_field(matrix, "matrix", (3, 3))
    a0, a1, a2 = matrix[..., :, 0], matrix[..., :, 1], matrix[..., :, 2]
    cols = (torch.linalg.cross(a1, a2, dim=-1), torch.linalg.cross(a2, a0, dim=-1), torch.linalg.cross(a0, a1, dim=-1))
    return torch.stack(cols, dim=-1)


def jacobian_determinant(jacobian: torch.Tensor) -> torch.Tensor:
    """``det(I + J)`` of displacement Jacobians ``(..., 3, 3)`` -> ``(...)``; ``<= 0`` means folding."""
    return determinant_3x3(deformation_gradient(jacobian))


def smooth_clamp_determinant(det: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """A smooth, strictly increasing lower clamp of the determinant, used by the volume term.

    ``det`` itself for ``det >= epsilon``; below, ``epsilon/2 + epsilon/2 * exp(2 (det - epsilon) / epsilon)``,
    which meets ``det`` with the same value and slope at ``epsilon`` (C1), stays above ``epsilon / 2``
    and keeps a positive slope. A folded point (``det <= 0``) therefore gets a large but finite
    volume penalty (at most ``(1 - epsilon/2)^4 / (epsilon/2)^2``, about 326 for the default 0.1)
    whose gradient increases ``det``; the slope decays for ``det << 0``.

    Args:
        det: determinants, any shape.
        epsilon: where the clamp starts; must be in (0, 1).

    Returns:
        the clamped determinants, same shape.
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"det epsilon must be in (0, 1), found {epsilon}")
    # evaluate the exponential branch only where it is used (min() keeps it <= 1 elsewhere)
    low = 0.5 * epsilon * (1.0 + torch.exp(2.0 * (torch.clamp(det, max=epsilon) - epsilon) / epsilon))
    return torch.where(det >= epsilon, det, low)


# --------------------------------------------------------------------------- regularisers
def bending_energy(hessian: torch.Tensor) -> torch.Tensor:
    """Bending energy per point: ``sum_i sum_j sum_k H[..., i, j, k]^2``.

    For a symmetric Hessian this is ``sum_i (u_xx^2 + u_yy^2 + u_zz^2 + 2 u_xy^2 + 2 u_xz^2 + 2 u_yz^2)``:
    every mixed term is counted twice through the full ``(j, k)`` sum.

    Args:
        hessian: ``(..., 3, 3, 3)`` with ``[..., i, j, k] = d2u_i / dx_j dx_k``.

    Returns:
        ``(...)`` per-point energy (units of the Hessian squared, 1/mm^2 in millimetres).
    """
    _check_matrix_field(hessian, "hessian", (3, 3, 3))
    return hessian.square().sum(dim=(-3, -2, -1))


def jacobian_penalty(jacobian: torch.Tensor) -> torch.Tensor:
    """Jacobian-determinant regulariser per point: ``|det(I + J) - 1|`` -> ``(...)``."""
    return (jacobian_determinant(jacobian) - 1.0).abs()


def hyperelastic_terms(
    jacobian: torch.Tensor, det_epsilon: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three per-point terms of the hyperelastic energy (Burger, Modersitzki, Ruthotto 2013).

    With ``phi = I + J``:

    * length: ``0.5 * ||J||_F^2``;
    * area: ``sum over the 3 columns c of cof(phi) of max(||c||^2 - 1, 0)^2``;
    * volume: ``(d - 1)^4 / d^2`` with ``d = smooth_clamp_determinant(det(phi), det_epsilon)``,
      equal to the exact term wherever ``det(phi) >= det_epsilon`` and a large finite penalty
      that pushes ``det`` up where the map folds.

    Args:
        jacobian: displacement Jacobians ``(..., 3, 3)``.
        det_epsilon: see :func:`smooth_clamp_determinant`.

    Returns:
        ``(length, area, volume)``, each of shape ``(...)``.
    """
    phi = deformation_gradient(jacobian)
    length = 0.5 * jacobian.square().sum(dim=(-2, -1))
    cof = cofactor_matrix(phi)
    area = torch.relu(cof.square().sum(dim=-2) - 1.0).square().sum(dim=-1)
    det = smooth_clamp_determinant(determinant_3x3(phi), det_epsilon)
    volume = (det - 1.0).pow(4) / det.square()
    return length, area, volume


def hyperelastic_energy(
    jacobian: torch.Tensor,
    alpha_length: float = 1.0,
    alpha_area: float = 1.0,
    alpha_volume: float = 1.0,
    det_epsilon: float = 0.1,
) -> torch.Tensor:
    """Weighted sum of :func:`hyperelastic_terms` per point -> ``(...)``."""
    length, area, volume = hyperelastic_terms(jacobian, det_epsilon)
    return alpha_length * length + alpha_area * area + alpha_volume * volume


# --------------------------------------------------------------------------- reduction
def _as_reduction(reduction: LossReduction | str) -> LossReduction:
    try:
        return LossReduction(reduction)
    except ValueError:
        raise ValueError(
            f"unsupported reduction {reduction!r}; expected one of {[r.value for r in LossReduction]}"
        ) from None


def weighted_reduction(
    values: torch.Tensor, weight: torch.Tensor | None = None, reduction: LossReduction | str = LossReduction.MEAN
) -> torch.Tensor:
    """Multiply per-point values by an optional per-point weight, then reduce.

    ``"mean"`` is ``mean(weight * values)`` (the weights are not normalised, so a per-point
    ``lambda(alpha_n)`` scales each point's term as in ``mean_n lambda(alpha_n) R_n``);
    ``"sum"`` is the sum; ``"none"`` returns the weighted per-point values.

    Args:
        values: per-point values, any shape.
        weight: ``None``, a scalar, a tensor broadcastable to ``values`` or with as many
            elements as ``values`` (e.g. ``(N, 1)`` for ``(N,)`` values).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        a scalar, or the per-point tensor for ``"none"``.

    Raises:
        ValueError: for a weight that does not match the values or an unknown reduction.
    """
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=values.dtype, device=values.device)
        if weight.shape != values.shape and weight.numel() == values.numel() and weight.ndim > 0:
            weight = weight.reshape(values.shape)
        try:
            torch.broadcast_shapes(weight.shape, values.shape)
        except RuntimeError as e:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not match the per-point values of shape "
                f"{tuple(values.shape)}; expected one weight per point"
            ) from e
        values = values * weight
    reduction = _as_reduction(reduction)
    if reduction == LossReduction.MEAN:
        return values.mean()
    if reduction == LossReduction.SUM:
        return values.sum()
    return values
