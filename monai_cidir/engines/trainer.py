"""Per-patient cIDIR training as a MONAI/Ignite workflow.

Each iteration draws ``num_points`` world points in the fixed lung mask and an alpha from
the prior, and minimises::

    loss = -NCC(fixed(p), moving(phi(p, alpha))) + sum_r lambda_r(alpha) * R_r(u)
    lambda_r(alpha) = alpha * scale_r * weight_r

with ``phi`` the :class:`~monai_cidir.engines.model.RegistrationModel` transform (affine
pre-alignment + INR residual) and ``R_r`` the bending-energy, Jacobian or hyperelastic
regularizer of :mod:`monai_cidir.losses`, evaluated on the INR residual's derivatives in
millimetres (Jacobian unchanged, Hessian / scale).

Regularizer scales and lambda(alpha) are owned by :class:`~monai_cidir.losses.RegistrationLoss`
(:data:`~monai_cidir.losses.REGULARIZER_SCALES`, calibration in :mod:`monai_cidir.losses.registration`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.utils import convert_to_tensor
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.handlers import LrScheduleHandler
from monai.inferers import SimpleInferer

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.engines import alphas
from monai_cidir.engines.alphas import alpha_grid, weight_ranges
from monai_cidir.engines.model import RegistrationModel
from monai_cidir.engines.options import TrainingSettings
from monai_cidir.losses.registration import RegistrationLoss

logger = logging.getLogger(__name__)

__all__ = [
    "AlphaPrior",
    "CIDIRTrainer",
    "PointStream",
    "build_lr_scheduler",
    "scale_initial_output",
    "build_optimizer",
]


class AlphaPrior:
    """The prior alpha is drawn from during training (and the grid alpha selection sweeps).

    One alpha (the paper), or a vector of ``K`` weights, one per regularizer (the loss's
    ``conditioning="per_regularizer"``), each drawn independently from its own range and
    distribution.

    Args:
        low: lower end of the range (paper: 0); one value, or one per weight.
        high: upper end of the range (paper: 1); one value, or one per weight. ``high == low``
            trains at that one alpha, as IDIR does (IDIR's default: 0.5 for the SIREN baseline of
            the benchmark).
        distribution: ``"uniform"`` (paper) or ``"log-uniform"`` (uniform in log alpha on
            ``[max(low, log_floor), high]``); one name, or one per weight.
        per_point: draw one alpha per point (one batch then covers the whole prior) instead
            of one per batch.
        log_floor: lower end used by the log-uniform prior when ``low`` is 0 (``None``: the module
            default :data:`~monai_cidir.engines.alphas.LOG_FLOOR`, 1e-5).
        num_weights: ``K``; default: the length of the longest of ``low``, ``high`` and
            ``distribution`` given as a list, else 1.

    Raises:
        ValueError: for an unknown distribution, a range with ``low > high`` or ``low < 0``, or lists
            whose lengths disagree with ``num_weights``.

    Example::

        >>> prior = AlphaPrior(0.0, 1.0, per_point=True)
        >>> prior.sample(4, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 1])
        >>> AlphaPrior(0.0, [1.0, 0.5], "log-uniform", per_point=True).sample(4).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        low: float | Sequence[float] = 0.0,
        high: float | Sequence[float] = 1.0,
        distribution: str | Sequence[str] = "uniform",
        per_point: bool = False,
        log_floor: float | None = None,
        num_weights: int | None = None,
    ) -> None:
        given = [v for v in (low, high, distribution) if not isinstance(v, (str, int, float))]
        k = int(num_weights) if num_weights is not None else max([len(v) for v in given], default=1)
        if k < 1:
            raise ValueError(f"num_weights must be >= 1, found {num_weights}")
        lows, highs, dists = (_per_weight(v, k, name) for v, name in ((low, "low"), (high, "high"), (distribution, "distribution")))
        for i, (lo, hi, dist) in enumerate(zip(lows, highs, dists)):
            where = "" if k == 1 else f" (weight {i})"
            if dist not in ("uniform", "log-uniform"):
                raise ValueError(f"distribution must be 'uniform' or 'log-uniform'{where}, found {dist!r}")
            if not float(hi) >= float(lo) or float(lo) < 0:
                raise ValueError(f"expected 0 <= low <= high{where}, found low={lo}, high={hi}")
        self.num_weights = k
        self.lows, self.highs = [float(v) for v in lows], [float(v) for v in highs]
        self.distributions = [str(v) for v in dists]
        self.per_point = bool(per_point)
        self.log_floor = float(alphas.LOG_FLOOR if log_floor is None else log_floor)

    @property
    def low(self) -> float:
        """The first weight's lower end (the whole prior's when K = 1)."""
        return self.lows[0]

    @property
    def high(self) -> float:
        """The first weight's upper end."""
        return self.highs[0]

    @property
    def distribution(self) -> str:
        """The first weight's distribution."""
        return self.distributions[0]

    @property
    def range(self) -> tuple[float, float]:
        """``(low, high)`` of the first weight."""
        return self.low, self.high

    def grid(self, num: int) -> list[float]:
        """``num`` alphas spaced as this prior samples them (the first weight's): the alpha
        selection's grid (:func:`~monai_cidir.engines.alpha_selection.alpha_grid`)."""
        return alpha_grid(self.low, self.high, num, self.distribution, self.log_floor)

    def axis_grids(self, num: int) -> list[list[float]]:
        """One grid of ``num`` values per weight, each spaced as that weight is sampled."""
        return [alpha_grid(lo, hi, num, d, self.log_floor) for lo, hi, d in zip(self.lows, self.highs, self.distributions)]

    def state_dict(self) -> dict:
        """Plain data that rebuilds the prior (``AlphaPrior(**state)``), as stored in ``model.pt``."""
        one = self.num_weights == 1
        return {
            "low": self.low if one else list(self.lows),
            "high": self.high if one else list(self.highs),
            "distribution": self.distribution if one else list(self.distributions),
            "per_point": self.per_point,
            "log_floor": self.log_floor,
            "num_weights": self.num_weights,
        }

    def _transform(self, r: torch.Tensor, i: int) -> torch.Tensor:
        lo, hi = self.lows[i], self.highs[i]
        if self.distributions[i] == "uniform" or hi <= self.log_floor:
            return lo + (hi - lo) * r
        floor = math.log(max(lo, self.log_floor))
        return torch.exp(floor + (math.log(hi) - floor) * r)

    def sample(self, num_points: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(1,)`` (one per batch) or ``(num_points, 1)`` (per point) alphas; ``(1, K)`` or
        ``(num_points, K)`` for ``K > 1`` weights."""
        n = num_points if self.per_point else 1
        if self.num_weights == 1:
            a = self._transform(torch.rand(n, generator=generator, dtype=torch.float64), 0).float()
            return a.reshape(n, 1) if self.per_point else a.reshape(1)
        r = torch.rand(n, self.num_weights, generator=generator, dtype=torch.float64)
        return torch.stack([self._transform(r[:, i], i) for i in range(self.num_weights)], dim=1).float()


def _check_weight_counts(network: torch.nn.Module, loss: RegistrationLoss, prior: AlphaPrior) -> None:
    """The network, the loss and the prior must agree on how many weights alpha has.

    Raises:
        ValueError: naming the three counts and how to make them agree.
    """
    net_k = int(getattr(network, "cond_features", loss.cond_features))  # a plain SIREN takes any alpha and ignores it
    if not net_k == loss.cond_features == prior.num_weights:
        raise ValueError(
            f"alpha has {loss.cond_features} weight(s) in the loss ({loss.conditioning} conditioning of {loss.names}), "
            f"{prior.num_weights} in the prior and {net_k} in the network (cond_features): they must agree. For one weight "
            "per regularizer use ConditionedINR(cond_features=len(regularizers)) and an AlphaPrior with that many weights."
        )


def _per_weight(value, k: int, name: str) -> list:
    """``value`` repeated ``k`` times, or the given list when it has ``k`` entries."""
    if isinstance(value, (str, int, float)):
        return [value] * k
    values = list(value)
    if len(values) != k:
        raise ValueError(f"{name} has {len(values)} entries for {k} weights: expected one value or {k}, found {value!r}")
    return values


def _smooth(image: torch.Tensor, mapping: CoordinateMapping, sigma_mm: float) -> torch.Tensor:
    """Gaussian smoothing with a sigma given in mm (per axis in voxels: sigma / spacing)."""
    from monai.transforms import GaussianSmooth

    sigma = [sigma_mm / float(sp) for sp in mapping.spacing]
    return torch.as_tensor(GaussianSmooth(sigma=sigma)(image.reshape(1, *image.shape[-3:]))).reshape(image.shape).to(image.dtype)


def build_lr_scheduler(
    schedule: str | Callable | None,
    optimizer: torch.optim.Optimizer,
    max_iterations: int,
    min_factor: float = 0.05,
    progress: Callable[[int], float] | None = None,
):
    """Learning-rate schedule, stepped once per iteration.

    Args:
        schedule: ``"cosine"`` (cosine annealing to ``min_factor`` x the initial rate),
            ``"step"`` (x0.3 at 60% and 85% of the run), ``"constant"``/``None``, or a callable
            ``f(optimizer) -> scheduler``.
        optimizer: the optimizer.
        max_iterations: the run's length.
        min_factor: final rate of the cosine schedule relative to the initial one.
        progress: ``f(iteration) -> fraction of the run done`` (default ``iteration / max_iterations``;
            the trainer passes one that also counts a time budget).

    Returns:
        a ``torch.optim.lr_scheduler`` object or ``None``.
    """
    if schedule is None or schedule == "constant":
        return None
    if callable(schedule):
        return schedule(optimizer)
    if progress is None:
        progress = lambda it: min(it, max_iterations) / max(1, max_iterations)  # noqa: E731
    if schedule == "cosine":
        factor = lambda it: min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress(it))))  # noqa: E731
    elif schedule == "step":
        factor = lambda it: 0.3 ** ((progress(it) >= 0.6) + (progress(it) >= 0.85))  # noqa: E731
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: expected 'cosine', 'step', 'constant' or a callable")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(
    network: torch.nn.Module,
    optimizer: Callable | None = None,
    learning_rate: float = 1e-4,
    harmonizer_lr_factor: float = 1.0,
) -> torch.optim.Optimizer:
    """The optimizer of one patient's network, with the harmonizer in its own parameter group.

    Args:
        network: the fresh INR.
        optimizer: a factory ``f(params_or_groups) -> optimizer`` (e.g. ``partial(torch.optim.Adam, lr=1e-4)``);
            default ``torch.optim.Adam(..., lr=learning_rate)``.
        learning_rate: the default optimizer's rate.
        harmonizer_lr_factor: the harmonizer's rate relative to the main network's. The harmonizer
            starts with a zero output layer (every alpha gives a plain SIREN), so with the main
            network's rate its alpha dependence develops only over tens of thousands of steps;
            a larger factor lets it develop within a short CPU run (see README's numbers).

    Returns:
        the optimizer.
    """
    harmonizer = getattr(network, "harmonizer", None)
    if harmonizer is None or harmonizer_lr_factor == 1.0:
        groups = [{"params": list(network.parameters())}]
    else:
        h_ids = {id(p) for p in harmonizer.parameters()}
        groups = [
            {"params": [p for p in network.parameters() if id(p) not in h_ids]},
            {"params": list(harmonizer.parameters()), "harmonizer": True},
        ]
    opt = optimizer(groups) if optimizer is not None else torch.optim.Adam(groups, lr=learning_rate)
    for g in opt.param_groups:
        if g.get("harmonizer"):
            g["lr"] = g["lr"] * float(harmonizer_lr_factor)
            g["initial_lr"] = g["lr"]
    return opt


@torch.no_grad()
def scale_initial_output(network: torch.nn.Module, factor: float | None) -> torch.nn.Module:
    """Shrink a fresh INR's output layer so that training starts from (almost) zero displacement.

    With SIREN initialisation the paper-size network's initial output is about 0.04 normalised
    units, i.e. 5-10 mm of random displacement on a chest CT: it undoes the affine pre-alignment
    and costs the first training seconds to unlearn. Multiplying the output layer's weights by
    ``factor`` (default 0.01 in :func:`~monai_cidir.engines.register_patient`) removes it;
    measured on the phantom (benchmarks/training.py) this reaches a given TRE several times sooner.

    Args:
        network: an INR whose ``layers[-1]`` is its linear output layer (ConditionedINR, SirenINR).
        factor: the weight multiplier (``None`` or 1: unchanged).

    Returns:
        the same network.

    Raises:
        TypeError: when the network has no linear ``layers[-1]``.
    """
    if factor is None or factor == 1:
        return network
    layers = getattr(network, "layers", None)
    last = layers[-1] if layers is not None and len(layers) else None
    if not isinstance(last, torch.nn.Linear):
        raise TypeError(
            f"init_output_scale needs a network whose layers[-1] is its nn.Linear output layer, "
            f"found {type(network).__name__}; pass init_output_scale=None for other networks"
        )
    last.weight.mul_(float(factor))
    return network


class PointStream:
    """Endless iterable of ``{"points": (N, 3)}`` batches from a point sampler (the trainer's data).

    Args:
        sampler: ``sampler(n) -> (n, 3)`` world points (mm) inside the fixed lung mask.
        num_points: points per batch.
    """

    def __init__(self, sampler: Callable[[int], torch.Tensor], num_points: int) -> None:
        self.sampler = sampler
        self.num_points = int(num_points)

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield {"points": self.sampler(self.num_points)}


class CIDIRTrainer(Trainer):
    """Per-patient cIDIR trainer (a MONAI ``Trainer``/Ignite engine).

    Every MONAI/Ignite handler attaches (StatsHandler, TensorBoardStatsHandler,
    CheckpointSaver, ignite ProgressBar); ``IterationEvents`` fire. ``engine.state.output``
    is a dict of floats: ``loss``, ``similarity`` (-NCC), ``regularization`` (the weighted
    sum), ``reg_<name>`` (each weighted term), ``alpha`` (mean of the drawn alphas), ``lr``.
    Use ``output_transform=lambda x: x["loss"]`` for StatsHandler.

    Args:
        network: a fresh INR (``ConditionedINR`` or ``SirenINR``).
        optimizer: its optimizer (e.g. Adam).
        fixed_image: fixed MetaTensor ``(1, X, Y, Z)``, RAS affine.
        moving_image: moving MetaTensor (its own grid).
        point_sampler: ``sampler(n) -> (n, 3)`` world points in the fixed lung mask.
        loss: the :class:`~monai_cidir.losses.RegistrationLoss` (similarity, regularizers, their
            scales and lambda(alpha)), or a regularizer specification it is built from
            (``"bending"``, ``["bending", "jacobian"]``, ``{"bending": 1.0, "jacobian": 0.5}``).
        alpha_prior: an :class:`AlphaPrior` (default uniform on [0, 1], one per batch).
        device: torch device.
        seed: seeds the alpha draws.
        handlers: MONAI/Ignite handlers to attach.
        inferer: how the training step calls the network (MONAI's ``Inferer`` protocol,
            ``inferer(points, network_fn, alpha, order=...)``; default ``SimpleInferer()``, one call
            per batch).
        settings: the :class:`~monai_cidir.engines.options.TrainingSettings` keywords, which own
            their defaults and checks: ``max_iterations`` (paper: 50,000), ``num_points`` (paper:
            10,000), ``regularization_points``, ``derivatives``, ``grad_clip``, ``lr_schedule``,
            ``smoothing_mm`` (coarse-to-fine image sigmas), ``time_budget_s`` (the learning-rate
            schedule then runs on whichever of iterations and seconds is further along),
            ``iterations_per_epoch`` and ``max_epochs`` (MONAI's ``train#trainer#max_epochs``: at
            most ``max_epochs * iterations_per_epoch`` steps). A misspelt one is a ``TypeError``
            naming the closest option. The run's settings are ``trainer.settings``.

    The affine pre-alignment is the model's: ``trainer.model.set_affine(matrix)`` (see
    :mod:`~monai_cidir.engines.prealign`).

    Checkpoints are a handler: attach a :class:`~monai_cidir.handlers.TrainingCheckpoint` to write a
    resumable ``checkpoint.pt`` (:meth:`checkpoint_state`); while one is attached, SIGINT / SIGTERM
    during :meth:`run` let the current iteration finish, write the checkpoint, and raise
    ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(143)`` (SIGTERM).

    Example::

        >>> trainer = CIDIRTrainer(ConditionedINR(), opt, fixed, moving, sampler, max_iterations=500)
        >>> StatsHandler(output_transform=lambda x: x["loss"]).attach(trainer)
        >>> trainer.run()
        >>> moved = trainer.model.transform_points(landmarks, alpha=0.3)
    """

    keyword_options = TrainingSettings  # what ``**settings`` accepts (the bundle's command-line check reads it)

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        fixed_image: torch.Tensor,
        moving_image: torch.Tensor,
        point_sampler: Callable[[int], torch.Tensor],
        loss: RegistrationLoss | str | Sequence[str] | Mapping[str, float] = "bending",
        alpha_prior: AlphaPrior | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        handlers: Sequence | None = None,
        inferer: Callable | None = None,
        **settings: Any,
    ) -> None:
        self.settings = TrainingSettings.from_keywords(settings)
        super().__init__(
            device=torch.device(device),
            max_epochs=int(math.ceil(self.settings.total_iterations / self.settings.epoch_length)),
            data_loader=PointStream(point_sampler, self.settings.num_points),
            epoch_length=self.settings.epoch_length,
            decollate=False,
            handlers=None,
        )
        self.max_iterations = self.settings.total_iterations
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.network = network.to(self.state.device)
        self.optimizer = optimizer
        self.fixed_mapping = CoordinateMapping.from_image(fixed_image)
        self.moving_mapping = CoordinateMapping.from_image(moving_image)
        self.model = RegistrationModel(self.network, self.fixed_mapping, derivatives=self.settings.derivatives)
        as_plain = lambda x: convert_to_tensor(x, track_meta=False).float()  # noqa: E731
        self.fixed = as_plain(fixed_image).to(self.state.device)
        self.moving = as_plain(moving_image).to(self.state.device)
        self.smoothing_mm = [float(v) for v in (self.settings.smoothing_mm or [])]
        self._levels = self._image_levels()
        self.point_sampler = point_sampler
        self.num_points = int(self.settings.num_points)
        self.loss_function = loss if isinstance(loss, RegistrationLoss) else RegistrationLoss(loss)
        self.loss_function.to(self.state.device)
        self.alpha_prior = alpha_prior or AlphaPrior(num_weights=self.loss_function.cond_features)
        _check_weight_counts(self.network, self.loss_function, self.alpha_prior)
        self.time_budget_s = self.settings.time_budget_s
        self.seconds_spent = 0.0  # training seconds of earlier (resumed) runs
        self._run_start: float | None = None
        self.stopped_by_time_budget = False
        self.lr_scheduler = build_lr_scheduler(self.settings.lr_schedule, optimizer, self.max_iterations, progress=self.progress)
        self.grad_clip = self.settings.grad_clip
        self.regularization_points = self.settings.regularization_points
        self.generator = torch.Generator().manual_seed(int(seed))
        self.checkpoint = None  # a TrainingCheckpoint attached to this trainer (it sets this)
        self.signal_caught: int | None = None

        if self.lr_scheduler is not None:  # stepped once per iteration, before the checkpoint handlers save it
            LrScheduleHandler(self.lr_scheduler, print_lr=False, epoch_level=False).attach(self)

        @self.on(Events.STARTED)
        def _start_clock(engine: Engine) -> None:
            self._run_start = time.perf_counter()

        @self.on(Events.ITERATION_COMPLETED)
        def _stop_at_max_iterations(engine: Engine) -> None:
            if engine.state.iteration >= self.max_iterations:
                engine.terminate()
            elif self.time_budget_s is not None and self.training_seconds >= self.time_budget_s:
                self.stopped_by_time_budget = True
                engine.terminate()

        if handlers is not None:
            self._register_handlers(handlers)

    def _image_levels(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fixed, moving) per stage of the coarse-to-fine schedule: smoothed by each sigma, then as they are."""
        smoothed = [(_smooth(self.fixed, self.fixed_mapping, v), _smooth(self.moving, self.moving_mapping, v)) for v in self.smoothing_mm]
        return smoothed + [(self.fixed, self.moving)]

    @property
    def training_seconds(self) -> float:
        """Seconds of training so far, earlier (resumed) runs included."""
        running = 0.0 if self._run_start is None else time.perf_counter() - self._run_start
        return self.seconds_spent + running

    def progress(self, iteration: int | None = None) -> float:
        """Fraction of the run done: iterations, or the time budget when that is further along."""
        it = self.state.iteration if iteration is None else iteration
        done = min(it, self.max_iterations) / self.max_iterations
        if self.time_budget_s is not None:
            done = max(done, self.training_seconds / self.time_budget_s)
        return min(1.0, done)

    # ------------------------------------------------------------------ one step
    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, float]:
        points = torch.as_tensor(batchdata["points"]).to(device=self.state.device, dtype=torch.float32)
        n = points.shape[0]
        alpha = self.alpha_prior.sample(n, self.generator).to(self.state.device)
        nr = n if self.regularization_points is None else min(int(self.regularization_points), n)
        self.network.train()
        alpha_r = alpha if alpha.numel() == 1 else alpha[:nr]
        moved, jac, hess = self.inferer(points[:nr], self.model.forward_with_derivatives, alpha_r, order=self.loss_function.order)
        if nr < n:
            rest = self.inferer(points[nr:], self.model, alpha if alpha.numel() == 1 else alpha[nr:])
            moved = torch.cat([moved, rest])
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        fixed_image, moving_image = self._levels[min(len(self._levels) - 1, int(self.progress() * len(self._levels)))]
        with torch.no_grad():
            fixed_values = self.fixed_mapping.sample(fixed_image, points)
        moving_values = self.moving_mapping.sample(moving_image, moved)
        terms = self.loss_function(fixed_values, moving_values, jac, hess, alpha)
        loss, similarity, regularization = terms["loss"], terms["similarity"], terms["regularization"]
        parts = {k: float(v.detach()) for k, v in terms.items() if k.startswith("reg_")}
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"non-finite training loss at iteration {engine.state.iteration}: similarity {float(similarity):.4g}, "
                f"regularization {float(regularization):.4g} ({', '.join(f'{k} {v:.4g}' for k, v in parts.items())}). "
                "Check the images for NaN/inf voxels; if they are finite, lower learning_rate or the regularizer scale."
            )
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step (LrScheduleHandler steps it after)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {
            "loss": float(loss.detach()),
            "similarity": float(similarity.detach()),
            "regularization": float(regularization.detach()),
            **parts,
            "alpha": float(alpha.mean()),
            "lr": float(lr),
        }

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        """Everything needed to resume: network, optimizer, scheduler, affine, engine and RNG states."""
        sampler_rng = getattr(self.point_sampler, "R", None)
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
            "affine": self.model.affine,
            "engine": {"iteration": self.state.iteration, "epoch": self.state.epoch},
            "training_seconds": self.training_seconds,
            "alpha_generator": self.generator.get_state(),
            "sampler_rng": None if sampler_rng is None else sampler_rng.get_state(),
            "torch_rng": torch.random.get_rng_state(),
        }

    def restore_checkpoint(self, state: Mapping) -> None:
        """Restore :meth:`checkpoint_state` output so that :meth:`run` continues where it stopped."""
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.model.set_affine(state.get("affine"))
        self.generator.set_state(state["alpha_generator"])
        sampler_rng = getattr(self.point_sampler, "R", None)
        if sampler_rng is not None and state.get("sampler_rng") is not None:
            sampler_rng.set_state(state["sampler_rng"])
        torch.random.set_rng_state(state["torch_rng"])
        self.state.iteration = int(state["engine"]["iteration"])
        self.seconds_spent = float(state.get("training_seconds", 0.0))
        self.state.epoch = int(state["engine"]["iteration"]) // int(self.state.epoch_length)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.signal_caught is not None:  # a second signal: stop at once
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signal_caught = signum  # the attached TrainingCheckpoint writes, then stops the run

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load a checkpoint file (default: the attached :class:`~monai_cidir.handlers.TrainingCheckpoint`'s)
        if it exists; returns whether one was loaded."""
        if path is None and self.checkpoint is not None:
            path = self.checkpoint.path
        if path is None or not Path(path).is_file():
            return False
        from monai_cidir.engines.model import load_torch_file

        state = load_torch_file(path, self.state.device, "training checkpoint", "delete it to train this patient from the start, or rerun with overwrite=True")
        self.restore_checkpoint(state)
        return True

    @property
    def finished(self) -> bool:
        """Whether ``max_iterations`` steps (or the time budget) are done."""
        spent = self.time_budget_s is not None and self.seconds_spent >= self.time_budget_s
        return self.state.iteration >= self.max_iterations or spent

    def run(self) -> None:  # type: ignore[override]
        """Train until ``max_iterations`` (continues from a restored checkpoint; no-op when finished)."""
        if self.finished:
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {}
        if self.checkpoint is not None and threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._on_signal) for s in handled}
        self.signal_caught = None
        try:
            super().run()
        finally:
            self.seconds_spent = self.training_seconds
            self._run_start = None
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.signal_caught is not None:
            logger.warning("training stopped by signal %d at iteration %d; checkpoint written to %s", self.signal_caught, self.state.iteration, self.checkpoint.path)
            raise KeyboardInterrupt if self.signal_caught == signal.SIGINT else SystemExit(128 + self.signal_caught)


def make_alpha_prior(alpha_range: Sequence, alpha_distribution: str | Sequence[str], num_weights: int = 1, per_point: bool = True) -> AlphaPrior:
    """The training prior of the bundle options: ``alpha_range`` (see :func:`weight_ranges`) and
    ``alpha_distribution`` (one name, or one per weight) for ``num_weights`` weights."""
    ranges = weight_ranges(alpha_range, num_weights)
    lows, highs = [r[0] for r in ranges], [r[1] for r in ranges]
    try:  # the prior checks the distributions, the ranges and their counts
        return AlphaPrior(lows, highs, alpha_distribution, per_point=per_point, num_weights=num_weights)
    except ValueError as e:
        raise ValueError(f"alpha_range / alpha_distribution: {e}") from None


def stored_prior(model) -> AlphaPrior | None:
    """The prior a trained model's ``model.pt`` stores (``model.info["alpha_prior"]``, with its floor);
    ``None`` for a model without one (saved before the prior was stored, or never saved)."""
    state = (getattr(model, "info", None) or {}).get("alpha_prior")
    return AlphaPrior(**state) if state else None
