"""Ready-made preprocessing chain for a loaded pair (crop -> optional resampling -> HU window).

Order matters: lung masks are computed from HU, so run ``LungMaskd`` (if the datalist gives no
masks) *before* this chain; landmarks are world coordinates and pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import Compose, Spacingd

from monai_cidir.transforms.intensity import HU_LUNG_WINDOW, ScaleHUd
from monai_cidir.transforms.io import DEFAULT_PAIR_KEYS
from monai_cidir.transforms.spatial import CropToMaskd

__all__ = ["pair_preprocessing"]


def pair_preprocessing(
    crop_margin_mm: float | None = 10.0,
    moving_crop_margin_mm: float | None = None,
    pixdim: Sequence[float] | float | None = None,
    hu_window: tuple[float, float] | None = HU_LUNG_WINDOW,
    image_keys: Sequence[str] = DEFAULT_PAIR_KEYS["image"],
    mask_keys: Sequence[str] = DEFAULT_PAIR_KEYS["mask"],
) -> Compose:
    """Build the preprocessing ``Compose`` for loaded pairs.

    Steps (each skipped when its argument is ``None``):

    1. crop the fixed image and mask to the fixed mask's box + ``crop_margin_mm``
       (:class:`~monai_cidir.transforms.CropToMaskd`);
    2. crop the moving image and mask to the same world box + ``moving_crop_margin_mm`` (keep it
       larger than the breathing motion, e.g. 40 mm, or leave ``None`` not to crop moving);
    3. resample images (bilinear) and masks (nearest) to ``pixdim`` mm (MONAI ``Spacingd``);
    4. clip and scale the images' HU window to [0, 1] (:class:`~monai_cidir.transforms.ScaleHUd`).

    Args:
        crop_margin_mm: fixed-side crop margin (mm).
        moving_crop_margin_mm: moving-side crop margin (mm).
        pixdim: output voxel size (mm), one value or three.
        hu_window: ``(hu_min, hu_max)`` mapped to [0, 1].
        image_keys: (fixed, moving) image keys.
        mask_keys: (fixed, moving) mask keys; the fixed one defines the crop box.

    Returns:
        a ``monai.transforms.Compose``.

    Example::

        >>> pre = pair_preprocessing(crop_margin_mm=10.0, moving_crop_margin_mm=40.0, pixdim=None)
        >>> item = pre(item)  # doctest: +SKIP
    """
    (fixed_img, moving_img), (fixed_mask, moving_mask) = tuple(image_keys), tuple(mask_keys)
    steps = []
    if crop_margin_mm is not None:
        steps.append(CropToMaskd([fixed_img, fixed_mask], mask_key=fixed_mask, margin_mm=crop_margin_mm))
    if moving_crop_margin_mm is not None:
        steps.append(
            CropToMaskd(
                [moving_img, moving_mask], mask_key=fixed_mask, margin_mm=moving_crop_margin_mm, allow_missing_keys=True
            )
        )
    if pixdim is not None:
        steps.append(Spacingd([fixed_img, moving_img], pixdim=pixdim, mode="bilinear", dtype=None))
        masks = [fixed_mask, moving_mask]
        steps.append(Spacingd(masks, pixdim=pixdim, mode="nearest", dtype=None, allow_missing_keys=True))
    if hu_window is not None:
        steps.append(ScaleHUd([fixed_img, moving_img], hu_min=hu_window[0], hu_max=hu_window[1]))
    return Compose(steps)
