"""The benchmark's methods and its one evaluator, run inside a worker process.

Every method returns the same thing for a loaded pair: the predicted moving-space positions of
the fixed landmarks (exact: the network / the ITK transform at each point) and the displacement
field on the fixed grid (world RAS mm). :func:`evaluate_registration` turns these into the table's
figures the same way for every method:

* TRE (mm): ``|phi(fixed landmark) - moving landmark|``, mean / SD / 95th percentile, plain and
  snapped to the moving voxel grid (DIR-LAB convention), with
  :class:`monai_cidir.metrics.TargetRegistrationError`;
* Dice: the moving lung mask pulled back through the displacement field (trilinear, > 0.5)
  against the fixed lung mask, full resolution;
* folding: fraction of fixed-mask voxels with ``det(I + du/dp) <= 0``, ``du/dp`` by central
  finite differences of the field on the fixed grid (the same for the INR and B-spline fields;
  the engine's own selection uses the INR's exact Jacobians, which can differ slightly).

Methods (``METHODS``):

``cidir``
    :class:`monai_cidir.networks.ConditionedINR` trained once over alpha ~ U[0, 1] by
    :func:`monai_cidir.engines.register_patient`, alpha chosen afterwards by lung Dice (no landmarks
    used). The 21-value grid is also scored by TRE to report the oracle alpha and what the Dice
    choice loses.
``cidir_<variant>``
    cIDIR with the register_patient options of ``budget["variants"][name]`` on top of the run's
    engine options, e.g. another regularizer, or two regularizers each with its own weight
    (``loss={"regularizer": {"bending": 1, "jacobian": 1}, "conditioning": "per_regularizer"}``).
    For a vector-conditioned model the oracle is the best vector the selection evaluated
    (``alpha_curve.csv``).
``idir``
    :class:`monai_cidir.networks.SirenINR` (IDIR's network) trained at one fixed alpha
    (``--idir-alpha``), forward-mode derivatives, same iterations and points as cIDIR.
``idir_autograd``
    the same, with IDIR's nested ``torch.autograd.grad`` derivatives (``derivatives="autograd"``):
    identical maths, so the same accuracy is expected and only the time per step differs.
``elastix_default`` / ``elastix_lung``
    affine + B-spline elastix, see :mod:`benchmarks.peers.elastix`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events

from monai_cidir.coordinates import CoordinateMapping

__all__ = [
    "INR_METHODS",
    "ELASTIX_METHODS",
    "METHODS",
    "TRECurveHandler",
    "evaluate_registration",
    "folding_fraction",
    "load_case",
    "run_method",
    "warped_mask_dice",
]

logger = logging.getLogger(__name__)

INR_METHODS = ("cidir", "idir", "idir_autograd")
ELASTIX_METHODS = ("elastix_default", "elastix_lung")
METHODS = INR_METHODS + ELASTIX_METHODS


# ---------------------------------------------------------------------------- data
def load_case(record: dict, lung_mask_backend: str = "threshold") -> dict:
    """Load a datalist record (or a DIR-LAB record, which carries ``case``) into a loaded pair.

    Missing lung masks (DIR-LAB ships none) are computed with
    :class:`monai_cidir.transforms.LungMaskd` (``lung_mask_backend``), once, and given to every
    method alike.

    Args:
        record: a record of :func:`monai_cidir.data.load_pair_datalist` or
            :func:`monai_cidir.data.dirlab_datalist`.
        lung_mask_backend: backend for missing masks (``"threshold"`` works offline).

    Returns:
        the loaded-pair item.
    """
    from monai_cidir.transforms import LoadDIRLabd, LoadRegistrationPaird, LungMaskd

    item = (LoadDIRLabd() if "case" in record else LoadRegistrationPaird())(dict(record))
    for k in ("fixed", "moving"):
        if item.get(f"{k}_mask") is None:
            item[f"{k}_mask"] = LungMaskd(keys=f"{k}_image", backend=lung_mask_backend, output_key=f"{k}_mask")(
                {f"{k}_image": item[f"{k}_image"]}
            )[f"{k}_mask"]
    return item


# ---------------------------------------------------------------------------- evaluation
def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def warped_mask_dice(item: dict, field: torch.Tensor, chunk: int = 1 << 20) -> float:
    """Dice of the moving lung mask pulled back through ``field`` against the fixed lung mask.

    Args:
        item: the loaded pair (``fixed_image``, ``fixed_mask``, ``moving_mask``).
        field: displacement ``(X, Y, Z, 3)`` world RAS mm on the fixed grid.
        chunk: voxels per sampling call.
    """
    from monai.metrics import compute_dice

    fmap = CoordinateMapping.from_image(item["fixed_image"])
    mmap = CoordinateMapping.from_image(item["moving_mask"])
    moving = _plain(item["moving_mask"])[0].float()
    disp = field.reshape(-1, 3)
    warped = torch.empty(disp.shape[0])
    for flat, world in fmap.iter_points(chunk):
        warped[flat] = mmap.sample(moving, (world + disp[flat].double()).float())
    warped = (warped.reshape(fmap.spatial_shape) > 0.5).float()
    fixed = (_plain(item["fixed_mask"])[0] > 0).float()
    return float(compute_dice(warped[None, None], fixed[None, None], include_background=True).reshape(()))


def folding_fraction(
    field: torch.Tensor, mapping: CoordinateMapping, mask: torch.Tensor | None = None, slab: int = 16
) -> float:
    """Fraction of voxels (in ``mask``) where ``det(I + du/dp) <= 0``, by central differences.

    Args:
        field: displacement ``(X, Y, Z, 3)`` world mm on ``mapping``'s grid.
        mapping: the grid (its inverse affine turns index derivatives into mm derivatives).
        mask: optional ``(X, Y, Z)`` region (default: the whole grid).
        slab: planes per chunk along the first axis (bounds memory on large grids).

    Returns:
        the folded fraction in [0, 1].
    """
    inv = mapping.inverse_affine[:3, :3].to(torch.float64)  # d index / d world
    region = None if mask is None else _plain(mask) > 0
    nx = field.shape[0]
    folded = counted = 0
    for x0 in range(0, nx, slab):  # slabs along the first axis, one plane of halo each side
        lo, hi = max(0, x0 - 1), min(nx, x0 + slab + 1)
        f = field[lo:hi].to(torch.float64)
        # du_i/d(index_a): central inside, one-sided at the volume's borders only
        grads = torch.gradient(f, dim=(0, 1, 2)) if f.shape[0] > 1 else (torch.zeros_like(f),) + torch.gradient(f, dim=(1, 2))
        d_index = torch.stack(grads, dim=-1)[x0 - lo : x0 - lo + min(slab, nx - x0)]
        det = torch.linalg.det(torch.eye(3, dtype=torch.float64) + d_index @ inv)  # du_i/dp_j = du_i/dk_a dk_a/dp_j
        sel = det.reshape(-1) if region is None else det[region[x0 : x0 + slab]]
        folded += int((sel <= 0).sum())
        counted += sel.numel()
    return folded / counted if counted else 0.0


def evaluate_registration(item: dict, predicted: torch.Tensor | None, field: torch.Tensor | None) -> dict[str, Any]:
    """The table's accuracy figures for one method on one pair (see the module docstring).

    Args:
        item: the loaded pair.
        predicted: ``phi(fixed_landmarks)`` (N, 3) world RAS mm, or ``None``.
        field: the displacement on the fixed grid ``(X, Y, Z, 3)`` mm, or ``None``.

    Returns:
        ``tre_mean``, ``tre_sd``, ``tre_p95``, ``tre_max``, ``tre_snapped_mean``, ``tre_before_mean``,
        ``tre_before_sd``, ``dice``, ``dice_before``, ``folding`` (absent when not computable).
    """
    from monai_cidir.metrics import TargetRegistrationError

    out: dict[str, Any] = {}
    fixed_lm, moving_lm = item.get("fixed_landmarks"), item.get("moving_landmarks")
    if fixed_lm is not None and moving_lm is not None:
        target = torch.as_tensor(moving_lm, dtype=torch.float64)
        mgrid = CoordinateMapping.from_image(item["moving_image"])
        for label, pred in (("tre_before", torch.as_tensor(fixed_lm, dtype=torch.float64)), ("tre", predicted)):
            if pred is None:
                continue
            metric = TargetRegistrationError(over="landmarks")
            metric(pred.to(torch.float64)[None], target[None])
            out[f"{label}_mean"] = float(metric.aggregate("mean"))
            out[f"{label}_sd"] = float(metric.aggregate("std"))
            out[f"{label}_p95"] = float(metric.aggregate("p95"))
            out[f"{label}_max"] = float(metric.aggregate("max"))
            snapped = TargetRegistrationError(snap=True, moving_grid=mgrid, over="landmarks")
            snapped(pred.to(torch.float64)[None], target[None])
            out[f"{label}_snapped_mean"] = float(snapped.aggregate("mean"))
    fmap = CoordinateMapping.from_image(item["fixed_image"])
    out["dice_before"] = warped_mask_dice(item, torch.zeros(*fmap.spatial_shape, 3))
    if field is not None:
        out["dice"] = warped_mask_dice(item, field)
        out["folding"] = folding_fraction(field, fmap, _plain(item["fixed_mask"])[0])
    return out


# ---------------------------------------------------------------------------- INR methods
class TRECurveHandler:
    """Ignite handler: landmark TRE against training wall-clock, and a training time limit.

    Every ``every_seconds`` of training (evaluation time excluded from the clock) it maps the
    fixed landmarks through the trainer's model at each alpha of ``alphas`` and stores the mean
    TRE; when ``time_limit`` seconds of training are spent it terminates the trainer.

    Args:
        fixed_landmarks: (N, 3) world RAS mm.
        moving_landmarks: (N, 3) world RAS mm.
        alphas: alphas to evaluate at (one for an unconditioned network).
        every_seconds: evaluation period in training seconds.
        time_limit: training seconds after which training stops (``None``: no limit).

    Example::

        >>> h = TRECurveHandler(item["fixed_landmarks"], item["moving_landmarks"], alphas=[0.5], every_seconds=5)
        >>> metrics = register_patient(item, "out", handlers=[h])
        >>> h.rows[-1]["seconds"], h.rows[-1]["tre"]
    """

    def __init__(
        self,
        fixed_landmarks: torch.Tensor | None,
        moving_landmarks: torch.Tensor | None,
        alphas: Sequence[float],
        every_seconds: float = 5.0,
        time_limit: float | None = None,
    ) -> None:
        self.fixed = None if fixed_landmarks is None else torch.as_tensor(fixed_landmarks, dtype=torch.float64)
        self.moving = None if moving_landmarks is None else torch.as_tensor(moving_landmarks, dtype=torch.float64)
        self.alphas = [a if isinstance(a, (list, tuple)) else float(a) for a in alphas]
        self.every = float(every_seconds)
        self.time_limit = time_limit
        self.rows: list[dict] = []
        self.engine = None
        self.train_seconds = 0.0
        self._mark = 0.0
        self._last_eval = -math.inf
        self.stopped_by_time_limit = False

    def attach(self, engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self._evaluate(engine)
        self._mark = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self._mark
        self._mark = now

    def _iteration(self, engine) -> None:
        self._tick()
        if self.train_seconds - self._last_eval >= self.every:
            self._evaluate(engine)
        if self.time_limit is not None and self.train_seconds >= self.time_limit:
            self.stopped_by_time_limit = True
            engine.terminate()
        self._mark = time.perf_counter()

    def _completed(self, engine) -> None:
        self._tick()
        if not self.rows or self.rows[-1]["iteration"] != engine.state.iteration:
            self._evaluate(engine)

    @torch.no_grad()
    def _evaluate(self, engine) -> None:
        self._last_eval = self.train_seconds
        if self.fixed is None or self.moving is None:
            return
        model = engine.model
        tre = []
        for a in self.alphas:
            pred = model.transform_points(self.fixed, a)
            tre.append(float((pred - self.moving).norm(dim=1).mean()))
        self.rows.append({"iteration": int(engine.state.iteration), "seconds": self.train_seconds, "tre": tre})
        logger.info("iteration %d, %.1f s of training: mean TRE %.3f mm (best over alphas)", engine.state.iteration, self.train_seconds, min(tre))

    @property
    def iterations(self) -> int:
        return int(self.engine.state.iteration) if self.engine is not None else 0

    def curve(self, alpha: float) -> list[tuple[float, int, float]]:
        """``(training seconds, iteration, mean TRE)`` at the evaluated alpha nearest ``alpha``."""
        i = int(np.argmin([np.abs(np.subtract(a, alpha)).sum() for a in self.alphas]))
        return [(r["seconds"], r["iteration"], r["tre"][i]) for r in self.rows]


def _weights(options: dict) -> int:
    """How many weights alpha has under these register_patient options (the loss's ``cond_features``)."""
    from monai_cidir.losses import RegistrationLoss

    loss = options.get("loss")
    return RegistrationLoss(**loss).cond_features if isinstance(loss, dict) else 1


def _run_inr(item: dict, method: str, budget: dict, workdir: Path) -> dict:
    import itertools

    from monai_cidir.engines import alpha_grid, register_patient
    from monai_cidir.engines.alphas import DEFAULT_DISTRIBUTION
    from monai_cidir.networks import SirenINR

    variant = dict(budget.get("variants", {}).get(method, {}))
    conditioned = method == "cidir" or method in budget.get("variants", {})
    engine_options = {**budget.get("engine_options", {}), **variant}
    if isinstance(engine_options.get("network"), dict):  # network={"modulation": "per_neuron"} (JSON): on top of the pipeline's network
        from monai_cidir.engines.registration import default_network

        engine_options["network"] = default_network(**engine_options["network"])
    distribution = engine_options.get("alpha_distribution", DEFAULT_DISTRIBUTION)  # the grid the selection scores
    k = _weights(engine_options)
    grid = alpha_grid(0.0, 1.0, int(budget.get("num_alphas", 21)), distribution)  # the selection's grid
    if k > 1:  # the search's coarse grid: ~num_alphas^(1/K) values per weight
        per_axis = max(3, int(math.floor(int(budget.get("num_alphas", 21)) ** (1.0 / k) + 1e-9)))
        grid = [list(v) for v in itertools.product(alpha_grid(0.0, 1.0, per_axis, distribution), repeat=k)]
    idir_alpha = float(budget.get("idir_alpha", 0.5))
    handler = TRECurveHandler(
        item.get("fixed_landmarks"),
        item.get("moving_landmarks"),
        alphas=grid if conditioned else [idir_alpha],
        every_seconds=float(budget.get("eval_every", 5.0)),
        time_limit=budget.get("time_limit"),
    )
    options: dict[str, Any] = dict(
        network=None if conditioned else SirenINR,  # None: register_patient's network, the bundle's (log-alpha ConditionedINR)
        max_iterations=int(budget["iterations"]),
        num_points=int(budget["num_points"]),
        derivatives="autograd" if method == "idir_autograd" else "forward",
        seed=int(budget.get("seed", 0)),
        handlers=[handler],
        export_images=False,
        overwrite=True,
        resume=False,
        checkpoint_interval=10**9,
    )
    options.update(engine_options)
    if conditioned:
        options.update(num_alphas=len(grid))
    else:
        # IDIR: one fixed alpha, the prior collapsed to it
        options.update(alpha_range=(idir_alpha, idir_alpha), alpha=idir_alpha, num_alphas=0)
    start = time.perf_counter()
    metrics = register_patient(item, workdir, **options)
    wall = time.perf_counter() - start
    model = handler.engine.model
    alpha = metrics["alpha"]
    predicted = model.transform_points(item["fixed_landmarks"], alpha) if item.get("fixed_landmarks") is not None else None
    fmap = CoordinateMapping.from_image(item["fixed_image"])
    field = torch.from_numpy(model.map_grid(alpha, fmap))
    iters = max(1, handler.iterations)
    out: dict[str, Any] = {
        "seconds": float(metrics.get("seconds_training", 0.0)) + float(metrics.get("seconds_selection", 0.0)),
        "seconds_method_wall": wall,
        "seconds_training": handler.train_seconds,
        "seconds_affine": metrics.get("seconds_affine"),
        "iterations": handler.iterations,
        "seconds_per_step": handler.train_seconds / iters,
        "stopped_by_time_limit": handler.stopped_by_time_limit,
        "alpha": alpha,
        "engine_dice": metrics.get("dice"),
        "engine_folding": metrics.get("folding"),
        "seconds_per_alpha": metrics.get("seconds_per_alpha"),
        "seconds_selection": metrics.get("seconds_selection"),
        "curve": handler.curve(alpha),
    }
    if conditioned and predicted is not None:
        if k > 1:  # the oracle among the vectors the selection evaluated
            grid = _evaluated_vectors(workdir / str(item.get("name") or "pair") / "alpha_curve.csv")
        target = torch.as_tensor(item["moving_landmarks"], dtype=torch.float64)
        per_alpha = [float((model.transform_points(item["fixed_landmarks"], a) - target).norm(dim=1).mean()) for a in grid]
        best = int(np.argmin(per_alpha))
        chosen_tre = float((predicted - target).norm(dim=1).mean())
        out.update(
            alpha_oracle=grid[best],
            tre_oracle_mean=per_alpha[best],
            tre_loss_dice_choice=chosen_tre - per_alpha[best],
            tre_per_alpha=per_alpha,
            alpha_grid=grid,
        )
    return {"predicted": predicted, "field": field, **out}


def _evaluated_vectors(path: Path) -> list[list[float]]:
    """The alpha vectors of a vector-conditioned model's ``alpha_curve.csv`` (its ``alpha_<name>`` columns)."""
    import csv

    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [[float(r[c]) for c in r if c.startswith("alpha_")] for r in rows]


# ---------------------------------------------------------------------------- elastix
def _run_elastix(item: dict, method: str, budget: dict, workdir: Path) -> dict:
    from benchmarks.peers.elastix import register_elastix

    preset = method.split("_", 1)[1]
    start = time.perf_counter()
    result = register_elastix(
        item["fixed_image"],
        item["moving_image"],
        item.get("fixed_mask"),
        preset=preset,
        num_threads=budget.get("elastix_threads", budget.get("threads")),
        max_iterations=budget.get("elastix_max_iterations"),
        log_file=str(workdir / f"elastix_{preset}.log"),
    )
    wall = time.perf_counter() - start
    predicted = result.transform_points(item["fixed_landmarks"]) if item.get("fixed_landmarks") is not None else None
    field = result.displacement_field()
    return {"predicted": predicted, "field": field, "seconds": result.seconds, "seconds_method_wall": wall}


def run_method(item: dict, method: str, budget: dict, workdir: str | Path) -> dict:
    """Run one method on a loaded pair and evaluate it.

    Args:
        item: the loaded pair.
        method: one of :data:`METHODS`.
        budget: ``iterations``, ``num_points``, ``time_limit``, ``eval_every``, ``idir_alpha``,
            ``num_alphas``, ``seed``, ``threads``, ``elastix_max_iterations``, ``engine_options``.
        workdir: scratch folder for the method's files.

    Returns:
        a flat dict of figures (see :func:`evaluate_registration`), timings and, for the INR
        methods, the TRE-versus-time ``curve``.

    Raises:
        ValueError: for an unknown method.
    """
    variants = budget.get("variants", {})
    if method not in METHODS and method not in variants:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS} or a variant {sorted(variants)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = _run_inr if method in INR_METHODS or method in variants else _run_elastix
    res = run(item, method, budget, workdir)
    predicted, field = res.pop("predicted"), res.pop("field")
    start = time.perf_counter()
    res.update(evaluate_registration(item, predicted, field))
    res["seconds_evaluation"] = time.perf_counter() - start
    return res
