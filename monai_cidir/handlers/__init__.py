"""Ignite handlers: the registration metrics (MONAI ``IgniteMetricHandler`` style), the alpha search's key metric, the training checkpoint and the progress bar."""

from __future__ import annotations

from monai_cidir.handlers.alpha_choice import AlphaChoice, AlphaSearchEvents
from monai_cidir.handlers.checkpoint import TrainingCheckpoint
from monai_cidir.handlers.progress import TrainingProgressBar
from monai_cidir.handlers.registration_metrics import AlphaCurveTRE, JacobianFoldingHandler, TargetRegistrationErrorHandler

__all__ = ["AlphaChoice", "AlphaCurveTRE", "AlphaSearchEvents", "TargetRegistrationErrorHandler", "JacobianFoldingHandler", "TrainingCheckpoint", "TrainingProgressBar"]
