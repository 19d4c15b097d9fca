"""Classical lung segmentation of a CT in HU (no weights): the ``"threshold"`` backend of ``LungMask``.

Made for what real scans hold, not only whole-chest scans: lungs cut by the field of view on any
side (cropped or zoomed reconstructions, one lung only in view), bowel and stomach gas, the
table, and padding outside the reconstruction circle (-2048, -3024, ...).

The steps of :func:`threshold_lung_mask`:

1. **Padding** (``HU <= padding_hu``) is neither air nor tissue: it is left out of both, and the
   Gaussian smoothing (``smoothing_mm``) is normalised over valid voxels only, so it leaves no
   dark rim at the reconstruction circle.
2. **Air** is ``smoothed HU < threshold_hu``; **tissue** is the rest of the valid voxels.
3. **Outside air**: the body is the largest 3-D tissue component; in every axial slice the
   convex hull of the body marks what is inside the patient. An air component with at most
   half of its voxels inside the hull is outside air (room air, air around the table, between
   the arms). A lung cut by the field of view stays inside the hull (chest wall, mediastinum and
   diaphragm lie around it), so cropping does not remove it; this replaces the usual
   "air touching the border is outside" rule, which removes every cropped lung.
4. **Airways**: the trachea and main bronchi are tracked slice by slice from the top as small
   round air components and removed (``remove_airways``).
5. **Lungs among the air components inside the body** (at least ``min_lung_volume_ml`` each).
   Aerated lung is denser than pure gas: its median HU lies well above the level of air
   (measured on the outside air of the same scan, else -1000 HU), whereas bowel and stomach gas
   sit at that level. A component is *gas-like* when its median HU is less than ``gas_margin_hu``
   above the air level. The first lung is the largest component that is not gas-like (the
   largest of all if every one is gas-like, which the plausibility report then flags); any
   other component is a lung too when it is not gas-like, has at least 10 % of the first lung's
   volume, and its centre lies above the first lung's lowest quarter (gas under the diaphragm
   does not).
6. Each lung: hole filling (vessels), a closing with a ball of ``closing_mm``, hole filling again;
   then, in every axial slice, holes of up to :data:`MAX_HOLE_MM2` (nodules and masses up to about
   35 mm, hilar vessels: tissue that 3-D filling leaves out where it touches the lung's border
   or a vessel leaving the lung).

Measured on real scans (``tests/transforms/test_lung_threshold.py``, ``benchmarks/lung_masks.py``):
the shared chest CT and every crop that cuts its lungs, the abdominal CT with gas-filled bowel,
and both scans of the real lung pair (one lung in view, touching the border, -2048 padding).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from monai_cidir.coordinates import CoordinateMapping

__all__ = ["threshold_lung_mask", "block_mean", "upsample_mask", "WORKING_SPACING_MM", "PADDING_HU", "AIR_HU", "GAS_MARGIN_HU", "MAX_HOLE_MM2", "ScanAxes", "scan_axes", "padding_mask", "split_air", "air_level_hu"]

PADDING_HU = -1500.0
"""Values at or below this are padding outside the reconstruction circle (-2048, -3024), not air."""

AIR_HU = -1000.0
"""Air, where a scan holds no outside air to measure it on."""

GAS_MARGIN_HU = 40.0
"""A component whose median HU is less than this above the scan's air level is gas, not aerated lung."""

MAX_HOLE_MM2 = 1000.0
"""Holes of a lung mask's axial slices up to this area (a nodule or mass of about 35 mm) are lung."""

WORKING_SPACING_MM = 2.0
"""Axes sampled finer than this are segmented on a coarser grid (an integer factor) and the mask is
interpolated back. On the 512 x 512 x 141 (0.98 x 0.98 x 2.25 mm) chest case of
``benchmarks/full_size.py`` the mask of the 2x coarser grid agrees with the full-resolution one
to Dice 0.99 (lung volume within 1%), at a quarter of the cost; scans of 1.37 mm pixels or coarser
(the real lung pair, the shared chest CT, the phantom) are segmented on their own grid."""


def _working_factors(spacing: np.ndarray, working_spacing_mm: float | None) -> tuple[int, ...]:
    """Per axis, the integer factor that brings a spacing finer than ``working_spacing_mm`` up to (at most) it."""
    if working_spacing_mm is None:
        return (1,) * len(spacing)
    return tuple(max(1, int(np.floor(float(working_spacing_mm) / float(s) + 1e-6))) for s in spacing)


def block_mean(data: np.ndarray, affine: np.ndarray, factors) -> tuple[np.ndarray, np.ndarray]:
    """Means of ``factors`` blocks of voxels (the last block of an axis repeats its edge voxel) and the coarse grid's affine.

    Args:
        data: ``(X, Y, Z)`` array.
        affine: its index -> world affine.
        factors: integer block size per axis.

    Returns:
        ``(coarse float32 array, coarse affine)``: coarse voxel ``c`` is centred on fine index
        ``f c + (f - 1) / 2``, so world positions are kept.
    """
    f = np.asarray(factors, dtype=int)
    shape = np.asarray(data.shape)
    pad = (-shape) % f
    if pad.any():
        data = np.pad(data, [(0, int(p)) for p in pad], mode="edge")
    c = data.shape // f
    coarse = data.reshape(c[0], f[0], c[1], f[1], c[2], f[2]).mean(axis=(1, 3, 5), dtype=np.float32)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f.astype(np.float64))
    scale[:3, 3] = (f - 1) / 2.0
    return coarse, np.asarray(affine, dtype=np.float64) @ scale


def upsample_mask(mask: np.ndarray, factors, shape) -> np.ndarray:
    """A mask of :func:`block_mean`'s coarse grid back on the fine grid ``shape``: trilinear, cut at 0.5 (bool)."""
    import torch.nn.functional as F

    f = [int(v) for v in factors]
    size = [n * k for n, k in zip(mask.shape, f)]
    out = np.empty(shape, dtype=bool)
    coarse = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    step = max(1, (1 << 25) // max(1, size[0] * size[1]) // f[2])  # coarse slices per chunk (about 32 M fine voxels)
    for k0 in range(0, mask.shape[2], step):  # slabs along the last axis, each with one coarse slice of context
        lo, hi = max(k0 - 1, 0), min(k0 + step + 1, mask.shape[2])
        fine = F.interpolate(coarse[..., lo:hi], size=(size[0], size[1], (hi - lo) * f[2]), mode="trilinear", align_corners=False)[0, 0]
        z0 = (k0 - lo) * f[2]
        z1 = min((min(k0 + step, mask.shape[2]) - lo) * f[2], shape[2] - lo * f[2])
        if z1 > z0:
            out[:, :, k0 * f[2] : k0 * f[2] + (z1 - z0)] = (fine[: shape[0], : shape[1], z0:z1] > 0.5).numpy()
    return out


@dataclass(frozen=True)
class ScanAxes:
    """Which array axis is axial (superior-inferior), its sign, and the left-right axis."""

    axial: int
    superior: float
    lateral: int


def scan_axes(affine: np.ndarray, spacing: np.ndarray) -> ScanAxes:
    """The array axis closest to superior-inferior (and its direction) and the left-right axis.

    Args:
        affine: 4x4 index -> world RAS affine.
        spacing: voxel size per array axis (mm).

    Returns:
        :class:`ScanAxes` (``superior`` is +1 when the axial index grows towards the head).
    """
    direction = np.asarray(affine, dtype=np.float64)[:3, :3] / np.asarray(spacing, dtype=np.float64)
    axial = int(np.argmax(np.abs(direction[2])))
    superior = 1.0 if direction[2, axial] > 0 else -1.0
    in_plane = [a for a in range(3) if a != axial]
    lateral = max(in_plane, key=lambda a: abs(direction[0, a]))
    return ScanAxes(axial, superior, lateral)


def padding_mask(hu: np.ndarray, padding_hu: float = PADDING_HU) -> np.ndarray:
    """Voxels outside the reconstruction (``HU <= padding_hu``)."""
    return hu <= padding_hu


def air_level_hu(hu: np.ndarray, outside_air: np.ndarray, min_voxels: int = 1000) -> float:
    """The HU of air in this scan: the median over ``outside_air`` (else :data:`AIR_HU`)."""
    if int(outside_air.sum()) < min_voxels:
        return AIR_HU
    return float(np.median(hu[outside_air]))


def _smooth_valid(hu: np.ndarray, valid: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian smoothing normalised over valid voxels (padding neither darkens nor brightens)."""
    if not np.any(sigma > 0):
        return np.where(valid, hu, AIR_HU).astype(np.float32)
    if valid.all():
        return ndimage.gaussian_filter(hu, sigma=sigma, truncate=3.0)
    weight = ndimage.gaussian_filter(valid.astype(np.float32), sigma=sigma, truncate=3.0)
    num = ndimage.gaussian_filter(np.where(valid, hu, 0.0).astype(np.float32), sigma=sigma, truncate=3.0)
    return np.where(weight > 1e-3, num / np.maximum(weight, 1e-3), AIR_HU).astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _slice_hull(body: np.ndarray) -> np.ndarray:
    """Convex hull of a 2-D mask: the hull of each row's outermost pixel corners, filled row by row.

    A pixel is inside when its centre is inside the hull (as ``skimage.morphology.convex_hull_image``).
    """
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(body.any(1))
    first = np.argmax(body[rows], axis=1)
    last = body.shape[1] - 1 - np.argmax(body[rows, ::-1], axis=1)
    r = np.concatenate([rows - 0.5, rows + 0.5, rows - 0.5, rows + 0.5])
    c = np.concatenate([first - 0.5, first - 0.5, last + 0.5, last + 0.5])
    try:
        hull = ConvexHull(np.stack([r, c], 1))
    except QhullError:  # too few distinct corners: the mask is its own hull
        return body.copy()
    # each row centre y crosses the convex polygon in one interval [lo, hi] of columns
    pr, pc = r[hull.vertices], c[hull.vertices]
    r0, c0, r1, c1 = pr, pc, np.roll(pr, -1), np.roll(pc, -1)
    y = np.arange(rows[0], rows[-1] + 1, dtype=np.float64)[:, None]
    spans = (np.minimum(r0, r1) <= y) & (y <= np.maximum(r0, r1)) & (r0 != r1)
    t = np.where(spans, (y - r0) / np.where(r0 != r1, r1 - r0, 1.0), 0.0)
    x = c0 + t * (c1 - c0)
    lo = np.where(spans, x, np.inf).min(1)
    hi = np.where(spans, x, -np.inf).max(1)
    cols = np.arange(body.shape[1])
    out = np.zeros_like(body)
    out[rows[0] : rows[-1] + 1] = (cols >= lo[:, None] - 1e-9) & (cols <= hi[:, None] + 1e-9)
    return out | body


def body_hull(tissue: np.ndarray, axial: int) -> np.ndarray:
    """Per axial slice, the convex hull of the body (the largest 3-D tissue component)."""
    body = np.moveaxis(_largest_component(tissue), axial, 0)
    hull = np.zeros_like(body)
    for k in np.flatnonzero(body.reshape(body.shape[0], -1).any(1)):
        hull[k] = _slice_hull(body[k])
    return np.moveaxis(hull, 0, axial)


def split_air(
    hu: np.ndarray,
    spacing: np.ndarray,
    axes: ScanAxes,
    threshold_hu: float = -400.0,
    smoothing_mm: float = 1.0,
    padding_hu: float = PADDING_HU,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 of the module docstring: ``(air inside the body, outside air)``, two bool arrays."""
    valid = ~padding_mask(hu, padding_hu)
    air = (_smooth_valid(hu, valid, np.full(3, smoothing_mm) / spacing) < threshold_hu) & valid
    hull = body_hull(valid & ~air, axes.axial)
    labels, n = ndimage.label(air)
    inside = np.bincount(labels.ravel(), weights=hull.ravel(), minlength=n + 1)
    total = np.bincount(labels.ravel(), minlength=n + 1)
    outside = inside <= 0.5 * total
    outside[0] = False
    outside_air = outside[labels]
    return air & ~outside_air, outside_air


def _airway_mask(air: np.ndarray, axes: ScanAxes, spacing: np.ndarray, max_area_mm2: float, max_bridge_mm: float = 15.0) -> np.ndarray:
    """Trachea and main bronchi: tracked slice by slice from the top while they stay small 2-D components.

    A seed is a small, roundish air component near the middle of the body's air (left-right)
    in the upper third of the slices that hold air; each next slice keeps the components that
    overlap the previous slice's airway and stay small. Where an airway touches a lung in a slice
    (its component grows past the limit), the previous slice's airway footprint (grown by one
    pixel) is cut out of that slice instead, for at most ``max_bridge_mm`` in a row; tracking
    resumes when the airway is a separate small component again.
    """
    order = [axes.axial] + [a for a in range(3) if a != axes.axial]
    vol = np.transpose(air, order)
    if axes.superior > 0:
        vol = vol[::-1]  # slice 0 = most superior
    in_plane = [a for a in range(3) if a != axes.axial]
    pixel_area = float(spacing[in_plane[0]] * spacing[in_plane[1]])
    tracker = _AirwayTracker(
        lat_dim=in_plane.index(axes.lateral),
        lat_spacing=float(spacing[axes.lateral]),
        max_px=max_area_mm2 / pixel_area,
        min_px=15.0 / pixel_area,  # about 4.5 mm across
        max_bridge=max(2, int(round(max_bridge_mm / float(spacing[axes.axial])))),
    )
    airway = tracker.run(vol)
    if axes.superior > 0:
        airway = airway[::-1]
    return np.transpose(airway, np.argsort(order))


@dataclass
class _AirwayTracker:
    lat_dim: int
    lat_spacing: float
    max_px: float
    min_px: float
    max_bridge: int

    def run(self, vol: np.ndarray) -> np.ndarray:
        airway = np.zeros(vol.shape, dtype=bool)
        occupied = np.flatnonzero(vol.reshape(vol.shape[0], -1).any(1))
        if len(occupied) == 0:
            return airway
        first, last = int(occupied[0]), int(occupied[-1])
        seed_limit = first + max(2, (last - first) // 3)
        cols = np.flatnonzero(vol[first : last + 1].any(axis=(0, 2 - self.lat_dim)))
        centre = 0.5 * (cols[0] + cols[-1])  # the middle of the body's air, left-right
        half_width_mm = 0.5 * (cols[-1] - cols[0] + 1) * self.lat_spacing
        prev = None  # the airway's small components in the previous slice
        bridge, age = None, 0  # airway footprint carried through slices where it touches a lung
        for k in range(first, last + 1):
            labels, n = ndimage.label(vol[k])
            if n == 0:
                if prev is not None:
                    break
                continue
            areas = np.bincount(labels.ravel(), minlength=n + 1)
            if prev is None and bridge is None:  # looking for the trachea
                if k > seed_limit:
                    break
                prev = self._seed(labels, n, areas, centre, half_width_mm)
                if prev is not None:
                    airway[k] = prev
                continue
            step = self._follow(labels, areas, prev, bridge, age)
            if step is None:
                break
            airway[k], prev, bridge, age = step
        return airway

    def _seed(self, labels, n, areas, centre, half_width_mm):
        objects = ndimage.find_objects(labels)
        best, best_d = 0, np.inf
        for lab in range(1, n + 1):
            if not (self.min_px <= areas[lab] <= self.max_px):
                continue
            box = objects[lab - 1]
            if areas[lab] < 0.5 * (box[0].stop - box[0].start) * (box[1].stop - box[1].start):
                continue  # not roundish
            mid = 0.5 * (box[self.lat_dim].start + box[self.lat_dim].stop - 1)
            d = abs(mid - centre) * self.lat_spacing
            if d < best_d:
                best, best_d = lab, d
        if best == 0 or best_d > 0.2 * half_width_mm:
            return None
        return labels == best

    def _follow(self, labels, areas, prev, bridge, age):
        footprint = prev if bridge is None else (bridge if prev is None else prev | bridge)
        touched = np.unique(labels[footprint])
        touched = touched[touched > 0]
        limit = min(self.max_px, 2.5 * float(footprint.sum()) + self.min_px)
        small, merged = touched[areas[touched] <= limit], touched[areas[touched] > limit]
        cur = np.isin(labels, small) if len(small) else None
        remove = cur.copy() if cur is not None else np.zeros_like(footprint)
        new_bridge = None
        if len(merged):
            in_merged = np.isin(labels, merged)
            fresh = in_merged & prev if prev is not None else None
            if fresh is not None and fresh.any():
                new_bridge, age = fresh, 1
                if bridge is not None:
                    new_bridge |= in_merged & bridge
            elif bridge is not None and age < self.max_bridge:
                new_bridge, age = in_merged & bridge, age + 1
            if new_bridge is not None and new_bridge.any():
                remove |= in_merged & ndimage.binary_dilation(new_bridge, ndimage.generate_binary_structure(2, 1))
            else:
                new_bridge = None
        if cur is None and new_bridge is None:
            return None
        return remove, cur, new_bridge, age


def _ellipsoid_structure(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    half = np.maximum(np.floor(radius_mm / spacing).astype(int), 0)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def _fill(mask: np.ndarray) -> np.ndarray:
    try:
        import fill_voids

        return fill_voids.fill(mask, in_place=False)
    except ImportError:  # fill_voids comes with lungmask; scipy is the fallback
        return ndimage.binary_fill_holes(mask)


@dataclass
class _Candidates:
    """Air components inside the body that are large enough to be a lung."""

    ids: np.ndarray  # label ids, largest first
    sizes: np.ndarray  # voxels per id
    gas_like: np.ndarray  # bool per id
    height: list  # per id: superior-positive axial positions of its voxels


def _select_lungs(c: _Candidates) -> list[int]:
    """Step 5 of the module docstring: the first lung, then the others that pass its tests."""
    lung_like = np.flatnonzero(~c.gas_like)
    first = int(lung_like[0]) if len(lung_like) else 0
    keep = [first]
    low_quarter = np.quantile(c.height[first], 0.25)
    for i in range(len(c.ids)):
        if i == first or c.gas_like[i] != c.gas_like[first]:
            continue
        if c.sizes[i] >= 0.1 * c.sizes[first] and c.height[i].mean() > low_quarter:
            keep.append(i)
    return [int(c.ids[i]) for i in keep]


def _candidates(labels: np.ndarray, hu: np.ndarray, axes: ScanAxes, voxel_ml: float, min_ml: float, air_hu: float, gas_margin_hu: float):
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    ids = np.array([i for i in np.argsort(sizes)[::-1] if sizes[i] > 0 and sizes[i] * voxel_ml >= min_ml], dtype=int)
    if len(ids) == 0:
        return None, sizes
    boxes = ndimage.find_objects(labels, max_label=int(ids.max()))
    height, medians = [], []
    for lab in ids:
        box = boxes[lab - 1]
        inside = labels[box] == lab
        medians.append(float(np.median(hu[box][inside])))
        k = np.nonzero(inside)[axes.axial] + box[axes.axial].start
        height.append(k * axes.superior)  # larger = more superior
    medians = np.asarray(medians)
    gas_like = medians < air_hu + gas_margin_hu
    return _Candidates(ids, sizes[ids], gas_like, height), sizes


def threshold_lung_mask(
    image: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    threshold_hu: float = -400.0,
    smoothing_mm: float = 1.0,
    closing_mm: float = 3.0,
    remove_airways: bool = True,
    max_airway_area_mm2: float = 700.0,
    min_lung_volume_ml: float = 10.0,
    padding_hu: float = PADDING_HU,
    gas_margin_hu: float = GAS_MARGIN_HU,
    working_spacing_mm: float | None = WORKING_SPACING_MM,
) -> np.ndarray:
    """Classical lung segmentation of a CT in HU (no weights); the steps are in the module docstring.

    Args:
        image: ``(X, Y, Z)`` HU array.
        affine: its 4x4 index -> world (RAS mm) affine.
        threshold_hu: air/tissue threshold (HU).
        smoothing_mm: Gaussian sigma before thresholding (mm); 0 disables it.
        closing_mm: closing radius (mm); 0 disables it.
        remove_airways: remove the trachea and main bronchi.
        max_airway_area_mm2: largest cross-section (mm^2) of a trachea/bronchus slice.
        min_lung_volume_ml: smallest volume (ml) a lung component may have.
        padding_hu: values at or below are padding outside the reconstruction, not air.
        gas_margin_hu: a component whose median HU is less than this above the scan's air level
            is gas-like (bowel or stomach gas, outside air), not aerated lung.
        working_spacing_mm: axes sampled finer than this are segmented on a grid coarser by an
            integer factor (block means of ``f`` voxels, ``f = floor(working_spacing_mm / spacing)``)
            and the mask is interpolated back (trilinear on the 0/1 mask, cut at 0.5), so a
            512 x 512 scan of 0.98 mm pixels costs what a 256 x 256 one does; ``None`` segments on
            the image's own grid. Scans of 1 mm pixels lose nothing measurable this way (see
            :data:`WORKING_SPACING_MM`).

    Returns:
        bool array ``(X, Y, Z)``, True inside the lungs (empty, with a warning, when no air
        component inside the body is large enough). Whether the result is plausible is for
        :func:`monai_cidir.transforms.lung_mask_report` to say.

    Raises:
        ValueError: for an image that is not 3-D.

    Example::

        >>> mask = threshold_lung_mask(ct_hu, affine)  # doctest: +SKIP
    """
    data = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if data.ndim != 3:
        raise ValueError(f"threshold_lung_mask expects a 3-D (X, Y, Z) HU array, found shape {data.shape}")
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    spacing = CoordinateMapping(affine, data.shape).spacing.numpy()
    factors = _working_factors(spacing, working_spacing_mm)
    if any(f > 1 for f in factors):
        options = dict(threshold_hu=threshold_hu, smoothing_mm=smoothing_mm, closing_mm=closing_mm, remove_airways=remove_airways,
                       max_airway_area_mm2=max_airway_area_mm2, min_lung_volume_ml=min_lung_volume_ml, padding_hu=padding_hu,
                       gas_margin_hu=gas_margin_hu)  # fmt: skip
        coarse, coarse_affine = block_mean(data, affine, factors)
        return upsample_mask(threshold_lung_mask(coarse, coarse_affine, working_spacing_mm=None, **options), factors, data.shape)
    axes = scan_axes(affine, spacing)
    data = data.astype(np.float32, copy=False)
    air, outside_air = split_air(data, spacing, axes, threshold_hu, smoothing_mm, padding_hu)
    air_hu = air_level_hu(data, outside_air)
    del outside_air
    if remove_airways:
        air &= ~_airway_mask(air, axes, spacing, max_airway_area_mm2)
    labels, _ = ndimage.label(air)
    del air
    voxel_ml = float(np.prod(spacing)) / 1000.0
    cands, sizes = _candidates(labels, data, axes, voxel_ml, min_lung_volume_ml, air_hu, gas_margin_hu)
    if cands is None:
        warnings.warn(
            f"threshold_lung_mask: the largest air component inside the body has {sizes.max(initial=0) * voxel_ml:.1f} ml "
            f"< min_lung_volume_ml={min_lung_volume_ml}; returning an empty mask",
            stacklevel=2,
        )
        return np.zeros(labels.shape, dtype=bool)
    return _fill_small_holes(_fill_lungs(labels, _select_lungs(cands), spacing, closing_mm), axes, spacing)


def _fill_small_holes(mask: np.ndarray, axes: ScanAxes, spacing: np.ndarray, max_area_mm2: float = MAX_HOLE_MM2) -> np.ndarray:
    """In every axial slice, fill the holes of at most ``max_area_mm2`` (nodules, vessels at the hilum)."""
    in_plane = [a for a in range(3) if a != axes.axial]
    max_px = max_area_mm2 / float(spacing[in_plane[0]] * spacing[in_plane[1]])
    out = np.moveaxis(mask.copy(), axes.axial, 0)
    for k in np.flatnonzero(out.reshape(out.shape[0], -1).any(1)):
        labels, n = ndimage.label(~out[k])
        if n < 2:
            continue
        sizes = np.bincount(labels.ravel())
        edge = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))
        small = np.flatnonzero(sizes <= max_px)
        small = small[(small > 0) & ~np.isin(small, edge)]
        if len(small):
            out[k] |= np.isin(labels, small)
    return np.moveaxis(out, 0, axes.axial)


def _fill_lungs(labels: np.ndarray, keep: list[int], spacing: np.ndarray, closing_mm: float) -> np.ndarray:
    """Step 6: each kept component filled, closed and filled again, within its padded bounding box."""
    mask = np.zeros(labels.shape, dtype=bool)
    struct = _ellipsoid_structure(closing_mm, spacing) if closing_mm > 0 else None
    pad = np.asarray(struct.shape) // 2 + 1 if struct is not None else np.ones(3, dtype=int)
    boxes = ndimage.find_objects(labels, max_label=max(keep))
    for lab in keep:
        box = boxes[lab - 1]
        lo = [max(s.start - p, 0) for s, p in zip(box, pad)]
        hi = [min(s.stop + p, n_) for s, p, n_ in zip(box, pad, labels.shape)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        comp = _fill(np.pad(labels[sl] == lab, [(int(p), int(p)) for p in pad]))
        if struct is not None:
            comp = _fill(ndimage.binary_closing(comp, structure=struct))
        core = tuple(slice(int(p), int(p) + (b - a)) for p, a, b in zip(pad, lo, hi))
        mask[sl] |= comp[core]
    return mask
