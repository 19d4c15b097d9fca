"""MONAI transforms for lung CT pairs: loading, preprocessing, point sampling.

Array transforms come with dictionary twins (``X`` / ``Xd``). Add new exports as one explicit
import line plus their names in ``__all__``.
"""

from __future__ import annotations

from monai_cidir.transforms.intensity import HU_LUNG_WINDOW, ScaleHU, ScaleHUd
from monai_cidir.transforms.io import DEFAULT_PAIR_KEYS, LoadDIRLabd, LoadRegistrationPaird
from monai_cidir.transforms.lung_quality import (
    CheckLungMask,
    CheckLungMaskd,
    LungMaskError,
    LungMaskReport,
    lung_mask_report,
)
from monai_cidir.transforms.lungmask import LungMask, LungMaskd, threshold_lung_mask
from monai_cidir.transforms.presets import pair_preprocessing
from monai_cidir.transforms.sampling import RandPointsInMask, RandPointsInMaskd, dilate_mask_mm
from monai_cidir.transforms.spatial import CropToMask, CropToMaskd

__all__ = [
    "CheckLungMask",
    "CheckLungMaskd",
    "CropToMask",
    "CropToMaskd",
    "DEFAULT_PAIR_KEYS",
    "HU_LUNG_WINDOW",
    "LoadDIRLabd",
    "LoadRegistrationPaird",
    "LungMask",
    "LungMaskd",
    "LungMaskError",
    "LungMaskReport",
    "RandPointsInMask",
    "RandPointsInMaskd",
    "ScaleHU",
    "ScaleHUd",
    "dilate_mask_mm",
    "lung_mask_report",
    "pair_preprocessing",
    "threshold_lung_mask",
]
