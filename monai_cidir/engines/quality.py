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
``dice_tolerance``), and whatever the affine did, when the result is broken in absolute terms
(the gates below); **warning** when a given mask is implausible, the two lung volumes differ
by more than a factor ``max_volume_ratio`` (breathing changes lung volume by well under 2x), a
lung mask covers (nearly) the whole field of view, or the lung Dice is flat over every scored
alpha (in both cases the Dice cannot tell the alphas apart: the selection cannot choose).

The absolute gates (module constants, read when a patient is assessed; the measured table and
the margins are in ``docs/quality_gates.md``, measured with ``benchmarks/quality_gates.py`` and the
stored benchmark results):

======================================  ==========  ====================================================
gate                                    threshold   good cases / sabotaged cases measured
======================================  ==========  ====================================================
folding at the exported alpha           > 1 %       0 in all 10 good cases / 1.8 % (real pair mirrored
                                                    in place), 22 % (issue 26)
lung Dice after cIDIR                   < 0.90      >= 0.956 / 0.824 (real pair mirrored in place)
lung Dice before registration, lung     < 0.20      >= 0.574 / 0.000 (real pair, real_r0 read mirrored
volumes within 1.43x: stops before                  as ITK 5.4 does), 0.037 (issue 26)
training (:func:`check_mask_overlap`)
mask share of its image's voxels        > 0.90      <= 0.34 / 1.00 (given masks of ones): warning
lung Dice range over the scored alphas  < 1e-6      >= 1.2e-4 / 0 (masks of ones): warning
======================================  ==========  ====================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from monai.utils import convert_to_tensor

from monai_cidir.coordinates import CoordinateMapping

__all__ = [
    "prepare_lung_masks",
    "mask_entries",
    "registration_quality",
    "assess_registration",
    "record_status",
    "NCC_TOLERANCE",
    "DICE_TOLERANCE",
    "MAX_VOLUME_RATIO",
    "MAX_LUNG_FOLDING",
    "MIN_LUNG_DICE",
    "MIN_OVERLAP_DICE",
    "OVERLAP_VOLUME_RATIO",
    "MAX_MASK_FOV_FRACTION",
    "FLAT_DICE_RANGE",
    "check_mask_overlap",
    "mask_overlap_dice",
]

logger = logging.getLogger("monai_cidir.engines")

NCC_TOLERANCE = 0.005
"""cIDIR may trail its affine by this much lung NCC before the result counts as failed."""

DICE_TOLERANCE = 0.01
"""cIDIR may trail its affine by this much lung Dice before the result counts as failed."""

MAX_VOLUME_RATIO = 2.0
"""Fixed and moving lung volumes further apart than this factor are reported."""

MAX_LUNG_FOLDING = 0.01
"""Above this fraction of lung points with ``det(I + J) <= 0`` at the exported alpha the result is failed."""

MIN_LUNG_DICE = 0.90
"""Below this lung Dice after cIDIR the result is failed (good cases: 0.956 and more; the real pair
mirrored in place: 0.824)."""

MIN_OVERLAP_DICE = 0.20
"""Lung masks overlapping less than this before registration, while their volumes agree within
:data:`OVERLAP_VOLUME_RATIO`, are scans that do not overlap in world space (a mirrored or misplaced
axis): the patient stops before training."""

OVERLAP_VOLUME_RATIO = 1.43
"""Lung volumes within this factor "agree" for :data:`MIN_OVERLAP_DICE` (masks of the same lungs)."""

MAX_MASK_FOV_FRACTION = 0.90
"""A lung mask covering more than this share of its image's voxels is not a lung mask: warned."""

FLAT_DICE_RANGE = 1e-6
"""A lung Dice that varies by less than this over the scored alphas (no voxel of the selection grid
changes: masks covering the field of view, identical scans) cannot choose one: warned. Good
registrations can have nearly flat curves (1.2e-4 on the quick start's phantom), so only a flat one counts."""


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


def mask_overlap_dice(item: Mapping, coarse_spacing_mm: float = 4.0) -> float:
    """The lung Dice before registration, measured as ``dice_before`` is (world space, no transform).

    On the selection grid (:func:`~monai_cidir.engines.alpha_selection.selection_grid`: the fixed
    lung's bounding box grown by 5 mm, about ``coarse_spacing_mm`` apart) the fixed mask is read at
    its voxels and the moving mask at the same world points (trilinear, above 0.5), so two scans
    whose affines place them apart (a mirrored or shifted axis) score near 0.

    Args:
        item: a loaded pair with ``fixed_mask`` and ``moving_mask``.
        coarse_spacing_mm: the grid's approximate spacing (mm).

    Returns:
        the Dice; NaN when the fixed mask is empty.

    Example::

        >>> mask_overlap_dice(item)  # doctest: +SKIP
        0.698
    """
    from monai_cidir.engines.alpha_selection import selection_grid

    fixed_map = CoordinateMapping.from_image(item["fixed_mask"])
    moving_map = CoordinateMapping.from_image(item["moving_mask"])
    fixed = convert_to_tensor(item["fixed_mask"], track_meta=False).float().reshape(fixed_map.spatial_shape)
    moving = convert_to_tensor(item["moving_mask"], track_meta=False).float().reshape(moving_map.spatial_shape)
    if not bool((fixed > 0.5).any()):
        return float("nan")
    grid = selection_grid(fixed_map, fixed, coarse_spacing_mm)
    inter = total = 0.0
    for _, world in grid.iter_points(1 << 18):
        f = fixed_map.sample(fixed, world.float(), mode="nearest") > 0.5
        m = moving_map.sample(moving, world.float()) > 0.5
        inter += float((f & m).sum())
        total += float(f.sum() + m.sum())
    return 2.0 * inter / total if total > 0 else float("nan")


def check_mask_overlap(item: Mapping, reports: Mapping[str, dict] | None = None, picture: str | os.PathLike | None = None) -> dict:
    """Before training: do the two scans overlap in world space, and are the masks lung masks?

    Lung masks that barely overlap (:func:`mask_overlap_dice` below :data:`MIN_OVERLAP_DICE`)
    while their volumes agree (within :data:`OVERLAP_VOLUME_RATIO`) are the same lungs placed apart
    by the scans' geometry: a slice axis reversed in one affine (ITK 5.4 reads some DICOM series
    so), a wrong origin or direction. Training on them gives a meaningless field, so the patient
    stops here. The share of each image's voxels its mask covers is returned for
    :func:`assess_registration` (a mask covering the whole field of view is warned about there).

    Args:
        item: a loaded pair with both masks (given or computed).
        reports: the masks' reports of :func:`prepare_lung_masks` (their volumes); default: measured here.
        picture: when the scans do not overlap, write this ``registration.png`` first (the "before"
            columns of :func:`~monai_cidir.engines.overview.plot_registration`).

    Returns:
        ``metrics.json`` entries ``{"fixed_mask_fov_fraction", "moving_mask_fov_fraction"}``.

    Raises:
        ValueError: "the scans do not overlap in world space: check the orientation of <file>",
            with the Dice, both volumes and both lung boxes.

    Example::

        >>> item, reports = prepare_lung_masks(item)  # doctest: +SKIP
        >>> check_mask_overlap(item, reports)["fixed_mask_fov_fraction"]  # doctest: +SKIP
        0.21
    """
    from monai_cidir.transforms.lung_quality import image_label, lung_mask_report

    name = item.get("name", "pair")
    reports = dict(reports or {})
    out, volumes, boxes = {}, {}, {}
    for side in ("fixed", "moving"):
        mask = convert_to_tensor(item[f"{side}_mask"], track_meta=False)
        out[f"{side}_mask_fov_fraction"] = float((mask > 0.5).float().mean())
        report = reports.get(side) or lung_mask_report(item[f"{side}_mask"]).as_dict()
        volumes[side], boxes[side] = float(report["volume_ml"]), report.get("bbox_mm")
    dice = mask_overlap_dice(item)
    low, high = sorted(volumes.values())
    agree = low > 0 and high <= OVERLAP_VOLUME_RATIO * low
    if agree and dice < MIN_OVERLAP_DICE:
        files = {side: image_label(item[f"{side}_image"], f"the {side} image") for side in ("fixed", "moving")}
        box = "; ".join(f"{side} {_box(boxes[side])}" for side in ("fixed", "moving") if boxes[side])
        if picture is not None:
            from monai_cidir.engines.overview import plot_registration

            plot_registration(item, None, picture, title=f"{name}: the scans do not overlap (lung Dice {dice:.3f} before registration); not registered")
        raise ValueError(
            f"{name}: the scans do not overlap in world space: check the orientation of {files['moving']} (and of "
            f"{files['fixed']}). Their lung masks agree in volume (fixed {volumes['fixed']:.0f} mL, moving "
            f"{volumes['moving']:.0f} mL: within {OVERLAP_VOLUME_RATIO}x) but overlap with a lung Dice of {dice:.3f} before registration (at least "
            f"{MIN_OVERLAP_DICE} expected); lung boxes (world RAS mm): {box}. A slice axis reversed in one image's affine (a DICOM "
            "series read with a flipped slice direction), a wrong origin or direction places one scan away from the other; "
            "registration.png and lung_masks.png show both scans. Nothing was trained."
        )
    return out


def _box(bbox) -> str:
    lo, hi = bbox
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi)) + "]"


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
    """``(status, failures, warnings)`` of one patient's metrics (see the module docstring).

    The relative rules compare cIDIR with its own affine; the absolute gates (:data:`MAX_LUNG_FOLDING`,
    :data:`MIN_LUNG_DICE`, :data:`MIN_OVERLAP_DICE`, :data:`MAX_MASK_FOV_FRACTION`,
    :data:`FLAT_DICE_RANGE`, read when called) hold whatever the affine did.

    Example::

        >>> assess_registration({"dice": 0.99, "dice_affine": 0.97, "folding": 0.22})[0]
        'failed'
    """
    failures = _relative_failures(metrics, ncc_tolerance, dice_tolerance) + _absolute_failures(metrics)
    warnings = []
    for side, report in (metrics.get("lung_masks") or {}).items():
        if not report.get("plausible", True):
            warnings.append(f"implausible given {side} lung mask ({report['image']}): " + "; ".join(report["problems"]))
    volumes = [metrics.get("fixed_lung_ml"), metrics.get("moving_lung_ml")]
    if all(v for v in volumes) and max(volumes) > max_volume_ratio * min(volumes):
        warnings.append(
            f"lung volumes differ by {max(volumes) / min(volumes):.1f}x (fixed {volumes[0]:.0f} mL, moving {volumes[1]:.0f} mL): "
            "masks of different regions or fields of view?"
        )
    warnings += _blind_selection(metrics)
    status = "failed" if failures else ("warning" if warnings else "ok")
    return status, failures, warnings


def _relative_failures(metrics: Mapping, ncc_tolerance: float, dice_tolerance: float) -> list[str]:
    """cIDIR worse than its own affine (or than no registration when no affine was kept)."""
    failures = []
    ncc_after, ncc_affine = metrics.get("ncc_after"), metrics.get("ncc_affine")
    reference = "its affine" if metrics.get("affine_prealign") else "no registration (no affine kept)"
    if ncc_after is not None and ncc_affine is not None and ncc_after < ncc_affine - ncc_tolerance:
        failures.append(f"worse than {reference}: lung NCC {ncc_after:.4f} after cIDIR < {ncc_affine:.4f}")
    dice, dice_affine = metrics.get("dice"), metrics.get("dice_affine")
    if dice is not None and dice_affine is not None and dice < dice_affine - dice_tolerance:
        failures.append(f"worse than {reference}: lung Dice {dice:.4f} after cIDIR < {dice_affine:.4f}")
    return failures


def _absolute_failures(metrics: Mapping) -> list[str]:
    """The gates measured on every good case (module docstring): folding, Dice after, overlap before."""
    failures = []
    hint = "open registration.png: a mirrored or shifted scan shows at a glance"
    folding, dice, before = metrics.get("folding"), metrics.get("dice"), metrics.get("dice_before")
    if folding is not None and folding > MAX_LUNG_FOLDING:
        failures.append(
            f"{100 * folding:.1f}% of the lung folds (det of the Jacobian <= 0) at the exported alpha (at most "
            f"{100 * MAX_LUNG_FOLDING:g}% expected): not a breathing motion; {hint}"
        )
    if dice is not None and dice < MIN_LUNG_DICE:
        failures.append(f"lung Dice {dice:.3f} after cIDIR (at least {MIN_LUNG_DICE} expected): the lungs are not aligned; {hint}")
    volumes = [metrics.get("fixed_lung_ml"), metrics.get("moving_lung_ml")]
    agree = all(v for v in volumes) and max(volumes) <= OVERLAP_VOLUME_RATIO * min(volumes)
    if before is not None and agree and before < MIN_OVERLAP_DICE:
        failures.append(
            f"the scans do not overlap in world space (lung Dice {before:.3f} before registration for lungs of "
            f"{volumes[0]:.0f} / {volumes[1]:.0f} mL): check the orientation of both images"
        )
    return failures


def _blind_selection(metrics: Mapping) -> list[str]:
    """Warnings where the lung Dice cannot tell the alphas apart: whole-field-of-view masks, a flat curve."""
    out = []
    covering = [s for s in ("fixed", "moving") if (metrics.get(f"{s}_mask_fov_fraction") or 0.0) > MAX_MASK_FOV_FRACTION]
    what = ("give masks of the lungs (or none: they are then computed, lung_mask_backend 'threshold' or 'lungmask'), or "
            "export an alpha of your choice (alpha=..., the inference config's --alpha)")  # fmt: skip
    if covering:
        shares = ", ".join(f"{s} {100 * metrics[f'{s}_mask_fov_fraction']:.0f}%" for s in covering)
        out.append(
            f"the lung mask covers (nearly) the whole field of view ({shares} of the image): the lung Dice cannot tell "
            f"the alphas apart, so the selection cannot choose; {what}"
        )
    dice_range = metrics.get("dice_range")
    if dice_range is not None and dice_range < FLAT_DICE_RANGE:
        out.append(
            f"the lung Dice is flat over every scored alpha (range {dice_range:.2g} < {FLAT_DICE_RANGE:g}): the selection "
            f"cannot choose and the exported alpha is arbitrary; {what}"
        )
    return out


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
