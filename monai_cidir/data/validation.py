"""Checks on what a user gives us, run before any training: files, image values, pair names.

Each check raises ``ValueError`` (``OSError`` for unreadable files) with what was expected, what
was found and the path or key, so that a bad input stops early and loudly instead of training on
it. The loader (:class:`~monai_cidir.transforms.LoadRegistrationPaird`), the datalist reader and
the cohort runner call them.

Example::

    >>> check_pair_names(["p1", "p2"], "datalist.json")
    >>> check_pair_names(["p1", "p1"], "datalist.json")
    Traceback (most recent call last):
    ...
    ValueError: datalist.json: pair names must be unique (each names an output folder); repeated: ['p1']
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.utils import convert_to_tensor

__all__ = ["check_pair_names", "check_image_file", "check_image_values", "AIR_LUNG_HU"]

#: a CT with lungs has voxels below this (air about -1000 HU, lung -950 to -500 HU)
AIR_LUNG_HU = -400.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,127}$")


def check_pair_names(names: Sequence[object], source: str = "") -> None:
    """Pair names become folder names under ``output_dir``: safe characters only, and unique.

    Args:
        names: the cohort's names, in order.
        source: where they come from (a datalist path), for the message.

    Raises:
        ValueError: for an empty cohort, a name that could leave ``output_dir`` or is not a plain
            folder name (path separators, ``..``, a leading dot or dash, control characters), or
            a repeated name.
    """
    where = f"{source}: " if source else ""
    if len(names) == 0:
        raise ValueError(f"{where}no pairs to register: the cohort is empty (expected at least one record)")
    bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n) or n.strip() != n]
    if bad:
        raise ValueError(
            f"{where}invalid pair name(s) {bad[:5]}: a name becomes the folder output_dir/<name>, so it must be 1-128 "
            "letters, digits, spaces or ._+- starting with a letter or digit (no '/', '\\', '..' or absolute paths)"
        )
    repeated = sorted(n for n, c in Counter(names).items() if c > 1)
    if repeated:
        raise ValueError(f"{where}pair names must be unique (each names an output folder); repeated: {repeated}")


def _metaimage_spacing(path: Path) -> list[float] | None:
    """``ElementSpacing`` (or ``ElementSize``) of a MetaImage header, None when absent."""
    with open(path, "rb") as f:
        head = f.read(8192).decode("latin-1", errors="replace")
    for line in head.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("ElementSpacing", "ElementSize"):
            try:
                return [float(v) for v in value.split()]
            except ValueError:
                return None
        if key.strip() == "ElementDataFile":
            break
    return None


def _nifti_spacing(path: Path) -> list[float] | None:
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
    except Exception:  # noqa: BLE001 (the reader reports unreadable files itself)
        return None
    return [float(v) for v in header["pixdim"][1:4]]


def _check_gzip(path: Path, key: str) -> None:
    """Read a gzip stream to its end: a truncated file fails here instead of loading as zeros."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as e:
        raise OSError(
            f"{key}: {path} is truncated or corrupt ({e}); the reader would fill the missing part with zeros. "
            "Copy or export the file again."
        ) from None


_CHECKED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of files that passed


def check_image_file(path: str | Path, key: str = "image") -> None:
    """File-level checks before reading: a complete gzip stream, a positive voxel spacing.

    ITK reads a negative spacing as a flipped axis and a truncated ``.gz`` as zeros, both without
    a warning; both would give a silently wrong registration.

    Args:
        path: the image file.
        key: the record key (``fixed_image``, ...), for the message.

    Raises:
        OSError: for a truncated or corrupt gzip stream.
        ValueError: for a zero or negative spacing in the header.
    """
    path = Path(path)
    if not path.is_file():  # DICOM folders and the like: the reader checks them
        return
    stat = path.stat()
    stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if stamp in _CHECKED:  # checked before training, not again at loading
        return
    name = path.name.lower()
    if name.endswith(".gz"):
        _check_gzip(path, key)
    spacing = None
    if name.endswith((".mha", ".mhd")):
        spacing = _metaimage_spacing(path)
    elif name.endswith((".nii", ".nii.gz")):
        spacing = _nifti_spacing(path)
    if spacing is not None and any(not s > 0 for s in spacing[:3]):
        raise ValueError(
            f"{key}: {path} has voxel spacing {spacing[:3]} in its header: expected positive values (mm). "
            "A negative spacing is read as a flipped axis; fix the header (the orientation belongs in the direction matrix)."
        )
    _CHECKED.add(stamp)


def check_image_values(image: torch.Tensor, key: str = "image", path: str | Path | None = None, ct: bool = True) -> None:
    """Value checks after reading: finite, not constant, and (``ct``) a CT in Hounsfield units with air or lung.

    Args:
        image: the loaded image (any shape).
        key: the record key, for the message.
        path: the file, for the message.
        ct: also require voxels below :data:`AIR_LUNG_HU` (a chest CT in HU has air and lung).

    Raises:
        ValueError: naming the key, the file, what was expected and what was found.
    """
    where = f"{key}: {path}" if path is not None else key
    data = convert_to_tensor(image, track_meta=False)
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{where} has {bad} non-finite voxel(s) (NaN or inf) of {data.numel()}: expected finite intensities. "
            "Replace them (e.g. with the background value) before registering."
        )
    lo, hi = float(data.min()), float(data.max())
    if not hi > lo:
        raise ValueError(f"{where} is constant ({lo:g} everywhere): expected an image with structure")
    if ct and not lo < AIR_LUNG_HU:
        raise ValueError(
            f"{where}: values in [{lo:g}, {hi:g}], none below {AIR_LUNG_HU:g}: expected a CT in Hounsfield units "
            "(air about -1000 HU, lung -950 to -500 HU). Rescale the image to HU (slope/intercept) before registering."
        )
