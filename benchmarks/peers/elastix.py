"""elastix (through the ``itk-elastix`` package) as a peer method: affine + B-spline registration.

Two presets, both an affine stage followed by a B-spline stage, both given the same fixed lung mask
the INR methods sample from (the issue's "same inputs, same masks"):

``"default"``
    elastix's own default parameter maps (``ParameterObject.GetDefaultParameterMap("affine")`` and
    ``("bspline")``): 4 resolutions, 256 iterations each, AdvancedMattesMutualInformation (+ a
    bending-energy penalty of weight 1 in the B-spline stage), 2,048 random samples per iteration,
    final control-point spacing 10 mm. Only the output knobs are touched (no result image) and
    mask erosion is off (see ``_COMMON``).

``"lung"``
    a lung CT tuned variant (:data:`LUNG_BSPLINE_OVERRIDES`), following common practice for
    intra-patient thoracic CT (e.g. the elastix model zoo's lung entries and the
    EMPIRE10 / DIR-LAB literature):

    * **AdvancedNormalizedCorrelation** instead of mutual information: same modality and HU
      preserved between breathing phases, and NCC is what the INR methods optimise too;
    * **finer final grid**, 6 mm instead of 10 mm, reached through an 8-4-2-1 schedule over the
      4 resolutions (48, 24, 12, 6 mm: coarse levels catch the large diaphragm motion, fine ones
      the local motion);
    * **more iterations and samples** (500 per resolution instead of 256, 4,000 samples instead
      of 2,048): the stochastic gradient noise is what limits elastix on small structures;
    * **mask-restricted sampling** (the fixed lung mask, also passed to the default preset), so
      the sliding chest wall does not pull the lung field;
    * a **bending-energy penalty** of weight 0.05 relative to NCC (NCC lies in [-1, 0], so the
      default weight of 1, set for MI, would over-smooth). Chosen a priori, not tuned on the
      benchmark's cases (tuning on the cases' landmarks would give elastix an oracle the INR
      methods do not get).

Coordinates: ITK images and points are in LPS; the project's world frame is RAS. Images are
converted with MONAI's ``metatensor_to_itk_image`` (told that the affine is RAS), points with
:func:`monai_cidir.coordinates.ras_to_lps`. elastix's result transform maps fixed-space points to
moving-space points, which is exactly the direction the target registration error needs, so the
fixed landmarks are pushed through it (no inversion).

Example::

    >>> result = register_elastix(item["fixed_image"], item["moving_image"], item["fixed_mask"], preset="lung")
    >>> moved = result.transform_points(item["fixed_landmarks"])  # (N, 3) world RAS mm
    >>> field = result.displacement_field()                          # (X, Y, Z, 3) RAS mm
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import

from monai_cidir.coordinates import CoordinateMapping, lps_to_ras, ras_to_lps

itk, has_itk = optional_import("itk")

__all__ = [
    "ELASTIX_PRESETS",
    "LUNG_AFFINE_OVERRIDES",
    "LUNG_BSPLINE_OVERRIDES",
    "ElastixResult",
    "elastix_available",
    "elastix_parameter_maps",
    "metatensor_to_itk",
    "register_elastix",
]

ELASTIX_PRESETS = ("default", "lung")

#: changes to elastix's default affine map for the "lung" preset.
LUNG_AFFINE_OVERRIDES: dict[str, list[str]] = {
    "NumberOfResolutions": ["3"],
    "MaximumNumberOfIterations": ["300"],
    "NumberOfSpatialSamples": ["4000"],
}

#: changes to elastix's default B-spline map for the "lung" preset (see the module docstring).
LUNG_BSPLINE_OVERRIDES: dict[str, list[str]] = {
    "Metric": ["AdvancedNormalizedCorrelation", "TransformBendingEnergyPenalty"],
    "Metric0Weight": ["1.0"],
    "Metric1Weight": ["0.05"],
    "NumberOfResolutions": ["4"],
    "FinalGridSpacingInPhysicalUnits": ["6.0"],
    "GridSpacingSchedule": ["8", "4", "2", "1"],
    "MaximumNumberOfIterations": ["500"],
    "NumberOfSpatialSamples": ["4000"],
    "ImageSampler": ["RandomCoordinate"],
    "NewSamplesEveryIteration": ["true"],
}

# settings every preset gets: no result image (the harness warps masks itself), quiet, and no
# mask erosion: elastix erodes the mask by the pyramid's kernel at coarse levels by default, which
# leaves too few samples in a lung mask of thick (5 mm) slices ("Could not find enough image
# samples"), so the default preset would fail outright with a mask.
_COMMON: dict[str, list[str]] = {"WriteResultImage": ["false"], "WriteIterationInfo": ["false"], "ErodeMask": ["false"]}


def elastix_available() -> bool:
    """Whether ``itk-elastix`` is importable (the benchmark's optional ``bench`` extra)."""
    return bool(has_itk) and hasattr(itk, "ElastixRegistrationMethod")


def _require_elastix() -> None:
    if not elastix_available():
        raise ImportError(
            "elastix benchmarks need the itk-elastix package: pip install 'monai_cidir[bench]' "
            "(or pip install itk-elastix)"
        )


def elastix_parameter_maps(
    preset: str = "default", max_iterations: int | None = None, overrides: Mapping[str, Any] | None = None
) -> list[dict[str, list[str]]]:
    """The affine and B-spline parameter maps of a preset, as plain ``{name: [values]}`` dicts.

    Args:
        preset: ``"default"`` (elastix's defaults) or ``"lung"`` (see the module docstring).
        max_iterations: when set, caps ``MaximumNumberOfIterations`` of every stage (for quick
            runs and the smoke test; the benchmark's full run leaves it unset).
        overrides: extra ``{name: value or [values]}`` applied to the B-spline stage.

    Returns:
        ``[affine_map, bspline_map]``.

    Raises:
        ValueError: for an unknown preset.
        ImportError: when itk-elastix is not installed.
    """
    if preset not in ELASTIX_PRESETS:
        raise ValueError(f"unknown elastix preset {preset!r}: expected one of {ELASTIX_PRESETS}")
    _require_elastix()
    po = itk.ParameterObject.New()
    maps = [
        {k: list(v) for k, v in dict(po.GetDefaultParameterMap(kind)).items()} for kind in ("affine", "bspline")
    ]
    if preset == "lung":
        maps[0].update(LUNG_AFFINE_OVERRIDES)
        maps[1].update(LUNG_BSPLINE_OVERRIDES)
    for m in maps:
        m.update(_COMMON)
        if max_iterations is not None:
            m["MaximumNumberOfIterations"] = [str(int(max_iterations))]
    for k, v in (overrides or {}).items():
        maps[1][str(k)] = [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
    return maps


def metatensor_to_itk(image: torch.Tensor, pixel_type=np.float32):
    """A channel-first MetaTensor ``(1, X, Y, Z)`` with a RAS affine -> an ITK image (LPS geometry).

    Args:
        image: the project's image or mask (its ``affine`` is index -> world RAS mm).
        pixel_type: numpy dtype of the ITK pixels.

    Returns:
        ``itk.Image`` whose physical points are the LPS version of the MetaTensor's RAS world points.

    Raises:
        ValueError: when the input is not a single-channel 3-D MetaTensor.
    """
    _require_elastix()
    from monai.data import MetaTensor
    from monai.data.itk_torch_bridge import metatensor_to_itk_image

    if not isinstance(image, MetaTensor) or image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(
            f"expected a single-channel MetaTensor (1, X, Y, Z), found {type(image).__name__} "
            f"of shape {tuple(getattr(image, 'shape', ()))}"
        )
    vol = MetaTensor(image.as_tensor()[0].detach().cpu().float(), affine=image.affine.detach().cpu().double())
    vol.meta["space"] = "RAS"  # the project convention; MONAI then flips to LPS for ITK
    return metatensor_to_itk_image(vol, channel_dim=None, dtype=pixel_type)


@dataclass
class ElastixResult:
    """What :func:`register_elastix` returns.

    Attributes:
        transform: the combined ITK transform (affine then B-spline), fixed -> moving, LPS mm.
        seconds: wall-clock of the registration itself (excludes image conversion).
        fixed_mapping: the fixed image's :class:`~monai_cidir.coordinates.CoordinateMapping`.
        parameter_maps: the maps elastix ran with.
        fixed_itk: the fixed image as ITK saw it (the reference grid of :meth:`displacement_field`).
    """

    transform: Any
    seconds: float
    fixed_mapping: CoordinateMapping
    parameter_maps: list = field(default_factory=list)
    fixed_itk: Any = None

    def transform_points(self, points: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Map fixed-space world RAS points (N, 3) to moving space; float64 (N, 3) RAS mm."""
        pts = ras_to_lps(np.asarray(torch.as_tensor(points, dtype=torch.float64).reshape(-1, 3)))
        out = np.array([tuple(self.transform.TransformPoint([float(c) for c in p])) for p in pts], dtype=np.float64)
        return torch.from_numpy(lps_to_ras(out.reshape(-1, 3)))

    def displacement_field(self) -> torch.Tensor:
        """The displacement ``phi(p) - p`` on the fixed grid: float32 ``(X, Y, Z, 3)`` world RAS mm."""
        vector = itk.Vector[itk.F, 3]
        field_type = itk.Image[vector, 3]
        flt = itk.TransformToDisplacementFieldFilter[field_type, itk.D].New()
        flt.SetTransform(self.transform)
        flt.SetReferenceImage(self.fixed_itk)
        flt.SetUseReferenceImage(True)
        flt.Update()
        arr = itk.array_from_image(flt.GetOutput())  # (Z, Y, X, 3), LPS vectors
        arr = np.ascontiguousarray(np.transpose(arr, (2, 1, 0, 3)))
        return torch.from_numpy(lps_to_ras(arr).astype(np.float32))


def register_elastix(
    fixed_image: torch.Tensor,
    moving_image: torch.Tensor,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    preset: str = "default",
    num_threads: int | None = 2,
    max_iterations: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    log_file: str | None = None,
) -> ElastixResult:
    """Affine + B-spline registration of a loaded pair with elastix.

    Args:
        fixed_image: fixed MetaTensor ``(1, X, Y, Z)`` (RAS affine), the inhale phase.
        moving_image: moving MetaTensor (its own grid), the exhale phase.
        fixed_mask: optional fixed lung mask (restricts elastix's samples to it).
        moving_mask: optional moving lung mask (restricts the moving samples; not used by the
            benchmark, which gives every method the fixed mask only).
        preset: ``"default"`` or ``"lung"``, see :func:`elastix_parameter_maps`.
        num_threads: elastix/ITK threads (``None``: elastix decides).
        max_iterations: cap on iterations per resolution (quick runs).
        overrides: extra B-spline parameters.
        log_file: when set, elastix's log is written to this file.

    Returns:
        an :class:`ElastixResult`.

    Raises:
        ImportError: when itk-elastix is absent.
        RuntimeError: when elastix fails (with its message).
    """
    _require_elastix()
    maps = elastix_parameter_maps(preset, max_iterations=max_iterations, overrides=overrides)
    fi = metatensor_to_itk(fixed_image)
    mi = metatensor_to_itk(moving_image)
    po = itk.ParameterObject.New()
    for m in maps:
        po.AddParameterMap(m)
    reg = itk.ElastixRegistrationMethod.New(fi, mi)
    reg.SetParameterObject(po)
    if fixed_mask is not None:
        reg.SetFixedMask(metatensor_to_itk((fixed_mask > 0).to(torch.float32), pixel_type=np.uint8))
    if moving_mask is not None:
        reg.SetMovingMask(metatensor_to_itk((moving_mask > 0).to(torch.float32), pixel_type=np.uint8))
    reg.SetLogToConsole(False)
    if log_file is not None:
        import os

        reg.SetOutputDirectory(os.path.dirname(os.path.abspath(log_file)))
        reg.SetLogFileName(os.path.basename(log_file))
        reg.SetLogToFile(True)
    if num_threads is not None:
        # ITK's global default, not reg.SetNumberOfThreads: the latter crashes the multi-metric
        # B-spline registration (InsightSoftwareConsortium/ITKElastix issue 160).
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(num_threads))
    start = time.perf_counter()
    try:
        reg.UpdateLargestPossibleRegion()
    except RuntimeError as e:  # elastix reports its own failure text
        raise RuntimeError(f"elastix ({preset} preset) failed: {e}") from None
    seconds = time.perf_counter() - start
    transform = reg.ConvertToItkTransform(reg.GetCombinationTransform())
    return ElastixResult(
        transform=transform,
        seconds=seconds,
        fixed_mapping=CoordinateMapping.from_image(fixed_image),
        parameter_maps=maps,
        fixed_itk=fi,
    )

