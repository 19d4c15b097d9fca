"""Fixtures of the engine tests: an analytic blob 'lung' pair with an exact motion.

``make_blob_pair`` defines the fixed image as an analytic function ``f`` of world position
(a body ellipsoid, a lung ellipsoid at -800 HU, Gaussian 'vessels' at +200 HU) and the
moving image as ``f(q - v(q))`` sampled on its own grid, so no resampling error enters the
ground truth: a fixed point ``p`` sits in the moving image at ``q`` with ``q - v(q) = p``
(solved by fixed-point iteration for the landmarks).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import affine_from_spacing


def _field(points: np.ndarray, centers, widths, amps, lung_center, lung_radii, body_radii) -> np.ndarray:
    rel = (points - lung_center) / lung_radii
    lung = np.sum(rel**2, axis=-1) <= 1.0
    body = np.sum(((points - lung_center) / body_radii) ** 2, axis=-1) <= 1.0
    img = np.where(body, 40.0, -1000.0)
    img = np.where(lung, -800.0, img)
    for c, w, a in zip(centers, widths, amps):
        d2 = np.sum((points - c) ** 2, axis=-1)
        img = img + np.where(lung, a * np.exp(-0.5 * d2 / w**2), 0.0)
    return img, lung


def make_blob_pair(
    shape=(36, 32, 28),
    spacing=(4.0, 4.0, 5.0),
    motion=None,
    moving_shape=None,
    moving_spacing=None,
    moving_origin_shift=(0.0, 0.0, 0.0),
    num_blobs=60,
    num_landmarks=40,
    seed=0,
    maps=None,
):
    """A loaded pair (the datalist contract) with an exact motion ``v`` (moving(q) = fixed(q - v(q))).

    ``maps=(forward, inverse)`` gives the fixed->moving map and its inverse instead of ``motion``.
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing, dtype=float)
    extent = (np.asarray(shape) - 1) * spacing
    origin = -extent / 2
    lung_center = np.zeros(3)
    lung_radii = extent * np.array([0.36, 0.34, 0.36])
    body_radii = extent * np.array([0.48, 0.47, 0.6])
    centers = lung_center + (rng.uniform(-0.9, 0.9, (num_blobs, 3)) * lung_radii)
    widths = rng.uniform(4.0, 9.0, num_blobs)
    amps = rng.uniform(300.0, 700.0, num_blobs)
    motion = motion or (lambda q: np.zeros_like(q))
    params = (centers, widths, amps, lung_center, lung_radii, body_radii)

    def grid_points(shp, aff):
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in shp], indexing="ij"), -1).reshape(-1, 3)
        return idx @ aff[:3, :3].T + aff[:3, 3]

    f_aff = affine_from_spacing(spacing, origin)
    m_shape = tuple(moving_shape or shape)
    m_spacing = np.asarray(moving_spacing or spacing, dtype=float)
    m_extent = (np.asarray(m_shape) - 1) * m_spacing
    m_aff = affine_from_spacing(m_spacing, -m_extent / 2 + np.asarray(moving_origin_shift))
    fp = grid_points(shape, f_aff)
    f_img, f_lung = _field(fp, *params)
    mq = grid_points(m_shape, m_aff)
    inverse = maps[1] if maps is not None else (lambda q: q - motion(q))
    m_img, m_lung = _field(inverse(mq), *params)
    # landmarks: blob centres inside the lung (they are features), moved by inverting q - v(q) = p
    inside = np.sum(((centers - lung_center) / lung_radii) ** 2, axis=-1) < 0.8
    lm_f = centers[inside][:num_landmarks]
    if maps is not None:
        q = maps[0](lm_f)
    else:
        q = lm_f.copy()
        for _ in range(100):
            q = lm_f + motion(q)
    as_mt = lambda a, shp, aff: MetaTensor(torch.as_tensor(a.reshape(shp), dtype=torch.float32)[None], affine=torch.as_tensor(aff))  # noqa: E731
    return {
        "name": f"blob{seed}",
        "fixed_image": as_mt(f_img, shape, f_aff),
        "moving_image": as_mt(m_img, m_shape, m_aff),
        "fixed_mask": as_mt(f_lung.astype(np.float32), shape, f_aff),
        "moving_mask": as_mt(m_lung.astype(np.float32), m_shape, m_aff),
        "fixed_landmarks": torch.as_tensor(lm_f, dtype=torch.float64),
        "moving_landmarks": torch.as_tensor(q, dtype=torch.float64),
    }


def breathing_motion(amplitude=8.0, extent_z=135.0):
    """A smooth non-linear test motion (mm): mostly along z, larger at the bottom, some contraction."""

    def v(q):
        z = q[..., 2] / extent_z
        r = np.exp(-np.sum((q[..., :2] / 60.0) ** 2, axis=-1))
        out = np.zeros_like(q)
        out[..., 2] = amplitude * r * (0.6 - 0.4 * z)
        out[..., 0] = -0.04 * q[..., 0] * r
        out[..., 1] = -0.03 * q[..., 1] * r
        return out

    return v
