"""Networks of cIDIR: the conditioned INR, its harmonizer, the SIREN baseline and their exact derivatives.

* :class:`ConditionedINR`: the main network, activation ``a*sin(b*omega_0*z + c) + d`` with
  ``(a, b, c, d)`` from a :class:`Harmonizer` fed with alpha.
* :class:`SirenINR`: the unconditioned IDIR network.
* ``forward_with_derivatives(coords, alpha, order)`` on both: exact Jacobian and Hessian in
  closed form, no nested autograd (:mod:`monai_cidir.networks.forward_mode`).
* :func:`autograd_derivatives`: the same triple by nested ``torch.autograd.grad`` (reference/baseline).
"""

from __future__ import annotations

from monai_cidir.networks.autograd_derivatives import autograd_derivatives
from monai_cidir.networks.harmonizer import Harmonizer
from monai_cidir.networks.inr import ConditionedINR, SirenINR

__all__ = ["ConditionedINR", "Harmonizer", "SirenINR", "autograd_derivatives"]
