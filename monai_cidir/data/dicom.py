"""DICOM series as a clinic exports them: a folder of slices, its geometry taken from the slices.

The geometry of a series comes from each slice's ImagePositionPatient (IPP, 0020,0032) and
ImageOrientationPatient (IOP, 0020,0037) alone, never from SpacingBetweenSlices (0018,0088) nor
from the file order or InstanceNumber:

* the in-plane axes are IOP's row direction ``r`` (column index ``i`` grows along it, step
  PixelSpacing[1]) and column direction ``c`` (row index ``j``, step PixelSpacing[0]); the slice
  normal is ``n = r x c``;
* slices are sorted by ``IPP . n``; the affine's slice axis runs from the first slice's position to
  the last (``(IPP_last - IPP_first) / (N - 1)``), so voxel ``[i, j, k]`` of the array lies at
  ``IPP_k + i * dc * r + j * dr * c`` in LPS millimetres, whatever the file order and the sign or
  absence of SpacingBetweenSlices;
* uneven slice gaps (a missing slice, a mixed reconstruction) are resampled linearly along ``n`` to
  the median gap, and a gantry tilt (slice origins that drift within the slice plane) is removed by
  shifting each slice in its plane, each with a log line naming the series; slices at the same
  position (several volumes in one series), inconsistent orientations or sizes stop with a
  ``ValueError``.

The array axes are ITK's index order ``[i, j, k]`` (i along the row direction), so voxel-index
landmark files read the same as with ITK; the affine is RAS (MONAI's convention) unless
``affine_lps_to_ras=False``.

Why not ITK: ITK 5.4 (GDCM) builds the slice axis of a series whose slices carry a negative
SpacingBetweenSlices (Philips exports) with a flipped direction while keeping the voxels in
ascending order, which mirrors the volume superior-inferior in world space (public reports:
SimpleITK issue 2214, ITK issue 4794; fixed after 5.4). MONAI's ``PydicomReader`` orders slices by
InstanceNumber and mixes the series of a folder. This reader uses pydicom for headers and voxels
(ITK decodes a compressed slice pydicom has no codec for, one file at a time, so ITK's series
geometry is never used).

Example::

    >>> from monai.transforms import LoadImage
    >>> from monai_cidir.data import DicomSeriesReader, list_dicom_series
    >>> [s.uid for s in list_dicom_series("patient1/CT")]  # doctest: +SKIP
    ['1.3.46.670589.33.1.63...']
    >>> load = LoadImage(image_only=True, ensure_channel_first=True)
    >>> image = load("patient1/CT", reader=DicomSeriesReader())  # doctest: +SKIP
    >>> image.affine  # index -> world RAS mm, slice axis from the first slice's IPP to the last's

Give the reader at call time, as above: ``LoadImage(reader=DicomSeriesReader())`` also registers
MONAI's default readers and silently falls back to them (ITK's geometry included) when this
reader refuses a series.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple, optional_import

pydicom, _HAS_PYDICOM = optional_import("pydicom")

__all__ = ["DicomSeries", "DicomSeriesReader", "list_dicom_series", "select_series", "read_dicom_series", "write_dicom_series", "is_dicom_path"]

logger = logging.getLogger(__name__)

#: position tolerance (mm) for "same orientation", "on the slice normal" and "even spacing" checks
POSITION_TOLERANCE_MM = 0.01
#: relative tolerance of a slice gap against the median gap before the series counts as uneven
GAP_TOLERANCE = 0.01


def _require_pydicom() -> None:
    if not _HAS_PYDICOM:
        raise ImportError("reading a DICOM series needs pydicom: pip install pydicom")


def is_dicom_path(path: str | os.PathLike) -> bool:
    """True for a folder (a DICOM series folder) or a file with a ``.dcm`` suffix or the ``DICM`` preamble.

    Example::

        >>> is_dicom_path("scan.nii.gz")
        False
    """
    path = Path(path)
    if path.is_dir():
        return True
    if path.suffix.lower() == ".dcm":
        return True
    if path.is_file() and not path.name.lower().endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".img", ".hdr")):
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    return False


@dataclass
class DicomSeries:
    """One image series of a folder: its slices (pydicom datasets with deferred pixel data) and labels.

    Attributes:
        uid: SeriesInstanceUID.
        description: SeriesDescription (empty when absent).
        files: the slice files, in the order found.
        datasets: the slices' pydicom datasets (pixel data read on access).
    """

    uid: str
    description: str = ""
    files: list[Path] = field(default_factory=list)
    datasets: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        """``uid 'description' (N slices)``, as the messages list a folder's series."""
        return f"{self.uid} {self.description!r} ({len(self)} slice{'s' if len(self) != 1 else ''})"


def _dicom_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")
    if not files:
        raise ValueError(f"{folder}: expected a folder of DICOM slice files, found no file in it")
    return files


def list_dicom_series(path: str | os.PathLike) -> list[DicomSeries]:
    """The image series under a folder (searched recursively), grouped by SeriesInstanceUID.

    Each file is opened once; pixel data are not read (pydicom defers them). Files that are not
    DICOM, and DICOM objects without pixel data (reports, presentation states), are skipped.

    Args:
        path: a folder, or one slice file (then its folder's series are listed).

    Returns:
        the series, largest first.

    Raises:
        ValueError: when the folder holds no DICOM image.

    Example::

        >>> for s in list_dicom_series("export/"):  # doctest: +SKIP
        ...     print(s.describe())
    """
    _require_pydicom()
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    series: dict[str, DicomSeries] = {}
    for f in _dicom_files(folder):
        try:
            ds = pydicom.dcmread(str(f), defer_size="64 KB")
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or "(no SeriesInstanceUID)"
        s = series.setdefault(uid, DicomSeries(uid, str(ds.get("SeriesDescription", ""))))
        s.files.append(f)
        s.datasets.append(ds)
    if not series:
        raise ValueError(f"{folder}: expected DICOM image slices, found none among its files (not DICOM, or no pixel data)")
    return sorted(series.values(), key=len, reverse=True)


def select_series(path: str | os.PathLike, series_uid: str | None = None) -> DicomSeries:
    """The one series to read from ``path``: the given UID, the only series, or the file's own series.

    Raises:
        ValueError: when a folder holds several series and none is chosen, or the UID is not
            there; the message lists each series (UID, description, slice count).
    """
    path = Path(path)
    found = list_dicom_series(path)
    if series_uid is None and path.is_file():  # one slice named: its series
        series_uid = str(pydicom.dcmread(str(path), stop_before_pixels=True).get("SeriesInstanceUID", ""))
    listing = "\n  ".join(s.describe() for s in found)
    if series_uid is not None:
        for s in found:
            if s.uid == str(series_uid):
                return s
        raise ValueError(f"{path}: no series with SeriesInstanceUID {series_uid!r}; the folder holds:\n  {listing}")
    if len(found) > 1:
        raise ValueError(
            f"{path} holds {len(found)} image series: choose one with the datalist key 'fixed_series_uid' / "
            f"'moving_series_uid' (or DicomSeriesReader(series_uid=...)):\n  {listing}"
        )
    return found[0]


@dataclass
class _Geometry:
    order: np.ndarray  # slice indices sorted along the normal
    rows: np.ndarray  # unit row direction r (LPS)
    cols: np.ndarray  # unit column direction c (LPS)
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (along c: PixelSpacing[0], along r: PixelSpacing[1])
    positions: np.ndarray  # (N, 3) sorted IPPs (LPS mm)


def _tag(ds, name: str, f: Path, count: int):
    value = ds.get(name)
    if value is None or len(value) != count:
        raise ValueError(f"{f}: the slice has no valid {name} (expected {count} numbers, found {value!r}); its geometry is unknown")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _geometry(series: DicomSeries, where: str) -> _Geometry:
    """Orientation, order and positions from the slices' IOP / IPP; refuses what is not one volume."""
    for ds, f in zip(series.datasets, series.files):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"{f}: a multi-frame (enhanced) DICOM object; expected one slice per file. Convert it (e.g. dcm2niix) to NIfTI")
    iop = np.stack([_tag(ds, "ImageOrientationPatient", f, 6) for ds, f in zip(series.datasets, series.files)])
    ipp = np.stack([_tag(ds, "ImagePositionPatient", f, 3) for ds, f in zip(series.datasets, series.files)])
    spacing = np.stack([_tag(ds, "PixelSpacing", f, 2) for ds, f in zip(series.datasets, series.files)])
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in series.datasets}
    if len(sizes) > 1:
        raise ValueError(f"{where}: slices of different sizes {sorted(sizes)} in one series; expected one volume")
    if np.abs(iop - iop[0]).max() > 1e-4 or np.abs(spacing - spacing[0]).max() > 1e-4:
        raise ValueError(f"{where}: the slices differ in ImageOrientationPatient or PixelSpacing; expected one volume (a localizer mixed in?)")
    rows, cols = iop[0, :3] / np.linalg.norm(iop[0, :3]), iop[0, 3:] / np.linalg.norm(iop[0, 3:])
    normal = np.cross(rows, cols)
    order = np.argsort(ipp @ normal, kind="stable")
    positions = ipp[order]
    along = positions @ normal
    same = np.flatnonzero(np.diff(along) < POSITION_TOLERANCE_MM)
    if len(same):
        files = [str(series.files[order[i]]) for i in same[:3]]
        raise ValueError(
            f"{where}: {len(same)} slice(s) lie at the position of another ({files}...): the series holds several volumes "
            "(e.g. 4D CT phases or repeated acquisitions); export one volume per series"
        )
    return _Geometry(order, rows, cols, normal, (float(spacing[0, 0]), float(spacing[0, 1])), positions)


def _slice_array(ds, f: Path) -> np.ndarray:
    """One slice in stored units times RescaleSlope plus RescaleIntercept, as (columns, rows) float32."""
    try:
        raw = ds.pixel_array
    except Exception as e:  # noqa: BLE001 (no codec for the transfer syntax: let ITK/GDCM decode the one file)
        itk, has_itk = optional_import("itk")
        if not has_itk:
            raise ValueError(f"{f}: cannot decode its pixel data ({e}); install pylibjpeg or itk") from e
        return np.asarray(itk.GetArrayFromImage(itk.imread(str(f))), dtype=np.float32).reshape(int(ds.Rows), int(ds.Columns)).T
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return (raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)).T


def _untilt(volume: np.ndarray, geo: _Geometry, where: str) -> np.ndarray:
    """Shift each slice in its plane so that slice origins line up on the normal (gantry tilt)."""
    offset = geo.positions - geo.positions[0]
    in_plane = offset - np.outer(offset @ geo.normal, geo.normal)
    drift = np.linalg.norm(in_plane, axis=1).max()
    if drift <= POSITION_TOLERANCE_MM:
        return volume
    from scipy.ndimage import shift

    di, dj = in_plane @ geo.rows / geo.pixel_spacing[1], in_plane @ geo.cols / geo.pixel_spacing[0]
    logger.warning(
        "%s: slice origins drift %.2f mm within the slice plane (gantry tilt %.1f deg): each slice shifted in-plane onto a regular grid",
        where, drift, np.degrees(np.arctan2(drift, abs(offset[-1] @ geo.normal))),
    )  # fmt: skip
    fill = float(volume.min())
    for k in range(volume.shape[2]):  # voxel (i, j) of slice k lies at (i + di, j + dj) of the untilted grid
        volume[:, :, k] = shift(volume[:, :, k], (di[k], dj[k]), order=1, mode="grid-constant", cval=fill)
    return volume


def _regular_slices(volume: np.ndarray, along: np.ndarray, where: str) -> tuple[np.ndarray, float]:
    """Linear resampling along the normal to the median gap when the gaps are uneven; the slice step."""
    if len(along) < 2:
        return volume, 1.0
    gaps = np.diff(along)
    step = float(np.median(gaps))
    if np.abs(gaps - step).max() <= max(POSITION_TOLERANCE_MM, GAP_TOLERANCE * step):
        return volume, float((along[-1] - along[0]) / (len(along) - 1))
    n = int(round((along[-1] - along[0]) / step)) + 1
    target = along[0] + step * np.arange(n)
    hi = np.clip(np.searchsorted(along, target, side="right"), 1, len(along) - 1)
    w = ((target - along[hi - 1]) / (along[hi] - along[hi - 1])).astype(np.float32)
    logger.warning(
        "%s: uneven slice gaps (%.3g to %.3g mm): %d slices resampled linearly to %d at %.3g mm",
        where, gaps.min(), gaps.max(), len(along), n, step,
    )  # fmt: skip
    return volume[:, :, hi - 1] * (1 - w) + volume[:, :, hi] * w, step


def read_dicom_series(series: DicomSeries, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The series' voxels ``(X, Y, Z)`` float32 (stored value x slope + intercept) and LPS affine.

    Raises:
        ValueError: see :func:`_geometry`; a slice without IPP / IOP / PixelSpacing names its file.
    """
    where = where or f"series {series.uid}"
    geo = _geometry(series, where)
    first = series.datasets[0]
    volume = np.empty((int(first.Columns), int(first.Rows), len(geo.order)), dtype=np.float32)  # filled in place: one copy
    for k, i in enumerate(geo.order):
        volume[:, :, k] = _slice_array(series.datasets[i], series.files[i])
    volume = _untilt(volume, geo, where)
    volume, step = _regular_slices(volume, geo.positions @ geo.normal, where)
    affine = np.eye(4)
    affine[:3, 0] = geo.rows * geo.pixel_spacing[1]
    affine[:3, 1] = geo.cols * geo.pixel_spacing[0]
    affine[:3, 2] = geo.normal * step
    affine[:3, 3] = geo.positions[0]
    return np.ascontiguousarray(volume), affine


class DicomSeriesReader(ImageReader):
    """A MONAI ``ImageReader`` for DICOM series with the geometry checked against every slice's IPP / IOP.

    See the module docstring for the conventions. Use it with ``monai.transforms.LoadImage``; the
    project's pair loader (:class:`~monai_cidir.transforms.LoadRegistrationPaird`) uses it for every
    folder or ``.dcm`` path.

    Args:
        series_uid: the SeriesInstanceUID to read when a folder holds several series (``None``: the
            folder must hold one, or the path is one slice file of the series wanted).
        affine_lps_to_ras: return a RAS affine (MONAI's convention), else DICOM's LPS.

    Raises:
        ValueError: for a folder without DICOM images, several series and no choice, slices at one
            position, mixed orientations or sizes, or missing geometry tags (naming the file).

    Example::

        >>> from monai.transforms import LoadImage
        >>> load = LoadImage(image_only=True)  # the reader at call time, so its errors are not bypassed
        >>> image = load("export/CT", reader=DicomSeriesReader(series_uid="1.2.840..."))  # doctest: +SKIP
    """

    def __init__(self, series_uid: str | None = None, affine_lps_to_ras: bool = True) -> None:
        super().__init__()
        self.series_uid = series_uid
        self.affine_lps_to_ras = affine_lps_to_ras

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return _HAS_PYDICOM and all(is_dicom_path(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs) -> list:
        _require_pydicom()
        out = []
        for path in ensure_tuple(data):
            series = select_series(path, self.series_uid)
            volume, affine = read_dicom_series(series, f"{path} (series {series.uid})")
            out.append((volume, affine, series))
        return out if len(out) > 1 else out[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        images = img if isinstance(img, list) else [img]
        if len(images) != 1:
            raise ValueError(f"DicomSeriesReader reads one series at a time, got {len(images)}")
        volume, affine, series = images[0]
        if self.affine_lps_to_ras:
            affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        first = series.datasets[0]
        meta = {
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(volume.shape),
            MetaKeys.SPACE: SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "spacing": np.sqrt((affine[:3, :3] ** 2).sum(axis=0)),
            "series_uid": series.uid,
            "series_description": series.description,
            "modality": str(first.get("Modality", "")),
            "manufacturer": str(first.get("Manufacturer", "")),
        }
        return volume, meta


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    *,
    series_uid: str | None = None,
    description: str = "monai_cidir test series",
    spacing_between_slices: str | None = "positive",
    file_order: str = "ascending",
) -> list[Path]:
    """Write a 3-D CT volume as a DICOM series (one uncompressed CT slice per file), for tests and benchmarks.

    Args:
        volume: ``(X, Y, Z)`` values in HU, stored rounded as int16 (slope 1, intercept 0).
        affine: the ``4 x 4`` index -> world RAS affine (slices may be oblique, not sheared).
        folder: created if missing; files ``slice_0000.dcm``, ... .
        series_uid: SeriesInstanceUID (a new one when ``None``).
        description: SeriesDescription.
        spacing_between_slices: ``"positive"``, ``"negative"`` (as Philips exports write it) or
            ``None`` (tag absent).
        file_order: ``"ascending"`` (file 0 is slice k = 0), ``"descending"`` or ``"shuffled"``;
            InstanceNumber follows the file order.

    Returns:
        the files written, in file order.

    Example::

        >>> write_dicom_series(np.full((8, 8, 4), -1000.0), np.eye(4), "/tmp/series")  # doctest: +SKIP
    """
    _require_pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    dx, dy, dz = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    rows, cols = lps[:3, 0] / dx, lps[:3, 1] / dy
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    n = volume.shape[2]
    ks = {"ascending": list(range(n)), "descending": list(range(n))[::-1]}.get(file_order)
    if ks is None:
        if file_order != "shuffled":
            raise ValueError(f"file_order must be 'ascending', 'descending' or 'shuffled', found {file_order!r}")
        ks = list(np.random.default_rng(0).permutation(n))
    stored = np.clip(np.round(np.asarray(volume)), -32768, 32767).astype(np.int16)
    files = []
    for number, k in enumerate(ks):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer, ds.PatientID = "CT", "monai_cidir", "test"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesDescription, ds.InstanceNumber = description, number + 1
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*rows, *cols)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]  # (between rows, between columns)
        ds.SliceThickness = f"{dz:.4f}"
        if spacing_between_slices is not None:
            ds.SpacingBetweenSlices = f"{dz if spacing_between_slices == 'positive' else -dz:.4f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"slice_{number:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files
