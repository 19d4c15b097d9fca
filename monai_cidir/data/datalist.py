"""Pair datalists (MONAI decathlon style) and the dataset that loads them.

A datalist is a JSON file::

    {"training": [
        {"name": "patient1",
         "fixed_image": "p1/inhale.nii.gz", "moving_image": "p1/exhale.nii.gz",
         "fixed_mask": "p1/inhale_lungs.nii.gz", "moving_mask": "p1/exhale_lungs.nii.gz",
         "fixed_landmarks": "p1/inhale.csv", "moving_landmarks": "p1/exhale.csv"}
    ]}

``fixed_image`` and ``moving_image`` are required, the rest optional (plus ``meta``, free for
the user's own data, and ``fixed_series_uid`` / ``moving_series_uid``, the SeriesInstanceUID to
read from a DICOM folder that holds several series); any other key is an error naming the known ones, so that a misspelt key
(``fixed_landmark``) does not silently drop the landmarks. Names become output folders: plain
names, unique. Relative paths are resolved against the datalist's folder. Images: anything MONAI's ITK reader opens (NIfTI, MHA/MHD, NRRD), or a
DICOM series folder (:class:`~monai_cidir.data.DicomSeriesReader`). Landmarks: any format of :func:`~monai_cidir.data.load_landmarks` (CSV with
header ``x,y,z`` in world LPS mm is the recommended one). fixed = inhale, moving = exhale: the
network maps a fixed-space world point ``p`` to ``p + u(p)`` in moving space.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from monai.data import Dataset
from monai.transforms import apply_transform

from monai_cidir.data.validation import check_pair_names

__all__ = ["PAIR_PATH_KEYS", "load_pair_datalist", "write_pair_datalist", "RegistrationPairDataset"]

#: the record keys that hold file paths.
PAIR_PATH_KEYS = (
    "fixed_image",
    "moving_image",
    "fixed_mask",
    "moving_mask",
    "fixed_landmarks",
    "moving_landmarks",
)
_REQUIRED = ("fixed_image", "moving_image")
#: record keys that hold plain strings: the SeriesInstanceUID to read from a DICOM folder with several series
PAIR_SERIES_KEYS = ("fixed_series_uid", "moving_series_uid")

logger = logging.getLogger(__name__)


def load_pair_datalist(
    path: str | os.PathLike, key: str = "training", path_keys: Sequence[str] = PAIR_PATH_KEYS
) -> list[dict]:
    """Read a pair datalist JSON; return its records with absolute, existing paths.

    Args:
        path: the datalist JSON file.
        key: the list to read (``"training"``; e.g. ``"validation"`` or ``"test"`` too).
        path_keys: record keys whose values are paths (resolved against the datalist's folder).

    Returns:
        a list of new dicts; path values are absolute strings; ``name`` defaults to
        ``pair_000``, ``pair_001``, ... by position. ``meta`` (any JSON value: the user's own
        data about the pair) is kept as it is; any other key is an error.

    Raises:
        FileNotFoundError: when the datalist or a file a record names does not exist (the message
            names the datalist, the record, the key and the resolved path).
        ValueError: for invalid JSON, a missing or empty ``key`` list, a record without fixed/moving
            image, an unknown record key (the message lists the known ones), or pair names that are
            not plain folder names or repeat (:func:`~monai_cidir.data.validation.check_pair_names`).

    Example::

        >>> records = load_pair_datalist("data/datalist.json")  # doctest: +SKIP
        >>> records[0]["fixed_image"]
        '/abs/path/data/p1/inhale.nii.gz'
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from None
    if not isinstance(content, dict) or key not in content:
        found = list(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"datalist {path}: expected a JSON object with a '{key}' list, found keys {found}")
    records = content[key]
    if not isinstance(records, list):
        raise ValueError(f"datalist {path}: '{key}' must be a list of records, found {type(records).__name__}")
    base = path.parent.resolve()
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"datalist {path}: record {i} of '{key}' must be an object, found {type(rec).__name__}")
        missing = [k for k in _REQUIRED if not rec.get(k)]
        if missing:
            raise ValueError(f"datalist {path}: record {i} of '{key}' lacks {missing}; it has keys {list(rec)}")
        known = ("name", "meta", *path_keys, *PAIR_SERIES_KEYS)
        unknown = [k for k in rec if k not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            said = ", ".join(f"'{k}'" + (f" (did you mean '{h[0]}'?)" if h else "") for k, h in hints.items())
            raise ValueError(f"datalist {path}: record {i} of '{key}' has unknown key(s) {said}; the known keys are {list(known)}")
        rec = dict(rec)
        for k in PAIR_SERIES_KEYS:
            if k in rec and not isinstance(rec[k], str):
                raise ValueError(f"datalist {path}: record {i}: '{k}' must be a SeriesInstanceUID string, found {rec[k]!r}")
        if rec.get("name") is None:
            rec["name"] = f"pair_{i:03d}"
        given = [k for k in ("fixed_landmarks", "moving_landmarks") if rec.get(k)]
        if len(given) == 1:
            logger.warning(
                "datalist %s: record %s has %s but not the other landmark file: TRE needs both, so it is not computed for this pair",
                path, rec["name"], given[0],
            )  # fmt: skip
        for k in path_keys:
            if rec.get(k) is None:
                continue
            if not isinstance(rec[k], str):
                raise ValueError(
                    f"datalist {path}: record {i} ({rec['name']}): '{k}' must be a path string, "
                    f"found {type(rec[k]).__name__}"
                )
            p = Path(rec[k]).expanduser()
            p = Path(os.path.normpath(p if p.is_absolute() else base / p))
            if not p.exists():
                raise FileNotFoundError(
                    f"datalist {path}: record {i} ({rec['name']}): '{k}' file not found: {p} (given as {rec[k]!r})"
                )
            rec[k] = str(p)
        out.append(rec)
    check_pair_names([r["name"] for r in out], f"datalist {path} ('{key}')")
    return out


def write_pair_datalist(
    path: str | os.PathLike, records: Sequence[dict], key: str = "training", path_keys: Sequence[str] = PAIR_PATH_KEYS
) -> Path:
    """Write records as a pair datalist JSON, with paths relative to its folder where possible.

    Args:
        path: the JSON file to write (parent folders are created).
        records: dicts with at least ``fixed_image`` and ``moving_image``.
        key: the list's key.
        path_keys: keys whose values are paths.

    Returns:
        the path written; :func:`load_pair_datalist` reads it back.

    Raises:
        ValueError: when a record lacks ``fixed_image`` or ``moving_image``.

    Example::

        >>> records = [{"fixed_image": "out/f.nii.gz", "moving_image": "out/m.nii.gz"}]
        >>> write_pair_datalist("out/datalist.json", records)  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    out = []
    for i, rec in enumerate(records):
        missing = [k for k in _REQUIRED if not rec.get(k)]
        if missing:
            raise ValueError(f"record {i} lacks {missing}; it has keys {list(rec)}")
        rec = dict(rec)
        for k in path_keys:
            if rec.get(k) is None:
                continue
            p = Path(rec[k]).resolve()
            rec[k] = os.path.relpath(p, base) if _shares_root(p, base) else str(p)
        out.append(rec)
    path.write_text(json.dumps({key: out}, indent=2) + "\n")
    return path


def _shares_root(a: Path, b: Path) -> bool:
    return a.anchor == b.anchor


class RegistrationPairDataset(Dataset):
    """A MONAI Dataset of loaded fixed/moving pairs from a pair datalist.

    Items follow the loaded-pair contract (see :mod:`monai_cidir.transforms.io`): every record is
    loaded by :class:`~monai_cidir.transforms.LoadRegistrationPaird` when accessed, then
    ``transform`` (if any) runs on the loaded item.

    Args:
        datalist: a datalist JSON path, or records as returned by :func:`load_pair_datalist`.
        transform: optional transform applied after loading.
        key: the list to read from a JSON datalist.

    Raises:
        FileNotFoundError: see :func:`load_pair_datalist`.

    Example::

        >>> ds = RegistrationPairDataset("data/datalist.json")  # doctest: +SKIP
        >>> item = ds[0]
        >>> item["fixed_image"].affine  # index -> world RAS mm
    """

    def __init__(
        self, datalist: str | os.PathLike | Sequence[dict], transform: Callable | None = None, key: str = "training"
    ) -> None:
        from monai_cidir.transforms.io import LoadRegistrationPaird

        records = load_pair_datalist(datalist, key=key) if isinstance(datalist, (str, os.PathLike)) else list(datalist)
        self.loader = LoadRegistrationPaird()
        self.post_transform = transform
        super().__init__(data=records, transform=transform)

    def _transform(self, index: int):
        return self._load_record(self.data[index])

    def _load_record(self, record: dict):
        """One record loaded and transformed (values already loaded, e.g. by the cohort pre-check, pass through)."""
        # loading errors reach the user as raised (naming the file), not wrapped by apply_transform
        item = self.loader(record)
        return apply_transform(self.post_transform, item) if self.post_transform is not None else item
