"""Engines: per-patient cIDIR training, affine pre-alignment, alpha selection and exports.

* :class:`CIDIRTrainer` (trainer.py): the per-patient MONAI/Ignite training workflow.
* :class:`RegistrationOptions`, :class:`TrainingSettings`, :class:`SelectionSettings` (options.py):
  the keyword options of :func:`register_patient`, the trainer and the selection: names, defaults
  and the checks that need no data, one owner per group.
* :func:`fit_affine` (prealign.py): the global affine the INR's residual starts from.
* :class:`AlphaSelectionEvaluator` (alpha_selection.py): the alpha sweep scored by lung Dice; its key
  metric (:class:`~monai_cidir.handlers.AlphaChoice`) decides, :class:`AlphaSearch` (alpha_search.py)
  says which alphas are scored; alphas.py: the grid and the forms of an alpha.
* :class:`RegistrationModel`, :func:`load_registration_model` (model.py): the trained transform.
* export.py: displacement field, warped image, alpha curve and lung-mask pictures.
* quality.py: lung-mask checks before training, lung NCC / Dice and a status per patient after it.
* :func:`plot_registration` (overview.py): ``registration.png``, the pair before and after, three planes.
* :func:`selection_evaluator`, :func:`select_and_export`, :class:`RegistrationExport` (selection.py):
  the alpha search on a trained model and the one handler that writes a patient's outputs.
* :func:`register_patient`, :func:`run_cohort`, :func:`export_registration` (registration.py):
  one pair's registration and the cohort loop.
* :class:`CohortTrainingWorkflow`, :class:`CohortInferenceWorkflow` (workflow.py): what the
  bundle's configs instantiate: a fresh network, trainer and evaluator per pair, from the
  ``network_def``, ``train#trainer`` and ``validate#evaluator`` partials.
"""

from __future__ import annotations

from monai_cidir.engines.alpha_search import AlphaSearch
from monai_cidir.engines.alpha_selection import AlphaCurve, AlphaSelectionEvaluator, alpha_grid, coarse_steps, mask_region, selection_grid
from monai_cidir.engines.export import (
    plot_alpha_curve,
    plot_lung_masks,
    write_alpha_curve,
    write_displacement_field,
    write_json,
    write_warped_image,
)
from monai_cidir.engines.options import RegistrationOptions, SelectionSettings, TrainingSettings
from monai_cidir.engines.model import RegistrationModel, iter_grid_chunks, load_registration_model, save_registration_model
from monai_cidir.engines.overview import plot_registration
from monai_cidir.engines.prealign import AffinePrealignment, fit_affine
from monai_cidir.engines.quality import assess_registration, prepare_lung_masks, registration_quality
from monai_cidir.engines.registration import (
    COHORT_COLUMNS,
    RegistrationFailed,
    TrainingProgressBar,
    collect_cohort_metrics,
    default_network,
    export_registration,
    format_summary_table,
    make_point_sampler,
    register_patient,
    run_cohort,
    write_cohort_table,
)
from monai_cidir.engines.selection import RegistrationExport, landmark_tre, model_prior, select_and_export, selection_evaluator
from monai_cidir.engines.trainer import AlphaPrior, CIDIRTrainer, build_lr_scheduler, build_optimizer, scale_initial_output
from monai_cidir.engines.workflow import CohortInferenceWorkflow, CohortTrainingWorkflow
from monai_cidir.losses.registration import REGULARIZER_SCALES

__all__ = [
    "AffinePrealignment",
    "AlphaCurve",
    "AlphaPrior",
    "AlphaSearch",
    "AlphaSelectionEvaluator",
    "CIDIRTrainer",
    "CohortInferenceWorkflow",
    "CohortTrainingWorkflow",
    "COHORT_COLUMNS",
    "REGULARIZER_SCALES",
    "RegistrationFailed",
    "RegistrationModel",
    "RegistrationExport",
    "RegistrationOptions",
    "SelectionSettings",
    "TrainingSettings",
    "TrainingProgressBar",
    "alpha_grid",
    "assess_registration",
    "build_lr_scheduler",
    "build_optimizer",
    "coarse_steps",
    "collect_cohort_metrics",
    "default_network",
    "export_registration",
    "fit_affine",
    "format_summary_table",
    "iter_grid_chunks",
    "landmark_tre",
    "load_registration_model",
    "make_point_sampler",
    "mask_region",
    "model_prior",
    "selection_grid",
    "plot_alpha_curve",
    "plot_lung_masks",
    "plot_registration",
    "prepare_lung_masks",
    "register_patient",
    "registration_quality",
    "run_cohort",
    "save_registration_model",
    "scale_initial_output",
    "select_and_export",
    "selection_evaluator",
    "write_alpha_curve",
    "write_cohort_table",
    "write_displacement_field",
    "write_json",
    "write_warped_image",
]
