"""Top-level entry points: register one patient, a cohort, or redo alpha selection/export.

``register_patient(item, output_dir, ...)`` runs the whole method on one loaded pair (the
loaded-pair contract of :mod:`monai_cidir.data`) and writes ``output_dir/<name>/``:

* ``model.pt`` (:func:`~monai_cidir.engines.model.load_registration_model`),
* ``alpha_curve.csv`` / ``alpha_curve.png``,
* ``lung_masks.png`` (both lung masks over their images, written before training),
* ``registration.png`` (fixed vs moving before and fixed vs warped moving after, three planes through
  the lungs: :func:`~monai_cidir.engines.overview.plot_registration`; the "before" half alone when the
  scans do not overlap and the patient stops before training),
* ``displacement.nii.gz`` (ITK displacement field at the chosen alpha, LPS),
* ``warped_moving.nii.gz`` (the moving image resampled on the fixed grid),
* ``metrics.json`` (written last: its presence marks the patient as complete),
* ``checkpoint.pt`` (resumable training state, written during training).

The outputs after training are written once, by :class:`~monai_cidir.engines.selection.RegistrationExport`
on the selection evaluator. Re-running skips a complete patient unless ``overwrite=True``; an
interrupted one resumes from ``checkpoint.pt``. The options are the keywords of
:class:`~monai_cidir.engines.options.RegistrationOptions`, so a bundle config can wire them.
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.data.datalist import PAIR_PATH_KEYS
from monai_cidir.data.validation import check_image_file, check_image_values, check_pair_names
from monai_cidir.engines.alpha_selection import AlphaSelectionEvaluator, format_alpha
from monai_cidir.engines.alphas import check_alpha, plain_alpha, weight_ranges  # noqa: F401 (weight_ranges, plain_alpha: re-exported)
from monai_cidir.engines.export import write_json
from monai_cidir.engines.model import RegistrationModel, load_registration_model, save_registration_model
from monai_cidir.engines.options import RegistrationOptions, SelectionSettings, TrainingSettings
from monai_cidir.engines.prealign import fit_affine
from monai_cidir.engines.quality import check_mask_overlap, mask_entries, prepare_lung_masks
from monai_cidir.engines.selection import (  # noqa: F401 (landmark_tre, prior_ranges: re-exported)
    _call_factory,
    _factory_search,
    factory_keywords,
    landmark_tre,
    model_prior,
    prior_ranges,
    select_and_export,
    selection_evaluator,
)
from monai_cidir.engines.trainer import AlphaPrior, CIDIRTrainer, build_optimizer, make_alpha_prior, scale_initial_output
from monai_cidir.handlers.checkpoint import TrainingCheckpoint
from monai_cidir.handlers.progress import TrainingProgressBar
from monai_cidir.losses.registration import RegistrationLoss

__all__ = [
    "register_patient",
    "run_cohort",
    "export_registration",
    "select_and_export",
    "landmark_tre",
    "make_point_sampler",
    "collect_cohort_metrics",
    "format_summary_table",
    "write_cohort_table",
    "COHORT_COLUMNS",
    "TrainingProgressBar",
    "RegistrationFailed",
]

logger = logging.getLogger("monai_cidir.engines")

OUTPUT_FILES = (
    "model.pt",
    "alpha_curve.csv",
    "alpha_curve.png",
    "lung_masks.png",
    "registration.png",
    "displacement.nii.gz",
    "warped_moving.nii.gz",
    "metrics.json",
    "settings.json",
)

#: register_patient arguments that define a result: a rerun skips or resumes only when they match
RESULT_SETTINGS = (
    "network", "optimizer", "learning_rate", "harmonizer_lr_factor", "init_output_scale", "max_iterations",
    "num_points", "time_budget_s", "regularizer", "regularizer_scales", "loss_balance", "loss", "alpha_range", "alpha_distribution",
    "alpha_per_point", "lr_schedule", "grad_clip", "derivatives", "regularization_points", "affine_prealign",
    "affine_kwargs", "num_alphas", "golden_section_steps", "no_folding", "selection_mode", "lung_mask_backend",
    "lung_mask_kwargs", "coarse_spacing_mm", "coarse_factor", "alpha", "export_images", "seed", "smoothing_mm",
    "trainer", "evaluator", "alpha_prior",
)  # fmt: skip

COHORT_COLUMNS = (
    "name",
    "alpha",
    "dice",
    "dice_before",
    "folding",
    "tre_before_mean",
    "tre_before_sd",
    "tre_after_mean",
    "tre_after_sd",
    "tre_before_snapped_mean",
    "tre_after_snapped_mean",
    "affine_prealign",
    "iterations",
    "seconds_training",
    "seconds_selection",
    "seconds_per_alpha",
    "status",
    "fixed_lung_ml",
    "moving_lung_ml",
    "ncc_before",
    "ncc_affine",
    "ncc_after",
    "dice_affine",
    "warnings",
    "error",
)


# ---------------------------------------------------------------------------- helpers
def _plain(x: torch.Tensor) -> torch.Tensor:
    return convert_to_tensor(x, track_meta=False)


def describe_device(device: str | torch.device) -> str:
    """The device a run used, as ``metrics.json`` reports it: ``"cpu"``, or ``"cuda:0 (NVIDIA H200)"``.

    Example::

        >>> describe_device("cpu")
        'cpu'
    """
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def make_point_sampler(mask: torch.Tensor, seed: int = 0, dilation_mm: float = 0.0) -> Callable[[int], torch.Tensor]:
    """``sampler(n) -> (n, 3)`` float32 world points drawn uniformly in a lung mask.

    Wraps :class:`monai_cidir.transforms.RandPointsInMask` (seeded with ``seed``; its voxel
    list is cached, so a call costs a few milliseconds); the callable exposes the
    transform's ``R`` so checkpoints save and restore its random state.

    Args:
        mask: the fixed lung mask MetaTensor ``(1, X, Y, Z)``.
        seed: random seed.
        dilation_mm: grow the mask before sampling.

    Example::

        >>> sampler = make_point_sampler(item["fixed_mask"], seed=0)
        >>> sampler(10_000).shape
        torch.Size([10000, 3])
    """
    from monai_cidir.transforms import RandPointsInMask

    transform = RandPointsInMask(num_points=1, dilation_mm=dilation_mm)
    transform.set_random_state(seed=seed)
    return _MaskPointSampler(transform, mask)


class _MaskPointSampler:
    def __init__(self, transform, mask) -> None:
        self.transform = transform
        self.mask = mask

    @property
    def R(self):  # noqa: N802 (MONAI's Randomizable name)
        return self.transform.R

    def __call__(self, n: int) -> torch.Tensor:
        self.transform.num_points = int(n)
        return self.transform(self.mask).float()


def _build(factory, *args, default: Callable, **kwargs):
    if factory is None:
        return default(*args, **kwargs)
    if isinstance(factory, torch.nn.Module):
        raise TypeError(
            "network must be a factory (a class or a callable returning a fresh module, e.g. a bundle "
            "'_mode_: callable' partial), found a module instance: one network would be shared by all patients"
        )
    if kwargs and not _accepts(factory, kwargs):
        raise TypeError(
            f"the network factory {factory!r} does not take {sorted(kwargs)}: with one alpha per regularizer the network "
            f"needs {kwargs}; use a partial of ConditionedINR (the bundle's 'network' with '_mode_': 'callable') or a "
            "factory that accepts these keywords"
        )
    return factory(*args, **kwargs)


def _accepts(factory, kwargs: Mapping) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True  # not introspectable: let the call decide
    names = {p.name for p in params}
    return any(p.kind is p.VAR_KEYWORD for p in params) or set(kwargs) <= names


def _patient_dir(output_dir, name: str) -> Path:
    """``output_dir/<name>``; the name must be a plain folder name, so outputs stay inside ``output_dir``."""
    check_pair_names([str(name)], f"output_dir {output_dir}")
    return Path(output_dir) / str(name)


def check_options(options: Mapping[str, Any]) -> RegistrationLoss:
    """The run's options that can be wrong whatever the data: checked once for a cohort, before training.

    Args:
        options: :func:`register_patient`'s keyword options (absent keys take its defaults; others
            are ignored): ``alpha``, ``alpha_range``, ``alpha_distribution``, ``device``,
            ``selection_mode``, ``num_alphas`` and the loss (``loss``, or ``regularizer`` /
            ``regularizer_scales`` / ``loss_balance``).

    Returns:
        the run's :class:`~monai_cidir.losses.RegistrationLoss`.

    Raises:
        ValueError: naming the option, what was expected and what was found.
    """
    given = {k: v for k, v in options.items() if k not in (*COMPONENTS, "alpha_prior")}
    opts = RegistrationOptions.from_keywords(given, extra=COMPONENTS)  # the names and the value checks
    _check_trainer_factory(options.get("trainer"))
    loss = _registration_loss(options.get("loss"), opts.regularizer, opts.regularizer_scales, opts.loss_balance)  # not two losses
    k = loss.cond_features
    make_alpha_prior(opts.alpha_range, opts.alpha_distribution, k)  # ranges and distributions, one per weight or for all
    check_alpha(opts.alpha, opts.alpha_range, k)
    check_device(opts.device)
    return loss


def _check_trainer_factory(trainer) -> None:
    """The settings a trainer partial sets itself (``train#trainer``), checked as the trainer would:
    a misspelt or bad one stops the cohort before any pair, not every pair at its trainer."""
    func = getattr(trainer, "func", trainer)
    group = getattr(func, "keyword_options", None)
    own = factory_keywords(trainer)
    if group is None or not own:
        return
    params = inspect.signature(func).parameters
    group.from_keywords({k: v for k, v in own.items() if k not in params})


def _registration_loss(loss, regularizer, regularizer_scales, loss_balance) -> RegistrationLoss:
    """The run's loss: the given object, or one built from the regularizer options (not both)."""
    if loss is None:
        return RegistrationLoss(regularizer, regularizer_scales, balance=loss_balance)
    if isinstance(loss, Mapping):  # a plain-data specification: RegistrationLoss's keyword arguments
        loss = RegistrationLoss(**loss)
    if not isinstance(loss, RegistrationLoss):
        raise TypeError(f"loss must be a monai_cidir.losses.RegistrationLoss, found {type(loss).__name__}")
    if regularizer != "bending" or regularizer_scales is not None or loss_balance is not None:
        raise ValueError(
            "pass either loss (a RegistrationLoss) or regularizer / regularizer_scales / loss_balance, not both: "
            f"found loss={loss!r} and regularizer={regularizer!r}, regularizer_scales={regularizer_scales!r}, "
            f"loss_balance={loss_balance!r}"
        )
    return loss


def _regularizer_name(loss: RegistrationLoss) -> str | dict[str, float]:
    """``"bending"`` for one regularizer at weight 1 (as the option was given), else ``{name: weight}``."""
    (name, weight), *rest = loss.spec.items()
    return name if not rest and weight == 1.0 else dict(loss.spec)


def check_landmark_pair(fixed, moving, name: str = "pair") -> None:
    """Fixed and moving landmarks must pair up one to one (same count, 3 coordinates, finite).

    Raises:
        ValueError: naming the pair and both counts.
    """
    if fixed is None or moving is None:
        return
    f, m = torch.as_tensor(fixed), torch.as_tensor(moving)
    if f.ndim != 2 or m.ndim != 2 or f.shape[1] != 3 or m.shape[1] != 3 or f.shape[0] != m.shape[0]:
        raise ValueError(
            f"{name}: fixed and moving landmarks must pair up one to one as (N, 3) arrays; found {tuple(f.shape)} and "
            f"{tuple(m.shape)}. TRE needs the same landmarks, in the same order, in both files."
        )
    if not bool(torch.isfinite(f).all() and torch.isfinite(m).all()):
        raise ValueError(f"{name}: the landmarks hold non-finite coordinates")


def check_overlap(model: RegistrationModel, item: Mapping, name: str = "pair", minimum: float = 0.5) -> float:
    """After the pre-alignment, most of the fixed lung must map inside the moving image.

    Returns:
        the fraction of fixed lung voxels (every one of at most 20000) whose affine image lies
        inside the moving image's field of view.

    Raises:
        ValueError: below ``minimum``: the scans do not overlap (another patient, a wrong origin or
            direction), so training could only produce a meaningless field.
    """
    mask = convert_to_tensor(item["fixed_mask"], track_meta=False)
    idx = torch.nonzero(mask.reshape(mask.shape[-3:]) > 0.5)
    if idx.numel() == 0:
        return 1.0
    idx = idx[:: max(1, len(idx) // 20000)].double()
    fixed_map, moving_map = CoordinateMapping.from_image(item["fixed_image"]), CoordinateMapping.from_image(item["moving_image"])
    vox = moving_map.world_to_index(model.apply_affine(fixed_map.index_to_world(idx)))
    upper = torch.as_tensor(moving_map.spatial_shape, dtype=torch.float64) - 0.5
    inside = float(((vox >= -0.5) & (vox <= upper)).all(dim=1).double().mean())
    if inside < minimum:
        raise ValueError(
            f"{name}: after the pre-alignment only {100 * inside:.0f}% of the fixed lung lies inside the moving image's field "
            f"of view (expected at least {100 * minimum:.0f}%): the scans do not overlap. Check that both are the same "
            "patient and that their origins and directions are right."
        )
    return inside


def check_device(device: str | torch.device) -> None:
    """The torch device must exist on this machine (``cuda`` without a GPU fails here, not mid-training)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}); expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _read_image(path) -> torch.Tensor:
    """The voxels of an image file, read as the pair loader reads them (ITK)."""
    from monai.transforms import LoadImage

    return LoadImage(reader="ITKReader", image_only=True, dtype=np.float32)(str(path))


def _landmark_count_problem(record) -> list[str]:
    """``[message]`` when a record's two landmark files hold different numbers of points (world-coordinate files)."""
    from monai_cidir.data import load_landmarks

    if not isinstance(record, Mapping) or not all(isinstance(record.get(k), (str, os.PathLike)) for k in ("fixed_landmarks", "moving_landmarks")):
        return []
    try:
        f, m = load_landmarks(record["fixed_landmarks"]), load_landmarks(record["moving_landmarks"])
    except Exception:  # noqa: BLE001 (voxel-index formats need their image: checked when the pair is loaded)
        return []
    if len(f) != len(m):
        return [f"{record.get('name', '?')}: {len(f)} fixed landmarks ({record['fixed_landmarks']}) against {len(m)} moving ({record['moving_landmarks']}): TRE needs them paired one to one"]
    return []


_IMAGE_KEYS = PAIR_PATH_KEYS[:2]  # fixed_image, moving_image

#: bytes of images the cohort pre-check keeps for training besides the first pair's (which trains next):
#: the pairs kept this way are read once; the others are read again when their turn comes
PRELOAD_BYTES = 512 * 2**20


def _precheck_cohort(dataset) -> dict[int, dict]:
    """Before any training: a non-empty cohort, valid and unique names, complete files with positive spacing.

    Records of a MONAI dataset (``dataset.data``) are checked file by file; loaded pairs (tensors)
    are checked when they are registered. Every problem of the cohort is reported at once.

    Returns:
        the images already read, ``{record index: {image key: MetaTensor, "name": name}}``: the
        first pair's always, the others' within :data:`PRELOAD_BYTES`, when ``dataset`` is a
        :class:`~monai_cidir.data.RegistrationPairDataset` (whose loader read and checked them);
        :func:`run_cohort` hands them to that loader, so those images are read once.
    """
    n = len(dataset) if hasattr(dataset, "__len__") else None
    if n == 0:
        raise ValueError("no pairs to register: the dataset is empty (expected at least one record)")
    if n is None:
        return {}
    check_pair_names([_record_name(dataset, i) for i in range(n)], "the cohort")
    records = getattr(dataset, "data", None)
    if not isinstance(records, Sequence):
        return {}
    problems, preloaded, kept = [], {}, 0
    for i, record in enumerate(records):
        problems += _landmark_count_problem(record)
        found = _check_record_images(dataset, record)
        problems += found["problems"]
        images = found.get("images")
        if images:
            size = sum(v.numel() * v.element_size() for v in images.values() if isinstance(v, torch.Tensor))
            if i == 0 or kept + size <= PRELOAD_BYTES:
                preloaded[i] = images
                kept += size if i else 0
    if problems:
        raise ValueError(f"{len(problems)} input problem(s), nothing was trained:\n  " + "\n  ".join(problems))
    return preloaded


def _check_record_images(dataset, record) -> dict:
    """One record's image and mask files (complete, positive spacing) and image values:
    ``{"problems": [...], "images": {key: MetaTensor, "name": ...}}`` (images when the dataset's own loader read them)."""
    from monai_cidir.data import RegistrationPairDataset

    if not isinstance(record, Mapping):
        return {"problems": []}
    problems, image_paths = [], {}
    for key in PAIR_PATH_KEYS[:4]:  # images and masks
        value = record.get(key)
        if isinstance(value, (str, os.PathLike)):
            try:
                check_image_file(value, key)
            except (OSError, ValueError, RuntimeError) as e:
                problems.append(f"{record.get('name', '?')}: {e}")
                continue
            if key.endswith("_image"):
                image_paths[key] = value
    if problems or not image_paths:
        return {"problems": problems}
    # values too: a NaN or non-HU scan of the last patient stops the first
    if isinstance(dataset, RegistrationPairDataset) and len(image_paths) == len(_IMAGE_KEYS):
        others = set(PAIR_PATH_KEYS) - set(_IMAGE_KEYS)  # masks and landmarks: read when the pair is loaded
        try:
            loaded = dataset.loader({k: v for k, v in record.items() if k not in others})
        except (OSError, ValueError, RuntimeError) as e:
            return {"problems": [f"{record.get('name', '?')}: {e}"]}
        return {"problems": [], "images": {**{k: loaded[k] for k in _IMAGE_KEYS}, "name": loaded.get("name")}}
    for key, value in image_paths.items():
        try:
            check_image_values(_read_image(value), key, value)
        except (OSError, ValueError, RuntimeError) as e:
            problems.append(f"{record.get('name', '?')}: {e}")
    return {"problems": problems}


# ---------------------------------------------------------------------------- selection + export


# ---------------------------------------------------------------------------- one patient
def _plain_setting(value: Any) -> Any:
    """A JSON value that identifies a setting (callables by what they build or their name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain_setting(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_setting(v) for v in value]
    if isinstance(value, torch.nn.Module):
        return repr(value)
    if callable(value) and not (isinstance(value, (type, functools.partial)) or inspect.isroutine(value)):
        # a callable object (an inferer, a handler): its class and its public attributes
        state = {k: v for k, v in getattr(value, "__dict__", {}).items() if not k.startswith("_")}
        return {"object": f"{type(value).__module__}.{type(value).__qualname__}", **({"attributes": _plain_setting(state)} if state else {})}
    if callable(value):
        keywords = getattr(value, "keywords", None)  # functools.partial, MONAI's "_mode_": "callable"
        func = getattr(value, "func", value)
        name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
        return {"callable": name, **({"keywords": _plain_setting(keywords)} if keywords else {})}
    return repr(value)


def _content_hash(tensor) -> str | None:
    if tensor is None:
        return None
    import hashlib

    data = convert_to_tensor(tensor, track_meta=False).detach().cpu().contiguous()
    affine = getattr(tensor, "affine", None)
    h = hashlib.sha1(data.numpy().tobytes())
    if affine is not None:
        h.update(torch.as_tensor(affine, dtype=torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def result_settings(options: Mapping[str, Any], item: Mapping) -> dict:
    """What defines a patient's result: the :data:`RESULT_SETTINGS` options and the inputs' content."""
    out = {k: _plain_setting(options.get(k)) for k in RESULT_SETTINGS}
    out["inputs"] = {k: _content_hash(item.get(k)) for k in PAIR_PATH_KEYS}
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from settings.json


def _check_stored_settings(pdir: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to skip or resume on results made with other settings (or of unknown settings)."""
    if overwrite or not any((pdir / f).is_file() for f in ("metrics.json", "checkpoint.pt")):
        return
    path = pdir / "settings.json"
    stored = json.loads(path.read_text()) if path.is_file() else None
    if stored == settings:
        return
    if stored is None:
        differ = "it has no settings.json (written by an older version or another tool)"
    else:
        keys = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        differ = "; ".join(f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in keys[:6])
    raise ValueError(
        f"{pdir} holds results of a run with other settings ({differ}); they are neither reused nor touched. "
        "Rerun with overwrite=True (--overwrite true) to redo this patient, or use another output_dir."
    )


class PatientDirLock:
    """An exclusive lock on a patient folder (``.lock``, created atomically), so two runs never write the same files.

    A lock left by a process that no longer runs (same host) is taken over; a live one is refused.

    Args:
        pdir: the patient folder (created when missing).

    Example::

        >>> with PatientDirLock(Path("outputs/p1")):
        ...     pass
    """

    def __init__(self, pdir: Path) -> None:
        self.path = Path(pdir) / ".lock"

    def __enter__(self) -> PatientDirLock:
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RuntimeError(
                    f"{self.path.parent} is being written by another run (pid {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}, since {owner.get('since', '?')}); nothing was changed. Wait for it, "
                    f"or remove {self.path} if that run is gone."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise RuntimeError(f"could not lock {self.path.parent}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: register_patient's keyword arguments that are components (the bundle's config ids), not options
COMPONENTS = ("network", "optimizer", "loss", "trainer", "evaluator", "handlers", "selection_handlers")

#: register_patient options a ``trainer`` factory may set itself (they are passed when it does not)
TRAINER_OPTIONS = TrainingSettings.names()

#: select_and_export arguments an ``evaluator`` factory may set itself (the AlphaSelectionEvaluator names)
EVALUATOR_OPTIONS = {"selection_mode": "mode", "chunk_size": "chunk_size"}


def _with_factory_options(options: dict, trainer, evaluator) -> dict:
    """register_patient's options with what the trainer / evaluator factories set themselves
    (those win: they are what runs, so settings.json and the logs report them)."""
    out = dict(options)
    out.update({k: v for k, v in factory_keywords(trainer).items() if k in TRAINER_OPTIONS})
    from_evaluator = factory_keywords(evaluator)
    out.update({name: from_evaluator[key] for name, key in EVALUATOR_OPTIONS.items() if key in from_evaluator})
    search = _factory_search(evaluator)
    if search is not None:  # the grid the factory's search scores (settings.json reports what runs)
        out.update(num_alphas=search.num_alphas, golden_section_steps=search.golden_section_steps)
    return out


def _open_patient_dir(pdir: Path, settings: dict, overwrite: bool, name: str) -> dict | None:
    """Check the stored settings, then: the stored metrics (marked skipped) when complete, or a clean
    folder with this run's ``settings.json`` (``None``)."""
    _check_stored_settings(pdir, settings, overwrite)
    metrics_path = pdir / "metrics.json"
    if metrics_path.is_file() and not overwrite:
        logger.info("%s: outputs complete in %s, skipping (overwrite=True redoes it)", name, pdir)
        stored = json.loads(metrics_path.read_text())
        stored["skipped"] = True
        return stored
    if overwrite and pdir.is_dir():
        for f in OUTPUT_FILES + ("checkpoint.pt",):
            (pdir / f).unlink(missing_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)
    write_json(settings, pdir / "settings.json")
    return None


def _prealign(trainer: CIDIRTrainer, item: Mapping, sampler, affine_prealign: bool | str, affine_kwargs: dict | None, name: str) -> dict:
    """Fit the affine the INR starts from (``"auto"``: kept when it improves the NCC); its report."""
    if affine_prealign is False:
        return {"affine_prealign": False}
    result = fit_affine(
        item["fixed_image"],
        item["moving_image"],
        sampler,
        fixed_mask=item.get("fixed_mask"),
        moving_mask=item.get("moving_mask"),
        similarity=trainer.loss_function.similarity,
        **(affine_kwargs or {}),
    )
    keep = result.kept or affine_prealign is True
    if keep:
        trainer.model.set_affine(result.matrix)
    logger.info("%s: affine pre-alignment NCC %.4f -> %.4f (%s)", name, result.ncc_identity, result.ncc_affine, "kept" if keep else "not kept")
    return {
        "affine_prealign": bool(keep),
        "affine_ncc_identity": result.ncc_identity,
        "affine_ncc_affine": result.ncc_affine,
        "seconds_affine": result.seconds,
    }


def register_patient(
    item: dict,
    output_dir: str | os.PathLike,
    *,
    network: Callable[[], torch.nn.Module] | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    loss: RegistrationLoss | Mapping | None = None,
    trainer: Callable[..., CIDIRTrainer] | None = None,
    evaluator: Callable[..., AlphaSelectionEvaluator] | None = None,
    handlers: Sequence | Callable[[], Sequence] | None = None,
    selection_handlers: Sequence | None = None,
    **options: Any,
) -> dict:
    """Register one loaded pair with cIDIR and write its outputs to ``output_dir/<name>/``.

    The components (network, optimizer, loss, trainer, evaluator, handlers) are the bundle's config
    ids; every other setting is a keyword option of :class:`~monai_cidir.engines.options.RegistrationOptions`,
    which owns their names, defaults and checks (``max_iterations``, ``num_points``,
    ``regularization_points``, ``alpha_range``, ``num_alphas``, ``selection_mode``, ``device``,
    ``overwrite``, ...; a misspelt name is a ``TypeError`` naming the closest option).

    Args:
        item: a loaded pair (``fixed_image``, ``moving_image``, optional masks, landmarks, ``name``).
        output_dir: the cohort's output folder.
        network: a factory returning a fresh INR (default :func:`default_network`: the paper's
            ``ConditionedINR`` reading log alpha, which spreads the small alphas the log-uniform
            prior draws most; the paper's linear input is ``alpha_encoding="linear"``).
        optimizer: a factory ``f(param_groups) -> optimizer`` (default ``Adam(groups, lr=learning_rate)``).
        loss: a ready :class:`~monai_cidir.losses.RegistrationLoss` (the bundle's ``loss`` id), or its
            keyword arguments as a dict, instead of the ``regularizer`` / ``regularizer_scales`` /
            ``loss_balance`` options; giving both is an error. With ``conditioning="per_regularizer"``
            alpha is a vector of one weight per regularizer: the network gets ``cond_features=K``, the
            prior draws K weights, the selection searches the K-dimensional space and
            ``metrics.json`` / ``model.pt`` store the chosen vector as a list (with the names in order).
        trainer: a factory of the patient's trainer, ``trainer(network, optimizer, fixed_image,
            moving_image, point_sampler, **options) -> CIDIRTrainer`` (the bundle's
            ``train#trainer``, a ``_mode_: callable`` partial of
            :class:`~monai_cidir.engines.CIDIRTrainer`). The :class:`~monai_cidir.engines.options.TrainingSettings`
            it sets itself win over the options of the same name here; the per-patient ones (loss,
            prior, device, handlers) come from here. Default: ``CIDIRTrainer``.
        evaluator: a factory of the alpha-selection evaluator (the bundle's
            ``validate#evaluator``), see :func:`select_and_export`.
        handlers: handlers (or a factory returning them, for one fresh set per patient) attached
            to the trainer, e.g. ``StatsHandler(output_transform=lambda x: x["loss"])``.
        selection_handlers: handlers attached to the alpha-selection evaluator.
        options: the :class:`~monai_cidir.engines.options.RegistrationOptions` keywords (its
            docstring lists them with their defaults). ``checkpoint_interval`` /
            ``checkpoint_every_s`` pace the resumable ``checkpoint.pt``; SIGINT/SIGTERM during
            training also write one before the process stops.

    Returns:
        the metrics dict (also in ``metrics.json``); a skipped patient returns its stored one
        with ``"skipped": True``.

    Raises:
        ValueError: when the item lacks images, an image has non-finite or constant values, a fixed
            ``alpha`` lies outside ``alpha_range``, or ``device`` is not available; all before
            training.

    Example::

        >>> item = LoadRegistrationPaird()(load_pair_datalist("phantom/datalist.json")[0])
        >>> metrics = register_patient(item, "outputs", max_iterations=300, num_points=2000)
        >>> metrics["tre_after_mean"] < metrics["tre_before_mean"]
        True
    """
    components = {"network": network, "optimizer": optimizer, "loss": loss, "trainer": trainer, "evaluator": evaluator}
    options = _with_factory_options({**RegistrationOptions.from_keywords(options, extra=COMPONENTS).as_dict(), **components}, trainer, evaluator)
    loss = _check_patient_inputs(item, options)
    k = loss.cond_features  # one weight per regularizer: the network takes K conditioning values
    prior = make_alpha_prior(options["alpha_range"], options["alpha_distribution"], k, per_point=options["alpha_per_point"])
    options["alpha_prior"] = prior.state_dict()  # with its floor: a code default, so settings.json must record it
    name = str(item.get("name") or "pair")
    pdir = _patient_dir(output_dir, name)
    with PatientDirLock(pdir):  # one writer per patient folder
        stored = _open_patient_dir(pdir, result_settings(options, item), options["overwrite"], name)
        if stored is not None:
            return stored

        start = time.perf_counter()
        item, mask_reports = prepare_lung_masks(item, options["lung_mask_backend"], options["lung_mask_kwargs"], overlay=pdir / "lung_masks.png")
        seconds_masks = time.perf_counter() - start
        logger.info("%s: lung masks ready (computed where missing, checked, lung_masks.png) in %.1f s", name, seconds_masks)
        overlap = check_mask_overlap(item, mask_reports, picture=pdir / "registration.png")  # scans placed apart (a mirrored axis) stop here
        trainer, previous = _train(item, pdir, options, loss, prior, handlers() if callable(handlers) else handlers)
        previous.update(mask_entries(mask_reports), seconds_masks=seconds_masks, **overlap)
        factory = selection_evaluator(evaluator, **{key: options[key] for key in (*SelectionSettings.names(), "lung_mask_backend", "lung_mask_kwargs")})
        metrics = select_and_export(
            trainer.model, item, pdir, factory, trainer.alpha_prior, options["alpha"], options["export_images"], previous=previous,
            selection_handlers=selection_handlers,
        )
        logger.info(
            "%s: alpha %s, Dice %.4f, folding %.2g, TRE %s -> %s mm", name, format_alpha(metrics["alpha"]), metrics["dice"],
            metrics["folding"], _fmt(metrics.get("tre_before_mean")), _fmt(metrics.get("tre_after_mean")),
        )  # fmt: skip
        return metrics


def _train(item: Mapping, pdir: Path, options: Mapping[str, Any], loss: RegistrationLoss, prior: AlphaPrior, handlers) -> tuple[CIDIRTrainer, dict]:
    """Build the patient's network, optimizer and trainer, resume or pre-align, train, and save
    ``model.pt``; returns the trainer (its model carries ``info``) and ``metrics.json``'s training entries."""
    from monai.utils import set_determinism

    name = str(item.get("name") or "pair")
    device, seed = torch.device(options["device"]), options["seed"]
    set_determinism(seed=seed)
    net, opt = _network_and_optimizer(options, loss.cond_features)
    sampler = make_point_sampler(item["fixed_mask"], seed=seed)
    trainer = _call_factory(
        options["trainer"] or CIDIRTrainer,
        (net, opt, item["fixed_image"], item["moving_image"], sampler),
        {key: options[key] for key in TRAINER_OPTIONS},
        loss=loss,
        alpha_prior=prior,
        device=device,
        seed=seed,
        handlers=handlers,
    )
    TrainingCheckpoint(pdir / "checkpoint.pt", options["checkpoint_interval"], options["checkpoint_every_s"]).attach(trainer)
    start = time.perf_counter()
    prealign_info = _resume_or_prealign(trainer, item, sampler, options, name)
    budget = "" if trainer.time_budget_s is None else f" (at most {trainer.time_budget_s:g} s)"
    logger.info("%s: training %d iterations x %d points on %s%s", name, trainer.max_iterations, trainer.num_points, device, budget)
    trainer.run()
    seconds_training = time.perf_counter() - start
    model_info = _model_info(trainer, name, options["alpha_range"], options["alpha_distribution"])
    trainer.model.info = dict(model_info)
    save_registration_model(trainer.model, pdir / "model.pt", **model_info)  # before selection: re-export can resume
    return trainer, {
        "iterations": int(trainer.state.iteration),
        "num_points": int(trainer.num_points),
        "regularizer": model_info["regularizer"],
        "seed": seed,
        **prealign_info,
        "seconds_training": seconds_training,
        "training_device": describe_device(device),
        "stopped_by_time_budget": bool(trainer.stopped_by_time_budget),
    }


def default_network(**options: Any) -> Callable[..., torch.nn.Module]:
    """The pipeline's network factory: the paper's ``ConditionedINR`` reading log alpha
    (``alpha_encoding="log"``), with ``options`` on top.

    Example::

        >>> net = default_network(modulation="per_neuron")()  # per-neuron modulation, log alpha
    """
    from monai_cidir.networks import ConditionedINR

    return functools.partial(ConditionedINR, **{"alpha_encoding": "log", **options})


def _network_and_optimizer(options: Mapping[str, Any], k: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh network (``network``, default :func:`default_network` with ``k`` conditioning
    inputs), its output scaled, and its optimizer with the harmonizer's parameter group."""
    net = _build(options["network"], default=default_network(), **({"cond_features": k} if k > 1 else {}))
    net = scale_initial_output(net, options["init_output_scale"])
    opt = build_optimizer(net, options["optimizer"], learning_rate=options["learning_rate"], harmonizer_lr_factor=options["harmonizer_lr_factor"])
    return net, opt


def _resume_or_prealign(trainer: CIDIRTrainer, item: Mapping, sampler, options: Mapping[str, Any], name: str) -> dict:
    """Resume from the attached checkpoint (when ``resume`` and it exists), else pre-align and check
    the overlap; returns ``metrics.json``'s pre-alignment entries."""
    if options["resume"] and trainer.resume():
        logger.info("%s: resuming from %s at iteration %d", name, trainer.checkpoint.path, trainer.state.iteration)
        return {"affine_prealign": trainer.model.affine is not None}
    info = _prealign(trainer, item, sampler, options["affine_prealign"], options["affine_kwargs"], name)
    check_overlap(trainer.model, item, name)
    return info


def _check_patient_inputs(item: Mapping, options: Mapping[str, Any]) -> RegistrationLoss:
    """Images, options and landmarks checked before anything is written; the run's loss object."""
    for key in ("fixed_image", "moving_image"):
        if item.get(key) is None:
            raise ValueError(f"the pair has no '{key}': expected a loaded pair with keys {sorted(item)}")
        check_image_values(item[key], f"{item.get('name') or 'pair'}: {key}", ct=False)
    loss = check_options(options)
    check_landmark_pair(item.get("fixed_landmarks"), item.get("moving_landmarks"), str(item.get("name") or "pair"))
    return loss


def _model_info(trainer: CIDIRTrainer, name: str, alpha_range, alpha_distribution: str) -> dict:
    """What ``model.pt`` stores beside the network: the loss's regularizers, the prior, the iterations."""
    loss = trainer.loss_function
    return {
        "name": name,
        "alpha_range": list(alpha_range),
        "alpha_distribution": alpha_distribution,
        "regularizer": _regularizer_name(loss),
        "regularizer_weights": loss.spec,
        "regularizer_lambda_scales": loss.scales,
        "regularizer_names": loss.names,
        "conditioning": loss.conditioning,
        "cond_features": loss.cond_features,
        "alpha_prior": trainer.alpha_prior.state_dict(),
        "iterations": trainer.state.iteration,
    }


def _fmt(v, spec: str = ".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# ---------------------------------------------------------------------------- inference entry
def export_registration(
    item: dict,
    output_dir: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    alpha: float | None = None,
    device: str | torch.device = "cpu",
    lung_mask_backend: str = "threshold",
    lung_mask_kwargs: dict | None = None,
    network_def: Callable[..., torch.nn.Module] | None = None,
    **selection_kwargs,
) -> dict:
    """Reload ``model.pt`` and redo alpha selection and export, without retraining.

    Args:
        item: the loaded pair (images and masks are needed for Dice and the warped image).
        output_dir: the cohort's output folder (the model is ``output_dir/<name>/model.pt``
            unless ``model_path`` is given); outputs are rewritten there.
        model_path: an explicit ``model.pt``.
        alpha: export at this alpha (``None``: select by Dice).
        device: torch device.
        lung_mask_backend: backend for missing masks and ``selection_mode="segment"``.
        lung_mask_kwargs: extra arguments of the lung-mask transform.
        network_def: rebuild this architecture and load the stored weights into it (see
            :func:`~monai_cidir.engines.load_registration_model`; ``None``: the stored network).
        selection_kwargs: the selection options of :func:`selection_evaluator` (``evaluator``,
            ``num_alphas``, ``golden_section_steps``, ``no_folding``, ``selection_mode``,
            ``coarse_factor``, ...), the prior's ``alpha_range`` / ``alpha_distribution`` (default:
            the model's own, :func:`model_prior`) and :func:`select_and_export`'s
            ``export_images``, ``export_coarse_mm`` and ``selection_handlers``.

    Returns:
        the new metrics dict (training entries of the previous ``metrics.json`` are kept).

    Raises:
        FileNotFoundError: when there is no model.pt.
    """
    name = str(item.get("name") or "pair")
    pdir = _patient_dir(output_dir, name)
    model_path = Path(model_path) if model_path is not None else pdir / "model.pt"
    with PatientDirLock(pdir):  # not while a training run writes this patient
        model = load_registration_model(model_path, device=device, network_def=network_def)
        check_alpha(alpha, prior_ranges(model_prior(model)), model.num_weights)  # the range it was trained on
        prior = model_prior(model, selection_kwargs.pop("alpha_range", None), selection_kwargs.pop("alpha_distribution", None))
        export = {key: selection_kwargs.pop(key) for key in ("export_images", "export_coarse_mm", "selection_handlers") if key in selection_kwargs}
        factory = selection_evaluator(lung_mask_backend=lung_mask_backend, lung_mask_kwargs=lung_mask_kwargs, **selection_kwargs)
        previous = {}
        if (pdir / "metrics.json").is_file():
            old = json.loads((pdir / "metrics.json").read_text())
            previous = {k: v for k, v in old.items() if k in ("iterations", "num_points", "regularizer", "seed", "seconds_affine", "seconds_training", "training_device", "affine_prealign")}
        item, mask_reports = prepare_lung_masks(item, lung_mask_backend, lung_mask_kwargs, overlay=pdir / "lung_masks.png")
        previous.update(mask_entries(mask_reports), **check_mask_overlap(item, mask_reports))
        return select_and_export(model, item, pdir, factory, prior, alpha, previous=previous, **export)


# ---------------------------------------------------------------------------- cohort
def collect_cohort_metrics(output_dir: str | os.PathLike, names: Iterable[str] | None = None, path=None) -> list[dict]:
    """Gather ``<name>/metrics.json`` under ``output_dir`` into ``metrics.csv`` (rank 0 after a split run).

    Args:
        output_dir: the cohort's output folder.
        names: restrict to these patients (default: every folder with a metrics.json).
        path: the CSV (default ``output_dir/metrics.csv``).

    Returns:
        the rows (dicts) in name order.
    """
    output_dir = Path(output_dir)
    if names is None:
        files = sorted(output_dir.glob("*/metrics.json"))
    else:
        files = [output_dir / str(n) / "metrics.json" for n in names]
    rows = [json.loads(f.read_text()) for f in files if f.is_file()]
    write_cohort_table(rows, output_dir / "metrics.csv" if path is None else path)
    return rows


def write_cohort_table(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write the cohort ``metrics.csv`` (columns :data:`COHORT_COLUMNS`, blank when absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COHORT_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(k, r.get(k, "")) for k in COHORT_COLUMNS})
    return path


def _cell(key: str, value):
    """A cohort-table cell: warnings joined by ``|``, an alpha vector as ``[a1, a2]`` (JSON)."""
    if isinstance(value, list):
        return json.dumps(value) if key == "alpha" else " | ".join(str(v) for v in value)
    return value


def _triple(r: Mapping, keys: Sequence[str], fmt: str) -> str:
    values = [r.get(k) for k in keys]
    return "/".join("n/a" if v is None else format(v, fmt) for v in values)


def _alpha_cell(alpha) -> str:
    """The summary table's alpha: ``0.316`` for one weight, ``[0.1, 0.03]`` for a vector."""
    if alpha is None:
        return "nan"
    return format(float(alpha), ".3f") if np.ndim(alpha) == 0 else format_alpha(alpha, ".2g")


def format_summary_table(rows: Sequence[dict]) -> str:
    """The summary table printed after a cohort, then one WARNING line per problem.

    Columns: patient, status (ok / warning / failed), alpha, folding, lung volumes (fixed/moving
    mL), lung NCC and lung Dice before / after the affine / after cIDIR, TRE before -> after.
    """
    head = (
        f"{'patient':<16} {'status':<8} {'alpha':>6} {'folding %':>9} {'lung mL F/M':>12}  "
        f"{'NCC before/affine/after':>23}  {'Dice before/affine/after':>24}  {'TRE before -> after (mm)':>24}"
    )
    lines = [head, "-" * len(head)]
    notes = []
    for r in rows:
        name, status = str(r.get("name")), str(r.get("status", "ok"))
        if "error" in r:
            lines.append(f"{name:<16} {status:<8} {'stopped: ' + str(r['error']).splitlines()[0][:90]}")
            notes.append(f"FAILED {name}: {r['error']}")
            continue
        volumes = f"{_fmt(r.get('fixed_lung_ml'), '.0f')}/{_fmt(r.get('moving_lung_ml'), '.0f')}"
        tre = f"{_fmt(r.get('tre_before_mean'))} -> {_fmt(r.get('tre_after_mean'))}"
        lines.append(
            f"{name:<16} {status:<8} {_alpha_cell(r.get('alpha')):>6} {100 * r.get('folding', float('nan')):>9.3f} "
            f"{volumes:>12}  {_triple(r, ('ncc_before', 'ncc_affine', 'ncc_after'), '.3f'):>23}  "
            f"{_triple(r, ('dice_before', 'dice_affine', 'dice'), '.3f'):>24}  {tre:>24}"
        )
        label = "FAILED" if status == "failed" else "WARNING"
        notes.extend(f"{label} {name}: {w}" for w in r.get("warnings") or [])
    befores = [r["tre_before_mean"] for r in rows if r.get("tre_before_mean") is not None]
    afters = [r["tre_after_mean"] for r in rows if r.get("tre_after_mean") is not None]
    if afters:
        lines.append("-" * len(head))
        tre = f"{sum(befores) / len(befores):.2f} -> {sum(afters) / len(afters):.2f}"
        lines.append(f"{'mean':<16} {'':<8} {'':>6} {'':>9} {'':>12}  {'':>23}  {'':>24}  {tre:>24}")
    return "\n".join(lines + notes)


def run_cohort(
    dataset: Iterable[dict],
    output_dir: str | os.PathLike,
    progress: bool = True,
    print_summary: bool = True,
    metrics_csv: str | os.PathLike | None = None,
    raise_on_failure: bool = True,
    **kwargs,
) -> list[dict]:
    """Register every pair of a dataset (loaded pairs, e.g. a MONAI Dataset) and tabulate.

    Args:
        dataset: iterable of loaded pairs (``RegistrationPairDataset``, ``DIRLabDataset``, a list).
        output_dir: outputs go to ``output_dir/<name>/``; the cohort table to ``metrics.csv``.
        progress: attach an Ignite ``ProgressBar`` to each patient's training (unless
            ``handlers`` are given) and log one line per patient.
        print_summary: print :func:`format_summary_table` at the end.
        metrics_csv: the cohort table path (default ``output_dir/metrics.csv``).
        raise_on_failure: raise :class:`RegistrationFailed` at the end when a patient failed.
        kwargs: options of :func:`register_patient`.

    A patient that cannot be loaded or registered (an implausible computed lung mask, a bad
    file, ...) is logged with the reason and stops alone: the others still run, and the table
    lists it with ``status`` "failed" and its ``error``; so does a pair whose scans do not overlap in
    world space (:func:`~monai_cidir.engines.quality.check_mask_overlap`, before training). A patient
    whose result is worse than its own affine or trips an absolute gate (folding, lung Dice:
    :func:`~monai_cidir.engines.quality.assess_registration`) keeps its outputs and counts as failed too.

    Returns:
        one metrics dict per patient.

    Raises:
        RegistrationFailed: after the table and summary are written, when a patient failed
            (``raise_on_failure``); its ``rows`` hold every patient's metrics.

    Example::

        >>> rows = run_cohort(RegistrationPairDataset("phantom/datalist.json"), "outputs", max_iterations=500)
    """
    output_dir = Path(output_dir)
    check_options(_with_factory_options(kwargs, kwargs.get("trainer"), kwargs.get("evaluator")))
    start = time.perf_counter()
    preloaded = _precheck_cohort(dataset)
    logger.info("cohort pre-check: %s pair(s) in %.1f s", len(dataset) if hasattr(dataset, "__len__") else "?", time.perf_counter() - start)
    rows: list[dict] = []
    seen: set[str] = set()
    if progress and kwargs.get("handlers") is None:
        kwargs["handlers"] = lambda: [TrainingProgressBar()]
    n = len(dataset) if hasattr(dataset, "__len__") else None
    for i, load in enumerate(_patients(dataset, preloaded)):
        name = _record_name(dataset, i)
        try:
            start = time.perf_counter()
            item = load()
            name = str(item.get("name") or name)
            logger.info("%s: loaded in %.1f s", name, time.perf_counter() - start)
            if name in seen:
                raise ValueError(f"a second pair is named {name!r}: names must be unique (each names an output folder)")
            seen.add(name)
            logger.info("patient %d%s: %s", i + 1, f"/{n}" if n else "", name)
            rows.append(register_patient(item, output_dir, **kwargs))
        except Exception as e:  # noqa: BLE001 (one patient's failure must not lose the others)
            known = isinstance(e, (ValueError, OSError, RuntimeError))
            logger.error("%s: stopped, not registered: %s: %s", name, type(e).__name__, e, exc_info=not known)
            rows.append({"name": name, "status": "failed", "error": f"{type(e).__name__}: {e}"})
    write_cohort_table(rows, output_dir / "metrics.csv" if metrics_csv is None else metrics_csv)
    if print_summary:
        print(format_summary_table(rows), flush=True)
    failed = [r["name"] for r in rows if r.get("status") == "failed"]
    if failed and raise_on_failure:
        raise RegistrationFailed(rows)
    return rows


class RegistrationFailed(RuntimeError):
    """Raised at the end of a cohort where a patient failed; the others finished and are kept.

    Attributes:
        rows: every patient's metrics (failed ones with ``status == "failed"``).
    """

    def __init__(self, rows: Sequence[dict]) -> None:
        self.rows = list(rows)
        failed = [r for r in self.rows if r.get("status") == "failed"]
        reasons = [f"{r['name']}: {r.get('error') or '; '.join(r.get('warnings') or [])}" for r in failed]
        super().__init__(f"{len(failed)} of {len(self.rows)} patient(s) failed:\n  " + "\n  ".join(reasons))


def _patients(dataset, preloaded: dict[int, dict] | None = None) -> Iterable[Callable[[], dict]]:
    """One loader per patient, so a pair that fails to load fails alone (indexable datasets); a pair whose
    images the pre-check read (``preloaded``) is loaded from them, not read again."""
    preloaded = {} if preloaded is None else preloaded

    def load(i: int) -> dict:
        images = preloaded.pop(i, None)
        if images is None:
            return dataset[i]
        return dataset._load_record({**dataset.data[i], **{k: v for k, v in images.items() if v is not None}})

    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return [lambda i=i: load(i) for i in range(len(dataset))]
    return [lambda item=item: item for item in dataset]


def _record_name(dataset, i: int) -> str:
    """The patient's name before it is loaded (a MONAI Dataset's record), else ``pair<i>``."""
    data = getattr(dataset, "data", None)
    try:
        record = data[i] if data is not None else dataset.dataset.data[dataset.indices[i]]
        return str(record.get("name") or f"pair{i}")
    except (AttributeError, IndexError, KeyError, TypeError):
        return f"pair{i}"
