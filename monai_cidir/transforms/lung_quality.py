"""Is this lung mask plausible? A report for every computed or given mask, before any training.

:func:`lung_mask_report` measures a mask on its image: volume (mL), connected components,
bounding box (world RAS mm), the share of its surface on the field-of-view border (and which
sides), and the median HU inside it against this scan's air level. A mask is *implausible*
when it is empty, holds less than ``min_volume_ml`` (300 mL; a chest CT holds 2-8 L of lung),
or when none of its components has the density of aerated lung: all of it either at the level
of pure air (bowel or stomach gas below the diaphragm, outside air; the test of
:mod:`~monai_cidir.transforms.lung_threshold`) or above -500 HU (soft tissue: a wrong label or
image).

:class:`CheckLungMask` / :class:`CheckLungMaskd` attach the report to the mask
(``mask.meta["lung_mask_report"]``) and act on an implausible one: a mask computed by
:class:`~monai_cidir.transforms.LungMask` raises :class:`LungMaskError` naming the image and
what was found (the patient stops before training), a given mask logs a warning (the user's
mask is kept, never silently).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_numpy, ensure_tuple
from scipy import ndimage

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.transforms.lung_threshold import (
    GAS_MARGIN_HU,
    PADDING_HU,
    WORKING_SPACING_MM,
    _working_factors,
    air_level_hu,
    block_mean,
    padding_mask,
    scan_axes,
    split_air,
    upsample_mask,
)

__all__ = [
    "LungMaskError",
    "LungMaskReport",
    "lung_mask_report",
    "image_label",
    "CheckLungMask",
    "CheckLungMaskd",
    "MIN_LUNG_VOLUME_ML",
    "GAS_MARGIN_HU",
]

logger = logging.getLogger("monai_cidir.transforms")

MIN_LUNG_VOLUME_ML = 300.0
"""Below this a mask cannot be the lungs of a chest CT (2-8 L): part of them, or another region."""

TISSUE_HU = -500.0
"""A component whose median HU is above this is not aerated lung."""

_COMPONENT_ML = 1.0  # smaller specks are not counted as components


class LungMaskError(ValueError):
    """A lung mask that cannot be the lungs; the message names the image and what was found."""


@dataclass
class LungMaskReport:
    """What a lung mask holds, and whether that can be the lungs.

    Attributes:
        image: the image the mask belongs to (its file, else a name).
        source: ``"computed (<backend>)"`` or ``"given"``.
        volume_ml: mask volume (mL).
        components_ml: volumes of its connected components of at least 1 mL, largest first.
        bbox_mm: ``[[x, y, z] min, [x, y, z] max]`` world RAS mm of its voxel centres.
        border_fraction: share of its surface voxels on the field-of-view edge (array faces or
            next to padding).
        border_sides: the sides it touches (``R``/``L``/``A``/``P``/``S``/``I``), padding excluded.
        median_hu: median HU inside the mask (``None`` without the image).
        air_hu: this scan's air level (``None`` without the image).
        problems: why the mask is implausible (empty when it is plausible).
    """

    image: str
    source: str
    volume_ml: float
    components_ml: list[float] = field(default_factory=list)
    bbox_mm: list[list[float]] | None = None
    border_fraction: float = 0.0
    border_sides: list[str] = field(default_factory=list)
    median_hu: float | None = None
    air_hu: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def plausible(self) -> bool:
        """No problems found."""
        return not self.problems

    @property
    def computed(self) -> bool:
        """The mask was computed (not given by the user)."""
        return self.source.startswith("computed")

    def as_dict(self) -> dict:
        """Plain data for ``metrics.json`` (with ``plausible``)."""
        return {**asdict(self), "plausible": self.plausible}

    def summary(self) -> str:
        """One line: volume, components, border contact, density."""
        parts = [f"{self.volume_ml:.0f} mL", f"{len(self.components_ml)} component(s)"]
        if self.border_fraction > 0:
            parts.append(f"{100 * self.border_fraction:.0f}% of its surface on the field-of-view border ({''.join(self.border_sides) or 'padding'})")
        if self.median_hu is not None:
            parts.append(f"median {self.median_hu:.0f} HU (air {self.air_hu:.0f} HU)")
        return f"lung mask of {self.image} ({self.source}): " + ", ".join(parts)


def image_label(image, fallback: str = "image") -> str:
    """The file an image was read from (``meta["filename_or_obj"]``), else ``fallback``."""
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name) if name else fallback


def _surface_on_border(mask: np.ndarray, valid: np.ndarray | None, faces_in_view=None) -> tuple[float, list[tuple[int, int]]]:
    """(share of surface voxels on the array faces or next to padding, the (axis, 0|-1) faces touched).

    ``mask`` may be a crop of the whole mask holding it with a margin of one voxel;
    ``faces_in_view`` then names the crop's faces that are the whole array's faces (default: all).
    """
    surface = mask & ~ndimage.binary_erosion(mask, border_value=0)
    edge = np.zeros_like(mask)
    faces = []
    for a in range(3):
        for end in (0, -1):
            if faces_in_view is not None and (a, end) not in faces_in_view:
                continue
            index = [slice(None)] * 3
            index[a] = end
            edge[tuple(index)] = True
            if mask[tuple(index)].any():
                faces.append((a, end))
    if valid is not None and not valid.all():
        edge |= ndimage.binary_dilation(~valid) & valid
    n = int(surface.sum())
    return (float((surface & edge).sum()) / n if n else 0.0), faces


def _side_letter(direction: np.ndarray, end: int) -> str:
    outward = -direction if end == 0 else direction  # world (RAS) direction leaving the array at that face
    a = int(np.argmax(np.abs(outward)))
    return ("R", "A", "S")[a] if outward[a] > 0 else ("L", "P", "I")[a]


def _density_problem(labels: np.ndarray, hu: np.ndarray, big: np.ndarray, air_hu: float, gas_margin_hu: float) -> str | None:
    medians = [float(np.median(hu[labels == lab])) for lab in big]
    if any(air_hu + gas_margin_hu <= m <= TISSUE_HU for m in medians):
        return None
    if all(m > TISSUE_HU for m in medians):
        return (
            f"no component has the density of aerated lung: median {max(medians):.0f} HU is soft tissue "
            f"(lung is below {TISSUE_HU:.0f} HU); a wrong label, or a mask of another image?"
        )
    return (
        f"no component has the density of aerated lung: the component medians ({', '.join(f'{m:.0f}' for m in medians[:3])} HU) "
        f"lie within {gas_margin_hu:.0f} HU of this scan's air ({air_hu:.0f} HU), as bowel or stomach gas below the "
        "diaphragm or outside air do; aerated lung is denser"
    )


def _air_level(hu: np.ndarray, affine: np.ndarray, spacing: np.ndarray, padding_hu: float) -> float:
    """This scan's air level (:func:`~monai_cidir.transforms.lung_threshold.air_level_hu`): the outside
    air found on the threshold backend's working grid, its median HU read on the image's own voxels."""
    factors = _working_factors(spacing, WORKING_SPACING_MM)
    if all(f == 1 for f in factors):
        return air_level_hu(hu, split_air(hu, spacing, scan_axes(affine, spacing), padding_hu=padding_hu)[1])
    coarse, coarse_affine = block_mean(hu, affine, factors)
    coarse_spacing = spacing * np.asarray(factors)
    outside = split_air(coarse, coarse_spacing, scan_axes(coarse_affine, coarse_spacing), padding_hu=padding_hu)[1]
    return air_level_hu(hu, upsample_mask(outside, factors, hu.shape) & ~padding_mask(hu, padding_hu))


def lung_mask_report(
    mask,
    image=None,
    name: str | None = None,
    source: str | None = None,
    min_volume_ml: float = MIN_LUNG_VOLUME_ML,
    gas_margin_hu: float = GAS_MARGIN_HU,
    padding_hu: float = PADDING_HU,
) -> LungMaskReport:
    """Measure a lung mask (and, with its image, its density) and say whether it can be the lungs.

    Args:
        mask: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` 0/1 mask with an ``affine`` (MetaTensor), on the image's grid.
        image: the CT in HU on the same grid (enables the density checks).
        name: how to call the image in messages (default: the image's file, else ``"image"``).
        source: ``"given"`` or ``"computed (...)"`` (default: read from ``mask.meta``, set by ``LungMask``).
        min_volume_ml: smallest plausible lung volume.
        gas_margin_hu: see :data:`GAS_MARGIN_HU`.
        padding_hu: values at or below are padding outside the reconstruction.

    Returns:
        :class:`LungMaskReport`.

    Raises:
        ValueError: when the mask and image grids differ in shape.

    Example::

        >>> report = lung_mask_report(item["fixed_mask"], item["fixed_image"])  # doctest: +SKIP
        >>> report.plausible, report.volume_ml
    """
    m = convert_to_numpy(mask).reshape(np.shape(mask)[-3:]) > 0.5
    affine = convert_to_numpy(getattr(mask, "affine", None) if getattr(mask, "affine", None) is not None else np.eye(4))
    mapping = CoordinateMapping(np.asarray(affine, dtype=np.float64), m.shape)
    spacing = mapping.spacing.numpy()
    meta = getattr(mask, "meta", None) or {}
    if source is None:
        source = f"computed ({meta['lung_mask_backend']})" if meta.get("lung_mask_backend") else "given"
    name = name or image_label(image if image is not None else mask)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    report = LungMaskReport(image=name, source=source, volume_ml=float(m.sum()) * voxel_ml)
    if not m.any():
        report.problems.append("the mask is empty")
        return report
    hu = valid = None
    if image is not None:
        hu = convert_to_numpy(image).astype(np.float32, copy=False)
        hu = hu.reshape(hu.shape[-3:])
        if hu.shape != m.shape:
            raise ValueError(f"the lung mask of {name} has shape {m.shape}, its image {hu.shape}: expected the same grid")
    # the mask's bounding box grown by one voxel: every measure below sees all of the mask there
    lo = [int(np.flatnonzero(m.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    hi = [int(np.flatnonzero(m.any(axis=tuple(b for b in range(3) if b != a)))[-1]) for a in range(3)]
    box = tuple(slice(max(a - 1, 0), min(b + 2, n_)) for a, b, n_ in zip(lo, hi, m.shape))
    in_view = [(a, end) for a in range(3) for end in (0, -1) if (box[a].start == 0 if end == 0 else box[a].stop == m.shape[a])]
    if hu is not None:
        valid = ~padding_mask(hu[box], padding_hu)
    labels, n = ndimage.label(m[box])
    sizes = np.bincount(labels.ravel())[1:] * voxel_ml
    order = np.argsort(sizes)[::-1]
    report.components_ml = [round(float(sizes[i]), 1) for i in order if sizes[i] >= _COMPONENT_ML]
    corners = mapping.index_to_world(torch.tensor([lo, hi], dtype=torch.float64)).numpy()
    report.bbox_mm = [np.round(corners.min(0), 1).tolist(), np.round(corners.max(0), 1).tolist()]
    report.border_fraction, faces = _surface_on_border(m[box], valid, in_view)
    direction = mapping.affine.numpy()[:3, :3] / spacing
    report.border_sides = sorted({_side_letter(direction[:, a], end) for a, end in faces}, key="RLAPSI".index)
    if report.volume_ml < min_volume_ml:
        report.problems.append(
            f"{report.volume_ml:.0f} mL of lung, expected at least {min_volume_ml:.0f} mL (a chest CT holds 2-8 L): "
            "the scan shows only part of the lungs, or the mask holds another region"
        )
    if hu is not None:
        report.air_hu = _air_level(hu, mapping.affine.numpy(), spacing, padding_hu)
        report.median_hu = float(np.median(hu[m]))
        big = [int(order[i]) + 1 for i in range(len(order)) if sizes[order[i]] >= 10.0] or [int(order[0]) + 1]
        problem = _density_problem(labels, hu[box], big[:5], report.air_hu, gas_margin_hu)
        if problem:
            report.problems.append(problem)
    return report


class CheckLungMask(Transform):
    """Check a lung mask against its image; attach the report; stop or warn when it is implausible.

    The mask is returned unchanged, with ``mask.meta["lung_mask_report"]`` (the
    :class:`LungMaskReport` as a dict). An implausible mask raises :class:`LungMaskError` when it
    was computed (``LungMask`` marks its output) and logs a warning when it was given
    (``on_implausible="auto"``); ``"raise"`` and ``"warn"`` apply to both.

    Args:
        min_volume_ml: smallest plausible lung volume.
        gas_margin_hu: see :data:`GAS_MARGIN_HU`.
        on_implausible: ``"auto"``, ``"raise"`` or ``"warn"``.

    Raises:
        ValueError: for an unknown ``on_implausible``.

    Example::

        >>> mask = CheckLungMask()(LungMask(backend="threshold")(image), image)  # doctest: +SKIP
        >>> mask.meta["lung_mask_report"]["volume_ml"]
    """

    def __init__(self, min_volume_ml: float = MIN_LUNG_VOLUME_ML, gas_margin_hu: float = GAS_MARGIN_HU, on_implausible: str = "auto") -> None:
        if on_implausible not in ("auto", "raise", "warn"):
            raise ValueError(f"on_implausible must be 'auto', 'raise' or 'warn', found {on_implausible!r}")
        self.min_volume_ml = float(min_volume_ml)
        self.gas_margin_hu = float(gas_margin_hu)
        self.on_implausible = on_implausible

    def __call__(self, mask, image=None, name: str | None = None):
        """Check ``mask`` (on ``image``'s grid); ``name`` labels the image in messages."""
        report = lung_mask_report(mask, image, name=name, min_volume_ml=self.min_volume_ml, gas_margin_hu=self.gas_margin_hu)
        if hasattr(mask, "meta"):
            mask.meta["lung_mask_report"] = report.as_dict()
        if report.plausible:
            logger.info("%s", report.summary())
            return mask
        message = f"implausible {report.summary()}: " + "; ".join(report.problems)
        stop = self.on_implausible == "raise" or (self.on_implausible == "auto" and report.computed)
        if stop:
            raise LungMaskError(
                message + ". Give a lung mask in the datalist (fixed_mask / moving_mask), or try "
                "lung_mask_backend='lungmask' with its R231 weights."
            )
        logger.warning("%s", message)
        return mask


class CheckLungMaskd(MapTransform):
    """Dictionary twin of :class:`CheckLungMask`: checks each mask key against its image key.

    Args:
        keys: mask keys, e.g. ``("fixed_mask", "moving_mask")``.
        image_keys: the image of each mask key, by position (default: ``<name>_mask`` ->
            ``<name>_image``).
        allow_missing_keys: skip absent masks.
        kwargs: options of :class:`CheckLungMask`.

    Raises:
        ValueError: when ``image_keys`` does not pair with ``keys``.

    Example::

        >>> item = CheckLungMaskd(("fixed_mask", "moving_mask"))(item)  # doctest: +SKIP
        >>> item["fixed_mask"].meta["lung_mask_report"]["plausible"]
    """

    def __init__(self, keys: KeysCollection, image_keys: KeysCollection | None = None, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        if image_keys is None:
            image_keys = tuple(f"{str(k)[: -len('_mask')]}_image" if str(k).endswith("_mask") else f"{k}_image" for k in self.keys)
        self.image_keys = ensure_tuple(image_keys)
        if len(self.image_keys) != len(self.keys):
            raise ValueError(f"image_keys {self.image_keys} must pair with keys {self.keys} by position")
        self.check = CheckLungMask(**kwargs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        errors = []  # every mask is checked (and gets its report) before one error names them all
        for key, image_key in self.key_iterator(d, self.image_keys):
            image = d.get(image_key)
            label = image_label(image, str(image_key)) if image is not None else str(image_key)
            try:
                d[key] = self.check(d[key], image, name=f"{d['name']}: {label}" if d.get("name") else label)
            except LungMaskError as e:
                errors.append(str(e))
        if errors:
            raise LungMaskError("\n".join(errors))
        return d
