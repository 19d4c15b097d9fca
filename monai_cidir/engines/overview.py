"""``registration.png``: the picture a registration user opens first.

Three planes through the fixed lungs (axial and coronal through their centre of mass, sagittal
through the centre of one lung; radiological display), each
shown four ways: fixed and moving *before* registration as a two-colour overlay (fixed magenta,
moving green: aligned anatomy is grey, a misplaced one shows in colour) and their absolute
difference, then the same for fixed and the *warped* moving image. The planes are laid out in
world space over the fixed image's field of view, so the "before" column shows where the moving
scan really lies: a mirrored or shifted scan, or a failed registration, is seen at a glance. The
planes span both scans' world boxes; where one scan is absent the other shows in its own colour
alone, and the difference is dark blue.

Only the planes are sampled (at most ``max_pixels`` per side; ``phi`` evaluated on a 6 mm lattice
of each plane and interpolated between, as the export does outside the lung), so the picture
costs a few seconds whatever the volume size.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_tensor

from monai_cidir.coordinates import CoordinateMapping

__all__ = ["plot_registration", "registration_planes"]

#: (name, world axis fixed by the plane, (row axis, column axis)): rows run top to bottom, columns
#: left to right, both along decreasing RAS (anterior / superior on top, the patient's right on the left)
VIEWS = (("axial", 2, (1, 0)), ("coronal", 1, (2, 0)), ("sagittal", 0, (2, 1)))

WINDOW_HU = (-1000.0, 300.0)
"""Grey window of the overlays."""


def _corners(mapping: CoordinateMapping) -> torch.Tensor:
    return mapping.index_to_world(torch.tensor(list(np.ndindex(2, 2, 2)), dtype=torch.float64) * (torch.tensor(mapping.spatial_shape) - 1))


def _plane_points(
    mappings: tuple[CoordinateMapping, ...], center: torch.Tensor, view: tuple, max_pixels: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """World points (float64, ``(rows * cols, 3)``) of one plane through ``center`` over the world box
    of all the images (so a scan placed away from the other shows beside it), pixels no finer than the
    first image's voxels."""
    _, fixed_axis, (row_axis, col_axis) = view
    corners = torch.cat([_corners(m) for m in mappings])
    lo, hi = corners.min(0).values, corners.max(0).values
    pixel = max(float(mappings[0].spacing.min()), float((hi - lo)[[row_axis, col_axis]].max()) / max_pixels)
    rows = torch.arange(float(hi[row_axis]), float(lo[row_axis]) - 1e-6, -pixel, dtype=torch.float64)
    cols = torch.arange(float(hi[col_axis]), float(lo[col_axis]) - 1e-6, -pixel, dtype=torch.float64)
    pts = center.to(torch.float64).reshape(1, 1, 3).repeat(len(rows), len(cols), 1)
    pts[..., row_axis] = rows[:, None]
    pts[..., col_axis] = cols[None, :]
    return pts.reshape(-1, 3), (len(rows), len(cols))


def _mask_centers(mask, mapping: CoordinateMapping) -> dict[str, torch.Tensor]:
    """World points the planes cross: the mask's centre of mass (axial, coronal) and, for the sagittal
    plane, the centre of the fuller side left or right of it (one lung, not the mediastinum between
    the two). From per-axis sums, no voxel list; the grid's centre without a mask."""
    shape = mapping.spatial_shape
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    side = centre.clone()
    m = None if mask is None else (convert_to_tensor(mask, track_meta=False).reshape(shape) > 0.5).float()
    if m is not None and float(m.sum()) > 0:
        profiles = [m.sum(dim=tuple(b for b in range(3) if b != a)).double() for a in range(3)]
        for a, prof in enumerate(profiles):
            centre[a] = float((prof * torch.arange(shape[a], dtype=torch.float64)).sum() / prof.sum())
        side = centre.clone()
        x = int(torch.argmax(mapping.affine[0, :3].abs()))  # the array axis closest to left-right
        idx = torch.arange(shape[x], dtype=torch.float64)
        halves = [idx <= centre[x], idx > centre[x]]
        prof = profiles[x]
        fuller = max(halves, key=lambda h: float(prof[h].sum()))
        if float(prof[fuller].sum()) > 0:
            side[x] = float((prof[fuller] * idx[fuller]).sum() / prof[fuller].sum())
    world = mapping.index_to_world(centre)
    return {"axial": world, "coronal": world, "sagittal": mapping.index_to_world(side)}


def _read(image, points: torch.Tensor) -> np.ndarray:
    """Trilinear values of an image at world points; NaN outside its field of view."""
    mapping = CoordinateMapping.from_image(image)
    data = convert_to_tensor(image, track_meta=False).float().reshape(mapping.spatial_shape)
    values = mapping.sample(data, points.float()).double()
    index = mapping.world_to_index(points)
    upper = torch.as_tensor(mapping.spatial_shape, dtype=torch.float64) - 0.5
    values[~((index >= -0.5) & (index <= upper)).all(dim=1)] = float("nan")
    return values.numpy()


def registration_planes(
    item: Mapping, transform: Callable[[torch.Tensor], torch.Tensor] | None, max_pixels: int = 320, coarse_mm: float = 6.0
) -> dict[str, dict[str, np.ndarray]]:
    """The three planes of :func:`plot_registration` as arrays.

    Args:
        item: the loaded pair (``fixed_image``, ``moving_image``, ``fixed_mask``).
        transform: ``phi``, world points (float64 ``(N, 3)``) -> their moving positions; ``None``: no "after".
        max_pixels: pixels along a plane's longer side (the pixel is never finer than the fixed voxel).
        coarse_mm: ``transform`` is evaluated on a lattice of the plane this far apart and its
            displacement interpolated bilinearly between (the export's rule outside the lung); 0: every pixel.

    Returns:
        ``{view: {"fixed", "moving", "warped"}}`` of 2-D HU arrays (NaN outside a scan), rows
        top to bottom, columns left to right in radiological display.
    """
    mapping = CoordinateMapping.from_image(item["fixed_image"])
    grids = (mapping, CoordinateMapping.from_image(item["moving_image"]))
    centers = _mask_centers(item.get("fixed_mask"), mapping)
    out = {}
    for view in VIEWS:
        pts, shape = _plane_points(grids, centers[view[0]], view, max_pixels)
        planes = {"fixed": _read(item["fixed_image"], pts), "moving": _read(item["moving_image"], pts)}
        if transform is not None:  # the field where the fixed scan is (it is not defined beyond it)
            moved = _plane_transform(transform, pts, shape, coarse_mm)
            planes["warped"] = _read(item["moving_image"], moved)
            planes["warped"][np.isnan(planes["fixed"])] = np.nan
        out[view[0]] = {k: v.reshape(shape) for k, v in planes.items()}
    return out


def _plane_transform(transform, pts: torch.Tensor, shape: tuple[int, int], coarse_mm: float) -> torch.Tensor:
    """``transform(pts)`` of a plane's points (a regular lattice ``shape``): evaluated on an even lattice
    about ``coarse_mm`` apart over the same corners, and bilinear between."""
    import torch.nn.functional as F

    grid = pts.reshape(*shape, 3)
    d_row = grid[1, 0] - grid[0, 0] if shape[0] > 1 else torch.zeros(3, dtype=pts.dtype)
    d_col = grid[0, 1] - grid[0, 0] if shape[1] > 1 else torch.zeros(3, dtype=pts.dtype)
    pixel = max(float(d_row.norm()), float(d_col.norm()), 1e-6)
    step = int(coarse_mm / pixel) if coarse_mm > 0 else 1
    if step <= 1 or min(shape) < 3:
        with torch.no_grad():
            return torch.as_tensor(transform(pts), dtype=torch.float64)
    n_rows, n_cols = (max(2, -(-(n - 1) // step) + 1) for n in shape)
    r = torch.linspace(0, shape[0] - 1, n_rows, dtype=torch.float64)
    c = torch.linspace(0, shape[1] - 1, n_cols, dtype=torch.float64)
    coarse = (grid[0, 0] + r[:, None, None] * d_row + c[None, :, None] * d_col).reshape(-1, 3)
    with torch.no_grad():
        disp = torch.as_tensor(transform(coarse), dtype=torch.float64) - coarse
    disp = disp.reshape(n_rows, n_cols, 3).permute(2, 0, 1)[None]
    full = F.interpolate(disp, size=shape, mode="bilinear", align_corners=True)[0].permute(1, 2, 0).reshape(-1, 3)
    return pts + full


def _grey(hu: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW_HU
    return np.clip((np.nan_to_num(hu, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def _overlay(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Fixed in magenta, moving in green (equal values: grey; where one scan is absent the other shows
    in its colour alone); dark blue outside both."""
    f, m = _grey(fixed), _grey(moving)
    f[np.isnan(fixed)] = 0.0
    m[np.isnan(moving)] = 0.0
    rgb = np.stack([f, m, f], axis=-1)
    rgb[np.isnan(fixed) & np.isnan(moving)] = (0.0, 0.0, 0.35)
    return rgb


def plot_registration(
    item: Mapping,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    path: str | os.PathLike,
    title: str = "",
    max_pixels: int = 320,
) -> Path:
    """Write ``registration.png``: fixed vs moving before and fixed vs warped moving after, three planes.

    Args:
        item: the loaded pair (``fixed_image``, ``moving_image`` and ``fixed_mask``, whose centre the planes cross).
        transform: ``phi`` (world float64 ``(N, 3)`` -> moving positions), e.g.
            ``lambda p: model.transform_points(p, alpha)``; ``None`` draws the "before" columns only.
        path: the PNG.
        title: figure title (the pair, alpha, Dice and status).
        max_pixels: pixels along a plane's longer side.

    Returns:
        the path written.

    Example::

        >>> plot_registration(item, lambda p: model.transform_points(p, 0.1), "outputs/pair1/registration.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    planes = registration_planes(item, transform, max_pixels)
    stages = [("before", "moving")] + ([("after", "warped")] if transform is not None else [])
    cmap = plt.get_cmap("gray").with_extremes(bad=(0.0, 0.0, 0.35))
    fig, axes = plt.subplots(len(planes), 2 * len(stages), figsize=(3.0 * 2 * len(stages), 3.0 * len(planes) + 0.5), dpi=80, squeeze=False)
    for r, (view, p) in enumerate(planes.items()):
        for c, (stage, key) in enumerate(stages):
            ax_o, ax_d = axes[r, 2 * c], axes[r, 2 * c + 1]
            ax_o.imshow(_overlay(p["fixed"], p[key]), interpolation="nearest")
            ax_o.set_title(f"{view}, {stage}: fixed (magenta) / {key} (green)", fontsize=7)
            ax_d.imshow(np.abs(p["fixed"] - p[key]), cmap=cmap, vmin=0.0, vmax=500.0, interpolation="nearest")
            ax_d.set_title(f"{view}, {stage}: |fixed - {key}| (0-500 HU)", fontsize=7)
            for ax in (ax_o, ax_d):
                ax.axis("off")
    if title:  # wrapped to the figure's width (the "before" half alone is narrow)
        fig.suptitle("\n".join(textwrap.wrap(title, 75 * len(stages))), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.0 * len(planes) + 0.5) if title else 1))
    fig.savefig(path)
    plt.close(fig)
    return path
