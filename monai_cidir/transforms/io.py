"""Loading transforms: a datalist record (file paths) -> the project's loaded-pair item.

The loaded item (shared by data, phantom, engines and bundle)::

    "name": str
    "fixed_image", "moving_image": MetaTensor (1, X, Y, Z) float32 HU, affine = index -> world RAS mm
    "fixed_mask", "moving_mask" (optional): MetaTensor (1, X, Y, Z) float32 0/1 on the image's grid
    "fixed_landmarks", "moving_landmarks" (optional): torch.float64 (N, 3) world RAS mm

Values that are already loaded (tensors) pass through untouched, so a record may mix paths and
in-memory data.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, ResampleToMatch
from monai.utils import ensure_tuple

from monai_cidir.data.dicom import DicomSeriesReader, is_dicom_path
from monai_cidir.data.dirlab import dirlab_affine, read_dirlab_image
from monai_cidir.data.validation import check_image_file, check_image_values
from monai_cidir.data.landmarks import load_landmarks

__all__ = ["LoadDIRLabd", "LoadRegistrationPaird", "DEFAULT_PAIR_KEYS"]

#: image, mask and landmark keys of the loaded-pair contract, in (fixed, moving) order.
DEFAULT_PAIR_KEYS = {
    "image": ("fixed_image", "moving_image"),
    "mask": ("fixed_mask", "moving_mask"),
    "landmarks": ("fixed_landmarks", "moving_landmarks"),
    "series_uid": ("fixed_series_uid", "moving_series_uid"),
}


def _is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike))


class LoadDIRLabd(MapTransform):
    """Load a DIR-LAB record (paths from :func:`~monai_cidir.data.dirlab_datalist`) into a loaded pair.

    Images are read by :func:`~monai_cidir.data.read_dirlab_image` (headerless int16, HU = raw - 1024,
    size/spacing from the built-in case table), landmarks by
    :func:`~monai_cidir.data.load_landmarks` (1-based voxel -> world RAS mm) with the case's affine,
    so landmarks load even without the images. The record must hold ``case_key``.

    Args:
        image_keys: keys of the T00 / T50 ``.img`` paths.
        landmark_keys: keys of the T00 / T50 landmark ``.txt`` paths.
        case_key: key of the case number (1-10).
        allow_missing_keys: do not fail when an image or landmark key is absent.

    Raises:
        KeyError: when ``case_key`` (or, unless allowed, a file key) is missing.
        ValueError: for a file of the wrong size (naming file, expected and found byte counts).

    Example::

        >>> from monai_cidir.data import dirlab_datalist
        >>> item = LoadDIRLabd()(dirlab_datalist("/data/dirlab", [1])[0])  # doctest: +SKIP
        >>> item["fixed_landmarks"].shape
        torch.Size([300, 3])
    """

    def __init__(
        self,
        image_keys: Sequence[str] = DEFAULT_PAIR_KEYS["image"],
        landmark_keys: Sequence[str] = DEFAULT_PAIR_KEYS["landmarks"],
        case_key: str = "case",
        allow_missing_keys: bool = False,
    ) -> None:
        self.image_keys = ensure_tuple(image_keys)
        self.landmark_keys = ensure_tuple(landmark_keys)
        super().__init__(self.image_keys + self.landmark_keys, allow_missing_keys)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.case_key not in d:
            raise KeyError(f"LoadDIRLabd: the record has no '{self.case_key}' (DIR-LAB case number); keys: {list(d)}")
        case = int(d[self.case_key])
        for key in self.key_iterator(d):
            value = d[key]
            if not _is_path(value):
                continue
            if key in self.image_keys:
                d[key] = read_dirlab_image(value, case)
            else:
                d[key] = load_landmarks(value, reference_image=dirlab_affine(case), format="dirlab")
        d.setdefault("name", f"dirlab_case{case:02d}")
        return d


class LoadRegistrationPaird(MapTransform):
    """Load a pair-datalist record (see :func:`~monai_cidir.data.load_pair_datalist`) into a loaded pair.

    * Images: MONAI ``LoadImage`` with the ITK reader (NIfTI, MHA/MHD, NRRD, ...), channel first,
      float32, values as stored (HU for CT); ``affine`` = index -> world RAS mm. A folder or a
      ``.dcm`` file is a DICOM series, read by :class:`~monai_cidir.data.DicomSeriesReader` (geometry
      from every slice's ImagePositionPatient / ImageOrientationPatient, not ITK's, which mirrors
      series with a negative SpacingBetweenSlices); a folder with several series needs the record's
      ``fixed_series_uid`` / ``moving_series_uid``. Multi-channel or non-3-D images are refused.
    * Masks: read the same way and binarised (``value > 0`` -> 1.0, so label maps such as
      lungmask's 1 = right / 2 = left lung become one lung mask). A mask stored on another grid
      than its image is resampled onto the image's grid (nearest neighbour, through world
      coordinates); one whose grid does not cover the image (:func:`check_mask_grid`) is refused.
    * Landmarks: :func:`~monai_cidir.data.load_landmarks`, with the matching image (fixed
      landmarks -> fixed image, moving -> moving) as reference for voxel-index formats.

    Images are required; masks and landmarks are optional. Values that are not paths (already
    loaded tensors) pass through.

    Args:
        image_keys: (fixed, moving) image keys.
        mask_keys: (fixed, moving) mask keys, paired with ``image_keys`` by position.
        landmark_keys: (fixed, moving) landmark keys, paired with ``image_keys`` by position.
        series_uid_keys: (fixed, moving) keys of the SeriesInstanceUID to read from a DICOM folder
            holding several series, paired with ``image_keys`` by position.
        reader: the reader given to ``monai.transforms.LoadImage`` for image files that are not
            DICOM (default ``"ITKReader"``).
        name_key: key of the pair's name; set from the fixed image's file name when absent.
        check_ct: require CT values in Hounsfield units (some voxels below -400 HU: air or lung).
            Every image is also checked for a complete file, a positive spacing in its header,
            finite values and not being constant (:mod:`monai_cidir.data.validation`).

    Raises:
        KeyError: when an image key is missing.
        FileNotFoundError: for a path that does not exist.
        RuntimeError: when the reader cannot open a file (names the file and the reader).
        OSError: for a truncated or corrupt ``.gz`` file.
        ValueError: for images that are not single-channel 3-D, a non-positive spacing, non-finite
            or constant values, or (``check_ct``) no voxel in the air/lung HU range; for a mask on another
            grid that does not cover its image (naming the mask file, both grids and the overlap).

    Example::

        >>> load = LoadRegistrationPaird()
        >>> record = {"fixed_image": "f.nii.gz", "moving_image": "m.mha", "fixed_landmarks": "f.csv"}
        >>> item = load(record)  # doctest: +SKIP
        >>> item["fixed_image"].shape, item["fixed_landmarks"].dtype
        (torch.Size([1, 128, 128, 64]), torch.float64)
    """

    def __init__(
        self,
        image_keys: Sequence[str] = DEFAULT_PAIR_KEYS["image"],
        mask_keys: Sequence[str] = DEFAULT_PAIR_KEYS["mask"],
        landmark_keys: Sequence[str] = DEFAULT_PAIR_KEYS["landmarks"],
        reader: object = "ITKReader",
        name_key: str = "name",
        check_ct: bool = True,
        series_uid_keys: Sequence[str] = DEFAULT_PAIR_KEYS["series_uid"],
    ) -> None:
        self.series_uid_keys = ensure_tuple(series_uid_keys)
        self.image_keys = ensure_tuple(image_keys)
        self.mask_keys = ensure_tuple(mask_keys)
        self.landmark_keys = ensure_tuple(landmark_keys)
        for what, keys in (("mask_keys", self.mask_keys), ("landmark_keys", self.landmark_keys)):
            if len(keys) not in (0, len(self.image_keys)):
                raise ValueError(f"{what} must pair with image_keys {self.image_keys} by position, found {keys}")
        super().__init__(self.image_keys + self.mask_keys + self.landmark_keys, allow_missing_keys=True)
        self.reader = reader
        self.name_key = name_key
        self.check_ct = bool(check_ct)
        self._loader = LoadImage(reader=reader, image_only=True, dtype=np.float32, ensure_channel_first=True)
        self._dicom_loader = LoadImage(image_only=True, dtype=np.float32, ensure_channel_first=True)
        self._resample = ResampleToMatch(mode="nearest", padding_mode="zeros")

    def _load(self, key: str, path, image: bool = False, series_uid: str | None = None) -> MetaTensor:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{key}: file not found: {path}")
        check_image_file(path, key)
        dicom = is_dicom_path(path)
        try:
            if dicom:
                # the reader at call time: LoadImage(reader=...) would fall back to ITK when it refuses a series
                img = self._dicom_loader(str(path), reader=DicomSeriesReader(series_uid=series_uid))
            else:
                img = self._loader(str(path))
        except ValueError as e:  # the DICOM reader's own checks name the series and what is wrong
            raise ValueError(f"{key}: {e}") from e
        except Exception as e:  # readers raise many types; give the user the file and the reader
            hint = " (a headerless DIR-LAB .img: use monai_cidir.data.DIRLabDataset)" if path.suffix == ".img" else ""
            used = "DicomSeriesReader" if dicom else self.reader
            raise RuntimeError(f"{key}: could not read {path} with {used}{hint}: {e}") from e
        if img.ndim != 4 or img.shape[0] != 1:
            raise ValueError(
                f"{key}: expected a single-channel 3-D image, i.e. (1, X, Y, Z) after loading, found shape "
                f"{tuple(img.shape)} in {path}"
            )
        if image:
            check_image_values(img, key, path, ct=self.check_ct)
        elif not bool(torch.isfinite(img.as_tensor()).all()):
            raise ValueError(f"{key}: {path} has non-finite voxels (NaN or inf): expected a 0/1 (or label) mask")
        return img

    @staticmethod
    def _same_grid(a: torch.Tensor, b: torch.Tensor) -> bool:
        return tuple(a.shape[1:]) == tuple(b.shape[1:]) and torch.allclose(
            torch.as_tensor(a.affine, dtype=torch.float64), torch.as_tensor(b.affine, dtype=torch.float64), atol=1e-4
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.image_keys:
            if key not in d:
                raise KeyError(f"LoadRegistrationPaird: the record has no '{key}'; keys: {list(d)}")
            if _is_path(d[key]):
                uid_key = dict(zip(self.image_keys, self.series_uid_keys)).get(key)
                d[key] = self._load(key, d[key], image=True, series_uid=d.get(uid_key) if uid_key else None)
        for i, key in enumerate(self.mask_keys):
            if key not in d or d[key] is None:
                continue
            source = d[key] if _is_path(d[key]) else f"{key} (in memory)"
            mask = self._load(key, d[key]) if _is_path(d[key]) else d[key]
            image = d[self.image_keys[i]]
            if isinstance(mask, MetaTensor) and isinstance(image, MetaTensor) and not self._same_grid(mask, image):
                resampled = self._resample(mask, image)
                check_mask_grid(mask, resampled, image, key, source, self.image_keys[i])
                mask = resampled
            d[key] = (mask > 0).to(torch.float32)  # a MetaTensor stays one, with its affine
        for i, key in enumerate(self.landmark_keys):
            if key not in d or d[key] is None:
                continue
            if _is_path(d[key]):
                d[key] = load_landmarks(d[key], reference_image=d[self.image_keys[i]])
            else:
                d[key] = torch.as_tensor(d[key], dtype=torch.float64)
        if not d.get(self.name_key):
            fixed = data.get(self.image_keys[0])
            d[self.name_key] = _stem(fixed) if _is_path(fixed) else "pair"
        return d


def _stem(path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".img", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


#: a mask on another grid must cover at least this share of its image's field of view
MIN_MASK_GRID_OVERLAP = 0.5

#: ... and at least this share of its (nonzero) voxels must lie inside the image
MIN_MASK_INSIDE = 0.5


def _grid_text(img) -> str:
    from monai_cidir.coordinates import CoordinateMapping

    m = CoordinateMapping.from_image(img)
    spacing = ", ".join(f"{v:.3g}" for v in m.spacing.tolist())
    origin = ", ".join(f"{v:.1f}" for v in m.affine[:3, 3].tolist())
    return f"shape {tuple(m.spatial_shape)}, spacing ({spacing}) mm, origin ({origin}) mm RAS"


def _fov_inside(of: MetaTensor, grid: MetaTensor, points: int = 32) -> float:
    """The share of ``of``'s field of view (a ``points``^3 lattice over its voxel centres) inside ``grid``'s voxel box."""
    from monai_cidir.coordinates import CoordinateMapping

    source, target = CoordinateMapping.from_image(of), CoordinateMapping.from_image(grid)
    shape = [min(int(n), points) for n in source.spatial_shape]
    index = target.world_to_index(source.world_grid(shape, dtype=torch.float64).reshape(-1, 3))
    upper = torch.as_tensor(target.spatial_shape, dtype=torch.float64) - 0.5
    return float(((index >= -0.5) & (index <= upper)).all(dim=1).double().mean())


def check_mask_grid(mask: MetaTensor, resampled: torch.Tensor, image: MetaTensor, key: str, source, image_key: str) -> None:
    """A mask stored on another grid than its image must cover the image: checked after resampling it.

    Raises:
        ValueError: naming the mask file, both grids (shape, spacing, origin) and the overlap,
            when the resampled mask is empty, its grid covers less than :data:`MIN_MASK_GRID_OVERLAP`
            of the image's field of view, or less than :data:`MIN_MASK_INSIDE` of its voxels lie inside the image.
    """
    from monai_cidir.transforms.lung_quality import image_label

    covered = _fov_inside(image, mask)
    nonzero = torch.nonzero(torch.as_tensor(mask).reshape(mask.shape[-3:]) > 0)
    inside = 0.0
    if len(nonzero):
        from monai_cidir.coordinates import CoordinateMapping

        pts = CoordinateMapping.from_image(mask).index_to_world(nonzero[:: max(1, len(nonzero) // 20000)].double())
        index = CoordinateMapping.from_image(image).world_to_index(pts)
        upper = torch.as_tensor(image.shape[1:], dtype=torch.float64) - 0.5
        inside = float(((index >= -0.5) & (index <= upper)).all(dim=1).double().mean())
    empty = not bool((torch.as_tensor(resampled) > 0).any())
    if empty or covered < MIN_MASK_GRID_OVERLAP or inside < MIN_MASK_INSIDE:
        problem = "is empty once resampled onto its image" if empty else "does not cover its image"
        raise ValueError(
            f"{key}: the mask {source} is on another grid than {image_key} and {problem}: its grid covers "
            f"{100 * covered:.0f}% of the image's field of view (at least {100 * MIN_MASK_GRID_OVERLAP:.0f}% expected) and "
            f"{100 * inside:.0f}% of its nonzero voxels lie inside the image (at least {100 * MIN_MASK_INSIDE:.0f}% expected). "
            f"Mask grid: {_grid_text(mask)}; image grid ({image_label(image, image_key)}): {_grid_text(image)}. "
            "Give the mask made on this image (same grid, or one covering the same field of view)."
        )
