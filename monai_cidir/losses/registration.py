"""The cIDIR training loss as one object: image similarity plus named, alpha-weighted regularizers.

::

    loss(alpha) = similarity(fixed(p), moving(phi(p, alpha))) + sum_r lambda_r(alpha) * R_r(u)
    lambda_r(alpha) = alpha_r * scale_r * weight_r

``alpha_r`` is the one alpha of the point or batch (``conditioning="shared"``, the paper) or its
``r``-th column (``conditioning="per_regularizer"``: one weight per regularizer, in the order of
:attr:`RegistrationLoss.names`). The regularizers see the displacement's derivatives in
millimetres, so a lambda means the same for every voxel size.

Regularizer scales (:data:`REGULARIZER_SCALES`). Bending (the default regularizer) was re-derived
on the realistic cases of ``benchmarks/compare.py`` (real CT, sliding, density change, 15-25 mm
diaphragm motion, rigid offset; :func:`monai_cidir.data.make_realistic_pair`) with
``benchmarks/conditioning.py``: networks trained at one lambda each (IDIR mode, 300 iterations x
2000 points) reach their best TRE at lambda ~100-1000 (real_r0: 0.28 / 0.26 / 0.19 / 0.25 / 0.48 mm
at lambda 0 / 1e2 / 1e3 / 1e4 / 1e5; real_r3: 0.11 / 0.08 / 0.10 mm at 0 / 1e2 / 1e3). The former
scale 1e5, calibrated on smooth synthetic motion, put almost the whole prior beyond that. With 3e3,
alpha in [0, 1] spans lambda 0-3000. The Jacobian (5) and hyperelastic (50) scales are the earlier
calibration (``benchmarks/alpha_scales.py``, smooth motion on the real chest CT); bending energy
leaves affine-like fields free, so its scale is much larger than those of the terms that penalise
any local volume change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from monai_cidir.losses.image_dissimilarity import GlobalNCCLoss
from monai_cidir.losses.regularization import BendingEnergyRegularizer, HyperelasticRegularizer, JacobianRegularizer

__all__ = ["REGULARIZER_SCALES", "REGULARIZERS", "RegistrationLoss", "regularizer_spec"]

#: lambda(alpha) = alpha * scale: the per-regularizer scale (see the module docstring).
REGULARIZER_SCALES: dict[str, float] = {"bending": 3e3, "jacobian": 5.0, "hyperelastic": 50.0}

#: name -> (regularizer class, derivative it takes: 1 Jacobian, 2 Hessian).
REGULARIZERS: dict[str, tuple[type[nn.Module], int]] = {
    "bending": (BendingEnergyRegularizer, 2),
    "jacobian": (JacobianRegularizer, 1),
    "hyperelastic": (HyperelasticRegularizer, 1),
}

_CONDITIONING = ("shared", "per_regularizer")


def regularizer_spec(regularizer: str | Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """A regularizer specification as ``{name: weight}``, names checked.

    Args:
        regularizer: ``"bending"``, ``"jacobian"``, ``"hyperelastic"``, a list of those (a sum), or a
            mapping name -> weight (a weighted sum; each weight multiplies the scale).

    Raises:
        ValueError: for an unknown name, an empty specification or a negative weight.
    """
    if isinstance(regularizer, str):
        spec = {regularizer: 1.0}
    elif isinstance(regularizer, Mapping):
        spec = {str(k): float(v) for k, v in regularizer.items()}
    else:
        spec = {str(k): 1.0 for k in regularizer}
    if not spec:
        raise ValueError(f"expected at least one regularizer out of {sorted(REGULARIZERS)}, found {regularizer!r}")
    for name, weight in spec.items():
        if name not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {name!r}: expected one of {sorted(REGULARIZERS)}")
        if not weight >= 0:
            raise ValueError(f"regularizer weights must be >= 0, found {name}: {weight}")
    return spec


class RegistrationLoss(nn.Module):
    """cIDIR's loss: a point similarity plus named regularizers, each weighted by ``lambda_r(alpha)``.

    It owns the map from alpha to the regularization weights, so the trainer, the benchmarks and
    user code compute the same loss. :meth:`forward` returns every term (for logging) and the total.

    Args:
        regularizer: see :func:`regularizer_spec` (default ``"bending"``).
        scales: overrides of :data:`REGULARIZER_SCALES` (``{name: scale}``).
        similarity: ``f(fixed_values, moving_values) -> scalar`` to minimise (default
            :class:`~monai_cidir.losses.GlobalNCCLoss`, i.e. -NCC).
        conditioning: ``"shared"`` (one alpha weights every regularizer, the paper) or
            ``"per_regularizer"`` (alpha has one column per regularizer, in the order of :attr:`names`).
        regularizer_kwargs: optional ``{name: kwargs}`` for the regularizers' constructors (e.g.
            ``{"hyperelastic": {"alpha_volume": 2.0}}``).
        balance: ``None`` (the paper's sum) or ``lambda_ref > 0``: each point's share of the loss is
            divided by ``1 + lambda(alpha) / lambda_ref`` (``lambda`` summed over the regularizers),
            i.e. its similarity gradient is weighted by ``s = lambda_ref / (lambda_ref + lambda)`` and
            its regularizer by ``s * lambda``. For one alpha this only rescales the loss (the same
            optimum); over a prior it keeps the strongly regularised alphas from dominating the
            shared network's gradients (bounded by ``lambda_ref``), as HyperMorph's
            ``(1 - t) sim + t reg`` does. The reported ``similarity`` keeps its unweighted value.

    Raises:
        ValueError: for an unknown regularizer, conditioning, scale name or a negative scale.

    Example::

        >>> loss = RegistrationLoss("bending")
        >>> jac, hess = torch.zeros(8, 3, 3), torch.zeros(8, 3, 3, 3)
        >>> hess[:, 0, 0, 1] = hess[:, 0, 1, 0] = 1e-3
        >>> terms = loss(torch.rand(8), torch.rand(8), jac, hess, alpha=torch.tensor([0.5]))
        >>> sorted(terms)
        ['loss', 'reg_bending', 'regularization', 'similarity']
        >>> float(terms["reg_bending"])  # 0.5 * 3e3 * 2e-6
        0.003
    """

    def __init__(
        self,
        regularizer: str | Sequence[str] | Mapping[str, float] = "bending",
        scales: Mapping[str, float] | None = None,
        similarity: nn.Module | None = None,
        conditioning: str = "shared",
        regularizer_kwargs: Mapping[str, Mapping] | None = None,
        balance: float | None = None,
    ) -> None:
        super().__init__()
        if conditioning not in _CONDITIONING:
            raise ValueError(f"conditioning must be one of {_CONDITIONING}, found {conditioning!r}")
        self.spec = regularizer_spec(regularizer)
        table = dict(REGULARIZER_SCALES)
        for name, value in (scales or {}).items():
            if name not in REGULARIZERS:
                raise ValueError(f"regularizer_scales has an unknown name {name!r}: expected some of {sorted(REGULARIZERS)}")
            if not float(value) >= 0:
                raise ValueError(f"regularizer scales must be >= 0, found {name}: {value}")
            table[name] = float(value)
        kwargs = dict(regularizer_kwargs or {})
        unknown = sorted(set(kwargs) - set(self.spec))
        if unknown:
            raise ValueError(f"regularizer_kwargs names {unknown}, which are not among the regularizers {list(self.spec)}")
        self.conditioning = conditioning
        if balance is not None and not float(balance) > 0:
            raise ValueError(f"balance must be a positive reference lambda or None, found {balance}")
        self.balance = None if balance is None else float(balance)
        self.similarity = GlobalNCCLoss() if similarity is None else similarity
        self.regularizers = nn.ModuleDict({name: REGULARIZERS[name][0](**kwargs.get(name, {})) for name in self.spec})
        #: lambda_r(alpha) = alpha_r * scales[r] (the weight of the specification included)
        self.scales = {name: table[name] * weight for name, weight in self.spec.items()}

    def extra_repr(self) -> str:
        """The specification, scales, conditioning and balance (``repr`` identifies the loss in ``settings.json``)."""
        return f"spec={self.spec}, scales={self.scales}, conditioning={self.conditioning!r}, balance={self.balance}"

    @property
    def names(self) -> list[str]:
        """The regularizers' names, in order (the column order of a per-regularizer alpha)."""
        return list(self.spec)

    @property
    def cond_features(self) -> int:
        """How many alpha values condition the network: 1 (shared) or one per regularizer."""
        return 1 if self.conditioning == "shared" else len(self.spec)

    @property
    def order(self) -> int:
        """The highest derivative order the regularizers need (1: Jacobian, 2: also the Hessian)."""
        return max(REGULARIZERS[name][1] for name in self.spec)

    def lambdas(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: lambda_r}``: a 0-d tensor for one alpha, or ``(N,)`` for one alpha per point.

        Args:
            alpha: ``(1,)``/``(1, K)`` (one for the batch) or ``(N, K)`` (per point); ``K`` is
                :attr:`cond_features`.

        Raises:
            ValueError: when alpha's last dimension does not match :attr:`cond_features`.
        """
        alpha = torch.as_tensor(alpha)
        k = self.cond_features
        last = alpha.shape[-1] if alpha.ndim else 1
        rows = alpha.reshape(-1, k) if alpha.numel() % k == 0 and (k == 1 or last == k) else None
        if rows is None or (alpha.ndim == 2 and alpha.shape[1] != k):
            raise ValueError(f"alpha must have {k} value(s) per row ({self.conditioning} conditioning of {self.names}), found shape {tuple(alpha.shape)}")
        out = {}
        for i, name in enumerate(self.spec):
            column = rows[:, 0 if k == 1 else i] * self.scales[name]
            out[name] = column.reshape(()) if rows.shape[0] == 1 else column
        return out

    def shares(self, lambdas: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Each point's loss share ``lambda_ref / (lambda_ref + sum_r lambda_r)`` (``None`` without ``balance``)."""
        if self.balance is None:
            return None
        return self.balance / (self.balance + sum(lambdas.values()))

    def regularization(
        self, jacobian: torch.Tensor | None, hessian: torch.Tensor | None, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(sum_r lambda_r R_r, {"reg_<name>": lambda_r R_r})`` from derivatives in millimetres.

        Args:
            jacobian: displacement Jacobians ``(N, 3, 3)`` (1/1).
            hessian: displacement Hessians ``(N, 3, 3, 3)`` (1/mm), needed when :attr:`order` is 2.
            alpha: see :meth:`lambdas`; with a per-point alpha the derivatives are those of its
                first rows (all of them, or fewer when the regularizers see a subset of the points).
        """
        lambdas = self.lambdas(alpha)
        return self._regularization(jacobian, hessian, lambdas, self.shares(lambdas))

    def _regularization(self, jacobian, hessian, lambdas: Mapping[str, torch.Tensor], share: torch.Tensor | None):
        total = None
        parts: dict[str, torch.Tensor] = {}
        for name, lam in lambdas.items():
            if share is not None:
                lam = lam * share
            deriv = hessian if REGULARIZERS[name][1] == 2 else jacobian
            if deriv is None:
                raise ValueError(f"the {name} regularizer needs the {'Hessian' if REGULARIZERS[name][1] == 2 else 'Jacobian'}, found None")
            reg = self.regularizers[name]
            term = lam * reg(deriv) if lam.ndim == 0 else reg(deriv, weight=lam[: deriv.shape[0]])
            parts[f"reg_{name}"] = term
            total = term if total is None else total + term
        return total, parts

    def forward(
        self,
        fixed_values: torch.Tensor,
        moving_values: torch.Tensor,
        jacobian: torch.Tensor | None,
        hessian: torch.Tensor | None,
        alpha: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Every term and the total.

        Args:
            fixed_values: fixed-image intensities at the points ``(N,)``.
            moving_values: moving-image intensities at the transformed points ``(N,)``.
            jacobian, hessian: the displacement's derivatives in mm (see :meth:`regularization`);
                the regularizers may use only the first rows (fewer than N points).
            alpha: see :meth:`lambdas`.

        Returns:
            ``{"loss", "similarity", "regularization", "reg_<name>"...}``, 0-d tensors.
        """
        fixed_values, moving_values = fixed_values.reshape(-1), moving_values.reshape(-1)
        similarity = self.similarity(fixed_values, moving_values)
        lambdas = self.lambdas(alpha)
        share = self.shares(lambdas)
        regularization, parts = self._regularization(jacobian, hessian, lambdas, share)
        if share is None:
            return {"loss": similarity + regularization, "similarity": similarity, "regularization": regularization, **parts}
        if share.ndim == 0:  # one alpha: the whole similarity term is scaled
            weighted = share * similarity
        else:  # per point: same value, gradient through each moving value scaled by its share
            s = share.reshape(-1).to(moving_values.dtype)
            if s.numel() != moving_values.numel():
                raise ValueError(f"balance with per-point alpha needs one alpha per similarity point: {s.numel()} vs {moving_values.numel()}")
            weighted = self.similarity(fixed_values, moving_values * s + moving_values.detach() * (1 - s))
        return {"loss": weighted + regularization, "similarity": similarity, "regularization": regularization, **parts}
