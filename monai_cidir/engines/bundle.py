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
* :mod:`~monai_cidir.engines.distributed`: the per-rank device and the tear-down of
  ``multi_gpu_train.json`` (the NCCL/Gloo group itself is joined by :func:`train_cohort` after
  training); :mod:`~monai_cidir.engines.cli`: the command line's checks and flags.
* :func:`handler_factory`: turns ``_mode_: callable`` handler partials into the
  one-fresh-set-per-patient factory the trainer takes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_cidir.engines.alpha_selection import format_alpha
from monai_cidir.engines.cli import _normalise_options, as_flag, check_cli_overrides, exit_with_message  # noqa: F401 (re-exported)
from monai_cidir.engines.distributed import (  # noqa: F401 (the configs' targets before 0.11.0)
    _join_process_group,
    _wait_for_file,
    destroy_distributed,
    init_distributed,
    rank_and_world_size,
)
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
