"""HU clipping and intensity scaling: MONAI's ``ScaleIntensityRange(d)`` with a lung CT preset.

Loaded images are in HU (the loaded-pair contract). Lung masks must be computed from HU
(``LungMaskd``) *before* this scaling. NCC (the cIDIR similarity) is invariant to a linear
intensity change, so the scaling itself does not change the loss; the clipping does: it removes
bone/metal and out-of-body outliers that would otherwise dominate the correlation.
"""

from __future__ import annotations

import numpy as np
from monai.config import DtypeLike, KeysCollection
from monai.transforms import ScaleIntensityRange, ScaleIntensityRanged

__all__ = ["HU_LUNG_WINDOW", "ScaleHU", "ScaleHUd"]

#: default HU window (air ... soft tissue/contrast) mapped to [0, 1].
HU_LUNG_WINDOW = (-1000.0, 500.0)


class ScaleHU(ScaleIntensityRange):
    """Clip HU to a window and map it linearly to ``[b_min, b_max]`` (default -1000..500 HU -> 0..1).

    A preset of ``monai.transforms.ScaleIntensityRange`` with ``clip=True``.

    Args:
        hu_min: HU mapped to ``b_min``.
        hu_max: HU mapped to ``b_max``.
        b_min: output minimum.
        b_max: output maximum.
        clip: clip to ``[b_min, b_max]`` after scaling.
        dtype: output dtype.

    Example::

        >>> ScaleHU()(torch.tensor([-2000.0, -1000.0, -250.0, 500.0, 3000.0]))
        tensor([0.0000, 0.0000, 0.5000, 1.0000, 1.0000])
    """

    def __init__(
        self,
        hu_min: float = HU_LUNG_WINDOW[0],
        hu_max: float = HU_LUNG_WINDOW[1],
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        dtype: DtypeLike = np.float32,
    ) -> None:
        super().__init__(a_min=hu_min, a_max=hu_max, b_min=b_min, b_max=b_max, clip=clip, dtype=dtype)


class ScaleHUd(ScaleIntensityRanged):
    """Dictionary twin of :class:`ScaleHU` (a preset of ``monai.transforms.ScaleIntensityRanged``).

    Args:
        keys: image keys, e.g. ``["fixed_image", "moving_image"]`` (never masks).
        hu_min: HU mapped to ``b_min``.
        hu_max: HU mapped to ``b_max``.
        b_min: output minimum.
        b_max: output maximum.
        clip: clip after scaling.
        dtype: output dtype.
        allow_missing_keys: do not fail on missing keys.

    Example::

        >>> scale = ScaleHUd(["fixed_image", "moving_image"])
        >>> item = scale(item)  # doctest: +SKIP
    """

    def __init__(
        self,
        keys: KeysCollection,
        hu_min: float = HU_LUNG_WINDOW[0],
        hu_max: float = HU_LUNG_WINDOW[1],
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, a_min=hu_min, a_max=hu_max, b_min=b_min, b_max=b_max, clip=clip, dtype=dtype,
            allow_missing_keys=allow_missing_keys,
        )
