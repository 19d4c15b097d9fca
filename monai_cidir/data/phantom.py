"""Synthetic breathing phantom and synthetic breathing pairs with exact, dense ground truth.

Two entry points produce registration pairs whose true correspondence is known everywhere:

* :func:`make_breathing_phantom` writes an analytic chest phantom (body, ribs, spine, heart,
  liver, stomach gas, trachea and main bronchi, two lungs with a branching vessel tree of
  several calibres, diaphragm domes) at inhale (fixed) and exhale (moving), their lung masks,
  landmark pairs at vessel points and a ``datalist.json``; :func:`generate_breathing_phantom`
  returns the same pair in memory.
* :func:`make_breathing_pair` applies the same breathing motion to a real CT.

Both follow the loaded-pair contract (see :mod:`monai_cidir.transforms.io`): fixed = inhale,
moving = exhale, images ``(1, X, Y, Z)`` float32 HU MetaTensors with an index -> world RAS
affine, masks float32 0/1, landmarks float64 ``(N, 3)`` world RAS mm; files store landmarks as
CSV (header ``x,y,z``) in world **LPS** mm.

The motion (:class:`BreathingMotion`) maps a fixed (inhale) world point ``p`` to the moving
(exhale) point ``p + u(p)``; the exhale image is the inhale anatomy pulled back through the
inverse map, ``exhale(q) = inhale(phi^-1(q))``, so ``moving_landmark = motion(fixed_landmark)``
holds exactly (to float precision) and ``motion.displacement(points)`` is the dense ground truth.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor
from monai.data import MetaTensor

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing, ras_to_lps
from monai_cidir.utils import atomic_path

__all__ = [
    "BreathingMotion",
    "generate_breathing_phantom",
    "make_breathing_phantom",
    "make_breathing_pair",
    "write_registration_pair",
]

# HU values of the phantom's tissues.
_HU_AIR = -1000.0
_HU_FAT = -100.0
_HU_SOFT = 40.0
_HU_LIVER = 60.0
_HU_HEART = 45.0
_HU_LUNG = -850.0
_HU_VESSEL = 40.0
_HU_BONE = 650.0
_HU_SPINE = 300.0
_HU_DISC = 80.0

_AXIS_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# ----------------------------------------------------------------------------------------------
# motion model
# ----------------------------------------------------------------------------------------------
def _lung_box(lung_min, lung_max, amplitude_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lungs' box as float64 corners and size, checked (non-degenerate, positive amplitude)."""
    lo = np.asarray(lung_min, dtype=np.float64).reshape(3)
    hi = np.asarray(lung_max, dtype=np.float64).reshape(3)
    if not np.all(hi - lo > 0):
        raise ValueError(f"expected lung_min < lung_max on every axis, found {lo} and {hi}")
    if not amplitude_mm > 0:
        raise ValueError(f"amplitude_mm must be positive, found {amplitude_mm}")
    return lo, hi, hi - lo


def _seeded_bumps(lung_min: np.ndarray, size: np.ndarray, seed: int, salt: int, num: int, total: float) -> dict:
    """``num`` Gaussian bumps inside the lung box (widths 0.25-0.45 of its height), amplitudes summing to ``total``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), salt]))
    centers = lung_min + size * rng.uniform(0.15, 0.85, size=(num, 3))
    widths = float(size[2]) * rng.uniform(0.25, 0.45, size=num)
    dirs = rng.normal(size=(num, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    weights = rng.uniform(0.5, 1.0, size=num)
    return {"centers": centers, "widths": widths, "amplitudes": dirs * (total * weights / max(weights.sum(), 1e-12))[:, None]}


def _mask_voxels(mask, who: str) -> tuple[CoordinateMapping, np.ndarray]:
    """The mask's grid and the ``(K, 3)`` indices of its voxels (``ValueError`` naming ``who`` when empty)."""
    mapping = CoordinateMapping.from_image(mask)
    data = np.asarray(mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask)[0] > 0.5
    index = np.argwhere(data)
    if index.shape[0] == 0:
        raise ValueError(f"{who}: the lung mask is empty")
    return mapping, index


def _bump_arrays(bumps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(bumps["centers"], dtype=np.float64).reshape(-1, 3),
        np.asarray(bumps["widths"], dtype=np.float64).reshape(-1),
        np.asarray(bumps["amplitudes"], dtype=np.float64).reshape(-1, 3),
    )


class BreathingMotion:
    """Smooth, sliding-free, non-linear inhale -> exhale breathing motion with an exact inverse.

    The map sends a fixed (inhale) world point ``p`` (RAS mm) to the moving (exhale) point
    ``phi(p) = p + u(p)``. It is defined relative to the lungs' bounding box
    ``[lung_min, lung_max]`` (world RAS mm; centre ``c``, half sizes ``h``, height ``H``)::

        s(z)  = (1 - tanh((z - z_m) / L)) / 2,  z_m = z_min + 0.45 H,  L = 0.25 H
                (about 1 at the lung base and below, about 0 at the apex)
        w(z)  = 0.4 + 0.6 s(z)
        u_z   =  A * s(z) * (0.8 + 0.2 tanh((c_y - y) / h_y))       superior-inferior, towards S,
                                                                    larger posteriorly
        u_y   = -A_ap  * (1 + tanh((y - c_y) / h_y)) / 2 * w(z)     anterior wall moves posteriorly
        u_x   = -A_lat * tanh((x - c_x) / h_x) * w(z)               lateral walls move to the midline
        u    += sum_k a_k exp(-|p - m_k|^2 / (2 r_k^2))             a few seeded smooth bumps

    with ``A = amplitude_mm``, ``A_ap = ap_fraction * A``, ``A_lat = lateral_fraction * A``; the
    seeded bumps (centres ``m_k`` inside the lung box, widths ``r_k`` of 0.25-0.45 lung heights,
    vector amplitudes summing to ``perturbation_mm``, default ``0.1 A``) make the field
    non-symmetric and seed-dependent. One smooth field covers body and lungs (no sliding); its
    largest motion is the diaphragm's (superior-inferior, about ``A`` at the lung base, fading
    towards the apex), with smaller anterior-posterior and lateral contraction. The field's
    gradient is small (``|du/dp| < 0.5`` for lungs taller than ~4 A), so the map is a
    diffeomorphism and :meth:`inverse` converges by fixed-point iteration.

    Works on numpy arrays (float64) and torch tensors (differentiable, so ``torch.autograd``
    gives the exact Jacobian of the ground truth).

    Args:
        lung_min: lower corner of the lungs' bounding box, world RAS mm.
        lung_max: upper corner of the lungs' bounding box, world RAS mm.
        amplitude_mm: peak superior-inferior displacement ``A`` (mm).
        ap_fraction: anterior-posterior amplitude as a fraction of ``A``.
        lateral_fraction: lateral amplitude as a fraction of ``A``.
        perturbation_mm: total amplitude of the seeded bumps (default ``0.1 * A``).
        num_bumps: number of seeded bumps.
        seed: seed of the bumps.
        bumps: explicit bumps ``{"centers": (K, 3), "widths": (K,), "amplitudes": (K, 3)}``
            (used by :meth:`from_dict`); overrides ``seed``/``num_bumps``/``perturbation_mm``.

    Raises:
        ValueError: for a degenerate bounding box or a non-positive amplitude.

    Example::

        >>> motion = BreathingMotion((-120, -80, -200), (120, 80, 0), amplitude_mm=10.0, seed=0)
        >>> p = np.array([[50.0, -30.0, -180.0]])
        >>> q = motion(p)                        # exhale position of an inhale point
        >>> bool(np.allclose(motion.inverse(q), p, atol=1e-6))
        True
    """

    def __init__(
        self,
        lung_min: Sequence[float],
        lung_max: Sequence[float],
        amplitude_mm: float = 10.0,
        ap_fraction: float = 0.3,
        lateral_fraction: float = 0.2,
        perturbation_mm: float | None = None,
        num_bumps: int = 4,
        seed: int = 0,
        bumps: dict | None = None,
    ) -> None:
        self.lung_min, self.lung_max, size = _lung_box(lung_min, lung_max, amplitude_mm)
        self.amplitude_mm = float(amplitude_mm)
        self.ap_fraction = float(ap_fraction)
        self.lateral_fraction = float(lateral_fraction)
        self.center = 0.5 * (self.lung_min + self.lung_max)
        self.half = 0.5 * size
        height = float(size[2])
        self.z_mid = float(self.lung_min[2] + 0.45 * height)
        self.z_len = 0.25 * height
        if bumps is None:
            pert = 0.1 * self.amplitude_mm if perturbation_mm is None else float(perturbation_mm)
            bumps = _seeded_bumps(self.lung_min, size, seed, 0xB12E, num_bumps, pert)
        self.bump_centers, self.bump_widths, self.bump_amplitudes = _bump_arrays(bumps)

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_lung_mask(cls, mask: torch.Tensor, **kwargs) -> BreathingMotion:
        """Motion fitted to the bounding box of a lung mask (MetaTensor ``(1, X, Y, Z)``, RAS affine).

        Args:
            mask: 0/1 lung mask with an ``affine``.
            kwargs: the other arguments of :class:`BreathingMotion`.

        Raises:
            ValueError: when the mask is empty.
        """
        mapping, index = _mask_voxels(mask, "BreathingMotion.from_lung_mask")
        lo, hi = index.min(0), index.max(0)
        corners = np.array([[hi[a] if c[a] else lo[a] for a in range(3)] for c in np.ndindex(2, 2, 2)], dtype=np.float64)
        world = mapping.index_to_world(torch.from_numpy(corners)).numpy()
        return cls(world.min(0), world.max(0), **kwargs)

    def to_dict(self) -> dict:
        """Plain-data (JSON-serialisable) description; :meth:`from_dict` rebuilds the exact map."""
        return {
            "type": "BreathingMotion",
            "convention": "fixed (inhale) world RAS mm p -> moving (exhale) p + u(p)",
            "lung_min": self.lung_min.tolist(),
            "lung_max": self.lung_max.tolist(),
            "amplitude_mm": self.amplitude_mm,
            "ap_fraction": self.ap_fraction,
            "lateral_fraction": self.lateral_fraction,
            "bumps": {
                "centers": self.bump_centers.tolist(),
                "widths": self.bump_widths.tolist(),
                "amplitudes": self.bump_amplitudes.tolist(),
            },
        }

    @classmethod
    def from_dict(cls, state: dict) -> BreathingMotion:
        """Rebuild a motion saved by :meth:`to_dict` (or read from a ``*_motion.json`` file)."""
        return cls(
            state["lung_min"],
            state["lung_max"],
            amplitude_mm=state["amplitude_mm"],
            ap_fraction=state["ap_fraction"],
            lateral_fraction=state["lateral_fraction"],
            bumps=state["bumps"],
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> BreathingMotion:
        """Read a motion written beside a phantom/pair (``<name>_motion.json``).

        Raises:
            FileNotFoundError: when the file does not exist.
            ValueError: when the file does not describe a BreathingMotion.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"motion file not found: {path}")
        state = json.loads(path.read_text())
        if state.get("type") != "BreathingMotion":
            raise ValueError(f"{path} does not describe a BreathingMotion (type={state.get('type')!r})")
        return cls.from_dict(state)

    def __repr__(self) -> str:
        return (
            f"BreathingMotion(amplitude_mm={self.amplitude_mm:.3g}, ap_fraction={self.ap_fraction:.3g}, "
            f"lateral_fraction={self.lateral_fraction:.3g}, bumps={len(self.bump_widths)})"
        )

    # ------------------------------------------------------------------ evaluation
    def displacement(self, points):
        """Displacement ``u(p)`` (mm) at fixed world points ``(..., 3)`` RAS mm.

        Args:
            points: numpy array or torch tensor (differentiable) of shape ``(..., 3)``.

        Returns:
            ``u(p)`` of the same type and shape (float64 for numpy input, the input's dtype for torch).

        Raises:
            ValueError: when the last dimension is not 3.
        """
        is_torch = isinstance(points, torch.Tensor)
        if is_torch:
            p = points if points.is_floating_point() else points.to(torch.float64)
            tanh, exp, stack = torch.tanh, torch.exp, torch.stack
        else:
            p = np.asarray(points, dtype=np.float64)
            tanh, exp, stack = np.tanh, np.exp, np.stack
        if p.shape[-1] != 3:
            raise ValueError(f"expected points of shape (..., 3), found {tuple(p.shape)}")
        x, y, z = (p[..., i] if is_torch else np.ascontiguousarray(p[..., i]) for i in range(3))
        cx, cy = float(self.center[0]), float(self.center[1])
        hx, hy = float(self.half[0]), float(self.half[1])
        amp = self.amplitude_mm
        s = 0.5 * (1.0 - tanh((z - self.z_mid) / self.z_len))
        w = 0.4 + 0.6 * s
        ux = (-self.lateral_fraction * amp) * tanh((x - cx) / hx) * w
        uy = (-0.5 * self.ap_fraction * amp) * (1.0 + tanh((y - cy) / hy)) * w
        uz = amp * s * (0.8 + 0.2 * tanh((cy - y) / hy))
        for m, r, a in zip(self.bump_centers, self.bump_widths, self.bump_amplitudes):
            g = exp(((x - m[0]) ** 2 + (y - m[1]) ** 2 + (z - m[2]) ** 2) * (-0.5 / r**2))
            ux = ux + a[0] * g
            uy = uy + a[1] * g
            uz = uz + a[2] * g
        return stack([ux, uy, uz], -1)

    def __call__(self, points):
        """The forward map ``p + u(p)`` (fixed/inhale -> moving/exhale world RAS mm)."""
        if not isinstance(points, torch.Tensor):
            points = np.asarray(points, dtype=np.float64)
        return points + self.displacement(points)

    def inverse(self, points, tol: float = 1e-9, max_iter: int = 200):
        """The inverse map: moving (exhale) world points ``q`` -> fixed points ``p`` with ``p + u(p) = q``.

        Fixed-point iteration ``p <- q - u(p)`` (a contraction since ``|du/dp| < 1``).

        Args:
            points: ``(..., 3)`` numpy array or torch tensor, world RAS mm.
            tol: stop when the largest residual ``|p + u(p) - q|`` is below this (mm).
            max_iter: iteration limit.

        Returns:
            ``p`` of the same type and shape.

        Raises:
            RuntimeError: when the iteration does not reach ``tol`` (the motion is not invertible there).
        """
        is_torch = isinstance(points, torch.Tensor)
        q = points.detach().to(torch.float64) if is_torch else np.asarray(points, dtype=np.float64)
        p = q - self.displacement(q)
        residual = float("inf")
        for _ in range(max_iter):
            u = self.displacement(p)
            p_next = q - u
            step = p_next - p
            residual = float(step.abs().max()) if is_torch else float(np.abs(step).max(initial=0.0))
            p = p_next
            if residual < tol:
                break
        else:
            raise RuntimeError(
                f"BreathingMotion.inverse did not converge (last step {residual:.3g} mm > tol {tol:.3g} mm); "
                "the amplitude is too large for the lung size"
            )
        return p.to(points.dtype) if is_torch else p


# ----------------------------------------------------------------------------------------------
# analytic anatomy
# ----------------------------------------------------------------------------------------------
def _ramp(signed_distance, width):
    """Partial-volume occupancy from a signed distance (negative inside), linear over ``width`` mm."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0)


def _tubes(r: np.ndarray, segments, w: float, max_shift: float, index_range) -> np.ndarray:
    """Occupancy (0..1, soft edge ``w``) of the union of tubes ``(a, b, radius)`` at the points ``r``
    ``(3, ...)``, rendered segment by segment in the index box each can reach (``index_range``)."""
    occupancy = np.zeros(r.shape[1:], dtype=np.float64)
    for a, b, radius in segments:
        pad = radius + w + max_shift + 1e-3
        sl = index_range(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if sl is None:
            continue
        occ = _ramp(_segment_distance(r[(slice(None),) + sl], a, b) - radius, w)
        np.maximum(occupancy[sl], occ, out=occupancy[sl])
    return occupancy


def _segment_distance(r: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from component-first points ``r`` (3, ...) to the segment [a, b]."""
    ab = b - a
    d0, d1, d2 = r[0] - a[0], r[1] - a[1], r[2] - a[2]
    t = np.clip((d0 * ab[0] + d1 * ab[1] + d2 * ab[2]) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.sqrt((d0 - t * ab[0]) ** 2 + (d1 - t * ab[1]) ** 2 + (d2 - t * ab[2]) ** 2)


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    return v * np.cos(angle) + np.cross(axis, v) * np.sin(angle) + axis * (axis @ v) * (1.0 - np.cos(angle))


class _Anatomy:
    """The phantom's anatomy as analytic functions of world RAS position (mm), sized to the field of view.

    All functions take component-first positions ``r`` of shape ``(3, ...)``, relative to the centre.
    """

    def __init__(self, half_extent: np.ndarray, spacing: np.ndarray, rng: np.random.Generator):
        ex, ey, ez = (float(v) for v in half_extent)
        self.edge = float(np.mean(spacing))  # partial-volume width
        self.min_spacing = float(np.min(spacing))

        def jitter(scale):
            return 1.0 + scale * rng.uniform(-1.0, 1.0)

        # body: an elliptic cylinder along z
        self.bx, self.by, self.yb = 0.90 * ex * jitter(0.02), 0.80 * ey * jitter(0.02), -0.04 * ey
        self.bmin = min(self.bx, self.by)
        # lungs (side +1 = right = +x in RAS, -1 = left)
        self.z_top = 0.80 * ez * jitter(0.02)
        self.z_bot = -0.60 * ez * jitter(0.02)
        height = self.z_top - self.z_bot
        self.lungs = {}
        for side in (1.0, -1.0):
            ax = 0.31 * self.bx * jitter(0.04)
            xl = side * (0.105 * self.bx + ax)
            self.lungs[side] = {
                "center": np.array([xl, self.yb - 0.03 * self.by, self.z_bot + 0.30 * height]),
                "semi": np.array([ax, 0.60 * self.by * jitter(0.03), 0.70 * height]),
                "dome_base": self.z_bot + (0.04 * height if side > 0 else 0.0),
                "dome_height": 0.26 * height * jitter(0.05),
            }
        # heart (left-anterior, low), spine (posterior)
        self.heart_c = np.array([-0.12 * self.bx, self.yb + 0.26 * self.by, self.z_bot + 0.22 * height])
        self.heart_semi = np.array([0.28 * self.bx, 0.34 * self.by, 0.26 * height])
        self.spine_c = np.array([0.0, self.yb - 0.66 * self.by])
        self.spine_r = 0.15 * self.bmin
        # ribs
        self.rib_period = max(25.0, 4.0 * float(spacing[2]))
        self.rib_phase = rng.uniform(0.0, self.rib_period)
        # airways: trachea down to the carina, two main bronchi into the hila
        self.r_trachea = max(0.055 * self.bmin, 0.9 * float(np.min(spacing)))
        y_t = self.yb - 0.05 * self.by
        self.carina = np.array([0.0, y_t, self.z_top - 0.32 * height])
        r_b = 0.72 * self.r_trachea
        self.airways = [(np.array([0.0, y_t, ez + 10.0 * self.edge]), self.carina.copy(), self.r_trachea)]
        self.hilum = {}
        for side in (1.0, -1.0):
            lc = self.lungs[side]["center"]
            target = np.array([lc[0], lc[1], self.carina[2] - 0.20 * height])
            entry = self._entry_point(self.carina, target, side)
            direction = (target - self.carina) / np.linalg.norm(target - self.carina)
            self.airways.append((self.carina.copy(), entry + 1.5 * r_b * direction, r_b))
            self.hilum[side] = entry
        # stomach gas under the left dome
        left = self.lungs[-1.0]
        gx, gy = left["center"][0] + 0.1 * left["semi"][0], left["center"][1] + 0.2 * left["semi"][1]
        gz = float(self._dome(np.array([gx, gy, 0.0]), -1.0)) - 0.10 * height
        self.gas_c = np.array([gx, gy, gz])
        self.gas_semi = np.array([0.10 * self.bx, 0.10 * self.by, 0.05 * height])
        # texture: smooth random field (plane waves) that moves with the tissue
        k = 24
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.tex_k = (dirs * (2.0 * np.pi / rng.uniform(6.0, 20.0, size=k))[:, None]).astype(np.float32)
        self.tex_phi = rng.uniform(0.0, 2.0 * np.pi, size=k).astype(np.float32)
        self.tex_scale = np.sqrt(2.0 / k)
        # vessel trees
        self.segments = []  # (a, b, radius, generation, side)
        for side in (1.0, -1.0):
            self._grow_tree(side, rng, r_b)

    # -------------------------------------------------------------- signed functions (mm, < 0 inside)
    def _rho(self, r):
        return np.sqrt((r[0] / self.bx) ** 2 + ((r[1] - self.yb) / self.by) ** 2)

    @staticmethod
    def _ellipsoid(r, center, semi):
        q = np.sqrt(((r[0] - center[0]) / semi[0]) ** 2 + ((r[1] - center[1]) / semi[1]) ** 2 + ((r[2] - center[2]) / semi[2]) ** 2)
        return (q - 1.0) * float(np.min(semi))

    def _dome(self, r, side):
        lung = self.lungs[side]
        c, a = lung["center"], lung["semi"]
        return lung["dome_base"] + lung["dome_height"] * (1.0 - ((r[0] - c[0]) / a[0]) ** 2 - ((r[1] - c[1]) / a[1]) ** 2)

    def lung_sdf(self, r, side):
        lung = self.lungs[side]
        f = self._ellipsoid(r, lung["center"], lung["semi"])
        f = np.maximum(f, self._dome(r, side) - r[2])  # above the diaphragm
        f = np.maximum(f, (self._rho(r) - 0.78) * self.bmin)  # inside the rib cage
        f = np.maximum(f, -self._ellipsoid(r, self.heart_c, self.heart_semi * 1.06))  # cardiac notch
        spine = np.hypot(r[0] - self.spine_c[0], r[1] - self.spine_c[1]) - 1.25 * self.spine_r
        return np.maximum(f, -spine)

    def lungs_sdf(self, r):
        return np.minimum(self.lung_sdf(r, 1.0), self.lung_sdf(r, -1.0))

    def _entry_point(self, start, target, side):
        """Where the segment start -> target first enters the lung (dense sampling, 0.05% of its length)."""
        t = np.linspace(0.0, 1.0, 2001)
        pts = start[:, None] + t[None] * (target - start)[:, None]
        inside = np.flatnonzero(self.lung_sdf(pts, side) < 0)
        if len(inside) == 0:
            raise RuntimeError("phantom construction failed: the hilum target is outside the lung")
        return pts[:, inside[0]]

    def _grow_tree(self, side, rng, r_b, num_terminals: int = 96):
        """A vessel tree that fills the lung: recursive median splits of random terminal points.

        ``num_terminals`` points are drawn uniformly inside the lung; from the hilum, each segment
        runs part of the way towards the centroid of the terminals it feeds, then the set is
        split in two along its longest axis (a branch point) and each half is fed recursively;
        single terminals are reached directly. Radii grow like Murray's law, with ``n^(1/3)`` for
        ``n`` terminals fed, from half a voxel at the terminals to 0.85 trachea radii at the root.
        """
        lung = self.lungs[side]
        margin = max(2.0, self.edge)
        lo, hi = lung["center"] - lung["semi"], lung["center"] + lung["semi"]
        terminals = np.empty((0, 3))
        while len(terminals) < num_terminals:
            cand = lo + (hi - lo) * rng.uniform(size=(4 * num_terminals, 3))
            terminals = np.concatenate([terminals, cand[self.lung_sdf(cand.T, side) < -margin]])
        terminals = terminals[:num_terminals]
        r_min, r_root = 0.5 * self.min_spacing, max(0.85 * self.r_trachea, self.min_spacing)
        root_dir = terminals.mean(0) - self.hilum[side]
        root_dir /= np.linalg.norm(root_dir)
        start = self.hilum[side] + np.array([0.0, 1.3 * r_b, -1.3 * r_b]) - 1.0 * r_b * root_dir
        stack = [(start, terminals, 0, 0.45)]
        while stack:
            a, points, gen, fraction = stack.pop()
            radius = r_min + (r_root - r_min) * (np.cbrt(len(points)) - 1.0) / (np.cbrt(num_terminals) - 1.0)
            if len(points) == 1:
                self.segments.append((a, points[0], radius, gen, side))
                continue
            centroid = points.mean(0)
            b = a + fraction * (centroid - a)
            b = b + 0.08 * np.linalg.norm(centroid - a) * rng.normal(size=3)
            if self.lung_sdf(b[:, None], side)[0] > -margin:
                b = a + fraction * (centroid - a)
            self.segments.append((a, b, radius, gen, side))
            axis = np.argmax(points.max(0) - points.min(0))
            order = np.argsort(points[:, axis])
            half = len(points) // 2
            stack.append((b, points[order[:half]], gen + 1, 0.55))
            stack.append((b, points[order[half:]], gen + 1, 0.55))

    # -------------------------------------------------------------- rendering
    def texture(self, r):
        r32 = r.astype(np.float32)
        acc = np.zeros(r.shape[1:], dtype=np.float32)
        for k, phi in zip(self.tex_k, self.tex_phi):
            acc += np.cos(r32[0] * k[0] + r32[1] * k[1] + r32[2] * k[2] + phi)
        return self.tex_scale * acc

    def render(self, r: np.ndarray, index_range, max_shift: float):
        """HU and lung indicator at anatomical positions ``r`` (3, X, Y, Z), relative to the centre.

        Args:
            r: anatomical (fixed-space, centred) position of every voxel of the target grid.
            index_range: callable(lo, hi) -> slices of the target voxels whose *grid* position may
                lie in the box [lo, hi] (centred world mm), used to render vessels locally.
            max_shift: bound on |grid position - anatomical position| (mm).
        """
        w = self.edge
        rho = self._rho(r)
        tex = self.texture(r)
        hu = _HU_AIR + (_HU_FAT - _HU_AIR) * _ramp((rho - 1.0) * self.bmin, w)
        hu += (_HU_SOFT + 8.0 * tex - hu) * _ramp((rho - 0.92) * self.bmin, w)
        # liver under the right dome, heart
        liver = np.maximum(r[2] - self._dome(r, 1.0) + 2.0 * w, -r[0] - 0.10 * self.bx)
        liver = np.maximum(liver, (rho - 0.90) * self.bmin)
        hu += (_HU_LIVER + 6.0 * tex - hu) * _ramp(liver, w)
        hu += (_HU_HEART - hu) * _ramp(self._ellipsoid(r, self.heart_c, self.heart_semi), w)
        # lungs
        lung_f = self.lungs_sdf(r)
        hu += (_HU_LUNG + 30.0 * tex - hu) * _ramp(lung_f, w)
        # vessels (local rendering, segment by segment)
        vessel = _tubes(r, [seg[:3] for seg in self.segments], w, max_shift, index_range)
        hu += (_HU_VESSEL - hu) * vessel
        # airways and stomach gas
        hu += (_HU_AIR - hu) * _tubes(r, self.airways, w, max_shift, index_range)
        hu += (_HU_AIR - hu) * _ramp(self._ellipsoid(r, self.gas_c, self.gas_semi), w)
        # spine with discs, ribs
        spine_d = np.hypot(r[0] - self.spine_c[0], r[1] - self.spine_c[1]) - self.spine_r
        disc = np.abs(((r[2] + 7.0) % 30.0) - 15.0) < 3.5
        hu += (np.where(disc, _HU_DISC, _HU_SPINE + 20.0 * tex) - hu) * _ramp(spine_d, w)
        band = np.abs(((r[2] + 0.4 * (r[1] - self.yb) + self.rib_phase) % self.rib_period) - 0.5 * self.rib_period)
        # band = distance (mm, along z) to the nearest rib's mid-line, ribs sloping down anteriorly
        rib_occ = _ramp(0.5 * self.rib_period - band - 0.18 * self.rib_period, w)
        rib_occ *= _ramp(np.abs(rho - 0.835) * self.bmin - 0.035 * self.bmin, w)
        rib_occ *= r[2] < self.z_top + 0.05 * (self.z_top - self.z_bot)
        hu += (_HU_BONE - hu) * rib_occ
        return hu, lung_f < 0

    def landmark_candidates(self, min_radius: float) -> np.ndarray:
        """Vessel centreline points (branch points, segment thirds) inside the lungs, (N, 3) centred mm."""
        points = []
        for a, b, radius, _, _ in self.segments:
            if radius < min_radius:
                continue
            for t in (1.0 / 3.0, 2.0 / 3.0, 1.0):
                points.append(a + t * (b - a))
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        inside = self.lungs_sdf(points.T) < -max(2.0, self.edge)
        return points[inside]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _direction_from_code(orientation: str) -> np.ndarray:
    code = orientation.upper()
    if len(code) != 3 or any(c not in _AXIS_CODES for c in code) or len({_AXIS_CODES[c][0] for c in code}) != 3:
        raise ValueError(f"orientation must be a 3-letter code such as 'LPS' or 'RAS' (one of R/L, A/P, S/I each), found {orientation!r}")
    direction = np.zeros((3, 3))
    for col, c in enumerate(code):
        axis, sign = _AXIS_CODES[c]
        direction[axis, col] = sign
    return direction


def _grid_affine(shape, spacing, center, orientation) -> np.ndarray:
    base = affine_from_spacing(spacing, (0.0, 0.0, 0.0), _direction_from_code(orientation))
    offset = np.asarray(center, dtype=np.float64) - CoordinateMapping(base, shape).center.numpy()
    return affine_from_spacing(spacing, offset, _direction_from_code(orientation))


def _index_range_fn(mapping: CoordinateMapping, origin: np.ndarray):
    """Callable (lo, hi) in centred world mm -> slices of voxels whose centre lies in that box."""
    shape = np.asarray(mapping.spatial_shape)

    def index_range(lo, hi):
        corners = np.array([[hi[a] if c[a] else lo[a] for a in range(3)] for c in np.ndindex(2, 2, 2)]) + origin
        idx = mapping.world_to_index(torch.from_numpy(corners)).numpy()
        start = np.maximum(np.floor(idx.min(0)).astype(int), 0)
        stop = np.minimum(np.ceil(idx.max(0)).astype(int) + 1, shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(s), int(e)) for s, e in zip(start, stop))

    return index_range


def _centred(world: np.ndarray, center: np.ndarray) -> np.ndarray:
    """(X, Y, Z, 3) world mm -> component-first (3, X, Y, Z) positions relative to ``center``."""
    return np.ascontiguousarray(np.moveaxis(world - center, -1, 0))


def _metatensor(array: np.ndarray, affine: np.ndarray, name: str) -> MetaTensor:
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)[None]),
        affine=torch.as_tensor(affine, dtype=torch.float64),
        meta={"space": "RAS", "filename_or_obj": name},
    )


def _select_spread(points: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``num`` of ``points`` spread out: greedy farthest-point selection from a random start."""
    if num >= len(points):
        return points
    chosen = [int(rng.integers(len(points)))]
    dist = np.linalg.norm(points - points[chosen[0]], axis=1)
    for _ in range(num - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return points[np.sort(chosen)]


# ----------------------------------------------------------------------------------------------
# the phantom
# ----------------------------------------------------------------------------------------------
def generate_breathing_phantom(
    seed: int = 0,
    shape: Sequence[int] = (112, 96, 80),
    spacing: Sequence[float] = (2.8, 2.8, 3.2),
    amplitude_mm: float = 10.0,
    num_landmarks: int = 200,
    noise_hu: float = 10.0,
    orientation: str = "LPS",
    center_mm: Sequence[float] = (0.0, -20.0, -150.0),
    moving_shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
    name: str | None = None,
) -> dict:
    """Render the synthetic breathing phantom in memory (the loaded-pair item plus ``"motion"``).

    The anatomy is analytic and sized to the field of view (``shape * spacing``): a body
    (elliptic cylinder, fat layer), ribs, spine with discs, heart, liver, stomach gas, trachea
    and main bronchi (air, excluded from the lung masks), two lungs (about -850 HU with a smooth
    texture) cut from below by diaphragm domes, and in each lung a branching vessel tree (+40 HU,
    7 generations, radii shrinking by 0.79 per branching). The exhale image is the same anatomy
    evaluated at ``motion.inverse(q)`` for every exhale voxel ``q`` (no interpolation), plus
    independent white noise. Intensities are rounded to whole HU (as stored in the int16 files).

    Args:
        seed: seed of anatomy, motion, landmarks and noise (same seed -> same output).
        shape: array shape ``(X, Y, Z)`` of both images.
        spacing: voxel size (mm) along the array axes.
        amplitude_mm: peak superior-inferior motion (see :class:`BreathingMotion`), 5-15 mm typical.
        num_landmarks: number of landmark pairs (vessel centreline and branch points in the lungs).
        noise_hu: standard deviation of the white noise added to each image (HU).
        orientation: array axis orientation code (``"LPS"``: as ITK/DICOM CTs; ``"RAS"``, ...).
        center_mm: world RAS position of the fixed grid's centre.
        moving_shift_mm: shift of the moving grid's origin (mm), to test grids that differ.
        name: the pair's name (default ``"phantom_seed{seed}"``).

    Returns:
        dict with ``name``, ``fixed_image``, ``moving_image``, ``fixed_mask``, ``moving_mask``
        (MetaTensors ``(1, X, Y, Z)`` float32), ``fixed_landmarks``, ``moving_landmarks``
        (float64 ``(N, 3)`` world RAS mm) and ``motion`` (:class:`BreathingMotion`).

    Raises:
        ValueError: for a bad shape, spacing, orientation, or too few landmark candidates.

    Example::

        >>> item = generate_breathing_phantom(seed=0, shape=(48, 48, 32), num_landmarks=100)
        >>> item["fixed_image"].shape, item["fixed_landmarks"].shape
        (torch.Size([1, 48, 48, 32]), torch.Size([100, 3]))
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"expected a 3-D shape of at least 16 voxels per axis, found {shape}")
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"expected 3 positive spacings (mm), found {spacing.tolist()}")
    name = name or f"phantom_seed{seed}"
    seeds = np.random.SeedSequence([int(seed), 0xC1D1]).spawn(4)
    rng_anat, rng_land, rng_noise_f, rng_noise_m = (np.random.default_rng(s) for s in seeds)
    center = np.asarray(center_mm, dtype=np.float64)

    fixed_affine = _grid_affine(shape, spacing, center, orientation)
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] += np.asarray(moving_shift_mm, dtype=np.float64)
    fixed_map = CoordinateMapping(fixed_affine, shape)
    moving_map = CoordinateMapping(moving_affine, shape)
    half_extent = 0.5 * (np.asarray(shape) - 1) * spacing
    half_extent = np.abs(_direction_from_code(orientation)) @ half_extent  # per world axis
    anatomy = _Anatomy(half_extent, spacing, rng_anat)

    # inhale: the anatomy at the grid's own positions
    fixed_world = fixed_map.world_grid(dtype=torch.float64).numpy()
    hu_f, lung_f = anatomy.render(_centred(fixed_world, center), _index_range_fn(fixed_map, center), 0.0)
    lung_mask_f = _metatensor(lung_f, fixed_affine, f"{name}_inhale_lungmask")
    motion = BreathingMotion.from_lung_mask(lung_mask_f, amplitude_mm=amplitude_mm, seed=int(seed))

    # exhale: the anatomy pulled back through the exact inverse motion
    moving_world = moving_map.world_grid(dtype=torch.float64).numpy()
    pulled = motion.inverse(moving_world, tol=1e-5)
    max_shift = float(np.linalg.norm(pulled - moving_world, axis=-1).max())
    hu_m, lung_m = anatomy.render(_centred(pulled, center), _index_range_fn(moving_map, center), max_shift)

    hu_f = np.round(hu_f + noise_hu * rng_noise_f.standard_normal(hu_f.shape))
    hu_m = np.round(hu_m + noise_hu * rng_noise_m.standard_normal(hu_m.shape))

    # landmarks: vessel points inside the lungs, inside both fields of view
    candidates = anatomy.landmark_candidates(min_radius=0.3 * float(spacing.min())) + center
    moved = motion(candidates)
    margin = 2.0
    inside = np.ones(len(candidates), dtype=bool)
    for mapping, pts in ((fixed_map, candidates), (moving_map, moved)):
        idx = mapping.world_to_index(torch.from_numpy(pts)).numpy()
        inside &= np.all((idx >= margin) & (idx <= np.asarray(shape) - 1 - margin), axis=1)
    candidates = candidates[inside]
    if len(candidates) < num_landmarks:
        raise ValueError(
            f"the phantom has only {len(candidates)} vessel landmark candidates for num_landmarks={num_landmarks}; "
            "use a larger shape or fewer landmarks"
        )
    fixed_lm = _select_spread(candidates, int(num_landmarks), rng_land)
    moving_lm = motion(fixed_lm)

    return {
        "name": name,
        "fixed_image": _metatensor(hu_f, fixed_affine, f"{name}_inhale"),
        "moving_image": _metatensor(hu_m, moving_affine, f"{name}_exhale"),
        "fixed_mask": lung_mask_f,
        "moving_mask": _metatensor(lung_m, moving_affine, f"{name}_exhale_lungmask"),
        "fixed_landmarks": torch.from_numpy(fixed_lm),
        "moving_landmarks": torch.from_numpy(moving_lm),
        "motion": motion,
    }


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _nifti_bytes(image: torch.Tensor, dtype) -> bytes:
    import nibabel as nib

    data = np.asarray(image.detach().cpu().numpy()[0])
    affine = np.asarray(image.affine, dtype=np.float64)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.round(data), info.min, info.max)
    nii = nib.Nifti1Image(data.astype(dtype), affine)
    nii.header.set_xyzt_units("mm")
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    return gzip.compress(nii.to_bytes(), compresslevel=6, mtime=0)


def _csv_bytes(points_ras: torch.Tensor) -> bytes:
    lps = ras_to_lps(np.asarray(points_ras.detach().cpu().numpy(), dtype=np.float64))
    lines = ["x,y,z"] + [f"{x:.6f},{y:.6f},{z:.6f}" for x, y, z in lps]
    return ("\n".join(lines) + "\n").encode()


def _write_checked(path: Path, content: bytes, overwrite: bool) -> None:
    """Write ``content`` unless an identical file exists; refuse to replace a different one."""
    if path.exists():
        if path.read_bytes() == content:
            return
        if not overwrite:
            raise FileExistsError(
                f"{path} exists and differs from what these arguments produce; remove it, pass overwrite=True, "
                "or choose another output_dir or name"
            )
    with atomic_path(path) as tmp:
        tmp.write_bytes(content)


def write_registration_pair(item: dict, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a loaded pair (+ its ``motion``) as files and add it to ``output_dir/datalist.json``.

    Files (``<name>`` = ``item["name"]``): ``<name>_inhale.nii.gz`` / ``<name>_exhale.nii.gz``
    (int16 HU), ``<name>_inhale_lungmask.nii.gz`` / ``<name>_exhale_lungmask.nii.gz`` (uint8 0/1),
    ``<name>_inhale_landmarks.csv`` / ``<name>_exhale_landmarks.csv`` (header ``x,y,z``, world LPS
    mm), ``<name>_motion.json`` (:meth:`BreathingMotion.to_dict`). ``datalist.json`` holds
    ``{"training": [record, ...], "motion": {name: "<name>_motion.json"}}`` with paths relative to
    ``output_dir``; an existing datalist keeps its other records (a record of the same name must
    be identical).

    Args:
        item: loaded pair as returned by :func:`generate_breathing_phantom` / :func:`make_breathing_pair`.
        output_dir: folder to write into (created when missing).
        overwrite: replace existing files that differ instead of raising.

    Returns:
        the path of ``datalist.json``.

    Raises:
        FileExistsError: when a file (or the datalist record) exists and differs, unless ``overwrite``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = str(item["name"])
    record = {"name": name}
    files = {
        "fixed_image": (f"{name}_inhale.nii.gz", lambda: _nifti_bytes(item["fixed_image"], np.int16)),
        "moving_image": (f"{name}_exhale.nii.gz", lambda: _nifti_bytes(item["moving_image"], np.int16)),
        "fixed_mask": (f"{name}_inhale_lungmask.nii.gz", lambda: _nifti_bytes(item["fixed_mask"], np.uint8)),
        "moving_mask": (f"{name}_exhale_lungmask.nii.gz", lambda: _nifti_bytes(item["moving_mask"], np.uint8)),
        "fixed_landmarks": (f"{name}_inhale_landmarks.csv", lambda: _csv_bytes(item["fixed_landmarks"])),
        "moving_landmarks": (f"{name}_exhale_landmarks.csv", lambda: _csv_bytes(item["moving_landmarks"])),
    }
    for key, (filename, encode) in files.items():
        if item.get(key) is None:
            continue
        _write_checked(out / filename, encode(), overwrite)
        record[key] = filename
    motion_file = None
    if item.get("motion") is not None:
        motion_file = f"{name}_motion.json"
        _write_checked(out / motion_file, (json.dumps(item["motion"].to_dict(), indent=1) + "\n").encode(), overwrite)

    datalist_path = out / "datalist.json"
    datalist = {"training": [], "motion": {}}
    if datalist_path.exists():
        try:
            datalist = json.loads(datalist_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{datalist_path} exists but is not valid JSON: {e}") from e
        datalist.setdefault("training", [])
        datalist.setdefault("motion", {})
    records = [r for r in datalist["training"] if r.get("name") != name]
    old = [r for r in datalist["training"] if r.get("name") == name]
    if old and old[0] != record and not overwrite:
        raise FileExistsError(f"{datalist_path} already has a different record named {name!r}; pass overwrite=True or another name")
    if old and old[0] == record and (motion_file is None or datalist["motion"].get(name) == motion_file):
        return datalist_path
    if old:  # keep the record's position
        records = [record if r.get("name") == name else r for r in datalist["training"]]
    else:
        records.append(record)
    datalist["training"] = records
    if motion_file is not None:
        datalist["motion"][name] = motion_file
    datalist.setdefault(
        "description",
        "Synthetic breathing pairs (monai_cidir.data.phantom): fixed = inhale, moving = exhale; landmark CSVs in "
        "world LPS mm; <name>_motion.json is the exact fixed -> moving map (monai_cidir.data.BreathingMotion.load).",
    )
    _write_checked(datalist_path, (json.dumps(datalist, indent=2) + "\n").encode(), overwrite=True)
    return datalist_path


def make_breathing_phantom(output_dir: str | os.PathLike, *, overwrite: bool = False, **phantom: Any) -> Path:
    """Write the synthetic breathing phantom (inhale/exhale CT, masks, landmarks, datalist.json).

    Renders :func:`generate_breathing_phantom` (``phantom`` are its arguments) and writes it with
    :func:`write_registration_pair`: NIfTI images (int16 HU), lung masks (uint8), landmark CSVs
    (``x,y,z`` world LPS mm, exact ground truth: moving = ``motion(fixed)``), the motion as JSON,
    and ``datalist.json`` (records follow the loaded-pair contract; paths relative to
    ``output_dir``). Deterministic by seed; calling again with the same arguments leaves the
    files untouched; a file that exists and differs is never overwritten (``FileExistsError``)
    unless ``overwrite=True``. Takes about a second at the default size.

    Args:
        output_dir: folder to write into (created when missing).
        overwrite: replace files that differ instead of raising.
        phantom: the keyword arguments of :func:`generate_breathing_phantom` (``seed``, ``shape``,
            e.g. ``(48, 48, 32)`` for a tiny test phantom, ``spacing``, ``amplitude_mm``,
            ``num_landmarks``, ``noise_hu``, ``orientation``, ``center_mm``, ``moving_shift_mm``,
            ``name``); an unknown one is a ``TypeError`` naming it.

    Returns:
        the path of ``output_dir/datalist.json``.

    Raises:
        FileExistsError: when an existing file differs from what these arguments produce.

    Example::

        >>> datalist = make_breathing_phantom("data/cidir_phantom", seed=0)  # doctest: +SKIP
        >>> from monai_cidir.data import load_pair_datalist
        >>> from monai_cidir.transforms import LoadRegistrationPaird
        >>> item = LoadRegistrationPaird()(load_pair_datalist(datalist)[0])  # doctest: +SKIP
    """
    item = generate_breathing_phantom(**phantom)
    return write_registration_pair(item, output_dir, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# a synthetic breathing pair from a real CT
# ----------------------------------------------------------------------------------------------
def _load_volume(value, what: str, binary: bool = False) -> MetaTensor:
    if isinstance(value, (str, os.PathLike)):
        from monai.transforms import LoadImage

        path = Path(value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"make_breathing_pair: {what} not found: {path}")
        try:
            value = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
        except Exception as e:  # readers raise many types
            raise RuntimeError(f"make_breathing_pair: could not read the {what} {path}: {e}") from e
    if not isinstance(value, MetaTensor):
        raise TypeError(f"make_breathing_pair: expected the {what} as a path or a MetaTensor with an affine, found {type(value).__name__}")
    if value.ndim != 4 or value.shape[0] != 1:
        raise ValueError(f"make_breathing_pair: expected the {what} as (1, X, Y, Z), found shape {tuple(value.shape)}")
    value = value.float()
    return (value > 0.5).float() if binary else value


def _pull_back(images, mapping: CoordinateMapping, motion: BreathingMotion, chunk: int = 1 << 21):
    """Each ``(1, X, Y, Z)`` image evaluated at ``motion.inverse(q)`` for every voxel ``q`` of its grid.

    Trilinear, border values outside the field of view; computed in slabs of about ``chunk`` voxels.
    """
    shape = mapping.spatial_shape
    volumes = [convert_to_tensor(img[0], track_meta=False).float() for img in images]
    outs = [torch.empty(shape, dtype=torch.float32) for _ in volumes]
    slab = max(1, chunk // (shape[0] * shape[1]))
    for k0 in range(0, shape[2], slab):
        k1 = min(shape[2], k0 + slab)
        idx = torch.stack(
            torch.meshgrid(
                torch.arange(shape[0], dtype=torch.float64),
                torch.arange(shape[1], dtype=torch.float64),
                torch.arange(k0, k1, dtype=torch.float64),
                indexing="ij",
            ),
            -1,
        ).reshape(-1, 3)
        p = torch.from_numpy(motion.inverse(mapping.index_to_world(idx).numpy(), tol=1e-5)).float()
        for volume, out in zip(volumes, outs):
            out[:, :, k0:k1] = mapping.sample(volume, p, padding_mode="border").reshape(shape[0], shape[1], k1 - k0)
    return outs


def _vessel_landmarks(
    image: np.ndarray,
    lung: np.ndarray,
    mapping: CoordinateMapping,
    motion: BreathingMotion,
    num: int,
    margin_mm: float = 5.0,
    target_mapping: CoordinateMapping | None = None,
) -> np.ndarray:
    """``num`` world points (RAS mm) at bright, high-contrast spots (vessels) inside the lungs, spread out.

    Candidates are local maxima (3x3x3 voxels) of the image smoothed by 1 mm, inside the lung
    mask eroded by ``margin_mm``, whose moving position ``motion(p)`` stays inside the grid;
    they are ranked by contrast (1 mm minus 4 mm Gaussian) and taken greedily at least
    ``d_min`` apart (``d_min`` halves until enough are found; voxel centres with the best
    contrast complete the set when there are too few maxima). ``target_mapping``: the moving
    grid when it is not the fixed one.
    """
    from scipy import ndimage

    spacing = mapping.spacing.numpy()
    fine = ndimage.gaussian_filter(image.astype(np.float32), 1.0 / spacing)
    coarse = ndimage.gaussian_filter(image.astype(np.float32), 4.0 / spacing)
    contrast = fine - coarse
    inner = ndimage.distance_transform_edt(lung, sampling=spacing) > margin_mm
    maxima = (fine == ndimage.maximum_filter(fine, size=3)) & inner & (contrast > 0)
    spread = ndimage.maximum_filter(maxima, size=3)  # a fallback pool: voxels next to no maximum
    chosen = np.empty((0, 3))
    for pool in (maxima, inner & ~spread):
        idx = np.argwhere(pool)
        if len(idx) == 0:
            continue
        idx = idx[np.argsort(-contrast[tuple(idx.T)], kind="stable")]
        world = mapping.index_to_world(torch.from_numpy(idx.astype(np.float64))).numpy()
        target = mapping if target_mapping is None else target_mapping
        moved = target.world_to_index(torch.from_numpy(motion(world))).numpy()
        world = world[np.all((moved >= 1.0) & (moved <= np.asarray(target.spatial_shape) - 2.0), axis=1)]
        if len(world) == 0:
            continue
        extent = world.max(0) - world.min(0)
        d_min = float(np.cbrt(np.prod(np.maximum(extent, 1.0)) / num))
        need = num - len(chosen)
        while d_min > 1e-3:
            picked = _greedy_spread(world, need, d_min, chosen)
            if len(picked) >= need:
                break
            d_min *= 0.5
        chosen = np.concatenate([chosen, picked[:need]])
        if len(chosen) >= num:
            return chosen
    raise ValueError(
        f"make_breathing_pair: only {len(chosen)} lung voxels {margin_mm} mm inside the mask qualify as landmarks for "
        f"num_landmarks={num} (mask too small, or the motion moves them out of the field of view)"
    )


def _greedy_spread(points: np.ndarray, num: int, d_min: float, taken: np.ndarray) -> np.ndarray:
    """The first points (in order) at least ``d_min`` from each other and from ``taken``, up to ``num``."""
    from scipy.spatial import cKDTree

    picked = np.empty((num, 3))
    count = 0
    tree = cKDTree(taken) if len(taken) else None
    for p in points:
        if tree is not None and tree.query(p, distance_upper_bound=d_min)[0] < d_min:
            continue
        if count and np.min(np.einsum("ij,ij->i", picked[:count] - p, picked[:count] - p)) < d_min**2:
            continue
        picked[count] = p
        count += 1
        if count == num:
            break
    return picked[:count]


def make_breathing_pair(
    ct,
    mask=None,
    seed: int = 0,
    amplitude_mm: float = 10.0,
    num_landmarks: int = 300,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
    overwrite: bool = False,
    **motion_kwargs,
) -> dict:
    """A synthetic inhale/exhale pair from one real CT, with exact dense ground truth.

    The CT is the fixed (inhale) image. A :class:`BreathingMotion` is fitted to the bounding box
    of its lung mask; the moving (exhale) image and mask are the CT and mask pulled back through
    the exact inverse motion on the CT's own grid (trilinear, border values outside the field of
    view; the moving image is rounded to whole HU, as its int16 file). Landmarks: ``num_landmarks``
    voxel centres at bright, high-contrast spots (vessels) at least 5 mm inside the lungs, spread
    out; ``moving_landmarks = motion(fixed_landmarks)`` exactly.

    Args:
        ct: the CT in HU, a ``(1, X, Y, Z)`` MetaTensor or a path (e.g. ``../shared/data/chest_ct.nii.gz``).
        mask: its lung mask (MetaTensor on the same grid or a path); ``None``: computed with
            :class:`~monai_cidir.transforms.LungMask` ``(backend="threshold")``.
        seed: seed of the motion's perturbation.
        amplitude_mm: peak superior-inferior motion (mm).
        num_landmarks: number of landmark pairs.
        output_dir: when given, the pair is written there as by :func:`make_breathing_phantom`
            (NIfTI, CSV in world LPS mm, ``<name>_motion.json``, ``datalist.json``).
        name: the pair's name (default: the CT file's stem, or ``"breathing_pair"``, plus ``_seed{seed}``).
        overwrite: replace files that differ instead of raising.
        motion_kwargs: other arguments of :class:`BreathingMotion` (``ap_fraction``, ...).

    Returns:
        the loaded-pair item (``name``, ``fixed_image``, ``moving_image``, ``fixed_mask``,
        ``moving_mask``, ``fixed_landmarks``, ``moving_landmarks``) plus ``motion``, and
        ``datalist`` (the path of ``datalist.json``) when ``output_dir`` is given.

    Raises:
        FileNotFoundError: when a path does not exist.
        ValueError: for a CT/mask that is not ``(1, X, Y, Z)`` or not on the same grid, or too few landmarks.
        FileExistsError: when writing would replace a different file (unless ``overwrite``).

    Example::

        >>> pair = make_breathing_pair("../shared/data/chest_ct.nii.gz", seed=0)  # doctest: +SKIP
        >>> err = pair["motion"](pair["fixed_landmarks"]) - pair["moving_landmarks"]  # exactly 0
    """
    if name is None:
        stem = "breathing_pair"
        if isinstance(ct, (str, os.PathLike)):
            stem = Path(ct).name
            for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
                if stem.lower().endswith(ext):
                    stem = stem[: -len(ext)]
        name = f"{stem}_seed{seed}"
    image = _load_volume(ct, "CT")
    if mask is None:
        from monai_cidir.transforms.lungmask import LungMask

        mask = LungMask(backend="threshold")(image)
    mask = _load_volume(mask, "lung mask", binary=True)
    mapping = CoordinateMapping.from_image(image)
    if tuple(mask.shape) != tuple(image.shape) or not torch.allclose(
        torch.as_tensor(mask.affine, dtype=torch.float64), mapping.affine, atol=1e-4
    ):
        raise ValueError(
            f"make_breathing_pair: the lung mask {tuple(mask.shape)} must be on the CT's grid {tuple(image.shape)} "
            "(same shape and affine)"
        )
    if float(mask.sum()) == 0:
        raise ValueError("make_breathing_pair: the lung mask is empty")
    motion = BreathingMotion.from_lung_mask(mask, amplitude_mm=amplitude_mm, seed=int(seed), **motion_kwargs)
    moving, moving_mask = _pull_back([image, mask], mapping, motion)
    moving, moving_mask = torch.round(moving), (moving_mask > 0.5).float()
    fixed_lm = _vessel_landmarks(image[0].numpy(), mask[0].numpy() > 0.5, mapping, motion, int(num_landmarks))
    affine = mapping.affine.clone()
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    images = {
        "fixed_image": MetaTensor(image.as_tensor().float().clone(), affine=affine.clone(), meta=meta),
        "moving_image": MetaTensor(moving[None], affine=affine.clone(), meta={"space": "RAS", "filename_or_obj": f"{name}_exhale"}),
        "fixed_mask": MetaTensor(mask.as_tensor().clone(), affine=affine.clone(), meta={"space": "RAS"}),
        "moving_mask": MetaTensor(moving_mask[None], affine=affine.clone(), meta={"space": "RAS"}),
    }
    return _finish_pair(name, images, fixed_lm, motion, output_dir, overwrite)


def _finish_pair(name: str, images: dict, fixed_lm: np.ndarray, motion, output_dir, overwrite: bool) -> dict:
    """The loaded-pair item of a synthetic pair (exact landmarks ``motion(fixed)``), written when ``output_dir`` is given."""
    item = {"name": name, **images, "fixed_landmarks": torch.from_numpy(fixed_lm)}
    item.update(moving_landmarks=torch.from_numpy(motion(fixed_lm)), motion=motion)
    if output_dir is not None:
        item["datalist"] = write_registration_pair(item, output_dir, overwrite=overwrite)
    return item
