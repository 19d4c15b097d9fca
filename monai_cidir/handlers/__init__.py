"""Ignite handlers: the registration metrics (MONAI ``IgniteMetricHandler`` style) and the training progress bar."""

from __future__ import annotations

from monai_cidir.handlers.progress import TrainingProgressBar
from monai_cidir.handlers.registration_metrics import JacobianFoldingHandler, TargetRegistrationErrorHandler

__all__ = ["TargetRegistrationErrorHandler", "JacobianFoldingHandler", "TrainingProgressBar"]
