"""Datasets and file IO: DIR-LAB 4DCT, pair datalists, landmark files.

Conventions are documented in ``monai_cidir/data/README.md``. Add new exports as one explicit
import line plus their names in ``__all__``.
"""

from __future__ import annotations

from monai_cidir.data.datalist import PAIR_PATH_KEYS, RegistrationPairDataset, load_pair_datalist, write_pair_datalist
from monai_cidir.data.dicom import DicomSeriesReader, list_dicom_series, write_dicom_series
from monai_cidir.data.dirlab import (
    DIRLAB_CASES,
    DIRLabCase,
    DIRLabDataset,
    dirlab_affine,
    dirlab_datalist,
    find_dirlab_case,
    read_dirlab_image,
)
from monai_cidir.data.landmarks import (
    LANDMARK_FORMATS,
    LandmarkFormatError,
    detect_landmark_format,
    load_landmarks,
    reference_affine,
    save_landmarks,
)
from monai_cidir.data.phantom import BreathingMotion, generate_breathing_phantom, make_breathing_pair, make_breathing_phantom
from monai_cidir.data.realistic import SlidingBreathingMotion, make_realistic_pair, moving_grid

# The loading transforms live in monai_cidir.transforms (which imports this package); they are
# re-exported lazily so that importing either package first works.
_FROM_TRANSFORMS = ("LoadDIRLabd", "LoadRegistrationPaird")


def __getattr__(name: str):
    if name in _FROM_TRANSFORMS:
        from monai_cidir.transforms import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BreathingMotion",
    "generate_breathing_phantom",
    "make_breathing_pair",
    "make_breathing_phantom",
    "SlidingBreathingMotion",
    "make_realistic_pair",
    "moving_grid",
    "DicomSeriesReader",
    "list_dicom_series",
    "write_dicom_series",
    "DIRLAB_CASES",
    "DIRLabCase",
    "DIRLabDataset",
    "LANDMARK_FORMATS",
    "LandmarkFormatError",
    "LoadDIRLabd",
    "LoadRegistrationPaird",
    "PAIR_PATH_KEYS",
    "RegistrationPairDataset",
    "detect_landmark_format",
    "dirlab_affine",
    "dirlab_datalist",
    "find_dirlab_case",
    "load_landmarks",
    "load_pair_datalist",
    "read_dirlab_image",
    "reference_affine",
    "save_landmarks",
    "write_pair_datalist",
]
