"""The engines' keyword options, one owner per group: names, defaults and the checks that need no data.

* :class:`TrainingSettings`: what :class:`~monai_cidir.engines.CIDIRTrainer` does per step and for how
  long (its keyword options; the bundle's ``train#trainer#...`` keys).
* :class:`SelectionSettings`: how alpha is searched and scored (:func:`~monai_cidir.engines.selection_evaluator`).
* :class:`RegistrationOptions`: :func:`~monai_cidir.engines.register_patient`'s flat keyword options,
  the two groups above plus the network, loss, prior, masks, pre-alignment, outputs and run control.

Each is a dataclass whose constructor checks its values (``ValueError`` naming the option, what was
expected and what was found) and whose :meth:`~OptionGroup.from_keywords` turns a misspelt name into a
``TypeError`` with a suggestion, so a bad option stops a run before anything is trained or written.

Example::

    >>> RegistrationOptions.from_keywords({"max_iterations": 300, "num_alphas": 11}).num_points
    10000
    >>> RegistrationOptions.from_keywords({"num_alpha": 11})  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    TypeError: register_patient() got unexpected keyword argument(s) ['num_alpha'] ('num_alpha': did you mean 'num_alphas'?) ...
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from monai_cidir.engines.alphas import DEFAULT_DISTRIBUTION

__all__ = ["OptionGroup", "TrainingSettings", "SelectionSettings", "RegistrationOptions"]


class OptionGroup:
    """Mixin of the option dataclasses: building from keywords with did-you-mean errors, and back to a dict."""

    caller: ClassVar[str] = "the options"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{name: default}`` of every option."""
        return cls().as_dict()

    @classmethod
    def from_keywords(cls, given: Mapping[str, Any], extra: Sequence[str] = ()):
        """The options of ``given`` (defaults for the others).

        Args:
            given: option names and values.
            extra: further names the caller accepts beside these (only used for suggestions).

        Raises:
            TypeError: naming each unknown keyword, with the closest known name when there is one.
            ValueError: from the value checks.
        """
        known = cls.names()
        unknown = sorted(set(given) - set(known))
        if unknown:
            hints = {k: difflib.get_close_matches(k, [*known, *extra], n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {h[0]!r}?" for k, h in hints.items() if h)
            raise TypeError(
                f"{cls.caller} got unexpected keyword argument(s) {unknown}{' (' + hint + ')' if hint else ''}; "
                f"see monai_cidir.engines.{cls.__name__} for the options"
            )
        return cls(**given)

    def as_dict(self) -> dict[str, Any]:
        """``{name: value}`` (a shallow copy: factories and objects are kept as they are)."""
        return {name: getattr(self, name) for name in self.names()}


def positive_seconds(value, name: str = "time_budget_s") -> float | None:
    """``None``, or ``value`` as a positive finite number of seconds (``ValueError`` naming ``name``)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{name} must be a positive number of seconds or None, found {value!r}")
    return seconds


@dataclasses.dataclass
class TrainingSettings(OptionGroup):
    """What :class:`~monai_cidir.engines.CIDIRTrainer` does per step and for how long.

    Args:
        max_iterations: optimisation steps (paper: 50,000).
        num_points: points per step (paper: 10,000).
        regularization_points: evaluate the regularizer on only the first this-many points of each
            batch (``None``: all of them, the paper); the other points cost one plain forward pass.
            The regularizer is a Monte Carlo integral, so a subset estimates it without bias.
        derivatives: ``"forward"`` (exact forward-mode, default) or ``"autograd"`` (nested autograd).
        grad_clip: max gradient norm (``None`` disables clipping).
        lr_schedule: ``"cosine"``, ``"step"``, ``"constant"`` or a callable, see
            :func:`~monai_cidir.engines.trainer.build_lr_scheduler`.
        smoothing_mm: coarse to fine: Gaussian sigmas (mm) of both images for equal shares of the run,
            then the images as they are for the last share (e.g. ``(4, 2)``); ``None``: as they are.
        time_budget_s: stop after this many seconds of training (``None``: no limit); the learning-rate
            schedule runs on whichever of iterations and seconds is further along.
        iterations_per_epoch: Ignite epoch length (epoch events and logging cadence).
        max_epochs: Ignite's epoch count (MONAI's ``train#trainer#max_epochs``): at most
            ``max_epochs * iterations_per_epoch`` steps, never more than ``max_iterations``;
            ``None``: ``ceil(max_iterations / iterations_per_epoch)``.

    Raises:
        ValueError: for counts below their minimum, a non-positive time budget or sigma, or an
            unknown derivative mode.

    Example::

        >>> TrainingSettings(max_iterations=600, num_points=2000, regularization_points=500).epoch_length
        100
    """

    caller: ClassVar[str] = "CIDIRTrainer()"

    max_iterations: int = 1000
    num_points: int = 10000
    regularization_points: int | None = 2000
    derivatives: str = "forward"
    grad_clip: float | None = 1.0
    lr_schedule: str | Callable | None = "cosine"
    smoothing_mm: Sequence[float] | None = None
    time_budget_s: float | None = None
    iterations_per_epoch: int = 100
    max_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.max_iterations < 1 or self.num_points < 2:
            raise ValueError(f"expected max_iterations >= 1 and num_points >= 2, found {self.max_iterations}, {self.num_points}")
        if self.max_epochs is not None and int(self.max_epochs) < 1:
            raise ValueError(f"max_epochs must be >= 1 or None, found {self.max_epochs}")
        if self.regularization_points is not None and int(self.regularization_points) < 2:
            raise ValueError(f"regularization_points must be >= 2 or None (every point), found {self.regularization_points}")
        if int(self.iterations_per_epoch) < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1, found {self.iterations_per_epoch}")
        if self.derivatives not in ("forward", "autograd"):
            raise ValueError(f"derivatives must be 'forward' or 'autograd', found {self.derivatives!r}")
        if any(not float(v) > 0 for v in self.smoothing_mm or ()):
            raise ValueError(f"smoothing_mm must hold positive sigmas (mm), found {self.smoothing_mm}")
        self.time_budget_s = positive_seconds(self.time_budget_s)

    @property
    def epoch_length(self) -> int:
        """Iterations per Ignite epoch (``iterations_per_epoch``, at most ``max_iterations``)."""
        return int(min(self.iterations_per_epoch, self.max_iterations))

    @property
    def total_iterations(self) -> int:
        """The steps the run takes: ``max_iterations``, capped by ``max_epochs`` epochs when given."""
        if self.max_epochs is None:
            return int(self.max_iterations)
        return min(int(self.max_iterations), int(self.max_epochs) * self.epoch_length)


@dataclasses.dataclass
class SelectionSettings(OptionGroup):
    """How alpha is searched and scored after training (:func:`~monai_cidir.engines.selection_evaluator`).

    Args:
        num_alphas: alphas of the search's grid (``0``: no sweep, export at a given ``alpha``).
        golden_section_steps: golden-section refinement steps around the grid's best.
        no_folding: only alphas without folding compete.
        selection_mode: ``"warp_mask"`` (warp the moving lung mask) or ``"segment"`` (segment the
            warped moving image).
        coarse_spacing_mm, coarse_factor: the selection grid, see
            :func:`~monai_cidir.engines.alpha_selection.selection_grid`.
        chunk_size: points per network call.

    Raises:
        ValueError: for an unknown mode or a negative or non-integer ``num_alphas``.

    Example::

        >>> SelectionSettings(num_alphas=11, selection_mode="segment").coarse_spacing_mm
        4.0
    """

    caller: ClassVar[str] = "selection_evaluator()"

    num_alphas: int = 21
    golden_section_steps: int = 0
    no_folding: bool = False
    selection_mode: str = "warp_mask"
    coarse_spacing_mm: float | None = 4.0
    coarse_factor: int | Sequence[int] | None = None
    chunk_size: int = 65536

    def __post_init__(self) -> None:
        if self.selection_mode not in ("warp_mask", "segment"):
            raise ValueError(f"selection_mode must be 'warp_mask' or 'segment', found {self.selection_mode!r}")
        n = self.num_alphas
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_alphas must be a whole number >= 0 (0: export at the given alpha), found {n!r}")


@dataclasses.dataclass
class RegistrationOptions(SelectionSettings, TrainingSettings):
    """:func:`~monai_cidir.engines.register_patient`'s keyword options: :class:`TrainingSettings` (passed
    to the trainer), :class:`SelectionSettings` (to the selection evaluator) and those below.

    Args:
        learning_rate: Adam's initial learning rate (used by the default optimizer).
        harmonizer_lr_factor: the harmonizer's learning rate relative to the main network's
            (:func:`~monai_cidir.engines.trainer.build_optimizer`; 1, the paper's setting: on the real
            lung pair a faster harmonizer lowered the lung NCC at small alpha, see README).
        init_output_scale: shrink the fresh network's output layer by this factor so training starts
            from ~zero displacement (``None``: keep the network's own initialisation).
        regularizer: ``"bending"``, ``"jacobian"``, ``"hyperelastic"``, a list or a weight mapping.
        regularizer_scales: overrides of :data:`~monai_cidir.losses.REGULARIZER_SCALES`.
        loss_balance: :class:`~monai_cidir.losses.RegistrationLoss` ``balance`` (``None``: the paper's sum).
            These three build the loss when ``register_patient`` gets no ``loss`` object.
        alpha_range: the prior's range (paper: (0, 1)): ``[low, high]`` for every weight, or one
            ``[low, high]`` per weight.
        alpha_distribution: ``"log-uniform"`` (default: log alpha uniform on [1e-5, 1], the selection
            grid 0 then log-spaced) or ``"uniform"`` (the paper).
        alpha_per_point: one alpha per point (default; converges faster, see README) or one per batch.
        affine_prealign: ``"auto"`` (fit, keep when it improves the NCC), ``True`` (always keep), ``False``.
        affine_kwargs: extra arguments of :func:`~monai_cidir.engines.prealign.fit_affine`.
        lung_mask_backend, lung_mask_kwargs: the lung masks computed when the pair has none (and the
            segmentation of ``selection_mode="segment"``), see
            :func:`~monai_cidir.engines.quality.prepare_lung_masks`.
        alpha: export at this fixed alpha instead of the selected one.
        export_images: write the displacement field and warped image.
        device: torch device.
        seed: seeds network initialisation, points and alphas.
        checkpoint_interval: iterations between resumable checkpoints.
        checkpoint_every_s: seconds between resumable checkpoints (``None``: by iterations only).
        overwrite: redo a patient whose ``metrics.json`` exists (otherwise it is skipped).
        resume: continue from ``checkpoint.pt`` when present.

    Example::

        >>> opts = RegistrationOptions.from_keywords({"max_iterations": 300, "selection_mode": "segment"})
        >>> {k: opts.as_dict()[k] for k in TrainingSettings.names()}["max_iterations"]
        300
    """

    caller: ClassVar[str] = "register_patient()"

    learning_rate: float = 1e-4
    harmonizer_lr_factor: float = 1.0
    init_output_scale: float | None = 0.01
    regularizer: str | Sequence[str] | Mapping[str, float] = "bending"
    regularizer_scales: Mapping[str, float] | None = None
    loss_balance: float | None = None
    alpha_range: Sequence = (0.0, 1.0)
    alpha_distribution: str | Sequence[str] = DEFAULT_DISTRIBUTION
    alpha_per_point: bool = True
    affine_prealign: bool | str = "auto"
    affine_kwargs: dict | None = None
    lung_mask_backend: str = "threshold"
    lung_mask_kwargs: dict | None = None
    alpha: float | Sequence[float] | None = None
    export_images: bool = True
    device: Any = "cpu"
    seed: int = 0
    checkpoint_interval: int = 500
    checkpoint_every_s: float | None = 60.0
    overwrite: bool = False
    resume: bool = True

    def __post_init__(self) -> None:
        TrainingSettings.__post_init__(self)
        SelectionSettings.__post_init__(self)
