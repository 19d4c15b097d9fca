"""Affine pre-alignment: a global affine fitted on NCC over lung-mask points.

cIDIR's INR learns the residual after this affine; :class:`~monai_cidir.engines.model.RegistrationModel`
composes both, so every exported field includes the affine.

Default rule (``affine_prealign="auto"`` in :func:`~monai_cidir.engines.register_patient`): the
affine is always fitted and kept only when it raises the NCC over the fixed lung mask (full
resolution, fixed evaluation points) by at least ``min_improvement`` (0.01) over the identity.
Pairs that are already aligned (DIR-LAB inhale/exhale, the phantom) then usually keep a small
affine that absorbs the global part of the breathing, which does no harm; pairs offset by
centimetres always keep it.

The fit: parameters ``(B, t)`` of ``phi(p) = p + B (p - c) + s t`` (``c``, ``s`` the fixed
mapping's centre and scale, so every parameter is O(1)); initialised with the translation
between the centres of mass of the two lung masks when a moving mask is given; Adam on
``-NCC(fixed(p), moving(phi(p)))`` over fresh mask points each step, coarse to fine over
Gaussian-smoothed copies of both images (sigmas in mm, ``levels``), each on the smallest grid
that holds what is sampled of it (:func:`pyramid_level`: the fixed image over its lung mask's box,
a coarser grid for the large sigmas of a finely sampled scan).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.utils import convert_to_tensor

from monai_cidir.coordinates import CoordinateMapping

__all__ = ["AffinePrealignment", "fit_affine", "smooth_image", "pyramid_level", "mask_center_of_mass"]


@dataclass
class AffinePrealignment:
    """Result of :func:`fit_affine`.

    Attributes:
        matrix: 4x4 float64 world (RAS mm) affine, fixed point -> moving point.
        ncc_identity: NCC over the evaluation points without any transform.
        ncc_affine: NCC over the same points after the affine.
        kept: whether the affine passed the keep rule (``ncc_affine >= ncc_identity + min_improvement``).
        seconds: wall-clock of the fit.
    """

    matrix: torch.Tensor
    ncc_identity: float
    ncc_affine: float
    kept: bool
    seconds: float

    @property
    def translation_mm(self) -> float:
        """Length of the affine's displacement at the fixed frame's origin-free centre (diagnostic)."""
        return float(torch.linalg.norm(self.matrix[:3, 3]))


def smooth_image(image: torch.Tensor, sigma_mm: float, spacing: Sequence[float]) -> torch.Tensor:
    """Gaussian smoothing with a sigma in mm (converted per axis with the voxel spacing).

    Args:
        image: channel-first ``(C, X, Y, Z)``.
        sigma_mm: the Gaussian's standard deviation in mm (0 returns the input).
        spacing: voxel size (mm) per spatial axis.

    Returns:
        the smoothed array (same shape, plain tensor).
    """
    from monai.transforms import GaussianSmooth

    data = convert_to_tensor(image, track_meta=False)
    if sigma_mm <= 0:
        return data
    sigma = tuple(float(sigma_mm) / float(s) for s in spacing)
    out = GaussianSmooth(sigma=sigma)(data.float())
    return convert_to_tensor(out, track_meta=False)


def pyramid_level(
    image: torch.Tensor, mapping: CoordinateMapping, sigma_mm: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, CoordinateMapping]:
    """An image Gaussian-smoothed by ``sigma_mm``, on the smallest grid that holds what will be sampled of it.

    * Axes sampled finer than ``sigma_mm / 3`` are first block-averaged by the integer factor that
      brings them up to it (a Gaussian of 3 voxels or more is well sampled), so a 512 x 512 scan's
      coarse levels cost what a 256 x 256 one's do.
    * With ``mask``, only the mask's bounding box grown by the kernel's reach (4 sigma and two voxels)
      is smoothed: every value trilinear sampling reads at points in the mask is the same as on the
      whole image.

    Args:
        image: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` on ``mapping``'s grid.
        mapping: its grid.
        sigma_mm: the Gaussian's standard deviation (mm); 0 returns the image (cropped to the mask's box).
        mask: the region that will be sampled (optional).

    Returns:
        ``(smoothed (1, ...) tensor, its grid)``: sample it with ``grid.sample(smoothed, points)``.
    """
    from monai_cidir.transforms.lung_threshold import block_mean

    data = convert_to_tensor(image, track_meta=False)
    data = data.reshape(data.shape[-3:])
    spacing = [float(v) for v in mapping.spacing]
    if mask is not None:
        box = mapping.bounding_slices(mask, margin_mm=4.0 * float(sigma_mm) + 2.0 * max(spacing))
        data, mapping = data[box], mapping.region(box)
    factors = [max(1, int(float(sigma_mm) / (3.0 * s) + 1e-6)) for s in spacing]
    if any(f > 1 for f in factors):
        coarse, coarse_affine = block_mean(data.float().numpy(), mapping.affine.numpy(), factors)
        data = torch.from_numpy(coarse)
        mapping = CoordinateMapping(coarse_affine, coarse.shape, center=mapping.center, scale=mapping.scale)
    smoothed = _smooth_in_slabs(data, sigma_mm, mapping.spacing.tolist()) if sigma_mm > 0 else data[None]
    return smoothed, mapping


def _smooth_in_slabs(data: torch.Tensor, sigma_mm: float, spacing: Sequence[float], max_voxels: int = 1 << 24) -> torch.Tensor:
    """:func:`smooth_image` of a ``(X, Y, Z)`` array, slab by slab along the last axis with the kernel's reach
    as overlap (the same values; MONAI's separable filter holds about seven copies of its input at once,
    2.9 GB for a 512 x 512 x 400 scan): returns ``(1, X, Y, Z)``."""
    nz = int(data.shape[-1])
    step = max(1, max_voxels // max(1, int(data.shape[0] * data.shape[1])))
    if step >= nz:
        return smooth_image(data[None], sigma_mm, spacing)
    reach = int(math.ceil(4.0 * float(sigma_mm) / float(spacing[2]))) + 2  # MONAI's kernel: 4 sigma
    out = torch.empty((1, *data.shape), dtype=torch.float32)
    for z0 in range(0, nz, step):
        lo, hi = max(z0 - reach, 0), min(z0 + step + reach, nz)
        out[0, :, :, z0 : min(z0 + step, nz)] = smooth_image(data[None, :, :, lo:hi], sigma_mm, spacing)[0, :, :, z0 - lo : min(z0 + step, nz) - lo]
    return out


def mask_center_of_mass(mask: torch.Tensor, mapping: CoordinateMapping) -> torch.Tensor:
    """World (RAS mm) centre of mass of a 0/1 mask ``(1, X, Y, Z)`` or ``(X, Y, Z)``.

    Raises:
        ValueError: when the mask is empty.
    """
    m = convert_to_tensor(mask, track_meta=False)
    m = m.reshape(m.shape[-3:]) > 0.5
    idx = torch.nonzero(m).to(torch.float64)
    if idx.numel() == 0:
        raise ValueError("the lung mask is empty: cannot compute its centre of mass")
    return mapping.index_to_world(idx.mean(0))


def _ncc(loss_fn, fixed_values, moving_values) -> torch.Tensor:
    return -loss_fn(fixed_values, moving_values)


def _check_levels(levels) -> list[tuple[int, float]]:
    """``levels`` as ``[(steps, sigma_mm), ...]``, or a ValueError naming what was found."""
    try:
        out = [(int(n), float(sigma)) for n, sigma in levels]
        if not out or any(n < 0 or not sigma >= 0 or n != float(m) for (n, sigma), (m, _) in zip(out, levels)):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"levels must be (steps >= 0, sigma_mm >= 0) pairs, coarse to fine, e.g. [(100, 6.0), (40, 0.0)], found {levels!r}") from None
    return out


def fit_affine(
    fixed_image: torch.Tensor,
    moving_image: torch.Tensor,
    sampler: Callable[[int], torch.Tensor],
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    num_points: int = 4096,
    levels: Sequence[tuple[int, float]] = ((100, 6.0), (60, 3.0), (40, 0.0)),
    learning_rate: float = 0.01,
    min_improvement: float = 0.01,
    similarity: torch.nn.Module | None = None,
) -> AffinePrealignment:
    """Fit a global affine (12 parameters) on NCC over points of the fixed lung mask.

    Args:
        fixed_image: fixed MetaTensor ``(1, X, Y, Z)`` (HU, RAS affine).
        moving_image: moving MetaTensor (its own grid).
        sampler: ``sampler(n) -> (n, 3)`` world points in the fixed lung mask (e.g. the
            trainer's point sampler); called afresh for every step.
        fixed_mask: fixed lung mask; with ``moving_mask``, the translation starts from the masks'
            centres of mass (without them, from the identity).
        moving_mask: moving lung mask.
        num_points: points per step.
        levels: the image pyramid, coarse to fine: ``(Adam steps, Gaussian sigma in mm)`` per level.
        learning_rate: Adam's learning rate on the normalised parameters.
        min_improvement: keep rule, see the module docstring.
        similarity: the loss to minimise, ``f(fixed_values, moving_values)`` (default -NCC,
            :class:`~monai_cidir.losses.GlobalNCCLoss`; the trainer passes its
            :class:`~monai_cidir.losses.RegistrationLoss`'s). ``ncc_identity``/``ncc_affine`` report
            minus its value.

    Returns:
        :class:`AffinePrealignment` (``matrix`` is the identity when not kept).

    Raises:
        ValueError: when a level is not ``(steps >= 0, sigma_mm >= 0)``.

    Example::

        >>> sampler = make_point_sampler(item["fixed_mask"], seed=0)
        >>> result = fit_affine(item["fixed_image"], item["moving_image"], sampler, item["fixed_mask"], item["moving_mask"])
        >>> result.kept, result.ncc_identity, result.ncc_affine
    """
    from monai_cidir.losses import GlobalNCCLoss

    levels = _check_levels(levels)
    start = time.perf_counter()
    fmap = CoordinateMapping.from_image(fixed_image)
    mmap = CoordinateMapping.from_image(moving_image)
    c, s = fmap.center.float(), fmap.scale
    loss_fn = GlobalNCCLoss() if similarity is None else similarity
    b = torch.zeros(3, 3, requires_grad=True)
    t = torch.zeros(3)
    if fixed_mask is not None and moving_mask is not None:
        t = ((mask_center_of_mass(moving_mask, mmap) - mask_center_of_mass(fixed_mask, fmap)) / s).float()
    t = t.clone().requires_grad_(True)

    def transform(points):
        return points + (points - c) @ b.T + s * t

    eval_points = sampler(max(num_points, 16384)).float()
    fixed_full = convert_to_tensor(fixed_image, track_meta=False)
    moving_full = convert_to_tensor(moving_image, track_meta=False)

    def evaluate(points_fn) -> float:
        with torch.no_grad():
            fv = fmap.sample(fixed_full, eval_points)
            mv = mmap.sample(moving_full, points_fn(eval_points))
            return float(_ncc(loss_fn, fv, mv))

    ncc_identity = evaluate(lambda p: p)
    optimizer = torch.optim.Adam([b, t], lr=learning_rate)
    for n_iter, sigma in levels:
        if int(n_iter) == 0:
            continue
        fixed_s, fixed_grid = pyramid_level(fixed_full, fmap, sigma, fixed_mask)  # the fixed points lie in its mask
        moving_s, moving_grid = pyramid_level(moving_full, mmap, sigma)
        for _ in range(int(n_iter)):
            points = sampler(num_points).float()
            with torch.no_grad():
                fv = fixed_grid.sample(fixed_s, points)
            loss = loss_fn(fv, moving_grid.sample(moving_s, transform(points)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    ncc_affine = evaluate(transform)
    kept = ncc_affine >= ncc_identity + min_improvement
    matrix = torch.eye(4, dtype=torch.float64)
    if kept:
        bd, td = b.detach().double(), t.detach().double()
        matrix[:3, :3] += bd
        matrix[:3, 3] = -bd @ fmap.center + s * td
    return AffinePrealignment(matrix, ncc_identity, ncc_affine, bool(kept), time.perf_counter() - start)
