"""DIR-LAB 4DCT (Castillo et al. 2009/2010), read from the original distribution as users unpack it.

Layout expected under ``root`` (exactly what the DIR-LAB archives unpack to; files may sit in any
sub-folder of their case folder, names are matched case-insensitively)::

    root/Case1Pack/.../case1_T00_s.img          root/Case1Pack/.../Case1_300_T00_xyz.txt
    root/Case2Pack/.../case2_T00-ssm.img  (2-5) root/Case6Pack/.../case6_dirLab300_T00_xyz.txt (6-10)
    root/Case6Pack/.../case6_T00.img     (6-10) ... and the T50 files alike
    root/Case8Deploy/...                  (case 8's folder name)

Conventions:

* Images are headerless int16 little-endian, stored with x fastest, i.e. array order ``(z, y, x)``
  on disk; they hold ``HU + 1024`` and are returned as float32 HU in a channel-first
  ``MetaTensor (1, X, Y, Z)``. Size and spacing come from :data:`DIRLAB_CASES` (built in).
* Geometry: the files carry no origin or direction. monai_cidir treats each volume as an ITK image
  with origin ``(0, 0, 0)`` and identity direction **in LPS** (what an ``.mhd`` sidecar without a
  ``TransformMatrix`` gives), so after ITK's LPS->RAS conversion the affine is
  ``diag(-sx, -sy, +sz)``: index ``(i, j, k)`` lies at world RAS ``(-sx*i, -sy*j, sz*k)`` mm.
  (The DIR-LAB slice index actually grows towards the feet: exhale landmarks move to lower ``k``.
  TRE and registration do not depend on this choice; viewers will show the volume head-down.)
* Landmarks: 300 pairs per case, 1-based voxel ``x y z``; returned as ``(300, 3)`` float64 world
  RAS mm through :func:`~monai_cidir.data.landmarks.load_landmarks` with the case's affine.
* fixed = T00 (inhale), moving = T50 (exhale).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import apply_transform
from monai.utils import MetaKeys

from monai_cidir.coordinates import affine_from_spacing, lps_to_ras

__all__ = [
    "DIRLabCase",
    "DIRLAB_CASES",
    "dirlab_affine",
    "find_dirlab_case",
    "dirlab_datalist",
    "read_dirlab_image",
    "DIRLabDataset",
]


@dataclass(frozen=True)
class DIRLabCase:
    """Geometry and literature reference values of one DIR-LAB 4DCT case.

    Attributes:
        case: case number (1-10).
        size: array size ``(X, Y, Z)``.
        spacing: voxel size in mm ``(sx, sy, sz)``.
        initial_tre_mean_mm: mean distance of the 300 landmark pairs before registration.
        initial_tre_sd_mm: its standard deviation.
        observer_error_mm: the inter-observer landmark error reported by DIR-LAB.

    Example::

        >>> DIRLAB_CASES[1].size
        (256, 256, 94)
    """

    case: int
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    initial_tre_mean_mm: float
    initial_tre_sd_mm: float
    observer_error_mm: float

    @property
    def nbytes(self) -> int:
        """Size in bytes of one image file (int16 voxels)."""
        return int(np.prod(self.size)) * 2


def _row(case, sx, sy, sz, px, py, pz, mean, sd, obs) -> DIRLabCase:
    return DIRLabCase(case, (sx, sy, sz), (px, py, pz), mean, sd, obs)


#: The DIR-LAB 4DCT case table (sizes, spacings, and the literature's no-registration TRE).
DIRLAB_CASES: dict[int, DIRLabCase] = {
    c.case: c
    for c in (
        _row(1, 256, 256, 94, 0.97, 0.97, 2.5, 3.89, 2.78, 0.85),
        _row(2, 256, 256, 112, 1.16, 1.16, 2.5, 4.34, 3.90, 0.70),
        _row(3, 256, 256, 104, 1.15, 1.15, 2.5, 6.94, 4.05, 0.77),
        _row(4, 256, 256, 99, 1.13, 1.13, 2.5, 9.83, 4.85, 1.13),
        _row(5, 256, 256, 106, 1.10, 1.10, 2.5, 7.48, 5.50, 0.92),
        _row(6, 512, 512, 128, 0.97, 0.97, 2.5, 10.89, 6.96, 0.97),
        _row(7, 512, 512, 136, 0.97, 0.97, 2.5, 11.03, 7.42, 0.81),
        _row(8, 512, 512, 128, 0.97, 0.97, 2.5, 14.99, 9.00, 1.03),
        _row(9, 512, 512, 128, 0.97, 0.97, 2.5, 7.92, 3.97, 0.75),
        _row(10, 512, 512, 120, 0.97, 0.97, 2.5, 7.30, 6.34, 0.86),
    )
}

_PHASES = ("T00", "T50")


def _case_info(case: int) -> DIRLabCase:
    try:
        return DIRLAB_CASES[int(case)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"DIR-LAB case must be one of {sorted(DIRLAB_CASES)}, found {case!r}") from None


def dirlab_affine(case: int) -> np.ndarray:
    """Index-to-world (RAS mm) affine of a DIR-LAB case: origin 0, identity LPS direction.

    Args:
        case: case number 1-10.

    Returns:
        float64 4x4 affine ``diag(-sx, -sy, sz, 1)``.

    Example::

        >>> dirlab_affine(1).diagonal()
        array([-0.97, -0.97,  2.5 ,  1.  ])
    """
    info = _case_info(case)
    identity_lps_in_ras = np.diag(lps_to_ras(np.ones(3)))  # the LPS axes expressed in RAS
    return affine_from_spacing(info.spacing, origin=(0.0, 0.0, 0.0), direction=identity_lps_in_ras)


def _patterns(case: int) -> dict[str, re.Pattern]:
    return {
        "fixed_image": re.compile(rf"^case{case}_T00(?:[_-][a-z]+)?\.img$", re.IGNORECASE),
        "moving_image": re.compile(rf"^case{case}_T50(?:[_-][a-z]+)?\.img$", re.IGNORECASE),
        "fixed_landmarks": re.compile(rf"^case{case}_(?:dirlab)?300_T00_xyz\.txt$", re.IGNORECASE),
        "moving_landmarks": re.compile(rf"^case{case}_(?:dirlab)?300_T50_xyz\.txt$", re.IGNORECASE),
    }


_EXAMPLE_NAMES = {
    "fixed_image": "case{c}_T00_s.img / case{c}_T00-ssm.img / case{c}_T00.img",
    "moving_image": "case{c}_T50_s.img / case{c}_T50-ssm.img / case{c}_T50.img",
    "fixed_landmarks": "Case{c}_300_T00_xyz.txt / case{c}_dirLab300_T00_xyz.txt",
    "moving_landmarks": "Case{c}_300_T50_xyz.txt / case{c}_dirLab300_T50_xyz.txt",
}


def find_dirlab_case(root: str | os.PathLike, case: int, require_images: bool = True) -> dict[str, str]:
    """Locate one DIR-LAB case's T00/T50 images and 300-landmark files under ``root``.

    Args:
        root: folder holding the unpacked case folders (``Case1Pack`` ... ``Case10Pack``,
            ``Case8Deploy``).
        case: case number 1-10.
        require_images: when False, a case folder holding only the landmark files is accepted
            (the image keys are then left out).

    Returns:
        ``{"fixed_image", "moving_image", "fixed_landmarks", "moving_landmarks"}`` -> absolute paths.

    Raises:
        FileNotFoundError: naming the folder or file pattern looked for and where.
        ValueError: when a file is found more than once in the case folder.

    Example::

        >>> find_dirlab_case("/data/dirlab", 8)["fixed_image"]  # doctest: +SKIP
        '/data/dirlab/Case8Deploy/Images/case8_T00.img'
    """
    info = _case_info(case)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"DIR-LAB root folder not found: {root}")
    folder_re = re.compile(rf"^case{info.case}(?:pack|deploy)$", re.IGNORECASE)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and folder_re.match(p.name))
    if not folders:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"DIR-LAB case {info.case}: no case folder Case{info.case}Pack (or Case{info.case}Deploy) in {root}; "
            f"folders there: {present or 'none'}"
        )
    if len(folders) > 1:
        raise ValueError(f"DIR-LAB case {info.case}: several case folders in {root}: {[p.name for p in folders]}")
    folder = folders[0]
    found: dict[str, list[Path]] = {k: [] for k in _EXAMPLE_NAMES}
    patterns = _patterns(info.case)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            for key, pat in patterns.items():
                if pat.match(name):
                    found[key].append(Path(dirpath) / name)
    out = {}
    for key, paths in found.items():
        if not paths:
            if not require_images and key.endswith("_image"):
                continue
            raise FileNotFoundError(
                f"DIR-LAB case {info.case}: no file named {_EXAMPLE_NAMES[key].format(c=info.case)} "
                f"anywhere under {folder}"
            )
        if len(paths) > 1:
            raise ValueError(
                f"DIR-LAB case {info.case}: {key} found {len(paths)} times under {folder}: "
                f"{[str(p) for p in paths]}; keep one"
            )
        out[key] = str(paths[0].resolve())
    return out


def dirlab_datalist(
    root: str | os.PathLike, cases: Iterable[int] = range(1, 11), require_images: bool = True
) -> list[dict]:
    """Records (``name``, ``case`` and the four file paths) of DIR-LAB cases, for :class:`LoadDIRLabd`.

    Args:
        root: see :func:`find_dirlab_case`.
        cases: case numbers.
        require_images: see :func:`find_dirlab_case`.

    Returns:
        one dict per case: ``{"name": "dirlab_case01", "case": 1, "fixed_image": ..., ...}``.

    Raises:
        FileNotFoundError: see :func:`find_dirlab_case`.
    """
    records = []
    for case in cases:
        info = _case_info(case)
        rec = {"name": f"dirlab_case{info.case:02d}", "case": info.case}
        rec.update(find_dirlab_case(root, info.case, require_images=require_images))
        records.append(rec)
    return records


def read_dirlab_image(path: str | os.PathLike, case: int) -> MetaTensor:
    """Read one headerless DIR-LAB ``.img`` volume as a float32 HU MetaTensor ``(1, X, Y, Z)``.

    Args:
        path: the ``.img`` file.
        case: its case number (gives size and spacing).

    Returns:
        MetaTensor in HU (raw - 1024) with ``affine`` = :func:`dirlab_affine` (RAS).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when its byte count is not the case's ``X*Y*Z*2``.

    Example::

        >>> img = read_dirlab_image("Case1Pack/Images/case1_T00_s.img", 1)  # doctest: +SKIP
        >>> img.shape
        torch.Size([1, 256, 256, 94])
    """
    info = _case_info(case)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DIR-LAB case {info.case} image not found: {path}")
    found = path.stat().st_size
    if found != info.nbytes:
        sx, sy, sz = info.size
        raise ValueError(
            f"DIR-LAB case {info.case} image {path} has {found} bytes; expected {info.nbytes} bytes "
            f"({sx} x {sy} x {sz} int16 voxels). Is it the right case, complete and uncompressed?"
        )
    raw = np.fromfile(path, dtype="<i2").reshape(info.size[::-1])  # on disk: (z, y, x), x fastest
    hu = np.ascontiguousarray(raw.transpose(2, 1, 0), dtype=np.float32) - np.float32(1024.0)
    affine = torch.as_tensor(dirlab_affine(info.case))
    meta = {
        MetaKeys.ORIGINAL_AFFINE: affine.clone(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(info.size),
        MetaKeys.SPACE: "RAS",
        MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
        "filename_or_obj": str(path),
        "dirlab_case": info.case,
    }
    return MetaTensor(torch.from_numpy(hu[None]), affine=affine, meta=meta)


class DIRLabDataset(Dataset):
    """The DIR-LAB 4DCT cases as a MONAI Dataset of loaded T00 (fixed) / T50 (moving) pairs.

    Each item follows the project's loaded-pair contract: ``name``, ``case``, ``fixed_image`` and
    ``moving_image`` (MetaTensor (1, X, Y, Z) float32 HU, RAS affine), ``fixed_landmarks`` and
    ``moving_landmarks`` ((300, 3) float64 world RAS mm). Files are located when the dataset is
    built (so a missing file fails early) and read by :class:`~monai_cidir.transforms.LoadDIRLabd`
    when an item is accessed; ``transform`` runs after loading.

    Args:
        root: folder with the unpacked case folders (see the module docstring).
        cases: case numbers to include.
        transform: optional transform applied to each loaded item.

    Raises:
        FileNotFoundError: naming the missing case folder or file and where it was looked for.

    Example::

        >>> ds = DIRLabDataset("/data/dirlab", cases=[1, 2])  # doctest: +SKIP
        >>> item = ds[0]
        >>> item["fixed_image"].shape, item["fixed_landmarks"].shape
        (torch.Size([1, 256, 256, 94]), torch.Size([300, 3]))
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cases: Sequence[int] | Iterable[int] = range(1, 11),
        transform: Callable | None = None,
    ) -> None:
        from monai_cidir.transforms.io import LoadDIRLabd

        self.root = Path(root)
        self.loader = LoadDIRLabd()
        self.post_transform = transform
        super().__init__(data=dirlab_datalist(root, cases), transform=transform)

    def _transform(self, index: int):
        # loading errors reach the user as raised (naming the file), not wrapped by apply_transform
        item = self.loader(self.data[index])
        return apply_transform(self.post_transform, item) if self.post_transform is not None else item
