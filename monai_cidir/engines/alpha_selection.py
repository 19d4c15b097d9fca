"""Alpha selection after training: sweep alpha, score each by lung Dice, pick the best.

For each alpha the trained :class:`~monai_cidir.engines.model.RegistrationModel` maps the
fixed grid into the moving image; the moving lung mask is warped to the fixed grid
(trilinear, threshold 0.5) and compared with the fixed lung mask by MONAI's ``DiceMetric``;
folding is the fraction of fixed-mask points with ``det(I + J) <= 0`` from the model's exact
Jacobians (``JacobianDeterminantMetric``). Every alpha passes through the engine, and the
evaluator's key metric, :class:`~monai_cidir.handlers.AlphaChoice`, decides: the best Dice wins;
Dice values within its ``tie_tolerance`` count as ties and the larger alpha (the smoother field)
wins them. With ``no_folding=True`` only alphas without folding compete (if none, the least folding).

``mode="segment"`` warps the moving *image* instead and segments it with
:class:`~monai_cidir.transforms.LungMask` (the paper's procedure); the fixed image is
segmented by the same backend.

Real time (the sweep is after training, but it runs for every patient):

* the grid (:func:`selection_grid`, a sub-grid of the fixed grid) is the fixed lung mask's bounding
  box (plus ``margin_mm``) sampled about every ``coarse_spacing_mm`` (4 mm) along each axis
  (:func:`coarse_steps`); ``grid=model.mapping`` gives the full-resolution Dice. On the real
  chest CT pair (1.68 x 1.68 x 5 mm, strides (2, 2, 1)) the coarse Dice is within 0.0012 of full
  resolution;
* the network runs without gradients, one alpha per call, with (a, b, c, d) folded into its
  weights (:meth:`~monai_cidir.networks.ConditionedINR.folded_layers`);
* **boundary band** (``band_mm``, mode ``"warp_mask"``): the whole grid is mapped once, at the
  sweep's median alpha (the reference). A point's warped label (trilinear > 0.5) can only change
  if it moves into the box ``[c - spacing, c + spacing]`` of a moving voxel ``c`` of the other
  label, and only as far as the interpolant's slope lets it reach 0.5; a Euclidean distance
  transform and that slope bound give every point a safe radius. For every other alpha, every
  32nd grid point (the probe) is mapped first: the largest movement ``m`` seen against the
  reference sets the band, the points whose safe radius is at most ``max(band_mm, 4 m)``; those
  are mapped too, and the band grows while they move further; the other points keep the
  reference's label. Beyond 20 mm every point is mapped. Tests check that the Dice equals the
  whole-grid Dice; on a 256 x 256 x 100 realistic case all 21 values agree exactly, with 7-22%
  of the grid mapped per alpha (35-113 K of 505 K points), and the sweep takes 6.4 s instead
  of 32 s;
* folding in the sweep is counted on every ``folding_stride``-th lung point per axis (4: ~16 mm,
  a 64th of them, when the sweep's folding is only reported; 2 with ``no_folding``, where it
  decides); the chosen alpha's folding (``curve.best``, and ``metrics.json``) uses every lung
  point of the grid. The exact Jacobians cost about four forward passes per point, so at stride 2
  they were about half of the sweep's time on the realistic cases.

Measured (``benchmarks/compare.py``, 2 threads): see README.md, "Performance".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.handlers import MeanDice, from_engine
from monai.metrics import DiceMetric

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.engines.alphas import LOG_FLOOR, alpha_grid, alpha_key, alpha_values, format_alpha
from monai_cidir.engines.alpha_search import AlphaSearch
from monai_cidir.engines.model import RegistrationModel
from monai_cidir.engines.trainer import stored_prior
from monai_cidir.handlers.alpha_choice import AlphaChoice, AlphaSearchEvents

__all__ = ["AlphaSelectionEvaluator", "AlphaCurve", "AlphaSearch", "LOG_FLOOR", "alpha_grid", "alpha_values", "coarse_steps", "format_alpha", "mask_region", "selection_grid"]


def coarse_steps(mapping: CoordinateMapping, coarse_spacing_mm: float | None = 4.0, coarse_factor=None) -> tuple[int, ...]:
    """Per-axis voxel strides of the selection grid.

    ``coarse_factor`` (an int or one int per axis) wins; otherwise the stride along each axis is
    the largest whole number of voxels not exceeding ``coarse_spacing_mm`` (at least 1), so the
    grid is about ``coarse_spacing_mm`` apart whatever the voxel size (DIR-LAB 0.97 x 0.97 x 2.5 mm
    -> strides (4, 4, 1); ``None`` -> full resolution).
    """
    if coarse_factor is not None:
        f = [int(coarse_factor)] * 3 if np.ndim(coarse_factor) == 0 else [int(v) for v in coarse_factor]
        return tuple(max(1, v) for v in f)
    if coarse_spacing_mm is None:
        return (1, 1, 1)
    return tuple(max(1, int(math.floor(coarse_spacing_mm / float(s) + 1e-6))) for s in mapping.spacing)


def selection_grid(
    mapping: CoordinateMapping,
    fixed_mask: torch.Tensor,
    coarse_spacing_mm: float | None = 4.0,
    coarse_factor: int | Sequence[int] | None = None,
    bounding_box: bool = True,
    margin_mm: float = 5.0,
) -> CoordinateMapping:
    """The default selection grid: a sub-grid of the fixed grid, about ``coarse_spacing_mm`` apart.

    Args:
        mapping: the fixed grid (``model.mapping``).
        fixed_mask: the fixed lung mask on it.
        coarse_spacing_mm: approximate spacing (see :func:`coarse_steps`; ``None``: every voxel).
        coarse_factor: explicit voxel stride (int or per axis), overrides ``coarse_spacing_mm``.
        bounding_box: restrict to the mask's bounding box plus ``margin_mm``; else the whole field of view.
        margin_mm: bounding-box margin (mm).

    Example::

        >>> grid = selection_grid(model.mapping, item["fixed_mask"])  # bounding box + 5 mm, ~4 mm apart
        >>> AlphaSelectionEvaluator(model, item, grid=grid)  # doctest: +SKIP
    """
    step = coarse_steps(mapping, coarse_spacing_mm, coarse_factor)
    if not bounding_box:
        return mapping.region(tuple(slice(0, n, st) for n, st in zip(mapping.spatial_shape, step)))
    return mapping.region(mask_region(fixed_mask, mapping, margin_mm, step))


def _on_grid(image: torch.Tensor, mapping: CoordinateMapping, grid: CoordinateMapping, mode: str) -> torch.Tensor:
    """An image of ``mapping``'s grid read at ``grid``'s voxel centres (exact values on a sub-grid)."""
    data = convert_to_tensor(image, track_meta=False).float()
    data = data.reshape(data.shape[-3:])
    out = torch.empty(grid.num_points, dtype=torch.float32)
    for flat, world in grid.iter_points(1 << 20):
        out[flat] = mapping.sample(data, world, mode=mode).float()
    return out.reshape(grid.spatial_shape)


def mask_region(mask: torch.Tensor, mapping: CoordinateMapping, margin_mm: float = 5.0, step=1) -> tuple[slice, ...]:
    """Index slices of a mask's bounding box grown by ``margin_mm``, every ``step`` voxels (int or per axis):
    :meth:`CoordinateMapping.bounding_slices` of the selection's fixed lung mask.

    Raises:
        ValueError: when the mask is empty.
    """
    try:
        return mapping.bounding_slices(mask, margin_mm, step)
    except ValueError as err:
        raise ValueError(f"alpha selection needs a fixed lung mask: {err}") from None


@dataclass
class AlphaCurve:
    """The sweep's results, one row per evaluated alpha (sorted by alpha).

    Attributes:
        rows: dicts with ``alpha`` (a float, or a tuple of K weights), ``dice``, ``folding`` (fraction), ``seconds`` and ``points``
            (grid points the network mapped for that alpha).
        best: the selected row.
    """

    rows: list[dict] = field(default_factory=list)
    best: dict | None = None

    @property
    def alpha(self) -> float | list[float]:
        """The selected alpha (a list of K weights for a vector-conditioned model)."""
        a = self.best["alpha"]
        return list(a) if isinstance(a, tuple) else float(a)


class AlphaSelectionEvaluator(Evaluator):
    """Ignite evaluator that sweeps alpha and selects the best by lung Dice.

    Each iteration scores one alpha (a float, or a tuple of K weights for a model conditioned on
    one weight per regularizer; ties then go to the larger ``sum_r alpha_r / high_r``);
    ``engine.state.output`` holds ``pred`` (warped mask,
    ``(1, 1, X, Y, Z)``), ``label`` (fixed mask), ``alpha``, ``dice``, ``folding`` and
    ``seconds``. The key metric (``key_metric``, default :class:`~monai_cidir.handlers.AlphaChoice`
    by lung Dice, reported as ``state.metrics["selected_dice"]``) sees every alpha of the search and
    chooses; MONAI's ``MeanDice`` is attached too (``state.metrics["mean_dice"]``: the last run's
    mean Dice). After :meth:`run`, ``self.curve`` is an :class:`AlphaCurve` (grid plus the optional
    refinement) whose ``best`` is the key metric's choice.

    Args:
        model: the trained registration.
        item: the loaded pair: ``fixed_mask`` (MetaTensor ``(1, X, Y, Z)`` on the model's fixed grid),
            ``moving_mask`` (its own grid; needed by ``mode="warp_mask"``) and, for ``mode="segment"``,
            ``fixed_image`` and ``moving_image``.
        prior: the training prior (:class:`~monai_cidir.engines.AlphaPrior`): the search's first grid
            is spaced as it samples alpha. ``None``: the one the model was trained with, as
            ``model.pt`` stores it (``model.info["alpha_prior"]``), else the paper's uniform prior on
            ``[0, 1]``; required for a model conditioned on ``K > 1`` weights.
        search: which alphas are scored (:class:`~monai_cidir.engines.AlphaSearch`: the grid size or
            explicit alphas, golden-section steps, refinement rounds); default ``AlphaSearch()``
            (21 alphas, no refinement for one weight).
        key_metric: the metric that chooses, and its rule: an :class:`~monai_cidir.handlers.AlphaChoice`
            (or a subclass), or a callable that returns a fresh one (a config partial); default
            ``AlphaChoice()`` (lung Dice, ties within 1e-3 to the larger alpha;
            ``AlphaChoice(no_folding=True)``: only alphas with zero folding compete).
        mode: ``"warp_mask"`` (warp the moving lung mask) or ``"segment"`` (segment the warped
            moving image with ``lung_mask``).
        lung_mask: the segmentation of ``"segment"``, a :class:`~monai_cidir.transforms.LungMask`
            (default ``LungMask(backend="threshold")``); unused by ``"warp_mask"``.
        grid: where each alpha is scored: a grid of the fixed image's world (a
            :class:`~monai_cidir.coordinates.CoordinateMapping`, e.g. ``model.mapping`` for every
            voxel), or a factory ``grid(model.mapping, fixed_mask, bounding_box=...)`` of one (e.g.
            ``functools.partial(selection_grid, coarse_spacing_mm=2.0)``); the fixed mask (and, for
            ``"segment"``, the fixed image) is read on it. Default :func:`selection_grid`: the fixed
            lung mask's bounding box plus 5 mm, about every 4 mm (the whole field of view for
            ``"segment"``: segmentation backends need the body in view).
        chunk_size: points per network call (bounds memory).
        val_handlers: more handlers.
        band_mm: smallest radius (mm) of the boundary band (see the module docstring); ``None``
            maps every grid point for every alpha. Ignored by ``mode="segment"``.
        folding_stride: count folding on every this-many-th lung point per axis during the sweep
            (1: all); the chosen alpha is always counted on all of them. Default: 2 when the key
            metric refuses folding (the sweep's folding then decides), else 4 (it is only reported).

    Example::

        >>> evaluator = AlphaSelectionEvaluator(model, item)
        >>> evaluator.run()
        >>> evaluator.curve.alpha, evaluator.curve.best["dice"]
    """

    def __init__(
        self,
        model: RegistrationModel,
        item: Mapping[str, Any],
        prior=None,
        search: AlphaSearch | None = None,
        key_metric: AlphaChoice | Callable[[], AlphaChoice] | None = None,
        mode: str = "warp_mask",
        lung_mask: Callable | None = None,
        grid: CoordinateMapping | Callable[..., CoordinateMapping] | None = None,
        chunk_size: int = 65536,
        val_handlers: Sequence | None = None,
        band_mm: float | None = 0.1,
        folding_stride: int | None = None,
    ) -> None:
        fixed_mask, moving_mask, moving_image, fixed_image = _pair_inputs(item, mode, band_mm)
        self.choice = _key_metric(key_metric)
        if folding_stride is None:
            folding_stride = 2 if self.no_folding else 4
        if int(folding_stride) < 1:
            raise ValueError(f"folding_stride must be >= 1, found {folding_stride}")
        self.num_weights = int(getattr(model, "num_weights", 1))
        self.prior = stored_prior(model) if prior is None else prior
        prior = self.prior
        self.search = AlphaSearch() if search is None else search
        alphas = self.search.first(prior, self.num_weights)
        if not alphas:
            raise ValueError(f"{self.search!r} gives no alpha to score: give num_alphas >= 1 or alphas=[...]")
        super().__init__(
            device=next(model.network.parameters()).device,
            val_data_loader=[{"alpha": a} for a in alphas],
            epoch_length=len(alphas),
            key_val_metric={self.choice.name: self.choice},
            additional_metrics={"mean_dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))},
            val_handlers=val_handlers,
            decollate=False,
            event_names=[AlphaSearchEvents],
        )
        self.model = model
        self.mode = mode
        self.chunk_size = int(chunk_size)
        self.band_mm = None if band_mm is None else float(band_mm)
        self.max_band_mm = 20.0
        self.folding_stride = int(folding_stride)
        self.dice_metric = DiceMetric(include_background=True, reduction="mean")
        fmap = model.mapping
        self.fixed_mapping = fmap
        if not isinstance(grid, CoordinateMapping):  # None or a factory of the grid
            grid = (grid or selection_grid)(fmap, fixed_mask, bounding_box=mode != "segment")
        self.grid = grid  # where each alpha is scored
        self.shape = self.grid.spatial_shape
        self.fixed_mask_grid = _on_grid(fixed_mask, fmap, self.grid, "nearest") > 0.5
        self.moving_mask = moving_mask
        self.moving_image = moving_image
        self.moving_mapping = CoordinateMapping.from_image(moving_image if moving_mask is None else moving_mask)
        self.lung_mask = None
        if mode == "segment":
            from monai_cidir.transforms import LungMask

            self.lung_mask = LungMask(backend="threshold") if lung_mask is None else lung_mask
            fimg = _on_grid(fixed_image, CoordinateMapping.from_image(fixed_image), self.grid, "bilinear")
            self.fixed_mask_grid = self._segment(fimg) > 0.5
        self.curve = AlphaCurve()
        self.reference_alpha = _median_alpha(alphas, self.num_weights)
        source = self.moving_mask if mode == "warp_mask" else self.moving_image
        self._source = convert_to_tensor(source, track_meta=False).float()
        self._inside = torch.nonzero(self.fixed_mask_grid.reshape(-1)).reshape(-1)
        self._world_cache: torch.Tensor | None = None
        self._band: dict | None = None
        self._folding_cache: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ scoring one alpha
    def _segment(self, image: torch.Tensor) -> torch.Tensor:
        from monai.data import MetaTensor

        seg = self.lung_mask(MetaTensor(image[None].float(), affine=self.grid.affine))
        seg = convert_to_tensor(seg, track_meta=False)
        return seg.reshape(image.shape)

    @torch.no_grad()
    def score_identity(self) -> float:
        """Dice of the unregistered pair on the same grid (the moving mask/segmentation read at ``p``)."""
        return self.score_transform(None)

    @torch.no_grad()
    def score_transform(self, transform=None) -> float:
        """Dice on the selection grid for any point map, e.g. the affine alone (``model.apply_affine``).

        Args:
            transform: ``fn(world (N, 3) float64) -> moved (N, 3)``; ``None`` is the identity.
        """
        source = self._source
        values = torch.empty(self.grid.num_points, dtype=torch.float32)
        for flat, world in self.grid.iter_points(self.chunk_size):
            moved = world if transform is None else transform(world)
            values[flat] = self.moving_mapping.sample(source, moved.float()).reshape(-1)
        values = values.reshape(self.shape)
        pred = self._segment(values) > 0.5 if self.mode == "segment" else values > 0.5
        self.dice_metric.reset()
        return float(self.dice_metric(pred[None, None].float(), self.fixed_mask_grid[None, None].float()).mean())

    # ------------------------------------------------------------------ grid helpers
    def _world_at(self, flat: torch.Tensor) -> torch.Tensor:
        """World points (float32) of flat indices of the selection grid."""
        if self._world_cache is not None:
            return self._world_cache[flat]
        return self.grid.points_at(flat).float()

    def _grid_world(self) -> torch.Tensor | None:
        """The whole grid's world points, cached when it has at most 4M points (else None)."""
        if self._world_cache is None and self.grid.num_points <= 4_000_000:
            parts = [w.float() for _, w in self.grid.iter_points(1 << 20)]
            self._world_cache = torch.cat(parts)
        return self._world_cache

    def _moved(self, flat: torch.Tensor | None, alpha: float) -> torch.Tensor:
        """``phi(p)`` (float32 mm) at flat grid indices (None: the whole grid), in chunks."""
        n = self.grid.num_points if flat is None else flat.numel()
        out = torch.empty(n, 3, dtype=torch.float32)
        for b in range(0, n, self.chunk_size):
            sel = torch.arange(b, min(n, b + self.chunk_size)) if flat is None else flat[b : b + self.chunk_size]
            out[b : b + len(sel)] = self.model(self._world_at(sel), alpha).float().cpu()
        if not bool(torch.isfinite(out).all()):  # a NaN position would read as "outside the lung", silently
            raise FloatingPointError(f"the trained network gives non-finite positions at alpha {format_alpha(alpha)}: the model is unusable, retrain it")
        return out

    def _sample(self, moved: torch.Tensor) -> torch.Tensor:
        out = torch.empty(moved.shape[0], dtype=torch.float32)
        for b in range(0, moved.shape[0], 1 << 20):
            out[b : b + (1 << 20)] = self.moving_mapping.sample(self._source, moved[b : b + (1 << 20)]).reshape(-1)
        return out

    def _band_supported(self) -> bool:
        if self.mode != "warp_mask" or self.band_mm is None or self._grid_world() is None:
            return False
        m = self.moving_mapping.affine[:3, :3].to(torch.float64)
        cols = m / torch.linalg.norm(m, dim=0)
        off = cols.T @ cols - torch.eye(3, dtype=torch.float64)
        return bool(off.abs().max() < 1e-3)  # EDT needs orthogonal voxel axes

    def _safe_distance(self, moved: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Per point, a radius (mm) around ``moved`` inside which the warped mask label cannot change.

        A label is trilinear interpolation ``v`` of the moving mask, thresholded at 0.5. Two bounds,
        the larger wins:

        * **voxel boxes**: ``v`` is ``L`` wherever the 8 voxels around the point all have label
          ``L``, so it can only change inside the box ``[c - spacing, c + spacing]`` of a voxel
          ``c`` of the other label. The radius is the Euclidean distance (scipy's EDT, exact at
          voxel centres, as those boxes are unions of voxel centres) from the point's nearest voxel
          ``v`` to the boxes of the label other than ``v``'s, less ``|p - v|``. The mask's bounding
          box (plus the largest radius that matters) is enough; points outside the image see its
          border voxels, as ``grid_sample``'s border padding does.
        * **slope**: along axis ``a`` the interpolant of values in [0, 1] changes by at most
          ``1 / spacing_a`` per mm (border padding clamps, which does not steepen it), so ``v``
          cannot reach 0.5 within ``|v - 0.5| / sqrt(sum_a spacing_a^-2)``. This is what keeps
          points inside the voxel boxes but far from the 0.5 level out of the band.

        Args:
            moved: ``(N, 3)`` world points in the moving image.
            values: ``v`` at those points when already sampled.
        """
        from scipy import ndimage

        mask = self._source.reshape(self._source.shape[-3:]).numpy() > 0.5
        spacing = self.moving_mapping.spacing.numpy().astype(np.float64)
        if values is None:
            values = self._sample(moved)
        slope = float(np.sqrt(np.sum(1.0 / spacing**2)))
        by_value = (values.double().numpy() - 0.5).__abs__() / slope * (1.0 - 1e-6)
        idx = np.argwhere(mask)
        vox = self.moving_mapping.world_to_index(moved.double()).numpy()
        if idx.size == 0:
            return torch.full((moved.shape[0],), float("inf"))
        pad = np.ceil(self.max_band_mm / spacing).astype(int) + 2
        lo, hi = idx.min(0) - pad, idx.max(0) + pad + 1
        clo, chi = np.maximum(lo, 0), np.minimum(hi, mask.shape)
        crop = np.pad(mask[tuple(slice(a, b) for a, b in zip(clo, chi))], list(zip(clo - lo, hi - chi)), mode="edge")
        box = np.ones((3, 3, 3), dtype=bool)
        d_in = ndimage.distance_transform_edt(~ndimage.binary_dilation(~crop, box), sampling=spacing)
        d_out = ndimage.distance_transform_edt(~ndimage.binary_dilation(crop, box), sampling=spacing)
        near = np.clip(np.rint(vox).astype(np.int64) - lo, 0, np.asarray(crop.shape) - 1)
        i, j, k = near[:, 0], near[:, 1], near[:, 2]
        dist = np.where(crop[i, j, k], d_in[i, j, k], d_out[i, j, k])
        offset = np.linalg.norm((vox - lo - near) * spacing, axis=1)
        return torch.from_numpy(np.maximum(dist - offset, by_value)).float()

    def _prepare_band(self) -> None:
        """Evaluate the reference alpha on the whole grid; keep its labels and safe radii."""
        moved = self._moved(None, self.reference_alpha)
        values = self._sample(moved)
        self._band = {"moved": moved, "labels": values > 0.5, "safe": self._safe_distance(moved, values)}
        self._band["probe"] = torch.arange(0, moved.shape[0], 32)  # every 32nd point: how far did alpha move things?

    def _warp_labels_band(self, alpha: float) -> tuple[torch.Tensor, int]:
        """Warped mask labels, mapping only the points near the reference's label boundary.

        The probe (every 32nd grid point) measures how far ``alpha`` moved points from the
        reference; the band is every point whose safe radius is at most four times that (at least
        ``band_mm``). If a mapped point moved further, the band widens to four times the largest
        movement seen, until every point inside it has been mapped; beyond ``max_band_mm`` the
        whole grid is mapped. ``self._band["radius"]`` keeps the last alpha's radius.

        Returns:
            ``(labels, number of points mapped)``.
        """
        if self._band is None:
            self._prepare_band()
        band = self._band
        n = band["moved"].shape[0]
        ref, safe = band["moved"], band["safe"]
        moved = torch.empty_like(ref)
        done = torch.zeros(n, dtype=torch.bool)
        idx = band["probe"]
        change = 0.0
        while idx.numel():  # ends: every round maps new points, or the radius passes max_band_mm
            moved[idx] = self._moved(idx, alpha)
            done[idx] = True
            change = max(change, float((moved[idx] - ref[idx]).norm(dim=1).max()))
            radius = max(self.band_mm, 4.0 * change)
            if radius > self.max_band_mm:  # the field changes too much with alpha: map everything
                return self._sample(self._moved(None, alpha)) > 0.5, n
            idx = torch.nonzero((safe <= radius) & ~done).reshape(-1)
        band["radius"] = radius
        labels = band["labels"].clone()
        mapped = torch.nonzero(done).reshape(-1)
        labels[mapped] = self._sample(moved[mapped]) > 0.5
        return labels, int(mapped.numel())

    def _folding_points(self, stride: int) -> torch.Tensor:
        """Flat indices of fixed-mask points on every ``stride``-th grid point along each axis."""
        if stride <= 1:
            return self._inside
        if stride not in self._folding_cache:  # the same points for every alpha of the sweep
            sub = np.stack(np.unravel_index(self._inside.numpy(), self.shape), axis=-1)
            keep = np.all(sub % stride == 0, axis=1)
            self._folding_cache[stride] = self._inside[torch.from_numpy(keep)]
        return self._folding_cache[stride]

    def folding(self, alpha: float, stride: int = 1) -> float:
        """Folding fraction at ``alpha``: exact Jacobians at the fixed-mask points of the grid (every ``stride``-th)."""
        from monai_cidir.metrics import JacobianDeterminantMetric

        pts = self._folding_points(stride)
        if pts.numel() == 0:
            return 0.0
        jac = self.model.displacement_jacobian(self._world_at(pts), alpha, self.chunk_size).float()
        metric = JacobianDeterminantMetric()
        metric(jac[None])
        return _folding_fraction(metric)

    @torch.no_grad()
    def score(self, alpha: float, folding_stride: int | None = None) -> dict:
        """Dice, folding and seconds of one alpha (also returns the warped mask as ``pred``).

        Args:
            alpha: the regularisation weight.
            folding_stride: thin the folding points (default: the evaluator's ``folding_stride``).
        """
        start = time.perf_counter()
        self.model.network.eval()
        self._grid_world()
        if self._band_supported():
            labels, evaluated = self._warp_labels_band(alpha)
            pred = labels.reshape(self.shape)
        else:
            values = self._sample(self._moved(None, alpha)).reshape(self.shape)
            evaluated = self.grid.num_points
            pred = self._segment(values) > 0.5 if self.mode == "segment" else values > 0.5
        pred = pred[None, None].float()
        label = self.fixed_mask_grid[None, None].float()
        self.dice_metric.reset()
        dice = float(self.dice_metric(pred, label).mean())
        stride = self.folding_stride if folding_stride is None else int(folding_stride)
        folding = self.folding(alpha, stride)
        return {
            "alpha": alpha_key(alpha, self.num_weights),
            "dice": dice,
            "folding": folding,
            "seconds": time.perf_counter() - start,
            "points": evaluated,
            "pred": pred,
            "label": label,
        }

    def _iteration(self, engine, batchdata: dict) -> dict:
        alpha = batchdata["alpha"]
        if self.num_weights == 1 and isinstance(alpha, (list, tuple)):
            alpha = alpha[0]
        alpha = alpha_key(alpha, self.num_weights)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        out = self.score(alpha)
        self.curve.rows.append({k: out[k] for k in ("alpha", "dice", "folding", "seconds", "points")})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out

    # ------------------------------------------------------------------ selection
    @property
    def no_folding(self) -> bool:
        """Whether only alphas without folding compete (the key metric's rule)."""
        return self.choice.no_folding

    def _best_row(self) -> dict:
        """The curve's row of the key metric's choice (the last one scored at that alpha)."""
        chosen = self.choice.best["alpha"]
        return next(r for r in reversed(self.curve.rows) if r["alpha"] == chosen)

    def score_alphas(self, alphas: list) -> None:
        """Score more alphas through the engine (a further run of the same search: handlers and the
        key metric see them); the search strategy's refinement calls this."""
        self.data_loader = [{"alpha": a} for a in alphas]
        self.state.epoch_length = len(alphas)
        Evaluator.run(self)

    def run(self) -> AlphaCurve:  # type: ignore[override]
        """Sweep the grid (Ignite run), refine, let the key metric choose; returns :attr:`curve`."""
        self.curve = AlphaCurve()
        self.fire_event(AlphaSearchEvents.SEARCH_STARTED)  # the key metric starts collecting
        super().run()
        self.search.refine(self)
        best = dict(self._best_row())
        self.curve.rows.sort(key=lambda r: r["alpha"])
        if self.folding_stride > 1:  # the sweep thinned the folding points; the choice gets all of them
            with torch.no_grad():
                best["folding"] = self.folding(best["alpha"], 1)
        self.curve.best = best
        self.fire_event(AlphaSearchEvents.SEARCH_COMPLETED)  # the curve is final: exports run here
        return self.curve


def _pair_inputs(item: Mapping[str, Any], mode: str, band_mm) -> tuple:
    """``(fixed_mask, moving_mask, moving_image, fixed_image)`` of the pair; refuses an unknown mode,
    the inputs a mode lacks, and a non-positive band, before any work."""
    if not isinstance(item, Mapping) or item.get("fixed_mask") is None:
        found = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise ValueError(f"expected the loaded pair (a dict with 'fixed_mask', 'moving_mask' and the images), found {found}")
    if mode not in ("warp_mask", "segment"):
        raise ValueError(f"mode must be 'warp_mask' or 'segment', found {mode!r}")
    moving_mask, moving_image, fixed_image = item.get("moving_mask"), item.get("moving_image"), item.get("fixed_image")
    if mode == "warp_mask" and moving_mask is None:
        raise ValueError("mode='warp_mask' needs the moving lung mask (the pair has no 'moving_mask')")
    if mode == "segment" and (moving_image is None or fixed_image is None):
        raise ValueError("mode='segment' needs the pair's fixed_image and moving_image")
    if band_mm is not None and not band_mm > 0:
        raise ValueError(f"band_mm must be positive or None, found {band_mm}")
    return item["fixed_mask"], moving_mask, moving_image, fixed_image


def _median_alpha(alphas: list, num_weights: int):
    """The boundary band's reference alpha: the first grid's median (per weight for K weights)."""
    if num_weights == 1:
        return float(np.median(alphas))
    return tuple(float(np.median([a[i] for a in alphas])) for i in range(num_weights))


def _key_metric(key_metric) -> AlphaChoice:
    """The evaluator's key metric: the default, the one given, or a fresh one from a factory."""
    if key_metric is None:
        return AlphaChoice()
    if isinstance(key_metric, AlphaChoice):
        return key_metric
    choice = key_metric()  # a factory (e.g. a config partial): a fresh metric for this search
    if not isinstance(choice, AlphaChoice):
        raise TypeError(f"key_metric must be an AlphaChoice or a callable returning one; the callable returned {type(choice).__name__}")
    return choice


def _folding_fraction(metric) -> float:
    """Folding fraction from an accumulated ``JacobianDeterminantMetric`` (0 when empty)."""
    try:
        value = metric.aggregate()
    except Exception:  # no points in the mask on this grid
        return 0.0
    value = torch.as_tensor(value, dtype=torch.float64)
    return float(value.reshape(-1)[0]) if value.numel() else 0.0
