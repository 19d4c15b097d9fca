"""Realistic synthetic motion on real CT: sliding, density change, large diaphragm motion, rigid offset.

:class:`~monai_cidir.data.BreathingMotion` is smooth and sliding-free, and its pairs share one grid:
easy cases that flatter any smooth regulariser. :class:`SlidingBreathingMotion` adds what real
inhale/exhale and baseline/follow-up pairs have, while keeping an exact inverse (so landmark
pairs and the dense field stay exact ground truth):

* **sliding**: the lungs and everything under them move superior-inferior, the chest wall and
  the mediastinum do not; the superior-inferior displacement jumps at the outline of the lungs
  (their axial footprint), so its tangential component is discontinuous there;
* **large diaphragm motion**: ``amplitude_mm`` (15-25 mm) at the lung base, decaying to zero
  towards the apex;
* **density change**: inside the lungs the moving image's HU follows the local volume change,
  ``HU' + 1000 = (HU + 1000) / det(d phi / d p)``;
* **an inter-scan rigid offset** (rotation about the lungs' centre, then translation) and a
  moving scan with its own field of view and spacing (:func:`make_realistic_pair`);
* scanner noise and crops that cut the lungs at the border (:func:`make_realistic_pair`).

The map is a composition of three maps, each exactly invertible::

    phi = R o S o P
    P(x, y, z) = (x + u_x(x, y, z), y + u_y(x, y, z), z)     smooth in-plane contraction
    S(x, y, z) = (x, y, z + F(x, y) u_z(x, y, z))            superior-inferior, F = lung footprint (0/1)
    R(p)       = Q (p - c) + c + t                           rigid offset

``P`` is a contraction-free smooth field (in-plane gradient < 0.5), inverted per axial plane by
fixed-point iteration; ``S`` moves each axial column along itself, so it is inverted per column
(``|d u_z / d z| < 0.5``) whatever ``F`` does between columns: that is what makes the sliding
exact, and ``det(d phi/d p) = det(d P/d p) (1 + F d u_z/d z)`` (the jump of ``F`` is a shear,
which does not change volume). World coordinates are RAS mm; superior is +z.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing
from monai_cidir.data.phantom import _bump_arrays, _lung_box, _mask_voxels, _seeded_bumps

__all__ = ["SlidingBreathingMotion", "make_realistic_pair", "moving_grid", "REALISTIC_PADDING_HU"]

#: value of moving voxels whose anatomy lies outside the fixed scan (a reconstruction-circle pad).
REALISTIC_PADDING_HU = -2048.0
_FOOTPRINT_STEP_MM = 1.0


def _rotation_matrix(degrees: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees, right-handed, RAS)."""
    rx, ry, rz = (math.radians(float(d)) for d in degrees)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


class SlidingBreathingMotion:
    """Sliding inhale -> exhale motion with a rigid inter-scan offset and an exact inverse.

    Fixed (inhale) world points ``p`` (RAS mm, ``(..., 3)`` numpy) map to moving (exhale) points
    ``phi(p)``. With the lungs' bounding box (centre ``c``, half sizes ``h``, height ``H``,
    ``s(z) = (1 - tanh((z - z_min - 0.45 H) / (0.25 H))) / 2``, about 1 at the base and 0 at the apex)::

        u_x = -lateral_fraction A tanh((x - c_x) / h_x) (0.4 + 0.6 s) + bumps_x     (P, smooth)
        u_y = -ap_fraction A (1 + tanh((y - c_y) / h_y)) / 2 (0.4 + 0.6 s) + bumps_y
        u_z =  F(x, y) [A s(z) (0.8 + 0.2 tanh((c_y - y) / h_y)) + bumps_z]         (S, sliding)

    ``F`` is the lungs' footprint on the axial plane (the mask projected along z, dilated by
    ``footprint_margin_mm``), a 0/1 raster of 1 mm: everything above or below the lungs moves with
    them (diaphragm, liver), the chest wall and mediastinum beside them do not. Then the rigid
    offset ``R``. Bumps are seeded Gaussians (total amplitude ``perturbation_mm``).

    Args:
        lung_min: lower corner of the lungs' bounding box, world RAS mm.
        lung_max: upper corner.
        footprint: 2-D boolean raster ``(nx, ny)`` of the footprint, cell ``(i, j)`` centred at
            ``footprint_origin + (i, j) * 1 mm``.
        footprint_origin: world ``(x, y)`` of cell ``(0, 0)``.
        amplitude_mm: superior-inferior motion at the lung base ``A``.
        ap_fraction: anterior-posterior contraction as a fraction of ``A``.
        lateral_fraction: lateral contraction as a fraction of ``A``.
        perturbation_mm: total bump amplitude (default ``0.1 A``).
        num_bumps: number of bumps.
        rotation_deg: rigid rotation about x, y, z (degrees) about the lungs' centre.
        translation_mm: rigid translation (mm).
        seed: seed of the bumps.
        bumps: explicit bumps (``centers`` (K, 3), ``widths`` (K,), ``amplitudes`` (K, 3)).

    Raises:
        ValueError: for a degenerate box, a non-positive amplitude, an empty footprint or an
            amplitude too large for the lung height (the column map would fold).

    Example::

        >>> motion = SlidingBreathingMotion.from_lung_mask(mask, amplitude_mm=20.0, translation_mm=(0, 25, 10))  # doctest: +SKIP
        >>> q = motion(p)                                   # exhale position of inhale points
        >>> np.allclose(motion.inverse(q), p, atol=1e-5)    # doctest: +SKIP
        True
    """

    def __init__(
        self,
        lung_min: Sequence[float],
        lung_max: Sequence[float],
        footprint: np.ndarray,
        footprint_origin: Sequence[float],
        amplitude_mm: float = 20.0,
        ap_fraction: float = 0.2,
        lateral_fraction: float = 0.1,
        perturbation_mm: float | None = None,
        num_bumps: int = 4,
        rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
        translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
        seed: int = 0,
        bumps: Mapping | None = None,
    ) -> None:
        self.lung_min, self.lung_max, size = _lung_box(lung_min, lung_max, amplitude_mm)
        self.footprint = np.asarray(footprint, dtype=bool)
        if self.footprint.ndim != 2 or not self.footprint.any():
            raise ValueError(f"expected a non-empty 2-D footprint raster, found shape {self.footprint.shape}")
        self.footprint_origin = np.asarray(footprint_origin, dtype=np.float64).reshape(2)
        self.amplitude_mm, self.ap_fraction, self.lateral_fraction = float(amplitude_mm), float(ap_fraction), float(lateral_fraction)
        self.center, self.half = 0.5 * (self.lung_min + self.lung_max), 0.5 * size
        self.z_mid, self.z_len = float(self.lung_min[2] + 0.45 * size[2]), 0.25 * float(size[2])
        if self.amplitude_mm / (2.0 * self.z_len) > 0.5:
            raise ValueError(
                f"amplitude_mm={amplitude_mm} is too large for lungs {size[2]:.0f} mm tall: the superior-inferior "
                f"compression would exceed 50% (expected amplitude_mm <= {self.z_len:.0f})"
            )
        self.rotation_deg = tuple(float(v) for v in rotation_deg)
        self.translation_mm = np.asarray(translation_mm, dtype=np.float64).reshape(3)
        self.rotation = _rotation_matrix(self.rotation_deg)
        if bumps is None:
            total = 0.1 * self.amplitude_mm if perturbation_mm is None else float(perturbation_mm)
            bumps = _seeded_bumps(self.lung_min, size, seed, 0x51D3, num_bumps, total)
        self.bump_centers, self.bump_widths, self.bump_amplitudes = _bump_arrays(bumps)

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_lung_mask(cls, mask: torch.Tensor, footprint_margin_mm: float = 3.0, **kwargs) -> SlidingBreathingMotion:
        """Motion fitted to a lung mask (MetaTensor ``(1, X, Y, Z)`` with an affine): its box and footprint.

        Args:
            mask: 0/1 lung mask.
            footprint_margin_mm: dilation of the footprint (so that the pleura moves with the lung).
            kwargs: the other arguments of the class.

        Raises:
            ValueError: when the mask is empty.
        """
        from scipy import ndimage

        mapping, idx = _mask_voxels(mask, "SlidingBreathingMotion.from_lung_mask")
        world = mapping.index_to_world(torch.from_numpy(idx.astype(np.float64))).numpy()
        lo, hi = world.min(0), world.max(0)
        step = _FOOTPRINT_STEP_MM
        pad = footprint_margin_mm + float(mapping.spacing.max())
        origin = lo[:2] - pad
        shape = np.ceil((hi[:2] - lo[:2] + 2 * pad) / step).astype(int) + 1
        raster = np.zeros(shape, dtype=bool)
        cells = np.round((world[:, :2] - origin) / step).astype(int)
        raster[cells[:, 0], cells[:, 1]] = True
        # close the gaps between projected voxel centres (coarse in-plane spacing), then the margin
        gap = int(math.ceil(float(mapping.spacing[:2].max()) / step))
        raster = ndimage.binary_closing(raster, structure=np.ones((2 * gap + 1,) * 2), border_value=0)
        raster = ndimage.binary_fill_holes(raster)
        raster = ndimage.distance_transform_edt(~raster, sampling=step) <= footprint_margin_mm
        return cls(lo, hi, raster, origin, **kwargs)

    def to_dict(self) -> dict:
        """Plain-data (JSON-serialisable) description; :meth:`from_dict` rebuilds the exact map."""
        rows = ["".join("1" if v else "0" for v in row) for row in self.footprint]
        return {
            "type": "SlidingBreathingMotion",
            "convention": "fixed (inhale) world RAS mm p -> moving (exhale) phi(p) = R(S(P(p)))",
            "lung_min": self.lung_min.tolist(),
            "lung_max": self.lung_max.tolist(),
            "footprint_origin": self.footprint_origin.tolist(),
            "footprint_step_mm": _FOOTPRINT_STEP_MM,
            "footprint": rows,
            "amplitude_mm": self.amplitude_mm,
            "ap_fraction": self.ap_fraction,
            "lateral_fraction": self.lateral_fraction,
            "rotation_deg": list(self.rotation_deg),
            "translation_mm": self.translation_mm.tolist(),
            "bumps": {"centers": self.bump_centers.tolist(), "widths": self.bump_widths.tolist(), "amplitudes": self.bump_amplitudes.tolist()},
        }

    @classmethod
    def from_dict(cls, state: Mapping) -> SlidingBreathingMotion:
        """Rebuild a motion saved by :meth:`to_dict`."""
        if state.get("type") != "SlidingBreathingMotion":
            raise ValueError(f"expected a SlidingBreathingMotion description, found type={state.get('type')!r}")
        footprint = np.array([[c == "1" for c in row] for row in state["footprint"]], dtype=bool)
        keys = ("amplitude_mm", "ap_fraction", "lateral_fraction", "rotation_deg", "translation_mm", "bumps")
        return cls(state["lung_min"], state["lung_max"], footprint, state["footprint_origin"], **{k: state[k] for k in keys})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SlidingBreathingMotion:
        """Read a ``<name>_motion.json`` written by :func:`make_realistic_pair`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"motion file not found: {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def __repr__(self) -> str:
        return (
            f"SlidingBreathingMotion(amplitude_mm={self.amplitude_mm:.3g}, rotation_deg={self.rotation_deg}, "
            f"translation_mm={tuple(round(float(v), 2) for v in self.translation_mm)})"
        )

    # ------------------------------------------------------------------ the three maps
    def in_footprint(self, xy: np.ndarray) -> np.ndarray:
        """``F(x, y)``: whether world ``(..., 2)`` points lie in the lungs' footprint (nearest cell)."""
        cells = np.round((np.asarray(xy, dtype=np.float64) - self.footprint_origin) / _FOOTPRINT_STEP_MM).astype(np.int64)
        nx, ny = self.footprint.shape
        inside = (cells[..., 0] >= 0) & (cells[..., 0] < nx) & (cells[..., 1] >= 0) & (cells[..., 1] < ny)
        out = np.zeros(cells.shape[:-1], dtype=bool)
        out[inside] = self.footprint[cells[..., 0][inside], cells[..., 1][inside]]
        return out

    def _bumps(self, p: np.ndarray, component: int) -> np.ndarray:
        total = np.zeros(p.shape[:-1])
        for m, r, a in zip(self.bump_centers, self.bump_widths, self.bump_amplitudes):
            if a[component] != 0.0:
                total += a[component] * np.exp(np.sum((p - m) ** 2, axis=-1) * (-0.5 / r**2))
        return total

    def _s(self, z: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 - np.tanh((z - self.z_mid) / self.z_len))

    def in_plane_displacement(self, p: np.ndarray) -> np.ndarray:
        """``(u_x, u_y)`` of the smooth in-plane map ``P`` at ``(..., 3)`` points."""
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        amp, w = self.amplitude_mm, 0.4 + 0.6 * self._s(z)
        ux = -self.lateral_fraction * amp * np.tanh((x - self.center[0]) / self.half[0]) * w + self._bumps(p, 0)
        uy = -0.5 * self.ap_fraction * amp * (1.0 + np.tanh((y - self.center[1]) / self.half[1])) * w + self._bumps(p, 1)
        return np.stack([ux, uy], -1)

    def si_displacement(self, p: np.ndarray) -> np.ndarray:
        """``F(x, y) u_z(x, y, z)`` of the sliding map ``S`` at ``(..., 3)`` points."""
        y, z = p[..., 1], p[..., 2]
        uz = self.amplitude_mm * self._s(z) * (0.8 + 0.2 * np.tanh((self.center[1] - y) / self.half[1])) + self._bumps(p, 2)
        return np.where(self.in_footprint(p[..., :2]), uz, 0.0)

    def _P(self, p: np.ndarray) -> np.ndarray:
        out = p.copy()
        out[..., :2] += self.in_plane_displacement(p)
        return out

    def _S(self, p: np.ndarray) -> np.ndarray:
        out = p.copy()
        out[..., 2] += self.si_displacement(p)
        return out

    def __call__(self, points) -> np.ndarray:
        """The forward map ``phi(p)`` (fixed/inhale -> moving/exhale world RAS mm)."""
        p = np.asarray(points, dtype=np.float64)
        q = self._S(self._P(p))
        return (q - self.center) @ self.rotation.T + self.center + self.translation_mm

    def displacement(self, points) -> np.ndarray:
        """``phi(p) - p`` (mm)."""
        p = np.asarray(points, dtype=np.float64)
        return self(p) - p

    def inverse(self, points, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
        """``phi^{-1}(q)``: undo the rigid offset, then ``S`` per column, then ``P`` per axial plane.

        Raises:
            RuntimeError: when a fixed-point iteration does not reach ``tol`` mm in ``max_iter`` steps.
        """
        q = np.asarray(points, dtype=np.float64)
        r = (q - self.center - self.translation_mm) @ self.rotation + self.center
        p = r.copy()  # S^-1: z + F u_z(x, y, z) = r_z along each column (x, y fixed)
        for _ in range(max_iter):
            z_next = r[..., 2] - self.si_displacement(p)
            step = float(np.abs(z_next - p[..., 2]).max(initial=0.0))
            p[..., 2] = z_next
            if step < tol:
                break
        else:
            raise RuntimeError(f"SlidingBreathingMotion.inverse: the column map did not converge (last step {step:.3g} mm)")
        s = p.copy()  # P^-1: (x, y) + u_xy(x, y, z) = s_xy in each axial plane
        for _ in range(max_iter):
            xy_next = s[..., :2] - self.in_plane_displacement(p)
            step = float(np.abs(xy_next - p[..., :2]).max(initial=0.0))
            p[..., :2] = xy_next
            if step < tol:
                break
        else:
            raise RuntimeError(f"SlidingBreathingMotion.inverse: the in-plane map did not converge (last step {step:.3g} mm)")
        return p

    def jacobian_determinant(self, points, h: float = 0.05) -> np.ndarray:
        """``det(d phi / d p)`` at fixed points: ``det(dP/dp) (1 + F d u_z / d z)`` by central differences.

        ``F`` jumps between columns, which shears without changing volume, so only the in-plane
        map's 2x2 Jacobian and the column stretch ``d u_z / d z`` enter (step ``h`` mm).
        """
        p = np.asarray(points, dtype=np.float64)
        e = np.eye(3) * h
        d = [(self.in_plane_displacement(p + e[a]) - self.in_plane_displacement(p - e[a])) / (2 * h) for a in range(2)]
        det_p = (1 + d[0][..., 0]) * (1 + d[1][..., 1]) - d[1][..., 0] * d[0][..., 1]
        mid = self._P(p)
        stretch = (self.si_displacement(mid + e[2]) - self.si_displacement(mid - e[2])) / (2 * h)
        return det_p * (1.0 + stretch)


# ----------------------------------------------------------------------------------------------
# a realistic pair from a real CT
# ----------------------------------------------------------------------------------------------
def _crop(image: MetaTensor, box: Sequence[Sequence[int]] | None) -> MetaTensor:
    """``image[:, a0:a1, b0:b1, c0:c1]`` with its affine moved to the new first voxel."""
    if box is None:
        return image
    from monai.transforms import SpatialCrop

    starts = [int(lo) for lo, _ in box]
    ends = [int(hi) if hi is not None else n for (_, hi), n in zip(box, image.shape[1:])]
    return SpatialCrop(roi_start=starts, roi_end=ends)(image)


def moving_grid(
    fixed: CoordinateMapping,
    translation_mm: Sequence[float],
    spacing: Sequence[float] | None = None,
    crop_mm: Sequence[Sequence[float]] | None = None,
) -> CoordinateMapping:
    """The moving scan's grid: the fixed field of view moved with the patient, cropped, resampled.

    Args:
        fixed: the fixed grid.
        translation_mm: the patient's rigid translation (world mm); the field of view follows it.
        spacing: the moving voxel size along each array axis (default: the fixed one).
        crop_mm: ``((start, end), ...)`` mm removed at the start and end of each array axis
            (negative: extended, where the moving image is then padding).

    Returns:
        the moving grid's mapping.

    Raises:
        ValueError: when the crop leaves no voxel on an axis.
    """
    spacing_f = fixed.spacing.numpy()
    spacing_m = spacing_f if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(3)
    crop = np.zeros((3, 2)) if crop_mm is None else np.asarray(crop_mm, dtype=np.float64).reshape(3, 2)
    extent = (np.asarray(fixed.spatial_shape) - 1) * spacing_f - crop.sum(1)
    if np.any(extent < 0):
        raise ValueError(f"moving_grid: crop_mm={crop.tolist()} leaves no field of view (extent {extent.tolist()} mm)")
    shape = np.floor(extent / spacing_m + 1e-6).astype(int) + 1
    rot = fixed.affine[:3, :3].numpy() / spacing_f  # unit direction columns
    origin = fixed.affine[:3, 3].numpy() + rot @ crop[:, 0] + np.asarray(translation_mm, dtype=np.float64)
    return CoordinateMapping(affine_from_spacing(spacing_m, origin, rot), shape)


def _pull_back_realistic(fixed: MetaTensor, mask: MetaTensor, grid: CoordinateMapping, motion, chunk: int = 1 << 20):
    """Moving image and mask on ``grid``: the fixed CT at ``phi^-1(q)``, lung HU scaled by ``1/det``.

    Voxels whose preimage lies outside the fixed scan get :data:`REALISTIC_PADDING_HU` (mask 0).
    """
    fmap = CoordinateMapping.from_image(fixed)
    ct, lung = fixed[0].as_tensor().double(), mask[0].as_tensor().double()
    world = grid.world_grid(dtype=torch.float64).reshape(-1, 3).numpy()
    image, moving_mask = np.empty(len(world), dtype=np.float32), np.empty(len(world), dtype=np.float32)
    upper = np.asarray(fmap.spatial_shape, dtype=np.float64) - 0.5
    for i0 in range(0, len(world), chunk):
        p = motion.inverse(world[i0 : i0 + chunk], tol=1e-5)
        pt = torch.from_numpy(p)
        idx = fmap.world_to_index(pt).numpy()
        inside = np.all((idx >= -0.5) & (idx <= upper), axis=1)
        hu = fmap.sample(ct, pt).numpy()
        m = np.clip(fmap.sample(lung, pt).numpy(), 0.0, 1.0)
        det = np.clip(motion.jacobian_determinant(p), 0.2, 5.0)
        hu = hu + m * np.maximum(hu + 1000.0, 0.0) * (1.0 / det - 1.0)
        image[i0 : i0 + chunk] = np.where(inside, hu, REALISTIC_PADDING_HU)
        moving_mask[i0 : i0 + chunk] = np.where(inside, m > 0.5, 0.0)
    shape = grid.spatial_shape
    meta = {"space": "RAS"}
    to_mt = lambda a: MetaTensor(torch.from_numpy(a.reshape(shape))[None], affine=grid.affine.clone(), meta=dict(meta))  # noqa: E731
    return to_mt(image), to_mt(moving_mask)


def _add_noise(image: MetaTensor, sigma: float, rng: np.random.Generator) -> MetaTensor:
    data = image.as_tensor().numpy()
    noisy = data + (rng.normal(0.0, sigma, size=data.shape) if sigma > 0 else 0.0)
    noisy = np.where(data <= REALISTIC_PADDING_HU + 1, data, np.round(noisy))
    return MetaTensor(torch.from_numpy(noisy.astype(np.float32)), affine=image.affine.clone(), meta=dict(image.meta))


def make_realistic_pair(
    ct,
    mask=None,
    seed: int = 0,
    amplitude_mm: float = 20.0,
    translation_mm: Sequence[float] = (0.0, 20.0, 20.0),
    rotation_deg: Sequence[float] = (2.0, 0.0, 1.0),
    noise_hu: float = 20.0,
    fixed_crop: Sequence[Sequence[int]] | None = None,
    moving_spacing: Sequence[float] | None = None,
    moving_crop_mm: Sequence[Sequence[float]] | None = None,
    num_landmarks: int = 300,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
    overwrite: bool = False,
    **motion_kwargs,
) -> dict:
    """A realistic inhale/exhale pair from one real CT, with exact dense ground truth.

    The (optionally cropped) CT is the fixed image; a :class:`SlidingBreathingMotion` fitted to
    its lung mask moves it; the moving image is the CT at ``phi^-1(q)`` for every voxel ``q`` of
    the moving grid (:func:`moving_grid`: the field of view follows the rigid offset, with its own
    crop and spacing), with the lungs' HU scaled by the volume change, padding where the anatomy
    is outside the fixed scan, and Gaussian noise (``noise_hu``) added to both images. Landmarks:
    ``num_landmarks`` vessel-like points at least 5 mm inside the fixed lungs whose moving
    position lies in the moving field of view; ``moving_landmarks = motion(fixed_landmarks)``.

    Args:
        ct: the CT in HU, a ``(1, X, Y, Z)`` MetaTensor or a path.
        mask: its lung mask (same grid; ``None``: computed with the threshold backend).
        seed: seeds the motion's bumps, the noise and nothing else.
        amplitude_mm: superior-inferior motion at the lung base (15-25 mm is typical).
        translation_mm: rigid offset (mm); 20-40 mm between real scans is common.
        rotation_deg: rigid rotation about x, y, z (degrees).
        noise_hu: standard deviation of the added noise (HU).
        fixed_crop: ``((start, stop), ...)`` array indices of the CT kept as the fixed image (cuts
            the lungs at the border when the box passes through them).
        moving_spacing: the moving voxel size (default: the fixed one).
        moving_crop_mm: see :func:`moving_grid`.
        num_landmarks: number of landmark pairs.
        output_dir: when given, the pair is written there (:func:`~monai_cidir.data.write_registration_pair`).
        name: the pair's name (default ``realistic_seed{seed}``).
        overwrite: replace files that differ instead of raising.
        motion_kwargs: other arguments of :class:`SlidingBreathingMotion`.

    Returns:
        the loaded-pair item plus ``motion`` (and ``datalist`` when written).

    Raises:
        FileNotFoundError: when a path does not exist.
        ValueError: for a CT/mask that is not ``(1, X, Y, Z)``, an empty mask, or too few landmarks.

    Example::

        >>> pair = make_realistic_pair("../shared/data/chest_ct.nii.gz", amplitude_mm=20.0)  # doctest: +SKIP
        >>> np.abs(pair["motion"](pair["fixed_landmarks"].numpy()) - pair["moving_landmarks"].numpy()).max()  # doctest: +SKIP
        0.0
    """
    from monai_cidir.data.phantom import _finish_pair, _load_volume, _vessel_landmarks

    name = name or f"realistic_seed{seed}"
    image = _crop(_load_volume(ct, "CT"), fixed_crop)
    if mask is None:
        from monai_cidir.transforms.lungmask import LungMask

        mask = LungMask(backend="threshold")(image)
    else:
        mask = _crop(_load_volume(mask, "lung mask", binary=True), fixed_crop)
    if tuple(mask.shape) != tuple(image.shape):
        raise ValueError(f"make_realistic_pair: the lung mask {tuple(mask.shape)} must be on the CT's grid {tuple(image.shape)}")
    if float(mask.sum()) == 0:
        raise ValueError("make_realistic_pair: the lung mask is empty")
    image, mask = image.float(), (mask > 0.5).float()
    motion = SlidingBreathingMotion.from_lung_mask(
        mask, amplitude_mm=amplitude_mm, translation_mm=translation_mm, rotation_deg=rotation_deg, seed=int(seed), **motion_kwargs
    )
    fmap = CoordinateMapping.from_image(image)
    grid = moving_grid(fmap, translation_mm, moving_spacing, moving_crop_mm)
    moving, moving_mask = _pull_back_realistic(image, mask, grid, motion)
    fixed_lm = _vessel_landmarks(image[0].numpy(), mask[0].numpy() > 0.5, fmap, motion, int(num_landmarks), target_mapping=grid)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x401E]))
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    images = {
        "fixed_image": _add_noise(MetaTensor(image.as_tensor().clone(), affine=fmap.affine.clone(), meta=meta), noise_hu, rng),
        "moving_image": _add_noise(moving, noise_hu, rng),
        "fixed_mask": MetaTensor(mask.as_tensor().clone(), affine=fmap.affine.clone(), meta={"space": "RAS"}),
        "moving_mask": moving_mask,
    }
    return _finish_pair(name, images, fixed_lm, motion, output_dir, overwrite)
