"""The cIDIR loss (:class:`RegistrationLoss`), its similarity and regularisation terms (MONAI ``_Loss`` style) and their functional core."""

from __future__ import annotations

from monai_cidir.losses import functional as _functional
from monai_cidir.losses.functional import (
    bending_energy,
    cofactor_matrix,
    deformation_gradient,
    determinant_3x3,
    global_ncc,
    hyperelastic_energy,
    hyperelastic_terms,
    jacobian_determinant,
    jacobian_penalty,
    smooth_clamp_determinant,
    weighted_reduction,
)
from monai_cidir.losses.image_dissimilarity import GlobalNCCLoss
from monai_cidir.losses.registration import REGULARIZER_SCALES, REGULARIZERS, RegistrationLoss, regularizer_spec
from monai_cidir.losses.regularization import (
    BendingEnergyRegularizer,
    HyperelasticRegularizer,
    JacobianRegularizer,
)

__all__ = [
    "RegistrationLoss",
    "REGULARIZER_SCALES",
    "REGULARIZERS",
    "regularizer_spec",
    "GlobalNCCLoss",
    "BendingEnergyRegularizer",
    "JacobianRegularizer",
    "HyperelasticRegularizer",
    *_functional.__all__,  # the functional core, re-exported as listed there
]
