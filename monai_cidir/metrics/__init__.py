"""Registration metrics (MONAI ``CumulativeIterationMetric`` style): landmark TRE and Jacobian folding; lung NCC."""

from __future__ import annotations

from monai_cidir.metrics.jacobian import JacobianDeterminantMetric
from monai_cidir.metrics.registration_error import (
    TargetRegistrationError,
    as_coordinate_mapping,
    snap_to_voxel,
    summarize,
    target_registration_error,
)
from monai_cidir.metrics.similarity import lung_ncc, mask_points

__all__ = [
    "TargetRegistrationError",
    "JacobianDeterminantMetric",
    "target_registration_error",
    "snap_to_voxel",
    "as_coordinate_mapping",
    "summarize",
    "lung_ncc",
    "mask_points",
]
