"""Cropping to the (fixed) lung mask's bounding box plus a margin in millimetres.

Cropping is done by MONAI's ``SpatialCrop``, which updates ``MetaTensor.affine`` (the world position
of every remaining voxel is unchanged). Landmarks and sampled points are world coordinates, so
cropping never moves them. The crop box is defined in world space: the mask's bounding box (voxel
centres) grown by ``margin_mm`` on every side; each cropped image keeps the voxels of its own grid
whose centres cover that world box, so images on other grids (e.g. the moving image) can be cropped
with the same box. The moving image moves relative to the fixed mask (up to several cm at the
diaphragm): give it a larger margin, or do not crop it.

For resampling use MONAI's ``Spacingd`` (e.g. ``Spacingd(["fixed_image", "moving_image"],
pixdim=1.5)`` and ``mode="nearest"`` for masks); it also keeps the affines right.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialCrop, Transform

from monai_cidir.coordinates import CoordinateMapping

__all__ = ["CropToMask", "CropToMaskd"]

_EPS = 1e-6


class CropToMask(Transform):
    """Crop a channel-first image to a mask's bounding box plus a margin in mm.

    Args:
        margin_mm: margin added on every side of the mask's bounding box, in millimetres
            (converted to voxels with each axis' spacing; the box never leaves the image).

    Raises:
        ValueError: for an empty mask, a negative margin, or inputs without an affine.

    Example::

        >>> crop = CropToMask(margin_mm=10.0)
        >>> cropped = crop(fixed_image, fixed_mask)  # doctest: +SKIP
        >>> cropped.affine  # voxel (0, 0, 0) of the crop sits where it sat in the original
    """

    def __init__(self, margin_mm: float = 10.0) -> None:
        if not margin_mm >= 0:
            raise ValueError(f"margin_mm must be >= 0, found {margin_mm}")
        self.margin_mm = float(margin_mm)

    def world_box(self, mask: torch.Tensor) -> torch.Tensor:
        """The 8 world corners (8, 3) of the mask's bounding box grown by the margin.

        Args:
            mask: channel-first MetaTensor ``(C, X, Y, Z)``; voxels > 0 are foreground.

        Returns:
            float64 world RAS mm corners.

        Raises:
            ValueError: when the mask is empty or has no affine.
        """
        mapping = CoordinateMapping.from_image(mask)
        data = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
        fg = torch.nonzero(data.detach().cpu().amax(dim=0) > 0)
        if fg.numel() == 0:
            raise ValueError(f"cannot crop to an empty mask (no voxel > 0) of shape {tuple(mask.shape)}")
        margin = self.margin_mm / mapping.spacing  # voxels along each axis
        lo = fg.amin(0).to(torch.float64) - margin
        hi = fg.amax(0).to(torch.float64) + margin
        corners = torch.stack([torch.where(torch.tensor(c, dtype=torch.bool), hi, lo) for c in _CORNERS])
        return mapping.index_to_world(corners)

    def compute_slices(self, img: torch.Tensor, box: torch.Tensor) -> tuple[list[int], list[int]]:
        """Index range ``[start, end)`` of ``img``'s grid covering the world ``box`` (clamped to the image).

        Args:
            img: channel-first MetaTensor to crop.
            box: world corners from :meth:`world_box`.

        Returns:
            ``(roi_start, roi_end)`` lists for ``monai.transforms.SpatialCrop``.
        """
        mapping = CoordinateMapping.from_image(img)
        index = mapping.world_to_index(box)
        start, end = [], []
        for axis, n in enumerate(mapping.spatial_shape):
            a = max(0, math.floor(float(index[:, axis].min()) + _EPS))
            b = min(n - 1, math.ceil(float(index[:, axis].max()) - _EPS))
            if b < a:  # box entirely outside this image: keep the nearest slice rather than nothing
                a = b = min(max(a, 0), n - 1)
            start.append(a)
            end.append(b + 1)
        return start, end

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> MetaTensor:
        """Crop ``img`` to ``mask``'s box (``mask`` may lie on another grid than ``img``).

        Args:
            img: channel-first MetaTensor.
            mask: channel-first MetaTensor mask.

        Returns:
            the cropped MetaTensor with its affine updated.
        """
        for name, t in (("img", img), ("mask", mask)):
            if not isinstance(t, MetaTensor):
                raise ValueError(f"CropToMask needs MetaTensors with an affine; '{name}' is a {type(t).__name__}")
        start, end = self.compute_slices(img, self.world_box(mask))
        return SpatialCrop(roi_start=start, roi_end=end)(img)


_CORNERS = [(a, b, c) for a in (False, True) for b in (False, True) for c in (False, True)]


class CropToMaskd(MapTransform):
    """Dictionary twin of :class:`CropToMask`: crop ``keys`` to the box of ``mask_key`` plus a margin.

    The box is computed once from the (uncropped) mask, so ``mask_key`` may be among ``keys``.
    Keys on other grids are cropped to the same world box. Landmark keys must not be listed:
    landmarks are world coordinates and stay valid unchanged.

    Args:
        keys: images/masks to crop, e.g. ``["fixed_image", "fixed_mask"]``.
        mask_key: the mask defining the box, e.g. ``"fixed_mask"``.
        margin_mm: margin on every side, mm.
        allow_missing_keys: do not fail on missing ``keys``.

    Raises:
        KeyError: when ``mask_key`` is missing.

    Example::

        >>> crop = CropToMaskd(["fixed_image", "fixed_mask"], mask_key="fixed_mask", margin_mm=10.0)
        >>> item = crop(item)  # doctest: +SKIP
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "fixed_mask",
        margin_mm: float = 10.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.cropper = CropToMask(margin_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.mask_key not in d:
            raise KeyError(f"CropToMaskd: mask key '{self.mask_key}' not in the data; keys: {list(d)}")
        box = self.cropper.world_box(d[self.mask_key])
        for key in self.key_iterator(d):
            if not isinstance(d[key], MetaTensor):
                found = type(d[key]).__name__
                raise ValueError(f"CropToMaskd: '{key}' must be a MetaTensor with an affine, found {found}")
            start, end = self.cropper.compute_slices(d[key], box)
            d[key] = SpatialCrop(roi_start=start, roi_end=end)(d[key])
        return d
