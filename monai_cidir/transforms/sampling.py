"""Random training points inside a (dilated) mask, in world millimetres.

The sampler draws ``num_points`` voxels of the mask uniformly with replacement and, with
``jitter=True`` (default), a uniform position inside each chosen voxel's cell
(index + U[-0.5, 0.5)^3), so the points are uniform over the mask's volume and continuous;
``round(world_to_index(p))`` is always a mask voxel. The mask's voxel list (and the dilation) is
computed once per mask and cached: a call costs O(num_points).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import ensure_tuple
from scipy import ndimage

from monai_cidir.coordinates import CoordinateMapping

__all__ = ["RandPointsInMask", "RandPointsInMaskd", "dilate_mask_mm"]


def dilate_mask_mm(mask: np.ndarray, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Dilate a 3-D boolean mask by a ball of ``radius_mm`` (Euclidean, in mm, anisotropic voxels).

    Args:
        mask: boolean array (X, Y, Z).
        spacing: voxel size (mm) per axis.
        radius_mm: ball radius; 0 returns the mask unchanged.

    Returns:
        the dilated boolean mask: every voxel whose centre lies within ``radius_mm`` of a mask voxel centre.

    Example::

        >>> m = np.zeros((5, 5, 5), bool); m[2, 2, 2] = True
        >>> int(dilate_mask_mm(m, (1.0, 1.0, 1.0), 1.0).sum())
        7
    """
    mask = np.asarray(mask, dtype=bool)
    if radius_mm <= 0 or not mask.any():
        return mask
    # work inside the mask's bounding box grown by the radius: the rest cannot change
    fg = np.argwhere(mask)
    pad = [int(np.ceil(radius_mm / float(s))) + 1 for s in spacing]
    box = tuple(
        slice(max(lo - p, 0), min(hi + p + 1, n)) for lo, hi, p, n in zip(fg.min(0), fg.max(0), pad, mask.shape)
    )
    dist = ndimage.distance_transform_edt(~mask[box], sampling=[float(s) for s in spacing])
    out = np.zeros_like(mask)
    out[box] = dist <= radius_mm + 1e-9
    return out


class RandPointsInMask(Randomizable, Transform):
    """Draw ``num_points`` random world points (mm, RAS) uniformly inside a mask.

    Args:
        num_points: points per call.
        dilation_mm: grow the mask by this radius (mm) before sampling (0: no dilation).
        jitter: uniform position inside each chosen voxel (default) or voxel centres only.
        dtype: output dtype (float32 for training).
        device: output device (default CPU).

    Raises:
        ValueError: for an empty mask or a mask without an affine.

    Example::

        >>> sampler = RandPointsInMask(num_points=10_000)
        >>> sampler.set_random_state(seed=0)
        >>> points = sampler(fixed_mask)  # doctest: +SKIP
        >>> points.shape
        torch.Size([10000, 3])
    """

    def __init__(
        self,
        num_points: int = 10_000,
        dilation_mm: float = 0.0,
        jitter: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if int(num_points) < 1:
            raise ValueError(f"num_points must be >= 1, found {num_points}")
        if not dilation_mm >= 0:
            raise ValueError(f"dilation_mm must be >= 0, found {dilation_mm}")
        self.num_points = int(num_points)
        self.dilation_mm = float(dilation_mm)
        self.jitter = bool(jitter)
        self.dtype = dtype
        self.device = device
        self._cache_key: tuple | None = None
        self._cache_mask: torch.Tensor | None = None
        self._voxels: np.ndarray | None = None
        self._mapping: CoordinateMapping | None = None
        self._choice: np.ndarray | None = None
        self._offset: np.ndarray | None = None

    # ------------------------------------------------------------------ cache
    def prepare(self, mask: torch.Tensor) -> np.ndarray:
        """Compute (or reuse) the voxel list of the (dilated) mask.

        Args:
            mask: channel-first MetaTensor ``(C, X, Y, Z)``; voxels > 0 in any channel count.

        Returns:
            int64 array (M, 3) of the voxel indices that points are drawn from.

        Raises:
            ValueError: when the mask is empty.
        """
        key = (mask.data_ptr(), mask._version, tuple(mask.shape))
        if mask is self._cache_mask and key == self._cache_key and self._voxels is not None:
            return self._voxels
        mapping = CoordinateMapping.from_image(mask)
        data = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
        fg = (data.detach().cpu().amax(dim=0) > 0).numpy()
        if self.dilation_mm > 0:
            fg = dilate_mask_mm(fg, mapping.spacing.tolist(), self.dilation_mm)
        voxels = np.argwhere(fg)
        if len(voxels) == 0:
            raise ValueError(f"cannot sample points in an empty mask (no voxel > 0) of shape {tuple(mask.shape)}")
        self._voxels, self._mapping = voxels, mapping
        self._cache_mask, self._cache_key = mask, key
        return voxels

    # ------------------------------------------------------------------ randomness
    def randomize(self, data: np.ndarray | None = None) -> None:
        """Draw the voxel choice and the in-voxel offsets for one call (needs :meth:`prepare` first)."""
        n_vox = len(self._voxels if data is None else data)
        self._choice = self.R.randint(0, n_vox, size=self.num_points)
        if self.jitter:
            self._offset = self.R.uniform(-0.5, 0.5, size=(self.num_points, 3))
        else:
            self._offset = np.zeros((self.num_points, 3))

    def __call__(self, mask: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """Sample points in ``mask``.

        Args:
            mask: channel-first MetaTensor with an affine.
            randomize: draw new points (False reuses the last draw, e.g. for a second mask).

        Returns:
            (num_points, 3) world RAS mm points, ``dtype``/``device`` as configured.
        """
        voxels = self.prepare(mask)
        if randomize or self._choice is None:
            self.randomize(voxels)
        index = voxels[self._choice] + self._offset
        world = self._mapping.index_to_world(torch.from_numpy(index))
        return world.to(dtype=self.dtype, device=self.device)


class RandPointsInMaskd(Randomizable, MapTransform):
    """Dictionary twin of :class:`RandPointsInMask`: write points sampled in ``keys`` masks to ``points_keys``.

    Args:
        keys: mask key(s), e.g. ``"fixed_mask"``.
        num_points: points per call.
        points_keys: output key(s), one per mask key (default ``"points"`` for a single mask,
            ``"<key>_points"`` otherwise).
        dilation_mm: mask dilation radius (mm).
        jitter: see :class:`RandPointsInMask`.
        dtype: output dtype.
        device: output device.
        allow_missing_keys: do not fail on missing masks.

    Example::

        >>> sampler = RandPointsInMaskd("fixed_mask", num_points=10_000, dilation_mm=5.0)
        >>> sampler.set_random_state(seed=0)
        >>> item = sampler(item)  # doctest: +SKIP
        >>> item["points"].shape
        torch.Size([10000, 3])
    """

    def __init__(
        self,
        keys: KeysCollection = "fixed_mask",
        num_points: int = 10_000,
        points_keys: KeysCollection | None = None,
        dilation_mm: float = 0.0,
        jitter: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if points_keys is None:
            points_keys = ("points",) if len(self.keys) == 1 else tuple(f"{k}_points" for k in self.keys)
        self.points_keys = ensure_tuple(points_keys)
        if len(self.points_keys) != len(self.keys):
            raise ValueError(f"points_keys {self.points_keys} must pair one-to-one with keys {self.keys}")
        self.samplers = {
            k: RandPointsInMask(num_points, dilation_mm=dilation_mm, jitter=jitter, dtype=dtype, device=device)
            for k in self.keys
        }

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this transform; the per-mask samplers share its random state."""
        super().set_random_state(seed, state)
        for sampler in self.samplers.values():
            sampler.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:
        """Nothing to draw here: each per-mask sampler draws from the shared state."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.points_keys):
            d[out_key] = self.samplers[key](d[key])
        return d
