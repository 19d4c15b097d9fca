"""Glue between the ``cidir_lung_ct`` bundle configs and the engines.

The bundle's JSON files only wire components; everything longer than a one-line expression
lives here:

* :func:`make_dataset`: the data switch of the configs (a datalist, the synthetic phantom
  generated on first use, or DIR-LAB), safe to call from every rank of a distributed run.
* :func:`make_phantom_cohort`: ``num_patients`` phantoms and one datalist, never overwriting.
* :func:`train_cohort`: :func:`~monai_cidir.engines.run_cohort`, with the patients partitioned
  across the ranks of a ``torchrun`` launch (one INR per patient, no DDP of a single INR) and
  the cohort table written by rank 0.
* :func:`infer_cohort`: :func:`~monai_cidir.engines.export_registration` for every patient
  that has a ``model.pt`` (alpha selection / export again, without retraining).
* :func:`evaluate_cohort`: TRE, Dice and folding recomputed from existing outputs, written as
  MONAI ``MetricsSaver`` reports (``write_metrics_reports``).
* :func:`init_distributed` / :func:`destroy_distributed`: the per-rank device and the
  tear-down of ``multi_gpu_train.json`` (the NCCL/Gloo group itself is joined by
  :func:`train_cohort` after training; see the note in the distributed section).
* :func:`handler_factory`: turns ``_mode_: callable`` handler partials into the
  one-fresh-set-per-patient factory the trainer takes.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_cidir.engines.alpha_selection import format_alpha
from monai_cidir.utils import atomic_path

__all__ = [
    "DEFAULT_PHANTOM_DIR",
    "make_phantom_cohort",
    "make_dataset",
    "init_distributed",
    "destroy_distributed",
    "rank_and_world_size",
    "handler_factory",
    "as_flag",
    "train_cohort",
    "infer_cohort",
    "evaluate_cohort",
    "exported_field_tre",
]

logger = logging.getLogger("monai_cidir.engines")

DEFAULT_PHANTOM_DIR = "data/cidir_phantom"
"""Where ``train.json`` generates the phantom, relative to the directory it is run from."""


# ---------------------------------------------------------------------------- distributed
# Why the process group is created only after training: MONAI's cumulative metrics (DiceMetric,
# and monai_cidir's TRE / Jacobian metrics) all-gather their buffers whenever a default process
# group exists. With one patient per rank that would average different patients' metrics (and
# hang when ranks hold different numbers of patients). So ranks learn their rank from torchrun's
# environment, train without a group, and join NCCL/Gloo only to gather the cohort table.
GATHER_TIMEOUT = datetime.timedelta(hours=48)
"""How long the first rank to finish waits for the others (ranks may hold unequal work)."""


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)``: of the process group if one exists, else of a ``torchrun`` launch.

    Returns:
        ``(0, 1)`` for a plain (non-``torchrun``) process.

    Example::

        >>> rank_and_world_size()  # a plain python process  # doctest: +SKIP
        (0, 1)
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> torch.device:
    """This rank's device for a ``torchrun`` launch (``multi_gpu_train.json``'s ``initialize``).

    Checks the ``torchrun`` environment and makes ``cuda:<LOCAL_RANK>`` the current CUDA
    device; the NCCL (GPU) or Gloo (CPU) process group is created by :func:`train_cohort` once
    the rank's patients are done (see the note above :data:`GATHER_TIMEOUT`).

    Returns:
        ``cuda:<LOCAL_RANK>`` or ``cpu``.

    Raises:
        RuntimeError: when the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
            ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is missing.

    Example::

        >>> device = init_distributed()  # under torchrun --nproc_per_node=2  # doctest: +SKIP
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi_gpu_train.json expects a torchrun launch; the environment lacks {missing}. Launch with "
            "`torchrun --standalone --nnodes=1 --nproc_per_node=N -m monai.bundle run training --config_file "
            "\"['.../train.json','.../multi_gpu_train.json']\"`, or drop multi_gpu_train.json for one process."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rank, world = rank_and_world_size()
    logger.info("rank %d of %d on %s", rank, world, device)
    return device


def _join_process_group(backend: str | None = None) -> None:
    if not torch.distributed.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        torch.distributed.init_process_group(backend=backend, timeout=GATHER_TIMEOUT)


def destroy_distributed() -> None:
    """Tear down the process group if one exists (``multi_gpu_train.json``'s ``finalize``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _wait_for_file(path: Path, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank_and_world_size()[0]} waited {timeout_s:.0f} s for rank 0 to write {path}")
        time.sleep(poll_s)


# ---------------------------------------------------------------------------- data
def make_phantom_cohort(
    dataset_dir: str | os.PathLike = DEFAULT_PHANTOM_DIR, num_patients: int = 1, seed: int = 0, **phantom_kwargs
) -> Path:
    """Generate ``num_patients`` synthetic breathing phantoms and one datalist over them.

    Patient ``i`` is :func:`monai_cidir.data.make_breathing_phantom` with seed ``seed + i``,
    written to ``dataset_dir/phantom_seed<seed+i>/``; ``dataset_dir/datalist.json`` lists them
    all. Existing identical files are left as they are; differing ones are never overwritten
    (``FileExistsError`` from the phantom writer).

    Args:
        dataset_dir: the folder to generate into.
        num_patients: number of phantom pairs.
        seed: seed of the first phantom.
        phantom_kwargs: options of :func:`~monai_cidir.data.make_breathing_phantom` (``shape``,
            ``spacing``, ``amplitude_mm``, ``num_landmarks``, ...).

    Returns:
        the path of ``dataset_dir/datalist.json``.

    Raises:
        ValueError: when ``num_patients < 1``.

    Example::

        >>> make_phantom_cohort("data/cidir_phantom", num_patients=2, shape=(48, 48, 32))  # doctest: +SKIP
    """
    from monai_cidir.data import load_pair_datalist, write_pair_datalist
    from monai_cidir.data.phantom import make_breathing_phantom

    if int(num_patients) < 1:
        raise ValueError(f"num_patients must be at least 1, found {num_patients}")
    dataset_dir = Path(dataset_dir)
    records: list[dict] = []
    for i in range(int(num_patients)):
        s = int(seed) + i
        sub = make_breathing_phantom(dataset_dir / f"phantom_seed{s}", seed=s, **phantom_kwargs)
        records.extend(load_pair_datalist(sub))
    # written under a temporary name and renamed, so a waiting rank never reads half a file
    path = dataset_dir / "datalist.json"
    with atomic_path(path) as tmp:
        write_pair_datalist(tmp, records)
    logger.info("phantom cohort of %d pair(s) written to %s", len(records), dataset_dir)
    return path


def _bundle_command_line() -> bool:
    """True under ``python -m monai.bundle ...`` (where an input error should end the run with its message)."""
    import sys

    return bool(sys.argv) and str(sys.argv[0]).replace("\\", "/").endswith("monai/bundle/__main__.py")


def exit_with_message(fn: Callable) -> Callable:
    """Under the bundle's command line, end a project input error with its message and exit status 1.

    MONAI wraps every exception raised while a config is evaluated in its own "Failed to
    instantiate component" / "Failed to evaluate ConfigExpression" error, so the project's message
    ended up in the middle of a long traceback. The bundle's entry points therefore turn the input
    errors (``ValueError``, ``OSError``, ``LookupError``, ``FloatingPointError``) into
    ``SystemExit("cidir_lung_ct: <type>: <message>")``: the user sees that message as the last
    lines, once. Called from Python, the functions raise as usual.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, LookupError, FloatingPointError) as e:
            if not _bundle_command_line():
                raise
            raise SystemExit(f"cidir_lung_ct: {type(e).__name__}: {e}") from None

    return wrapper


@exit_with_message
def make_dataset(
    dataset_dir: str | os.PathLike = DEFAULT_PHANTOM_DIR,
    datalist: str | os.PathLike | None = None,
    dataset_format: str = "datalist",
    phantom: Mapping[str, Any] | bool | None = None,
    cases: Sequence[int] | None = None,
    transform: Callable | None = None,
):
    """The dataset a bundle config trains on: a datalist, the phantom, or DIR-LAB.

    * ``dataset_format="dirlab"``: :class:`~monai_cidir.data.DIRLabDataset` on ``dataset_dir``
      (the DIR-LAB archives unpacked as distributed).
    * ``dataset_format="datalist"``: :class:`~monai_cidir.data.RegistrationPairDataset` on
      ``datalist`` (default ``dataset_dir/datalist.json``). When that file is absent and
      ``phantom`` is given, the phantom cohort is generated into ``dataset_dir`` first, but only
      if ``dataset_dir`` is missing or empty, so that user data is never written into.

    Under ``torchrun``, rank 0 generates the phantom while the other ranks wait for its datalist.

    Args:
        dataset_dir: the data folder.
        datalist: a datalist JSON (default ``dataset_dir/datalist.json``).
        dataset_format: ``"datalist"`` or ``"dirlab"``.
        phantom: options of :func:`make_phantom_cohort` (``num_patients``, ``seed``, ``shape``,
            ...); ``True`` for the defaults; ``None``/``False`` never generates.
        cases: DIR-LAB case numbers (default all ten).
        transform: a transform applied to every loaded pair.

    Returns:
        a MONAI ``Dataset`` of loaded pairs (the loaded-pair contract of :mod:`monai_cidir.data`).

    Raises:
        ValueError: for an unknown ``dataset_format``.
        FileNotFoundError: when there is no datalist and none may be generated.

    Example::

        >>> ds = make_dataset("data/cidir_phantom", phantom={"num_patients": 2})  # doctest: +SKIP
        >>> ds[0]["fixed_image"].shape
    """
    from monai_cidir.data import DIRLabDataset, RegistrationPairDataset

    fmt = str(dataset_format).lower()
    if fmt == "dirlab":
        return DIRLabDataset(dataset_dir, cases=range(1, 11) if cases is None else cases, transform=transform)
    if fmt != "datalist":
        raise ValueError(f"dataset_format must be 'datalist' or 'dirlab', found {dataset_format!r}")
    dataset_dir = Path(dataset_dir)
    default_list = dataset_dir / "datalist.json"
    path = Path(datalist) if datalist else default_list
    if not path.is_file():
        if not phantom or path.resolve() != default_list.resolve():
            raise FileNotFoundError(
                f"no datalist at {path}. Expected a JSON file {{'training': [{{'fixed_image': ..., "
                "'moving_image': ..., ...}]}} (see the bundle's docs/README.md), or "
                "--dataset_format dirlab --dataset_dir /path/to/dirlab for DIR-LAB."
            )
        if rank_and_world_size()[0] == 0:
            found = sorted(p.name for p in dataset_dir.iterdir()) if dataset_dir.is_dir() else []
            if found and not all(n.startswith("phantom_seed") for n in found):
                raise FileNotFoundError(
                    f"{dataset_dir} exists and holds {found[:5]}{' ...' if len(found) > 5 else ''} but no "
                    "datalist.json; the phantom is only generated into a missing or empty folder. Pass "
                    "--datalist /path/to/datalist.json, or --dataset_dir to a new folder for the phantom."
                )
            make_phantom_cohort(dataset_dir, **({} if phantom is True else dict(phantom)))
        else:  # the other ranks of a torchrun launch wait for rank 0's phantom
            _wait_for_file(default_list)
    return RegistrationPairDataset(str(path), transform=transform)


# ---------------------------------------------------------------------------- options
#: ``python -m monai.bundle run`` arguments that are not config ids
_RUN_ARGS = (
    "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
    "workflow_name", "workflow_type", "properties_path",
)  # fmt: skip


def _parse_cli_flags(args: Sequence[str]) -> dict[str, str | bool]:
    """``--key value`` / ``--key=value`` pairs of a Fire command line (a bare ``--key`` is ``True``)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        token = str(args[i])
        i += 1
        if not token.startswith("--") or token == "--":
            continue
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i < len(args) and not str(args[i]).startswith("--"):
                value, i = str(args[i]), i + 1
            else:
                value = True  # type: ignore[assignment]
        out[key.replace("-", "_") if "#" not in key else key] = value
    return out


def _literal(value: str | bool) -> Any:
    """What Fire makes of a command-line value: a Python literal where it parses, else the string."""
    import ast

    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "null": None, "none": None}.get(value.lower(), value)


def _new_option_of_known_parent(parser, key: str) -> bool:
    """``a#b`` not in the config, where ``a`` is an options dict (passed on as keyword arguments) or a
    component whose ``_target_`` accepts ``b``: a legitimate new option."""
    import inspect
    from pydoc import locate

    parent, sep, leaf = key.rpartition("#")
    if not sep or parent not in parser:
        return False
    node = parser[parent]
    if not isinstance(node, dict):
        return False
    target = node.get("_target_")
    if target is None:
        return True  # a plain options dict, e.g. ``phantom``: its consumer checks the names
    fn = locate(target) if isinstance(target, str) else None
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return leaf in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@exit_with_message
def check_cli_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse command-line overrides that no config id reads, or whose value has the wrong type.

    Under ``python -m monai.bundle run <id> --config_file F --key value ...`` MONAI adds any
    ``--key`` to the config, so a misspelt one (``--max_iteration 50000``) would run the defaults
    with exit status 0. This reads the command line (``sys.argv``; nothing happens outside
    ``monai.bundle``'s entry point), loads the config files and checks that every override names
    an id of them (``a#b`` for nested ones) and that a number, boolean or list keeps its kind
    (``--max_iterations abc`` is refused). The bundle's configs call it first.

    Args:
        argv: the command line (default ``sys.argv``).

    Raises:
        ValueError: naming the key, the closest known ids, or the expected type and the value.
    """
    import difflib
    import sys

    from monai.bundle import ConfigParser

    if argv is None:
        if not _bundle_command_line():
            return
        argv = sys.argv
    argv = list(argv)
    flags = _parse_cli_flags(argv[1:])
    files = _literal(flags.get("config_file", ""))
    if not files or flags.get("args_file"):
        return  # overrides read from an args file are not on the command line
    parser = ConfigParser()
    parser.read_config(files if isinstance(files, (list, tuple)) else [str(f) for f in str(files).split(",")])
    known = [k for k in parser.get() if k not in ("imports",)]
    problems = []
    for key, raw in flags.items():
        if key in _RUN_ARGS:
            continue
        if key not in parser and _new_option_of_known_parent(parser, key):
            continue
        if key not in parser:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; closest: {', '.join('--' + c for c in close)}" if close else ""
            problems.append(f"--{key}: no config id '{key}' in {files}, so nothing would read it{hint}")
            continue
        default, value = parser[key], _literal(raw)
        if isinstance(default, str) and default.startswith(("$", "@", "%")):
            continue  # an expression: its type is known only when evaluated
        if key in _NULLABLE and (value is None or str(value).strip().lower() in ("none", "null")):
            continue  # documented: null switches it off
        expected = (bool,) if isinstance(default, bool) else (int,) if isinstance(default, int) else (int, float) if isinstance(default, float) else (list, tuple) if isinstance(default, list) else None
        if expected is not None and (not isinstance(value, expected) or (bool not in expected and isinstance(value, bool))):
            if isinstance(value, str) and value.startswith(("$", "@", "%")):
                continue
            problems.append(f"--{key} {raw}: expected {' or '.join(t.__name__ for t in expected)} like the default {default!r}, found {type(value).__name__}")
    if problems:
        raise ValueError("command-line override(s) refused before anything ran:\n  " + "\n  ".join(problems))


#: numeric options whose documented ``null`` switches them off (time-based checkpoints; the
#: regularizer's point subset, so that every point is regularised)
_NULLABLE = ("checkpoint_every_s", "regularization_points")

_FLAG_OPTIONS = ("overwrite", "resume", "no_folding", "export_images", "alpha_per_point", "affine_prealign", "progress")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def as_flag(value: Any, name: str = "value", allow: Sequence[str] = ()) -> Any:
    """A command-line flag as a bool: ``--overwrite true`` reaches the config as the string ``"true"``.

    Args:
        value: a bool, or a string such as ``"true"``/``"false"``/``"yes"``/``"no"``/``"1"``/``"0"``.
        name: the option's name, for the error message.
        allow: other strings passed through unchanged (e.g. ``"auto"``).

    Returns:
        ``True``/``False``, or ``value`` itself when it is one of ``allow``.

    Raises:
        ValueError: for any other value.

    Example::

        >>> as_flag("true"), as_flag(False), as_flag("auto", allow=("auto",))
        (True, False, 'auto')
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in allow:
            return v
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    expected = ", ".join(["true", "false", *allow])
    raise ValueError(f"--{name} expects one of {expected}; found {value!r}")


def _normalise_options(kwargs: dict) -> dict:
    out = dict(kwargs)
    for key in _FLAG_OPTIONS:
        if key in out:
            out[key] = as_flag(out[key], key, allow=("auto",) if key == "affine_prealign" else ())
    for key in ("alpha", "time_budget_s", "checkpoint_every_s"):
        if isinstance(out.get(key), str) and out[key].strip().lower() in ("none", "null", ""):
            out[key] = None
    for key in ("alpha", "alpha_range"):  # "[0.1, 0.03]": one weight per regularizer, as a JSON list
        if isinstance(out.get(key), str) and out[key].strip().startswith("["):
            try:
                out[key] = json.loads(out[key])
            except ValueError:
                raise ValueError(f"--{key} expects a number or a JSON list such as [0.1, 0.03]; found {out[key]!r}") from None
    if "alpha_range" in out and out["alpha_range"] is None:
        del out["alpha_range"]  # the engines' default (or, in inference, the range stored in model.pt)
    if "alpha_range" in out:
        out["alpha_range"] = _alpha_range_option(out["alpha_range"])
    return out


def _alpha_range_option(value) -> list:
    """``[low, high]``, or one such pair per weight, as floats with ``low <= high``."""
    from monai_cidir.engines.registration import weight_ranges

    try:
        pairs = weight_ranges(value)
    except (TypeError, ValueError):
        pairs = []
    if not pairs or any(not lo <= hi for lo, hi in pairs):
        raise ValueError(f"--alpha_range expects [low, high] with low <= high (or one such pair per weight); found {value!r}")
    nested = all(isinstance(v, (list, tuple)) for v in value)
    return [list(p) for p in pairs] if nested else list(pairs[0])


# ---------------------------------------------------------------------------- handlers
def handler_factory(handlers: Sequence[Callable[[], Any]] | None = None) -> Callable[[], list]:
    """A factory building one fresh set of handlers per patient from handler partials.

    Bundle configs declare handlers with ``"_mode_": "callable"`` (each a partial); the trainer
    needs new handler objects for every patient's engine.

    Args:
        handlers: callables, each returning a handler (``None`` entries are dropped).

    Returns:
        ``factory() -> [handler, ...]``.

    Example::

        >>> from functools import partial
        >>> from monai.handlers import StatsHandler
        >>> make = handler_factory([partial(StatsHandler, output_transform=lambda x: x["loss"])])
        >>> make()[0] is not make()[0]
        True
    """
    parts = [h for h in (handlers or []) if h is not None]
    for h in parts:
        if not callable(h):
            raise TypeError(f"expected handler factories (use \"_mode_\": \"callable\" in the config), found {h!r}")
    return lambda: [h() for h in parts]


# ---------------------------------------------------------------------------- training
@exit_with_message
def train_cohort(
    dataset, output_dir: str | os.PathLike, print_summary: bool = True, backend: str | None = None, **kwargs
) -> list[dict]:
    """:func:`~monai_cidir.engines.run_cohort`, with the patients split across ``torchrun`` ranks.

    In a plain process this is ``run_cohort(dataset, output_dir, **kwargs)``. Under ``torchrun``
    (``WORLD_SIZE > 1``) the patients are partitioned with ``monai.data.partition_dataset``
    (rank ``r`` of ``N`` trains patients ``r, r + N, ...``, one INR each, no DDP), then the ranks
    join an NCCL (GPU) or Gloo (CPU) process group, the per-patient metrics are gathered, and
    rank 0 writes ``output_dir/metrics.csv`` and prints the summary table.

    Args:
        dataset: the loaded pairs (see :func:`make_dataset`).
        output_dir: the cohort's output folder.
        print_summary: print the summary table (rank 0).
        backend: process-group backend for the gather (default NCCL with CUDA, else Gloo).
        kwargs: options of :func:`~monai_cidir.engines.register_patient` (``network``,
            ``optimizer``, ``max_iterations``, ``num_points``, ``regularizer``, ``alpha_range``,
            ``affine_prealign``, ``device``, ``seed``, ``overwrite``, ``handlers``, ...); string
            flags such as ``"true"`` from the command line are accepted (:func:`as_flag`).

    Returns:
        the metrics of every patient (all ranks' on rank 0, this rank's on the others).

    Raises:
        RuntimeError: when a process group already exists before training (MONAI's metrics
            would then mix the ranks' patients).

    Example::

        >>> rows = train_cohort(make_dataset(phantom=True), "outputs", max_iterations=300)  # doctest: +SKIP
    """
    from monai.data import partition_dataset

    from monai_cidir.engines.registration import format_summary_table, run_cohort, write_cohort_table

    output_dir = Path(output_dir)
    kwargs = _normalise_options(kwargs)
    rank, world = rank_and_world_size()
    if world == 1:
        return _exit_on_failure(run_cohort(dataset, output_dir, print_summary=print_summary, raise_on_failure=False, **kwargs))
    if torch.distributed.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group exists before the cohort is trained: MONAI's cumulative metrics "
            "would all-gather each patient's Dice/TRE across ranks. Let train_cohort create the group after "
            "training (multi_gpu_train.json does)."
        )
    indices = partition_dataset(list(range(len(dataset))), num_partitions=world, shuffle=False, even_divisible=False)[rank]
    logger.info("rank %d of %d: patient indices %s", rank, world, indices)
    part_csv = output_dir / f"metrics_rank{rank}.csv"
    rows = run_cohort(
        torch.utils.data.Subset(dataset, indices), output_dir, print_summary=False, metrics_csv=part_csv, raise_on_failure=False, **kwargs
    )
    part_csv.unlink(missing_ok=True)
    _join_process_group(backend)
    gathered: list[list[dict] | None] = [None] * world
    torch.distributed.all_gather_object(gathered, rows)
    if rank == 0:
        rows = sorted((r for part in gathered for r in (part or [])), key=lambda r: str(r.get("name")))
        write_cohort_table(rows, output_dir / "metrics.csv")
        if print_summary:
            print(format_summary_table(rows), flush=True)
    torch.distributed.barrier()
    return _exit_on_failure(rows)


def _exit_on_failure(rows: list[dict]) -> list[dict]:
    """The command line's verdict: exit status 1 (after every patient ran) when one failed."""
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        names = ", ".join(str(r.get("name")) for r in failed)
        raise SystemExit(
            f"cidir_lung_ct: {len(failed)} of {len(rows)} patient(s) failed ({names}); see the WARNING/ERROR lines "
            "above and 'status', 'warnings', 'error' in metrics.csv. The other patients' outputs are complete."
        )
    return rows


# ---------------------------------------------------------------------------- inference
@exit_with_message
def infer_cohort(
    dataset,
    output_dir: str | os.PathLike,
    alpha: float | None = None,
    print_summary: bool = True,
    **kwargs,
) -> list[dict]:
    """Redo alpha selection and the exports of every trained patient, without retraining.

    Calls :func:`~monai_cidir.engines.export_registration` for each pair whose
    ``output_dir/<name>/model.pt`` exists (others are logged and skipped), then rewrites
    ``output_dir/metrics.csv`` and prints the summary table.

    Args:
        dataset: the loaded pairs the models were trained on.
        output_dir: the training run's output folder.
        alpha: export at this alpha for every patient (``None``: select by Dice).
        print_summary: print the summary table.
        kwargs: options of :func:`~monai_cidir.engines.export_registration` (``device``,
            ``alpha_range``, ``num_alphas``, ``golden_section_steps``, ``no_folding``,
            ``selection_mode``, ``lung_mask_backend``, ...).

    Returns:
        the new metrics of every re-exported patient.

    Raises:
        FileNotFoundError: when no patient of the dataset has a ``model.pt`` in ``output_dir``.

    Example::

        >>> infer_cohort(make_dataset(), "outputs", alpha=0.3)  # doctest: +SKIP
    """
    from monai_cidir.engines.registration import collect_cohort_metrics, export_registration, format_summary_table

    output_dir = Path(output_dir)
    kwargs = _normalise_options({"alpha": alpha, **kwargs})
    alpha = kwargs.pop("alpha")
    rows = []
    for i, item in enumerate(dataset):
        name = str(item.get("name") or f"pair{i}")
        if not (output_dir / name / "model.pt").is_file():
            logger.warning("%s: no %s, skipped (train it first)", name, output_dir / name / "model.pt")
            continue
        rows.append(export_registration(item, output_dir, alpha=alpha, **kwargs))
        logger.info("%s: exported at alpha %s (Dice %.4f, %s)", name, format_alpha(rows[-1]["alpha"]), rows[-1]["dice"], rows[-1]["status"])
    if not rows:
        raise FileNotFoundError(
            f"no model.pt for any patient of the dataset under {output_dir}/<name>/: run the training "
            "config first (or point --output_dir at its outputs)"
        )
    # the cohort table keeps trained patients that are not in this dataset
    table = collect_cohort_metrics(output_dir)
    if print_summary:
        print(format_summary_table(table), flush=True)
    return _exit_on_failure(rows)


# ---------------------------------------------------------------------------- evaluation
def exported_field_tre(displacement_path: str | os.PathLike, item: Mapping) -> float:
    """Mean TRE (mm) of the landmarks pushed through an exported ``displacement.nii.gz``.

    The field is read and applied by SimpleITK (``DisplacementFieldTransform``, LPS), not by
    monai_cidir, so this checks the exported file as other tools see it.

    Args:
        displacement_path: the displacement field written by the engines.
        item: a loaded pair with ``fixed_landmarks`` and ``moving_landmarks`` (world RAS mm).

    Returns:
        the mean distance (mm) between the pushed fixed landmarks and the moving landmarks.
    """
    import SimpleITK as sitk

    from monai_cidir.coordinates import lps_to_ras, ras_to_lps

    field = sitk.ReadImage(str(displacement_path), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    fixed = ras_to_lps(torch.as_tensor(item["fixed_landmarks"], dtype=torch.float64)).numpy()
    moved = np.array([transform.TransformPoint(tuple(float(c) for c in p)) for p in fixed])
    target = torch.as_tensor(item["moving_landmarks"], dtype=torch.float64).numpy()
    return float(np.linalg.norm(lps_to_ras(moved) - target, axis=1).mean())


@exit_with_message
def evaluate_cohort(
    dataset,
    output_dir: str | os.PathLike,
    alpha: float | None = None,
    save_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    coarse_factor: int = 1,
    summary_ops: str | Sequence[str] | None = "*",
    print_summary: bool = True,
) -> dict[str, dict[str, float]]:
    """Recompute TRE, Dice and folding from a training run's outputs; MetricsSaver-style CSV.

    For each pair with ``output_dir/<name>/model.pt``: the model is reloaded and evaluated at
    ``alpha`` (default: the alpha stored in its ``metrics.json``): TRE before/after (mean,
    snapped mean; :func:`~monai_cidir.engines.landmark_tre`), lung Dice and folding fraction
    (:class:`~monai_cidir.engines.AlphaSelectionEvaluator` at that single alpha, full resolution
    by default), and the TRE of the exported ``displacement.nii.gz`` applied by SimpleITK.
    Reports go to ``save_dir`` (default ``output_dir/eval``) with MONAI's
    ``write_metrics_reports`` (the writer of ``MetricsSaver``): ``metrics.csv`` (cohort means),
    ``<metric>_raw.csv`` (one row per patient) and ``<metric>_summary.csv``.

    Args:
        dataset: the loaded pairs the models were trained on.
        output_dir: the training run's output folder.
        alpha: evaluate every patient at this alpha instead of its selected one.
        save_dir: where the reports go.
        device: torch device.
        coarse_factor: Dice grid coarsening (1: the fixed image's full grid).
        summary_ops: ``write_metrics_reports`` summary operations.
        print_summary: print the per-patient table.

    Returns:
        ``{name: {metric: value}}``.

    Raises:
        FileNotFoundError: when no patient of the dataset has a ``model.pt`` in ``output_dir``.

    Example::

        >>> evaluate_cohort(make_dataset(), "outputs")["phantom_seed0"]["tre_after"]  # doctest: +SKIP
    """
    from monai.handlers.utils import write_metrics_reports

    from monai_cidir.engines.alpha_search import AlphaSearch
    from monai_cidir.engines.alpha_selection import AlphaSelectionEvaluator, selection_grid
    from monai_cidir.engines.model import load_registration_model
    from monai_cidir.engines.quality import prepare_lung_masks
    from monai_cidir.engines.registration import format_summary_table, landmark_tre

    output_dir = Path(output_dir)
    save_dir = output_dir / "eval" if save_dir is None else Path(save_dir)
    results: dict[str, dict[str, float]] = {}
    for i, item in enumerate(dataset):
        name = str(item.get("name") or f"pair{i}")
        pdir = output_dir / name
        if not (pdir / "model.pt").is_file():
            logger.warning("%s: no %s, skipped", name, pdir / "model.pt")
            continue
        model = load_registration_model(pdir / "model.pt", device=device)
        stored = json.loads((pdir / "metrics.json").read_text()) if (pdir / "metrics.json").is_file() else {}
        a = alpha if alpha is not None else stored.get("alpha", model.info.get("alpha"))
        if a is None:
            raise ValueError(f"{name}: no alpha given and none stored in {pdir / 'metrics.json'} or model.pt")
        item, _ = prepare_lung_masks(item, "threshold")
        best = AlphaSelectionEvaluator(
            model, item, search=AlphaSearch(alphas=[a]),
            grid=selection_grid(model.mapping, item["fixed_mask"], coarse_factor=coarse_factor),
        ).run().best
        weights = np.atleast_1d(np.asarray(a, dtype=np.float64)).tolist()
        names_k = model.info.get("regularizer_names") or [str(i) for i in range(len(weights))]
        row = {"alpha": weights[0]} if len(weights) == 1 else {f"alpha_{n}": v for n, v in zip(names_k, weights)}
        row.update(dice=float(best["dice"]), folding=float(best["folding"]))
        before, after = landmark_tre(None, None, item), landmark_tre(model, a, item)
        if after:
            row.update(
                tre_before=before["mean"],
                tre_after=after["mean"],
                tre_after_sd=after["sd"],
                tre_before_snapped=before["snapped_mean"],
                tre_after_snapped=after["snapped_mean"],
            )
            if (pdir / "displacement.nii.gz").is_file() and alpha is None:
                row["tre_exported_field"] = exported_field_tre(pdir / "displacement.nii.gz", item)
        results[name] = row
        logger.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    if not results:
        raise FileNotFoundError(
            f"no model.pt for any patient of the dataset under {output_dir}/<name>/: run the training config first"
        )
    names = sorted(results)
    keys = sorted({k for r in results.values() for k in r})
    details = {k: np.array([[results[n].get(k, math.nan)] for n in names], dtype=np.float64) for k in keys}
    means = {k: float(np.nanmean(v)) for k, v in details.items()}
    save_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_reports(save_dir, images=names, metrics=means, metric_details=details, summary_ops=summary_ops)
    if print_summary:
        table = [
            {"name": n, "tre_before_mean": r.get("tre_before"), "tre_after_mean": r.get("tre_after"), **r}
            for n, r in ((n, results[n]) for n in names)
        ]
        print(format_summary_table(table), flush=True)
    return results
