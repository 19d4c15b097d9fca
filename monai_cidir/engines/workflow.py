# Copyright (c) monai_cidir contributors
# Licensed under the Apache License, Version 2.0

"""The per-pair cohort workflows the bundle's configs instantiate.

A registration INR is trained per patient: there is no single trainer for a cohort. The configs
therefore declare the components as MONAI bundles do (``network_def``, ``loss``, ``optimizer``,
``train#trainer``, ``validate#evaluator``, ``inferer``, handlers), the trainer and evaluator as
``_mode_: callable`` partials, and one of these workflows builds a fresh network, optimizer,
trainer and evaluator from them for every pair:

* :class:`CohortTrainingWorkflow` (``train.json``'s ``workflow``): train, select alpha, export,
  for every pair (patients split across ``torchrun`` ranks).
* :class:`CohortInferenceWorkflow` (``inference.json``'s ``workflow``): alpha selection and the
  exports again from each pair's ``model.pt``, without retraining.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["CohortTrainingWorkflow", "CohortInferenceWorkflow"]


def _normalised_factory(factory: Callable | None) -> Callable | None:
    """A partial whose command-line strings (``"none"``, ``"true"``) are turned into values, in the
    partials it holds too (the evaluator's ``key_metric``)."""
    from monai_cidir.engines.cli import _normalise_options

    keywords = getattr(factory, "keywords", None)
    if not isinstance(factory, functools.partial) or not keywords:
        return factory
    keywords = {k: _normalised_factory(v) for k, v in _normalise_options(keywords).items()}
    return functools.partial(factory.func, *factory.args, **keywords)


def _handler_factory(handlers) -> Callable[[], list] | None:
    """Handler partials (a list) as one factory of fresh handlers per patient."""
    from monai_cidir.engines.bundle import handler_factory

    if handlers is None or callable(handlers):
        return handlers
    return handler_factory(handlers)


class CohortTrainingWorkflow:
    """Register every pair of a dataset: a fresh network, optimizer, trainer and evaluator each.

    For each pair it builds ``network_def()`` (with ``cond_features = loss.cond_features``),
    ``optimizer(param_groups)``, ``trainer(network, optimizer, fixed, moving, sampler, loss=...,
    alpha_prior=..., ...)`` (an :class:`~monai_cidir.engines.CIDIRTrainer` partial) and, after
    training, ``evaluator(model, item, prior=..., ...)`` (an
    :class:`~monai_cidir.engines.AlphaSelectionEvaluator` partial), then writes the pair's outputs
    and the cohort table (:func:`~monai_cidir.engines.bundle.train_cohort`; under ``torchrun`` the
    pairs are split across the ranks).

    Args:
        dataset: the loaded pairs (``train#dataset``).
        output_dir: outputs go to ``output_dir/<name>/`` and ``output_dir/metrics.csv``.
        network_def: a factory of a fresh INR (``_mode_: callable``).
        optimizer: a factory ``f(param_groups) -> optimizer``.
        loss: the :class:`~monai_cidir.losses.RegistrationLoss`.
        trainer: the trainer factory (``train#trainer``).
        evaluator: the alpha-selection evaluator factory (``validate#evaluator``).
        handlers: training handler partials (``train#handlers``), instantiated afresh per pair.
        options: the remaining per-pair options of :func:`~monai_cidir.engines.register_patient`
            (``alpha_range``, ``alpha_distribution``, ``affine_prealign``, ``device``, ``seed``,
            ``overwrite``, ...).
        print_summary: print the cohort's summary table at the end.

    Example::

        >>> workflow = CohortTrainingWorkflow(make_dataset(phantom=True), "outputs", partial(ConditionedINR),
        ...                                   partial(torch.optim.Adam, lr=1e-4), RegistrationLoss("bending"),
        ...                                   partial(CIDIRTrainer, max_iterations=300, num_points=2000),
        ...                                   partial(AlphaSelectionEvaluator, num_alphas=21))  # doctest: +SKIP
        >>> rows = workflow.run()  # one metrics dict per pair
    """

    def __init__(
        self,
        dataset,
        output_dir: str | os.PathLike,
        network_def: Callable,
        optimizer: Callable | None,
        loss,
        trainer: Callable,
        evaluator: Callable,
        handlers: Sequence[Callable] | Callable | None = None,
        options: Mapping[str, Any] | None = None,
        print_summary: bool = True,
    ) -> None:
        self.dataset = dataset
        self.output_dir = output_dir
        self.components = {
            "network": network_def,
            "optimizer": optimizer,
            "loss": loss,
            "trainer": _normalised_factory(trainer),
            "evaluator": _normalised_factory(evaluator),
            "handlers": _handler_factory(handlers),
        }
        self.options = dict(options or {})
        self.print_summary = bool(print_summary)

    def run(self) -> list[dict]:
        """Train, select and export every pair; returns their metrics (exit status 1 if one failed)."""
        from monai_cidir.engines.bundle import train_cohort

        return train_cohort(self.dataset, self.output_dir, print_summary=self.print_summary, **self.components, **self.options)


class CohortInferenceWorkflow:
    """Alpha selection and the exports again for every trained pair, without retraining.

    Args:
        dataset: the loaded pairs the models were trained on.
        output_dir: the training run's output folder (each pair's ``model.pt``).
        evaluator: the alpha-selection evaluator factory (an
            :class:`~monai_cidir.engines.AlphaSelectionEvaluator` partial).
        inferer: a :class:`~monai_cidir.inferers.PointInferer`: its ``chunk_size`` bounds every
            network call of the sweep and the exports.
        network_def: ``None`` (default): the network stored in each ``model.pt``. A factory: the
            architecture to rebuild, whose weights are then loaded from ``model.pt`` (checked).
        options: further options of :func:`~monai_cidir.engines.export_registration` (``alpha``,
            ``alpha_range``, ``device``, ``lung_mask_backend``, ...).
        print_summary: print the cohort's summary table at the end.

    Example::

        >>> CohortInferenceWorkflow(make_dataset(), "outputs", partial(AlphaSelectionEvaluator),
        ...                         PointInferer(65536), options={"alpha": 0.3}).run()  # doctest: +SKIP
    """

    def __init__(
        self,
        dataset,
        output_dir: str | os.PathLike,
        evaluator: Callable,
        inferer,
        network_def: Callable | None = None,
        options: Mapping[str, Any] | None = None,
        print_summary: bool = True,
    ) -> None:
        self.dataset = dataset
        self.output_dir = output_dir
        self.evaluator = _normalised_factory(evaluator)
        self.inferer = inferer
        self.network_def = network_def
        self.options = dict(options or {})
        self.print_summary = bool(print_summary)

    def run(self) -> list[dict]:
        """Re-export every trained pair; returns their new metrics."""
        from monai_cidir.engines.bundle import infer_cohort

        chunk_size = int(getattr(self.inferer, "chunk_size", 65536))
        return infer_cohort(
            self.dataset,
            self.output_dir,
            print_summary=self.print_summary,
            evaluator=self.evaluator,
            chunk_size=chunk_size,
            network_def=self.network_def,
            **self.options,
        )
