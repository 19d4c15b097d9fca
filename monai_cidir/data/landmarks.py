"""Landmark files: read every supported format into world RAS millimetres, write CSV/elastix/Slicer.

Every landmark set in monai_cidir is a ``torch.float64`` tensor of shape ``(N, 3)`` holding
**world RAS millimetres**, the frame of ``MetaTensor.affine`` of images loaded by the project, so
``inverse(image.affine) @ [x, y, z, 1]`` is the continuous 0-based voxel index of the point in
that image (see :mod:`monai_cidir.coordinates`). The conversions happen here, at the file boundary:

=================  ==========================================================  ===============
format             content                                                     reference image
=================  ==========================================================  ===============
``"dirlab"``       DIR-LAB ``*_xyz.txt``: one point a line, whitespace/tab       needed
                   separated integer voxel ``x y z``, **1-based**, CRLF ok
``"elastix"``      elastix/transformix input point file: first line ``point``   for ``index``
                   (world **LPS** mm) or ``index`` (0-based voxel), second line
                   the number of points, then one ``x y z`` a line
``"transformix"``  transformix ``outputpoints.txt``: ``Point 0 ; InputIndex =   no
                   [...] ; ... ; OutputPoint = [ x y z ] ; ...``; the
                   ``OutputPoint`` (world LPS mm) is read by default
``"csv"``          comma separated with a header naming ``x,y,z`` columns (other  no
                   columns ignored), world **LPS** mm
``"fcsv"``         3D Slicer markups fiducial file (``.fcsv``); honours its       no
                   ``# CoordinateSystem`` line (LPS default, RAS accepted)
=================  ==========================================================  ===============

The voxel formats are mapped with the reference image's affine **as loaded by the project**
(ITKReader, so the same array axis order as ITK's index ``[i, j, k]``): reorienting an image
(e.g. ``Orientationd``) before loading voxel landmarks changes their meaning. World formats never
need a reference image.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_cidir.coordinates import lps_to_ras, ras_to_lps

__all__ = [
    "LANDMARK_FORMATS",
    "LandmarkFormatError",
    "load_landmarks",
    "save_landmarks",
    "reference_affine",
    "detect_landmark_format",
]

LANDMARK_FORMATS = ("dirlab", "elastix", "transformix", "csv", "fcsv")

PathLike = str | os.PathLike

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BRACKET = re.compile(r"(\w+)\s*=\s*\[([^\]]*)\]")


class LandmarkFormatError(ValueError):
    """A landmark file that does not follow the format it claims (or any format)."""


def reference_affine(reference) -> torch.Tensor:
    """The float64 4x4 index-to-world (RAS mm) affine of a reference image.

    Args:
        reference: a MetaTensor (or anything with an ``affine`` attribute, e.g. a
            :class:`~monai_cidir.coordinates.CoordinateMapping`), or a 4x4 array/tensor.

    Returns:
        the affine as a ``torch.float64`` tensor of shape (4, 4).

    Raises:
        ValueError: when no 4x4 affine can be obtained.
    """
    affine = getattr(reference, "affine", reference)
    if affine is None:
        raise ValueError(f"reference image of type {type(reference).__name__} carries no affine")
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().to(torch.float64)
    else:
        affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    if tuple(affine.shape) != (4, 4):
        raise ValueError(
            f"expected a reference image with a 4x4 affine (or a 4x4 affine), found shape {tuple(affine.shape)}"
        )
    return affine


def _voxels_to_world(index0: np.ndarray, reference, path: Path, fmt: str) -> torch.Tensor:
    if reference is None:
        raise ValueError(
            f"landmark file {path} holds voxel indices ({fmt} format): pass reference_image= (the image "
            "they index, as loaded by the project, or its 4x4 affine) to convert them to world coordinates"
        )
    affine = reference_affine(reference)
    pts = torch.as_tensor(index0, dtype=torch.float64)
    return pts @ affine[:3, :3].T + affine[:3, 3]


def _lps_file_to_ras(points: np.ndarray) -> torch.Tensor:
    return lps_to_ras(torch.as_tensor(np.asarray(points, dtype=np.float64)))


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:  # universal newlines: CRLF ok
            return f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"landmark file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise LandmarkFormatError(f"landmark file {path} is not a text file ({e})") from None


def _parse_xyz(tokens: Sequence[str], path: Path, lineno: int, line: str) -> list[float]:
    if len(tokens) != 3:
        raise LandmarkFormatError(
            f"{path}, line {lineno}: expected 3 coordinates (x y z), found {len(tokens)} values in {line.strip()!r}"
        )
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise LandmarkFormatError(f"{path}, line {lineno}: expected 3 numbers, found {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise LandmarkFormatError(f"{path}, line {lineno}: non-finite coordinate in {line.strip()!r}")
    return values


def detect_landmark_format(path: PathLike) -> str:
    """Guess the format of a landmark file from its extension and first lines.

    Args:
        path: the landmark file.

    Returns:
        one of :data:`LANDMARK_FORMATS`.

    Raises:
        LandmarkFormatError: when the content matches no supported format (the message says why).
    """
    path = Path(path)
    lines = [ln for ln in _read_lines(path) if ln.strip()]
    if path.suffix.lower() == ".fcsv" or (lines and lines[0].lstrip().lower().startswith("# markups fiducial")):
        return "fcsv"
    if not lines:
        raise LandmarkFormatError(f"landmark file {path} is empty")
    first = lines[0].strip()
    if first.lower() in ("point", "index"):
        return "elastix"
    if first.lower().startswith("point") and "=" in first and "[" in first:
        return "transformix"
    if "," in first and re.search(r"[A-Za-z]", first):
        return "csv"
    tokens = first.replace(",", " ").split()
    if "," not in first and len(tokens) == 3:
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            values = None
        if values is not None and all(v == int(v) for v in values):
            return "dirlab"
    raise LandmarkFormatError(
        f"cannot tell the format of landmark file {path} from its first line {first!r}: expected a DIR-LAB "
        "file (integer voxel 'x y z' a line), an elastix point file (first line 'point' or 'index'), a "
        "transformix output file ('Point 0 ; ... OutputPoint = [ ... ]'), a CSV with a header 'x,y,z' or a "
        "Slicer .fcsv; pass format= to force one"
    )


def _read_dirlab(path: Path) -> np.ndarray:
    rows = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        rows.append(_parse_xyz(line.replace(",", " ").split(), path, lineno, line))
    if not rows:
        raise LandmarkFormatError(f"DIR-LAB landmark file {path} holds no points")
    return np.asarray(rows, dtype=np.float64) - 1.0  # 1-based -> 0-based


def _read_elastix(path: Path) -> tuple[str, np.ndarray]:
    lines = [(i, ln) for i, ln in enumerate(_read_lines(path), start=1) if ln.strip()]
    if len(lines) < 2:
        raise LandmarkFormatError(
            f"elastix point file {path}: expected a first line 'point' or 'index' and a second line with the "
            f"number of points, found {len(lines)} non-empty line(s)"
        )
    kind = lines[0][1].strip().lower()
    if kind not in ("point", "index"):
        raise LandmarkFormatError(f"{path}, line {lines[0][0]}: expected 'point' or 'index', found {lines[0][1]!r}")
    try:
        count = int(lines[1][1].strip())
    except ValueError:
        raise LandmarkFormatError(
            f"{path}, line {lines[1][0]}: expected the number of points, found {lines[1][1].strip()!r}"
        ) from None
    rows = [_parse_xyz(ln.split(), path, i, ln) for i, ln in lines[2:]]
    if len(rows) != count:
        raise LandmarkFormatError(f"elastix point file {path}: header announces {count} points, found {len(rows)}")
    return kind, np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def _read_transformix(path: Path, field: str) -> np.ndarray:
    rows = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = {k.lower(): v for k, v in _BRACKET.findall(line)}
        if field.lower() not in fields:
            raise LandmarkFormatError(
                f"{path}, line {lineno}: expected a transformix output line with '{field} = [ x y z ]', "
                f"found fields {sorted(fields) or 'none'}"
            )
        rows.append(_parse_xyz(fields[field.lower()].split(), path, lineno, line))
    if not rows:
        raise LandmarkFormatError(f"transformix output file {path} holds no points")
    return np.asarray(rows, dtype=np.float64)


def _read_csv(path: Path) -> np.ndarray:
    lines = _read_lines(path)
    reader = csv.reader(lines)
    header = None
    rows = []
    for lineno, row in enumerate(reader, start=1):
        if not any(c.strip() for c in row):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            missing = [c for c in ("x", "y", "z") if c not in header]
            if missing:
                raise LandmarkFormatError(
                    f"{path}, line {lineno}: expected a CSV header naming columns x,y,z (world LPS mm), "
                    f"found {lines[lineno - 1].strip()!r}"
                )
            cols = [header.index(c) for c in ("x", "y", "z")]
            continue
        if len(row) != len(header):
            raise LandmarkFormatError(
                f"{path}, line {lineno}: expected {len(header)} columns as in the header, found {len(row)}"
            )
        rows.append(_parse_xyz([row[c] for c in cols], path, lineno, lines[lineno - 1]))
    if not rows:
        raise LandmarkFormatError(f"CSV landmark file {path} holds no points")
    return np.asarray(rows, dtype=np.float64)


def _read_fcsv(path: Path) -> torch.Tensor:
    lines = _read_lines(path)
    columns = ["id", "x", "y", "z"]
    system = "lps"
    rows = []
    for lineno, line in enumerate(lines, start=1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            key, _, value = s[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
            elif key == "coordinatesystem":
                system = {"0": "ras", "1": "lps"}.get(value, value.lower())
            continue
        row = next(csv.reader([line]))
        try:
            cols = [columns.index(c) for c in ("x", "y", "z")]
        except ValueError:
            raise LandmarkFormatError(f"{path}: the '# columns =' line does not name x, y and z: {columns}") from None
        if len(row) <= max(cols):
            raise LandmarkFormatError(f"{path}, line {lineno}: expected {len(columns)} columns, found {len(row)}")
        rows.append(_parse_xyz([row[c] for c in cols], path, lineno, line))
    if system not in ("lps", "ras"):
        raise LandmarkFormatError(f"{path}: unsupported CoordinateSystem {system!r} (expected LPS or RAS)")
    if not rows:
        raise LandmarkFormatError(f"Slicer markups file {path} holds no points")
    pts = torch.as_tensor(np.asarray(rows, dtype=np.float64))
    return lps_to_ras(pts) if system == "lps" else pts


def load_landmarks(
    path: PathLike, reference_image=None, format: str | None = None, transformix_field: str = "OutputPoint"
) -> torch.Tensor:
    """Read a landmark file into world RAS millimetres.

    Args:
        path: the landmark file (formats in the module docstring).
        reference_image: the image that voxel-index formats (DIR-LAB, elastix ``index``) refer to,
            as loaded by the project (a MetaTensor with ``affine``), a
            :class:`~monai_cidir.coordinates.CoordinateMapping`, or its 4x4 affine. Ignored by the
            world-coordinate formats.
        format: one of :data:`LANDMARK_FORMATS`; detected from the file when omitted.
        transformix_field: which bracketed field of a transformix output file to read:
            ``"OutputPoint"`` (default) or ``"InputPoint"`` (both world LPS mm), or
            ``"InputIndex"`` / ``"OutputIndexFixed"`` / ``"OutputIndexMoving"`` (0-based voxel;
            need ``reference_image``).

    Returns:
        ``torch.float64`` tensor (N, 3), world RAS mm: ``inverse(reference.affine) @ p`` is the
        continuous 0-based voxel index of ``p``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: (``LandmarkFormatError``) on malformed content, naming the path, the line, what
            was expected and what was found; or when a voxel format lacks ``reference_image``.

    Example::

        >>> pts = load_landmarks("Case1_300_T00_xyz.txt", reference_image=fixed_image)  # doctest: +SKIP
        >>> pts.shape
        torch.Size([300, 3])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark file not found: {path}")
    fmt = detect_landmark_format(path) if format is None else format.lower()
    if fmt == "dirlab":
        return _voxels_to_world(_read_dirlab(path), reference_image, path, "DIR-LAB 1-based voxel")
    if fmt == "elastix":
        kind, pts = _read_elastix(path)
        if kind == "point":
            return _lps_file_to_ras(pts)
        return _voxels_to_world(pts, reference_image, path, "elastix 'index'")
    if fmt == "transformix":
        pts = _read_transformix(path, transformix_field)
        if "index" in transformix_field.lower():
            return _voxels_to_world(pts, reference_image, path, f"transformix {transformix_field}")
        return _lps_file_to_ras(pts)
    if fmt == "csv":
        return _lps_file_to_ras(_read_csv(path))
    if fmt == "fcsv":
        return _read_fcsv(path)
    raise ValueError(f"unknown landmark format {format!r}; expected one of {LANDMARK_FORMATS}")


def save_landmarks(path: PathLike, points, format: str | None = None) -> Path:
    """Write world RAS mm landmarks in a format other tools open.

    The file stores **LPS** (ITK, elastix and 3D Slicer convention); :func:`load_landmarks`
    reads it back to the same RAS points.

    Args:
        path: output file; parent folders are created.
        points: (N, 3) world RAS mm (tensor or array).
        format: ``"csv"`` (header ``x,y,z``), ``"elastix"`` (``point`` file for
            transformix ``-def``) or ``"fcsv"`` (3D Slicer markups); from the extension when
            omitted: ``.csv`` -> csv, ``.fcsv`` -> fcsv, ``.txt``/``.pts`` -> elastix.

    Returns:
        the path written.

    Raises:
        ValueError: for points not shaped (N, 3), non-finite values or an unknown format.

    Example::

        >>> save_landmarks("out/moved_landmarks.csv", torch.zeros(5, 3))  # doctest: +SKIP
    """
    path = Path(path)
    pts = torch.as_tensor(points).detach().cpu().to(torch.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"expected landmarks of shape (N, 3), found {tuple(pts.shape)}")
    if not torch.isfinite(pts).all():
        raise ValueError(f"landmarks to write to {path} contain non-finite values")
    if format is None:
        format = {".csv": "csv", ".fcsv": "fcsv", ".txt": "elastix", ".pts": "elastix"}.get(path.suffix.lower())
        if format is None:
            raise ValueError(
                f"cannot tell the landmark format from the extension of {path}: use .csv, .fcsv, .txt or .pts, "
                "or pass format="
            )
    lps = ras_to_lps(pts).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = format.lower()
    if fmt == "csv":
        text = "x,y,z\n" + "".join(f"{x:.6f},{y:.6f},{z:.6f}\n" for x, y, z in lps)
    elif fmt == "elastix":
        text = f"point\n{len(lps)}\n" + "".join(f"{x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in lps)
    elif fmt == "fcsv":
        text = (
            "# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        )
        text += "".join(
            f"{i + 1},{x:.6f},{y:.6f},{z:.6f},0,0,0,1,1,1,0,F-{i + 1},,\n" for i, (x, y, z) in enumerate(lps)
        )
    else:
        raise ValueError(f"unknown landmark output format {format!r}; expected 'csv', 'elastix' or 'fcsv'")
    path.write_text(text)
    return path
