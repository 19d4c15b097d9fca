"""Alpha selection and the outputs at the chosen alpha.

* :func:`selection_evaluator`: the evaluator partial of the keyword options (:class:`~monai_cidir.engines.options.SelectionSettings`).
* :func:`select_and_export`: run the search on a trained model, with :class:`RegistrationExport` (the
  one handler that writes a patient's outputs) and the landmark TRE curve attached.
* :func:`model_prior`: the prior a model was trained with (it spaces the search's grid);
  :func:`landmark_tre`: TRE statistics of a model at an alpha.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.engines.alpha_search import AlphaSearch
from monai_cidir.engines.alpha_selection import AlphaSelectionEvaluator, format_alpha, selection_grid
from monai_cidir.engines.alphas import alpha_values, check_alpha, plain_alpha
from monai_cidir.engines.export import (
    dilate_mask,
    map_displacement,
    plot_alpha_curve,
    plot_alpha_map,
    write_alpha_curve,
    write_displacement_field,
    write_json,
    write_warped_image,
)
from monai_cidir.engines.model import RegistrationModel, save_registration_model
from monai_cidir.engines.options import SelectionSettings
from monai_cidir.engines.quality import record_status, registration_quality
from monai_cidir.engines.trainer import AlphaPrior, make_alpha_prior, stored_prior
from monai_cidir.handlers.alpha_choice import AlphaChoice, AlphaSearchEvents
from monai_cidir.handlers.registration_metrics import AlphaCurveTRE

__all__ = [
    "RegistrationExport",
    "select_and_export",
    "selection_evaluator",
    "model_prior",
    "prior_ranges",
    "landmark_tre",
    "factory_keywords",
]


def landmark_tre(
    model: RegistrationModel | None, alpha: float | None, item: Mapping, moving_grid: CoordinateMapping | None = None
) -> dict[str, float]:
    """TRE statistics (mm) of a model at ``alpha`` (``model=None``: before registration).

    Returns:
        ``{"mean", "sd", "snapped_mean", "snapped_sd"}`` (``snapped_*`` snap to the moving
        image's voxels, the DIR-LAB convention); empty when the item has no landmarks.
    """
    from monai_cidir.metrics import TargetRegistrationError

    if item.get("fixed_landmarks") is None or item.get("moving_landmarks") is None:
        return {}
    fixed = torch.as_tensor(item["fixed_landmarks"], dtype=torch.float64)
    target = torch.as_tensor(item["moving_landmarks"], dtype=torch.float64)
    pred = fixed if model is None else model.transform_points(fixed, alpha)
    grid = moving_grid or CoordinateMapping.from_image(item["moving_image"])
    out = {}
    for snap, prefix in ((False, ""), (True, "snapped_")):
        metric = TargetRegistrationError(snap=snap, moving_grid=grid if snap else None, over="landmarks")
        metric(pred[None], target[None])
        out[f"{prefix}mean"] = float(metric.aggregate("mean"))
        out[f"{prefix}sd"] = float(metric.aggregate("std"))
    return out


def select_and_export(
    model: RegistrationModel,
    item: dict,
    patient_dir: str | os.PathLike,
    evaluator: Callable[..., AlphaSelectionEvaluator] | None = None,
    prior: AlphaPrior | None = None,
    alpha: float | None = None,
    export_images: bool = True,
    export_coarse_mm: float | None = 6.0,
    previous: dict | None = None,
    selection_handlers: Sequence | None = None,
) -> dict:
    """Alpha selection (or a fixed ``alpha``) for one trained model, its outputs written by a
    :class:`RegistrationExport` handler on the evaluator.

    Args:
        model: the trained registration.
        item: the loaded pair (images, masks, optional landmarks, name).
        patient_dir: where the outputs go.
        evaluator: a factory of the selection evaluator, ``evaluator(model, item, prior=...,
            val_handlers=...) -> AlphaSelectionEvaluator``:
            the one owner of the selection settings (search, scoring mode, grid, key metric, chunk
            size), e.g. the bundle's ``validate#evaluator`` (a ``_mode_: callable`` partial) or
            :func:`selection_evaluator`'s partial of the keyword options. Default:
            ``selection_evaluator()`` (21 alphas, lung Dice, the 4 mm grid of the lung's box).
        prior: the training prior, which spaces the search's grid and bounds ``alpha`` (default: the
            one stored in ``model.pt``, :func:`model_prior`).
        alpha: export at this alpha; the sweep still runs (its curve is written) unless the
            evaluator's search has ``num_alphas=0``.
        export_images: write ``displacement.nii.gz`` and ``warped_moving.nii.gz``.
        export_coarse_mm: the exported field is exact in the fixed lung mask grown by 10 mm and
            interpolated from a grid this coarse (mm) elsewhere
            (:func:`~monai_cidir.engines.export.map_displacement`; its measured error goes to
            ``metrics.json`` as ``export_interpolation_max_mm``); ``None``: exact everywhere.
        previous: entries to carry into ``metrics.json`` (e.g. training seconds).
        selection_handlers: handlers attached to the selection evaluator (the landmark TRE handler
            is added when the pair has landmarks).

    Returns:
        the metrics dict written to ``metrics.json``.

    Example::

        >>> factory = selection_evaluator(num_alphas=11, selection_mode="segment")
        >>> metrics = select_and_export(model, item, "outputs/pair1", evaluator=factory)  # doctest: +SKIP
    """
    prior = model_prior(model) if prior is None else prior
    check_alpha(alpha, prior_ranges(prior), model.num_weights)
    export = RegistrationExport(patient_dir, item, alpha, export_images, export_coarse_mm, previous)
    handlers = list(selection_handlers or [])
    if item.get("fixed_landmarks") is not None and item.get("moving_landmarks") is not None:
        handlers.append(AlphaCurveTRE(item["fixed_landmarks"], item["moving_landmarks"]))  # the TRE-vs-alpha curve
    evaluator = _sweep(selection_evaluator(evaluator), model, item, prior, [*handlers, export], alpha)
    if export.metrics is None:  # num_alphas=0: no search ran, the given alpha alone is exported
        export.write(evaluator, [], None)
    return export.metrics


def _sweep(factory: Callable, model: RegistrationModel, item: Mapping, prior: AlphaPrior, handlers: list, alpha) -> AlphaSelectionEvaluator:
    """Run the factory's search with ``handlers`` attached; the evaluator. With ``num_alphas=0``
    nothing is scored: the evaluator is built for the given ``alpha`` only (to score it), not run."""
    search = _factory_search(factory) or AlphaSearch()
    inputs = (model, item)
    if search.num_alphas == 0:
        if alpha is None:
            raise ValueError("no alpha to export: give alpha=... or an evaluator whose search has num_alphas > 0")
        single = functools.partial(factory, search=AlphaSearch(alphas=[alpha]))  # replaces the factory's own search
        return _call_factory(single, inputs, {}, prior=prior)
    evaluator = _call_factory(factory, inputs, {"val_handlers": handlers}, prior=prior)
    evaluator.run()
    return evaluator


class RegistrationExport:
    """Writes one patient's outputs, once, when the alpha search completes
    (:attr:`~monai_cidir.handlers.AlphaSearchEvents.SEARCH_COMPLETED`): ``alpha_curve.csv`` /
    ``alpha_curve.png``, ``displacement.nii.gz`` and ``warped_moving.nii.gz`` at the chosen alpha (or
    the given one), ``registration.png`` (the pair before and after, three planes: the picture to open
    first), ``model.pt`` with that alpha, and last ``metrics.json`` (Dice, folding, TRE before
    and after, lung NCC and status, timings), whose presence marks the patient complete.

    Args:
        patient_dir: where the outputs go.
        item: the loaded pair (images, masks, optional landmarks, name).
        alpha: export at this alpha instead of the key metric's choice.
        export_images: write ``displacement.nii.gz`` and ``warped_moving.nii.gz``.
        export_coarse_mm: the field is exact in the fixed lung mask grown by 10 mm and interpolated
            from a grid this coarse (mm) elsewhere (``None``: exact everywhere), see
            :func:`~monai_cidir.engines.export.map_displacement`.
        previous: entries carried into ``metrics.json`` (training seconds, pre-alignment, masks).

    Attributes:
        metrics: what ``metrics.json`` holds, once written (``None`` before).

    Example::

        >>> export = RegistrationExport("outputs/pair1", item)
        >>> AlphaSelectionEvaluator(model, item, val_handlers=[export]).run()
        >>> export.metrics["alpha"], export.metrics["dice"]
    """

    def __init__(
        self,
        patient_dir: str | os.PathLike,
        item: Mapping,
        alpha=None,
        export_images: bool = True,
        export_coarse_mm: float | None = 6.0,
        previous: Mapping | None = None,
    ) -> None:
        self.patient_dir = Path(patient_dir)
        self.item = item
        self.alpha = alpha
        self.export_images = bool(export_images)
        self.export_coarse_mm = export_coarse_mm
        self.previous = dict(previous or {})
        self.metrics: dict | None = None
        self._start = time.perf_counter()  # the selection's clock: from the handler's creation to the search's end

    def attach(self, engine: AlphaSelectionEvaluator) -> None:
        engine.add_event_handler(AlphaSearchEvents.SEARCH_COMPLETED, self)

    def __call__(self, engine: AlphaSelectionEvaluator) -> None:
        self.write(engine, engine.curve.rows, engine.curve.best)

    def _chosen(self, evaluator: AlphaSelectionEvaluator, rows: list[dict], best: dict | None) -> tuple:
        """``(alpha, row)`` to export: the key metric's choice, or the given alpha's row (scored alone,
        with every lung point's folding, when it is off the grid or nothing was swept)."""
        if self.alpha is None:
            return plain_alpha(best["alpha"]), best
        alpha = plain_alpha(self.alpha)
        row = next((r for r in rows if np.allclose(alpha_values(r["alpha"]), alpha_values(alpha), rtol=0, atol=1e-12)), None)
        with torch.no_grad():
            if row is None:
                row = evaluator.score(alpha, folding_stride=1)
            elif evaluator.folding_stride > 1:  # the sweep's folding was thinned
                row = dict(row, folding=evaluator.folding(alpha, 1))
        return alpha, row

    def write(self, evaluator: AlphaSelectionEvaluator, rows: list[dict], best: dict | None) -> dict:
        """Write every output for the search's ``rows`` and ``best`` (``[]`` and ``None`` when nothing
        was swept); returns :attr:`metrics`."""
        model, item, pdir = evaluator.model, self.item, self.patient_dir
        info = dict(getattr(model, "info", None) or {})
        k = model.num_weights
        names = list(info.get("regularizer_names") or [str(i) for i in range(k)])
        name = str(item.get("name", pdir.name))
        alpha, chosen = self._chosen(evaluator, rows, best)
        seconds_selection = time.perf_counter() - self._start
        if rows:
            _write_alpha_curve(rows, alpha, pdir, names, name, k)
        start = time.perf_counter()
        images = _export_images(model, alpha, item, pdir, self.export_coarse_mm, evaluator.chunk_size) if self.export_images else {}
        seconds_export = time.perf_counter() - start  # the two images alone, as before the handler
        metrics: dict[str, Any] = dict(self.previous)
        metrics.update(name=name, alpha=plain_alpha(alpha), dice=float(chosen["dice"]), dice_before=evaluator.score_identity())
        metrics.update(_curve_metrics(rows, best, alpha, chosen, names if k > 1 else None))
        for key, stats in (("tre_before", landmark_tre(None, None, item)), ("tre_after", landmark_tre(model, alpha, item))):
            metrics.update({f"{key}_{stat}": value for stat, value in stats.items()})
        metrics.update(registration_quality(model, alpha, item, evaluator))
        record_status(metrics)
        metrics["seconds_picture"] = _write_picture(model, alpha, item, pdir / "registration.png", metrics)
        metrics.update(seconds_selection=seconds_selection, seconds_export=seconds_export)
        metrics.update({f"export_{key}": v for key, v in images.items()})
        if info:  # a trained model (with what model.pt stores beside the network): kept with the chosen alpha
            save_registration_model(model, pdir / "model.pt", **{**info, "alpha": metrics["alpha"]})
            model.info = {**info, "alpha": metrics["alpha"]}
        write_json(metrics, pdir / "metrics.json")  # last: marks the patient complete
        self.metrics = metrics
        return metrics


def _write_picture(model: RegistrationModel, alpha, item: Mapping, path: Path, metrics: Mapping) -> float:
    """``registration.png`` (:func:`~monai_cidir.engines.overview.plot_registration`) titled with the
    result; its seconds."""
    from monai_cidir.engines.overview import plot_registration

    start = time.perf_counter()
    title = (
        f"{metrics['name']}: alpha {format_alpha(alpha)}, lung Dice {metrics['dice_before']:.3f} before -> {metrics['dice']:.3f} "
        f"after, folding {100 * metrics['folding']:.2f}%, status {metrics['status']}"
    )
    plot_registration(item, lambda p: model.transform_points(p, alpha), path, title=title)
    return time.perf_counter() - start


def selection_evaluator(
    evaluator: Callable[..., AlphaSelectionEvaluator] | None = None,
    lung_mask_backend: str = "threshold",
    lung_mask_kwargs: dict | None = None,
    **settings: Any,
) -> functools.partial:
    """The selection evaluator factory of the keyword options: one place that turns
    :func:`register_patient`'s flat selection options into an evaluator partial.

    Args:
        evaluator: a factory to complete (a class, or a ``functools.partial`` such as the bundle's
            ``validate#evaluator``); what it sets itself wins over the options below.
            Default :class:`~monai_cidir.engines.AlphaSelectionEvaluator`.
        lung_mask_backend, lung_mask_kwargs: the lung-mask transform of ``selection_mode="segment"``.
        settings: the :class:`~monai_cidir.engines.options.SelectionSettings` keywords: the search
            ``AlphaSearch(num_alphas, golden_section_steps=...)`` (``num_alphas=0``: no sweep, export
            at a given alpha), ``no_folding``, ``selection_mode`` (the evaluator's ``mode``), the
            selection grid ``coarse_spacing_mm`` / ``coarse_factor`` (:func:`selection_grid`) and
            ``chunk_size`` (points per network call).

    Returns:
        a ``functools.partial`` of the evaluator class with every option set.

    Example::

        >>> factory = selection_evaluator(num_alphas=11, coarse_spacing_mm=2.0)
        >>> evaluator = factory(model, item["fixed_mask"], item["moving_mask"], prior=AlphaPrior())  # doctest: +SKIP
    """
    base = evaluator or AlphaSelectionEvaluator
    own = factory_keywords(base)
    _factory_search(base)  # refuses a search that is not an AlphaSearch, before anything runs
    s = SelectionSettings.from_keywords(settings)
    options = {
        "search": AlphaSearch(s.num_alphas, golden_section_steps=s.golden_section_steps), "mode": s.selection_mode,
        "grid": functools.partial(selection_grid, coarse_spacing_mm=s.coarse_spacing_mm, coarse_factor=s.coarse_factor),
        "chunk_size": s.chunk_size,
    }  # fmt: skip
    if s.selection_mode == "segment":
        from monai_cidir.transforms import LungMask

        options["lung_mask"] = LungMask(backend=lung_mask_backend, **(lung_mask_kwargs or {}))
    merged = {**options, **own}
    if s.no_folding:  # the key metric owns the folding rule
        merged["key_metric"] = functools.partial(_refusing_folding, merged.get("key_metric"))
    return functools.partial(getattr(base, "func", base), **merged)


def _refusing_folding(key_metric=None) -> AlphaChoice:
    """A fresh key metric (the given one, or its factory's, default :class:`AlphaChoice`) that lets
    only alphas without folding compete."""
    choice = AlphaChoice() if key_metric is None else key_metric if isinstance(key_metric, AlphaChoice) else key_metric()
    choice.no_folding = True
    return choice


def model_prior(model: RegistrationModel, alpha_range: Sequence | None = None, alpha_distribution: str | Sequence[str] | None = None) -> AlphaPrior:
    """The prior a model was trained with (stored in ``model.pt``), or one of the given range /
    distribution (each overrides the stored one; models saved before the prior was stored give
    their range and distribution, else the paper's uniform [0, 1])."""
    stored = stored_prior(model)
    if alpha_range is None and alpha_distribution is None and stored is not None:
        return stored
    info = getattr(model, "info", {}) or {}
    alpha_range = info.get("alpha_range", (0.0, 1.0)) if alpha_range is None else alpha_range
    alpha_distribution = info.get("alpha_distribution", "uniform") if alpha_distribution is None else alpha_distribution
    return make_alpha_prior(alpha_range, alpha_distribution, model.num_weights)


def prior_ranges(prior: AlphaPrior) -> list[tuple[float, float]]:
    """``(low, high)`` of each weight of the prior."""
    return list(zip(prior.lows, prior.highs))


def _curve_metrics(rows: list[dict], best: dict | None, alpha, chosen: dict, names: list[str] | None) -> dict:
    """``metrics.json``'s entries about the search: the chosen row's folding, how alpha was set, the
    curve's size and speed, and (with landmarks) the oracle alpha, the lowest TRE scored."""
    selected = bool(rows) and best is not None and alpha_values(alpha) == alpha_values(best["alpha"])
    out: dict[str, Any] = {"folding": float(chosen["folding"]), "alpha_selection": "max_dice" if selected else "fixed", "num_alphas_evaluated": len(rows)}
    if names:  # one weight per regularizer
        out["alpha_names"] = names
    if rows:
        out["dice_at_alpha_min"] = float(rows[0]["dice"])
        out["seconds_per_alpha"] = float(sum(r["seconds"] for r in rows) / len(rows))
    if len(rows) >= 5:  # a curve: near 0, the Dice cannot choose (quality.FLAT_DICE_RANGE)
        dice = [float(r["dice"]) for r in rows]
        out["dice_range"] = max(dice) - min(dice)
    if rows and all("tre" in r for r in rows):  # landmarks: the best TRE scored, to compare the choice with
        oracle = min(rows, key=lambda r: r["tre"])
        out["alpha_oracle"], out["tre_oracle_mean"] = plain_alpha(oracle["alpha"]), float(oracle["tre"])
    return out


def _write_alpha_curve(rows: list[dict], alpha, patient_dir: Path, names: list[str], name: str, num_weights: int) -> None:
    """``alpha_curve.csv`` and its picture: the curve (one weight) or the map of evaluated vectors."""
    write_alpha_curve(rows, patient_dir / "alpha_curve.csv", names)
    if num_weights == 1:
        plot_alpha_curve(rows, alpha, patient_dir / "alpha_curve.png", title=name)
    else:
        plot_alpha_map(rows, alpha_values(alpha), patient_dir / "alpha_curve.png", names, title=name)


def _export_images(model: RegistrationModel, alpha, item: Mapping, patient_dir: Path, coarse_mm: float | None, chunk_size: int) -> dict:
    """``displacement.nii.gz`` and ``warped_moving.nii.gz`` from one mapping of the field; its error report."""
    lung = None if coarse_mm is None else dilate_mask(item["fixed_mask"], model.mapping, 10.0)
    field, info = map_displacement(model, alpha, lung, coarse_mm, chunk_size)  # mapped once for both files
    write_displacement_field(model, alpha, patient_dir / "displacement.nii.gz", field=field)
    write_warped_image(model, alpha, item["moving_image"], patient_dir / "warped_moving.nii.gz", field=field)
    return info


def factory_keywords(factory) -> dict:
    """The options a ``_mode_: callable`` partial (``functools.partial``) already sets; ``{}`` otherwise."""
    return dict(getattr(factory, "keywords", None) or {})


def _factory_search(factory) -> AlphaSearch | None:
    """The :class:`AlphaSearch` an evaluator factory sets itself (``validate#evaluator#search``), if any.

    Raises:
        TypeError: when it is not an ``AlphaSearch`` instance (e.g. a ``_mode_: callable`` partial).
    """
    search = factory_keywords(factory).get("search")
    if search is not None and not isinstance(search, AlphaSearch):
        raise TypeError(f"the evaluator's search must be an AlphaSearch instance (no '_mode_: callable' in the config), found {search!r}")
    return search


def _call_factory(factory: Callable, args: tuple, options: Mapping[str, Any], **required):
    """``factory(*args, **required, **options)``, leaving out the options the factory sets itself."""
    own = factory_keywords(factory)
    clash = sorted(set(required) & set(own))
    if clash:
        raise ValueError(
            f"the factory {getattr(factory, 'func', factory)!r} sets {clash} itself, but these are given per patient by the "
            "workflow (from the config's loss / alpha ids, device and output folder): remove them from the factory"
        )
    return factory(*args, **required, **{k: v for k, v in options.items() if k not in own})
