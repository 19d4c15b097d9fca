"""A failed registration is visible without landmarks: mask checks before training, similarity after.

Per patient the engines record, in ``metrics.json``, the summary table and the log:

* the lung masks: volume (``fixed_lung_ml``, ``moving_lung_ml``) and the full plausibility report
  of each (``lung_masks``; :func:`~monai_cidir.transforms.lung_mask_report`). A computed mask
  that is implausible stops the patient before training (:class:`~monai_cidir.transforms.LungMaskError`);
  a given one is kept with a warning;
* the similarity in the fixed lung (:func:`~monai_cidir.metrics.lung_ncc`): ``ncc_before`` (no
  registration), ``ncc_affine`` (the pre-alignment alone; the identity when none was kept) and
  ``ncc_after`` (cIDIR at the exported alpha);
* the lung Dice before (``dice_before``), after the affine alone (``dice_affine``) and after
  cIDIR (``dice``);
* ``status`` (``"ok"``, ``"warning"`` or ``"failed"``) and ``warnings`` (the reasons).

:func:`assess_registration` sets ``status``: **failed** when cIDIR is worse than its own affine
(lung NCC lower by more than ``ncc_tolerance``, or lung Dice lower by more than
``dice_tolerance``); **warning** when a given mask is implausible or the two lung volumes differ
by more than a factor ``max_volume_ratio`` (breathing changes lung volume by well under 2x).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

__all__ = [
    "prepare_lung_masks",
    "mask_entries",
    "registration_quality",
    "assess_registration",
    "record_status",
    "NCC_TOLERANCE",
    "DICE_TOLERANCE",
    "MAX_VOLUME_RATIO",
]

logger = logging.getLogger("monai_cidir.engines")

NCC_TOLERANCE = 0.005
"""cIDIR may trail its affine by this much lung NCC before the result counts as failed."""

DICE_TOLERANCE = 0.01
"""cIDIR may trail its affine by this much lung Dice before the result counts as failed."""

MAX_VOLUME_RATIO = 2.0
"""Fixed and moving lung volumes further apart than this factor are reported."""


def prepare_lung_masks(
    item: dict,
    backend: str = "threshold",
    lung_mask_kwargs: dict | None = None,
    check: Mapping | None = None,
    overlay: str | os.PathLike | None = None,
) -> tuple[dict, dict]:
    """Compute the missing lung masks (given masks win) and check both, before any training.

    Args:
        item: a loaded pair.
        backend: :class:`~monai_cidir.transforms.LungMask` backend for missing masks.
        lung_mask_kwargs: extra ``LungMask`` arguments (``weights``, ``threshold_kwargs``, ...).
        check: options of :class:`~monai_cidir.transforms.CheckLungMask` (``min_volume_ml``, ...).
        overlay: write the masks over both images to this PNG
            (:func:`~monai_cidir.engines.export.plot_lung_masks`), also when a mask is implausible.

    Returns:
        ``(item with fixed_mask and moving_mask, {"fixed": report dict, "moving": report dict})``.

    Raises:
        LungMaskError: when a computed mask is implausible (the message names the image).
    """
    from monai_cidir.transforms import CheckLungMaskd, LungMaskd

    item = dict(item)
    name = item.get("name", "pair")
    for side in ("fixed", "moving"):
        if item.get(f"{side}_mask") is None:
            logger.info("%s: computing the %s lung mask (backend %s)", name, side, backend)
            item[f"{side}_mask"] = LungMaskd(f"{side}_image", backend=backend, output_key=f"{side}_mask", **(lung_mask_kwargs or {}))(
                {f"{side}_image": item[f"{side}_image"]}
            )[f"{side}_mask"]
    try:
        item = CheckLungMaskd(("fixed_mask", "moving_mask"), **dict(check or {}))(item)
    finally:  # the picture is most useful when the check fails
        if overlay is not None:
            _plot_masks(item, overlay)
    reports = {side: item[f"{side}_mask"].meta["lung_mask_report"] for side in ("fixed", "moving")}
    return item, reports


def mask_entries(reports: Mapping[str, dict]) -> dict:
    """The lung-mask entries of ``metrics.json``: both volumes and both plausibility reports."""
    return {
        "fixed_lung_ml": reports["fixed"]["volume_ml"],
        "moving_lung_ml": reports["moving"]["volume_ml"],
        "lung_masks": dict(reports),
    }


def _plot_masks(item: Mapping, path) -> None:
    from monai_cidir.engines.export import plot_lung_masks

    reports = [item[f"{s}_mask"].meta.get("lung_mask_report") or {} for s in ("fixed", "moving")]
    volumes = " / ".join(f"{r.get('volume_ml', float('nan')):.0f} mL{'' if r.get('plausible', True) else ' (implausible)'}" for r in reports)
    panels = [(s, item[f"{s}_image"], item[f"{s}_mask"]) for s in ("fixed", "moving")]
    plot_lung_masks(panels, path, title=f"{item.get('name', 'pair')}: lung masks, fixed / moving {volumes}")


@torch.no_grad()
def registration_quality(model, alpha: float, item: Mapping, evaluator=None, max_points: int = 100_000) -> dict:
    """Lung NCC before / after the affine / after cIDIR, and the lung Dice after the affine alone.

    Args:
        model: the trained :class:`~monai_cidir.engines.model.RegistrationModel`.
        alpha: the exported alpha.
        item: the pair with its masks.
        evaluator: the :class:`~monai_cidir.engines.AlphaSelectionEvaluator` of the sweep (its grid
            gives ``dice_affine`` on the same points as ``dice``); ``None`` skips ``dice_affine``.
        max_points: fixed-lung voxels used for the NCC.

    Returns:
        ``{"ncc_before", "ncc_affine", "ncc_after"[, "dice_affine"]}``.
    """
    from monai_cidir.metrics import lung_ncc

    out = lung_ncc(
        item["fixed_image"],
        item["moving_image"],
        item["fixed_mask"],
        {"ncc_before": None, "ncc_affine": model.apply_affine, "ncc_after": lambda p: model.transform_points(p, alpha)},
        max_points=max_points,
    )
    if evaluator is not None:
        out["dice_affine"] = evaluator.score_transform(model.apply_affine)
    return out


def assess_registration(
    metrics: Mapping,
    ncc_tolerance: float = NCC_TOLERANCE,
    dice_tolerance: float = DICE_TOLERANCE,
    max_volume_ratio: float = MAX_VOLUME_RATIO,
) -> tuple[str, list[str], list[str]]:
    """``(status, failures, warnings)`` of one patient's metrics (see the module docstring)."""
    failures, warnings = [], []
    ncc_after, ncc_affine = metrics.get("ncc_after"), metrics.get("ncc_affine")
    reference = "its affine" if metrics.get("affine_prealign") else "no registration (no affine kept)"
    if ncc_after is not None and ncc_affine is not None and ncc_after < ncc_affine - ncc_tolerance:
        failures.append(f"worse than {reference}: lung NCC {ncc_after:.4f} after cIDIR < {ncc_affine:.4f}")
    dice, dice_affine = metrics.get("dice"), metrics.get("dice_affine")
    if dice is not None and dice_affine is not None and dice < dice_affine - dice_tolerance:
        failures.append(f"worse than {reference}: lung Dice {dice:.4f} after cIDIR < {dice_affine:.4f}")
    for side, report in (metrics.get("lung_masks") or {}).items():
        if not report.get("plausible", True):
            warnings.append(f"implausible given {side} lung mask ({report['image']}): " + "; ".join(report["problems"]))
    volumes = [metrics.get("fixed_lung_ml"), metrics.get("moving_lung_ml")]
    if all(v for v in volumes) and max(volumes) > max_volume_ratio * min(volumes):
        warnings.append(
            f"lung volumes differ by {max(volumes) / min(volumes):.1f}x (fixed {volumes[0]:.0f} mL, moving {volumes[1]:.0f} mL): "
            "masks of different regions or fields of view?"
        )
    status = "failed" if failures else ("warning" if warnings else "ok")
    return status, failures, warnings


def record_status(metrics: dict) -> dict:
    """Set ``metrics["status"]`` and ``metrics["warnings"]`` (:func:`assess_registration`); log a WARNING line each."""
    status, failures, warnings = assess_registration(metrics)
    metrics["status"] = status
    metrics["warnings"] = failures + warnings
    name = metrics.get("name")
    for reason in failures:
        logger.warning("%s: registration FAILED: %s", name, reason)
    for reason in warnings:
        logger.warning("%s: %s", name, reason)
    return metrics
