"""Image similarity in the fixed lung: does a transform align the pair? Needs no landmarks.

:func:`lung_ncc` is the global NCC (:func:`monai_cidir.losses.functional.global_ncc`, the
training similarity) between the fixed image at the fixed lung's voxel centres and the moving
image read (trilinear, world coordinates) where a transform sends them. The same points serve
every transform, so the values of "before registration", "after the affine" and "after cIDIR"
differ only by the transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from monai.utils import convert_to_numpy, convert_to_tensor

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.losses.functional import global_ncc

__all__ = ["lung_ncc", "mask_points"]


def mask_points(mask, max_points: int = 100_000) -> tuple[torch.Tensor, tuple[np.ndarray, ...]]:
    """World points (float64, RAS mm) of a mask's voxel centres, every k-th in C order up to ``max_points``.

    Args:
        mask: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` MetaTensor with its affine.
        max_points: upper bound on the points (a deterministic, evenly spread subset).

    Returns:
        ``(points (N, 3), index arrays of the chosen voxels)``.

    Raises:
        ValueError: when the mask is empty.
    """
    m = convert_to_numpy(mask).reshape(np.shape(mask)[-3:]) > 0.5
    idx = np.argwhere(m)
    if len(idx) == 0:
        raise ValueError("the lung mask is empty: no points to measure the similarity on")
    step = max(1, int(np.ceil(len(idx) / max_points)))
    idx = idx[::step]
    mapping = CoordinateMapping.from_image(mask)
    return mapping.index_to_world(torch.from_numpy(idx.astype(np.float64))), tuple(idx.T)


@torch.no_grad()
def lung_ncc(
    fixed_image,
    moving_image,
    fixed_mask,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor] | None],
    max_points: int = 100_000,
) -> dict[str, float]:
    """NCC in the fixed lung for each named transform (fixed world point -> moving world point).

    Args:
        fixed_image: fixed MetaTensor ``(1, X, Y, Z)``.
        moving_image: moving MetaTensor (its own grid).
        fixed_mask: fixed lung mask on the fixed grid.
        transforms: ``{name: fn}``, ``fn(points (N, 3) float64 mm) -> moved (N, 3)``; ``None`` is
            the identity (no registration).
        max_points: lung voxels used (every k-th, deterministic).

    Returns:
        ``{name: ncc}`` in [-1, 1].

    Example::

        >>> lung_ncc(fixed, moving, mask, {"before": None, "after": lambda p: model.transform_points(p, 0.3)})
        {'before': 0.41, 'after': 0.93}  # doctest: +SKIP
    """
    points, index = mask_points(fixed_mask, max_points)
    fixed = convert_to_tensor(fixed_image, track_meta=False)
    fixed_values = fixed.reshape(fixed.shape[-3:])[index].double()
    moving_map = CoordinateMapping.from_image(moving_image)
    moving = convert_to_tensor(moving_image, track_meta=False).double()
    moving = moving.reshape(moving.shape[-3:])
    out = {}
    for name, fn in transforms.items():
        moved = points if fn is None else torch.as_tensor(fn(points), dtype=torch.float64).cpu()
        out[name] = float(global_ncc(fixed_values, moving_map.sample(moving, moved)))
    return out
