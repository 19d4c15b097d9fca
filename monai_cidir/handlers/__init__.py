"""Ignite handlers (MONAI ``IgniteMetricHandler`` style) for the registration metrics."""

from __future__ import annotations

from monai_cidir.handlers.registration_metrics import JacobianFoldingHandler, TargetRegistrationErrorHandler

__all__ = ["TargetRegistrationErrorHandler", "JacobianFoldingHandler"]
