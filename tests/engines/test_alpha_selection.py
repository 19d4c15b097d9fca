"""Alpha selection: coarse-grid Dice tracks full-resolution Dice, the selection rule, folding, MeanDice."""

from __future__ import annotations

import pytest
import torch

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.engines import AlphaPrior, AlphaSearch, AlphaSelectionEvaluator, RegistrationModel, alpha_grid
from monai_cidir.engines.alpha_selection import coarse_steps, selection_grid
from monai_cidir.handlers import AlphaChoice
from monai_cidir.networks import ConditionedINR
from monai_cidir.transforms import LungMask


class _AlphaScaledField(torch.nn.Module):
    """u(x, alpha) = (1 - alpha) * c * x_z^2 e_z: a smooth field whose size shrinks with alpha."""

    def __init__(self, c: float = 0.15) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))

    def forward(self, x, alpha):
        a = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1, 1)
        return (1 - a) * self.c * torch.stack([0 * x[:, 0], 0 * x[:, 1], x[:, 2] ** 2], dim=1)

    def forward_with_derivatives(self, x, alpha, order=1):
        a = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1, 1, 1)
        jac = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype)
        jac[:, 2, 2] = 2 * self.c * x[:, 2]
        return self.forward(x, alpha), (1 - a) * jac, None


@pytest.fixture(scope="module")
def phantom_item(tmp_path_factory):
    from monai_cidir.data import RegistrationPairDataset, make_breathing_phantom

    datalist = make_breathing_phantom(tmp_path_factory.mktemp("phantom_sel"), seed=1, shape=(64, 60, 44), spacing=(4.2, 4.4, 5.8))
    return RegistrationPairDataset(datalist)[0]


def test_coarse_dice_within_0_005_of_full_resolution(phantom_item):
    torch.manual_seed(0)
    model = RegistrationModel(ConditionedINR(hidden_features=32), CoordinateMapping.from_image(phantom_item["fixed_image"]))
    affine = torch.eye(4, dtype=torch.float64)
    affine[2, 2] = 0.97  # a global 3% SI compression on top of the random INR: Dice varies with the map
    model.set_affine(affine)
    alphas = [0.0, 0.5, 1.0]
    # 9 mm on this coarse phantom gives strides (2, 2, 1), as the 4 mm default does on a 1.7 x 1.7 x 5 mm CT
    coarse = AlphaSelectionEvaluator(
        model, phantom_item, search=AlphaSearch(alphas=alphas),
        grid=selection_grid(model.mapping, phantom_item["fixed_mask"], coarse_spacing_mm=9.0),
    )
    assert torch.allclose(coarse.grid.spacing, model.mapping.spacing * torch.tensor([2.0, 2.0, 1.0]))
    full = AlphaSelectionEvaluator(
        model, phantom_item, search=AlphaSearch(alphas=alphas), grid=model.mapping
    )
    c, f = coarse.run(), full.run()
    assert int(torch.tensor(coarse.shape).prod()) * 6 < int(torch.tensor(full.shape).prod())
    for rc, rf in zip(c.rows, f.rows):
        assert abs(rc["dice"] - rf["dice"]) <= 0.005, (rc, rf)
    # MeanDice handler attached to the evaluator: the sweep's mean Dice
    mean = sum(r["dice"] for r in c.rows) / len(c.rows)
    assert coarse.state.metrics["mean_dice"] == pytest.approx(mean, abs=1e-5)


def test_selection_prefers_best_dice_and_larger_alpha_on_ties():
    rows = [
        {"alpha": 0.0, "dice": 0.90, "folding": 0.0},
        {"alpha": 0.25, "dice": 0.95, "folding": 0.01},
        {"alpha": 0.5, "dice": 0.95, "folding": 0.0},
        {"alpha": 0.75, "dice": 0.93, "folding": 0.0},
    ]
    assert AlphaChoice().choose(rows)["alpha"] == 0.5  # tie -> larger alpha
    rows[2]["dice"] = 0.94
    assert AlphaChoice().choose(rows)["alpha"] == 0.25
    assert AlphaChoice(no_folding=True).choose(rows)["alpha"] == 0.5  # 0.25 folds
    assert AlphaChoice(tie_tolerance=0.05).choose(rows)["alpha"] == 0.75  # all but alpha 0 tie
    # long training: Dice creeps up by several 1e-4 towards alpha 0 (the TRE does not follow); the
    # default tolerance, 1e-3, keeps the smoother field, the former 1e-4 and 5e-4 did not (the GPU's
    # 2500 x 10000 phantom run, seed 1: 0.98513 at alpha 0.001, 0.98438 at 0.026, 0.98384 at 1)
    creeping = [{"alpha": 0.001, "dice": 0.98513, "folding": 0.0}, {"alpha": 0.026, "dice": 0.98438, "folding": 0.0},
                {"alpha": 0.3, "dice": 0.98380, "folding": 0.0}]  # fmt: skip
    assert AlphaChoice().choose(creeping)["alpha"] == 0.026
    assert AlphaChoice(tie_tolerance=5e-4).choose(creeping)["alpha"] == 0.001
    assert AlphaChoice(tie_tolerance=2e-3).choose(creeping)["alpha"] == 0.3
    # a Dice that falls by more than the tolerance is not a tie (the real pair: 0.9818 at 0, 0.9736 at 1)
    assert AlphaChoice().choose([{"alpha": 0.0, "dice": 0.9818, "folding": 0.0}, {"alpha": 1.0, "dice": 0.9736, "folding": 0.0}])["alpha"] == 0.0


class _LowestDice(AlphaChoice):
    """A key metric with another rule (the worst Dice): the evaluator must follow it."""

    def choose(self, rows):
        return min(rows, key=lambda r: r["dice"])


def test_the_key_metric_decides(phantom_item):
    # the fixed mask as moving mask: Dice is highest where the field is smallest (alpha -> 1)
    model = RegistrationModel(_AlphaScaledField(c=0.3), CoordinateMapping.from_image(phantom_item["fixed_image"]))
    args = (model, {**phantom_item, "moving_mask": phantom_item["fixed_mask"]})
    ev = AlphaSelectionEvaluator(*args, search=AlphaSearch(alphas=[0.0, 0.5, 1.0]))
    curve = ev.run()
    dice = {r["alpha"]: r["dice"] for r in curve.rows}
    assert dice[1.0] > dice[0.5] > dice[0.0]
    assert curve.alpha == 1.0 and ev.state.metrics["selected_dice"] == pytest.approx(dice[1.0])
    assert ev.state.best_metric == pytest.approx(dice[1.0])
    # another rule, given as a factory (as a config partial gives it): a fresh metric per search
    ev = AlphaSelectionEvaluator(*args, search=AlphaSearch(alphas=[0.0, 0.5, 1.0]), key_metric=_LowestDice)
    curve = ev.run()
    assert curve.alpha == 0.0 and curve.best["dice"] == pytest.approx(dice[0.0])
    assert ev.state.metrics["selected_dice"] == pytest.approx(dice[0.0])
    # misconfigurations are refused before or at the first alpha, naming what is wrong
    with pytest.raises(TypeError, match="AlphaChoice"):
        AlphaSelectionEvaluator(*args, search=AlphaSearch(alphas=[0.5]), key_metric=dict)
    with pytest.raises(ValueError, match=r"expected the loaded pair .* found MetaTensor"):
        AlphaSelectionEvaluator(model, phantom_item["fixed_mask"])
    with pytest.raises(KeyError, match="ncc"):
        AlphaSelectionEvaluator(*args, search=AlphaSearch(alphas=[0.5]), key_metric=AlphaChoice(score_key="ncc")).run()


def test_folding_fraction_from_exact_jacobians(phantom_item):
    mapping = CoordinateMapping.from_image(phantom_item["fixed_image"])
    mirror = torch.eye(4, dtype=torch.float64)
    mirror[0, 0] = -1.0  # det(I + J) = -1 everywhere
    model = RegistrationModel(_AlphaScaledField(c=0.0), mapping, mirror)
    rows = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(alphas=[0.5])).run().rows
    assert rows[0]["folding"] == 1.0
    model.set_affine(None)
    rows = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(alphas=[0.5])).run().rows
    assert rows[0]["folding"] == 0.0 and rows[0]["dice"] < 1.0


def test_grid_and_golden_section_refinement(phantom_item):
    assert alpha_grid() == pytest.approx([i / 20 for i in range(21)])
    assert alpha_grid(1e-3, 1.0, 4, "log-uniform") == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])
    # a log-uniform prior from 0: the unregularised end stays on the grid, the rest is log-spaced
    assert alpha_grid(0.0, 1.0, 5, "log-uniform", log_floor=1e-3) == pytest.approx([0.0, 1e-3, 1e-2, 1e-1, 1.0])
    assert AlphaPrior(0.0, 1.0, "log-uniform", log_floor=1e-2).grid(3) == pytest.approx([0.0, 1e-2, 1.0])
    assert AlphaPrior(0.2, 0.6).grid(3) == pytest.approx([0.2, 0.4, 0.6])
    # the fixed image's own mask as 'moving' mask: Dice is highest where the field is smallest (alpha -> 1)
    model = RegistrationModel(_AlphaScaledField(c=0.3), CoordinateMapping.from_image(phantom_item["fixed_image"]))
    ev = AlphaSelectionEvaluator(
        model, {**phantom_item, "moving_mask": phantom_item["fixed_mask"]}, search=AlphaSearch(5, golden_section_steps=4),
        key_metric=AlphaChoice(tie_tolerance=0.0),
    )
    from ignite.engine import Events

    seen = []
    ev.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output["alpha"]))
    curve = ev.run()
    assert len(curve.rows) == 5 + 4
    assert sorted(seen) == sorted(r["alpha"] for r in curve.rows)  # the refinement too went through the engine
    refined = [r["alpha"] for r in curve.rows if r["alpha"] not in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert len(refined) == 4 and all(0.75 <= a <= 1.0 for a in refined)
    assert curve.best["dice"] == max(r["dice"] for r in curve.rows)
    assert curve.alpha == 1.0


def test_coarse_steps_follow_the_voxel_size():
    from monai_cidir.coordinates import affine_from_spacing
    from monai_cidir.engines import coarse_steps

    dirlab = CoordinateMapping(affine_from_spacing((0.97, 0.97, 2.5)), (256, 256, 94))
    assert coarse_steps(dirlab) == (4, 4, 1)
    assert coarse_steps(dirlab, None) == (1, 1, 1)
    assert coarse_steps(dirlab, coarse_factor=2) == (2, 2, 2)


def test_segment_mode_agrees_with_warped_mask(phantom_item):
    torch.manual_seed(0)
    model = RegistrationModel(ConditionedINR(hidden_features=32), CoordinateMapping.from_image(phantom_item["fixed_image"]))
    kw = dict(search=AlphaSearch(alphas=[0.5]))
    warp = AlphaSelectionEvaluator(model, phantom_item, **kw).run()
    seg = AlphaSelectionEvaluator(model, {**phantom_item, "moving_mask": None}, mode="segment", lung_mask=LungMask(backend="threshold"), **kw)
    # the threshold backend segments the fixed phantom close to its true mask...
    steps = coarse_steps(model.mapping)  # segment mode scores on the whole field of view, ~4 mm apart
    truth = phantom_item["fixed_mask"][0][tuple(slice(0, None, st) for st in steps)] > 0.5
    assert tuple(truth.shape) == seg.grid.spatial_shape
    overlap = 2 * (seg.fixed_mask_grid & truth).sum() / (seg.fixed_mask_grid.sum() + truth.sum())
    assert float(overlap) > 0.95
    # ...so Dice of the segmented moved image tracks Dice of the warped mask
    assert seg.run().best["dice"] == pytest.approx(warp.best["dice"], abs=0.02)


@pytest.mark.parametrize("c", [0.005, 0.3])
def test_band_sweep_gives_the_full_grid_dice_exactly(phantom_item, c):
    """The boundary-band sweep reproduces every alpha's Dice of the whole-grid evaluation.

    c = 0.005 moves points by < 0.5 mm between alpha = 0.5 (the reference) and 0/1: a thin band
    holds, and its radius follows the movement. c = 0.3 moves them by up to ~5 mm: the band must
    widen (or fall back) and still agree.
    """
    mapping = CoordinateMapping.from_image(phantom_item["fixed_image"])
    model = RegistrationModel(_AlphaScaledField(c=c), mapping)
    alphas = [0.0, 0.2, 0.5, 0.9, 1.0]
    band = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(alphas=alphas))
    full = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(alphas=alphas), band_mm=None)
    b, f = band.run(), full.run()
    dices = [r["dice"] for r in f.rows]
    if c > 0.1:
        assert max(dices) - min(dices) > 0.02  # the field really changes Dice
    for rb, rf in zip(b.rows, f.rows):
        assert rb["dice"] == pytest.approx(rf["dice"], abs=1e-7), (rb, rf)
    n = int(torch.tensor(band.shape).prod())
    if c > 0.1:  # widened beyond the band's reach: more points, up to all of them
        assert band.score(0.0)["points"] > n / 3
    else:
        near = band.score(0.45)["points"]
        near_radius = band._band["radius"]
        far = band.score(0.0)["points"]
        assert band._band["radius"] == pytest.approx(4 * _largest_move(band, 0.0), rel=1e-5)
        assert near_radius < band._band["radius"]  # the band follows how far alpha moved the points
        assert near <= far < n / 3  # far fewer network evaluations than grid points
        assert near >= n // 32  # the probe is always mapped


def _largest_move(ev, alpha):
    """Largest movement of the probe points between the reference alpha and ``alpha``."""
    probe = ev._band["probe"]
    return float((ev._moved(probe, alpha) - ev._band["moved"][probe]).norm(dim=1).max())


def test_safe_radius_is_conservative(phantom_item):
    """No point moved by less than its safe radius changes its warped-mask label."""
    mapping = CoordinateMapping.from_image(phantom_item["fixed_image"])
    model = RegistrationModel(_AlphaScaledField(c=0.0), mapping)
    ev = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(alphas=[0.5]))
    g = torch.Generator().manual_seed(0)
    lo, hi = ev._grid_world().min(0).values, ev._grid_world().max(0).values
    pts = lo + (hi - lo) * torch.rand(20000, 3, generator=g)
    safe = ev._safe_distance(pts)
    label = ev._sample(pts) > 0.5
    assert (safe > 2.0).float().mean() > 0.3  # most points are far from the boundary...
    assert (safe < 1.0).any()  # ...some are close
    for _ in range(5):
        direction = torch.nn.functional.normalize(torch.randn(20000, 3, generator=g), dim=1)
        step = safe.clamp(min=0)[:, None] * torch.rand(20000, 1, generator=g) * 0.999
        moved = ev._sample(pts + direction * step) > 0.5
        assert torch.equal(moved, label)


def test_sweep_folding_is_thinned_and_the_choice_uses_every_point(phantom_item):
    mapping = CoordinateMapping.from_image(phantom_item["fixed_image"])
    model = RegistrationModel(_AlphaScaledField(c=0.0), mapping)
    ev = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(alphas=[0.5]))
    inside = int(ev.fixed_mask_grid.sum())
    thinned = ev._folding_points(2).numel()
    assert inside / 12 < thinned < inside / 4
    with pytest.raises(ValueError, match="folding_stride"):
        AlphaSelectionEvaluator(model, phantom_item, folding_stride=0)
    with pytest.raises(ValueError, match="band_mm"):
        AlphaSelectionEvaluator(model, phantom_item, band_mm=-1.0)


def test_selection_evaluator_folds_the_keyword_options_and_the_factory_wins(phantom_item):
    import functools

    from monai_cidir.engines import selection_evaluator

    model = RegistrationModel(_AlphaScaledField(c=0.3), CoordinateMapping.from_image(phantom_item["fixed_image"]))
    args = (model, {**phantom_item, "moving_mask": phantom_item["fixed_mask"]})
    factory = selection_evaluator(num_alphas=3, golden_section_steps=2, coarse_spacing_mm=9.0, chunk_size=4096)
    assert factory.func is AlphaSelectionEvaluator and factory.keywords["mode"] == "warp_mask"
    ev = factory(*args, prior=AlphaPrior(0.0, 1.0))
    search = ev.search
    assert (search.num_alphas, search.golden_section_steps, ev.chunk_size) == (3, 2, 4096)
    # the grid factory: the same sub-grid as selection_grid at that spacing (the lung box, every 2nd voxel here)
    expected = selection_grid(model.mapping, phantom_item["fixed_mask"], 9.0)
    assert ev.grid.spatial_shape == expected.spatial_shape and torch.allclose(ev.grid.affine, expected.affine)
    assert ev.grid.spatial_shape != selection_grid(model.mapping, phantom_item["fixed_mask"]).spatial_shape
    # what a config partial sets itself wins over the keyword options
    own = functools.partial(AlphaSelectionEvaluator, search=AlphaSearch(alphas=[0.0, 1.0]), chunk_size=512)
    ev = selection_evaluator(own, num_alphas=7, chunk_size=4096)(*args, prior=AlphaPrior())
    assert ev.chunk_size == 512 and [r["alpha"] for r in ev.run().rows] == [0.0, 1.0]
    assert not ev.no_folding and ev.folding_stride == 4
    # no_folding is the key metric's rule: set on the factory's own key metric too (fresh per evaluator)
    own_metric = functools.partial(AlphaSelectionEvaluator, key_metric=functools.partial(AlphaChoice, tie_tolerance=0.0))
    strict = selection_evaluator(own_metric, no_folding=True)
    first, second = strict(*args, prior=AlphaPrior()), strict(*args, prior=AlphaPrior())
    assert first.no_folding and first.choice.tie_tolerance == 0.0 and first.folding_stride == 2
    assert first.choice is not second.choice
    with pytest.raises(TypeError, match="did you mean 'no_folding'"):
        selection_evaluator(no_foldin=True)
    with pytest.raises(TypeError, match="AlphaSearch instance"):
        selection_evaluator(functools.partial(AlphaSelectionEvaluator, search=functools.partial(AlphaSearch, 3)))


def test_the_export_handler_writes_the_outputs_once_when_the_search_completes(phantom_item, tmp_path):
    """RegistrationExport, attached like any handler, writes after the refinement too, exactly once, at the key metric's choice."""
    import json

    from monai_cidir.engines import RegistrationExport

    model = RegistrationModel(_AlphaScaledField(c=0.3), CoordinateMapping.from_image(phantom_item["fixed_image"]))
    model.info = {"name": "p", "alpha_range": [0.0, 1.0]}
    item = {**phantom_item, "moving_mask": phantom_item["fixed_mask"]}  # Dice is highest at alpha 1
    export = RegistrationExport(tmp_path / "p", item, export_coarse_mm=None, previous={"seconds_training": 1.5})
    writes = []
    write = export.write
    export.write = lambda *args: writes.append(len(args[1])) or write(*args)
    ev = AlphaSelectionEvaluator(model, item, search=AlphaSearch(5, golden_section_steps=3), val_handlers=[export])
    curve = ev.run()
    assert writes == [5 + 3]  # once, with the grid and the refinement's alphas
    stored = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert stored == export.metrics and stored["alpha"] == curve.alpha == 1.0 and stored["seconds_training"] == 1.5
    assert stored["dice"] == pytest.approx(curve.best["dice"]) and stored["num_alphas_evaluated"] == 8
    for f in ("alpha_curve.csv", "alpha_curve.png", "displacement.nii.gz", "warped_moving.nii.gz", "model.pt"):
        assert (tmp_path / "p" / f).is_file(), f
    assert torch.load(tmp_path / "p" / "model.pt", weights_only=False)["alpha"] == 1.0 and model.info["alpha"] == 1.0


def test_a_trained_model_is_searched_on_its_own_prior(phantom_item):
    """prior=None reads the prior model.pt stores (log-uniform: 0, then log-spaced), not the paper's uniform grid."""
    model = RegistrationModel(_AlphaScaledField(c=0.3), CoordinateMapping.from_image(phantom_item["fixed_image"]))
    plain = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(5))
    model.info = {"alpha_prior": AlphaPrior(0.0, 1.0, "log-uniform", log_floor=1e-4).state_dict()}
    stored = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(5))
    first = lambda ev: [a["alpha"] for a in ev.data_loader]  # noqa: E731
    assert first(plain) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert first(stored) == pytest.approx([0.0, 1e-4, 1e-3 * 10 ** (1 / 3), 10 ** (-4 / 3), 1.0])
