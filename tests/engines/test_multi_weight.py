"""Several regularization weights conditioned at once: the prior, alpha vectors, the K-dimensional search, end to end."""

from __future__ import annotations

import csv
import functools
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Events

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.engines import AlphaPrior, AlphaSearch, AlphaSelectionEvaluator, RegistrationModel, load_registration_model, register_patient
from monai_cidir.engines.model import as_alpha_tensor
from monai_cidir.engines.registration import check_alpha, weight_ranges
from monai_cidir.losses import RegistrationLoss
from monai_cidir.networks import ConditionedINR

TINY = dict(shape=(48, 48, 32), spacing=(5.6, 5.6, 8.0))
# TRE after / before of the two-weight run (120 iterations), measured at commit 8835b11 + this test:
# 4.36 -> 0.452 mm (0.104x) at [1, 1], 0.442 mm at [0.01, 0.1]; the bound keeps a margin of about half
TWO_WEIGHT_TRE_RATIO = 0.15


# ---------------------------------------------------------------------------- prior
def test_one_weight_prior_draws_what_it_drew_before():
    """K = 1 stays bit-identical: the same generator stream, the same transform as the single-alpha prior."""
    for dist in ("uniform", "log-uniform"):
        got = AlphaPrior(0.0, 1.0, dist, per_point=True, log_floor=1e-3).sample(1000, torch.Generator().manual_seed(3))
        r = torch.rand(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        want = r if dist == "uniform" else torch.exp(math.log(1e-3) + (0.0 - math.log(1e-3)) * r)
        assert got.shape == (1000, 1)
        assert torch.equal(got, want.float().reshape(1000, 1))


def test_vector_prior_samples_each_weight_from_its_own_range():
    prior = AlphaPrior([0.0, 0.2], [1.0, 0.5], ["log-uniform", "uniform"], per_point=True, log_floor=1e-3)
    a = prior.sample(20000, torch.Generator().manual_seed(0))
    assert prior.num_weights == 2 and a.shape == (20000, 2)
    assert float(a[:, 0].min()) >= 1e-3 and float(a[:, 0].max()) <= 1.0
    assert float(a[:, 1].min()) >= 0.2 and float(a[:, 1].max()) <= 0.5
    # log-uniform: half the draws below the geometric middle of [1e-3, 1]; uniform: half below the middle
    assert abs(float((a[:, 0] < math.sqrt(1e-3)).double().mean()) - 0.5) < 0.02
    assert abs(float((a[:, 1] < 0.35).double().mean()) - 0.5) < 0.02
    # the two columns are drawn independently
    assert abs(float(torch.corrcoef(a.T.double())[0, 1])) < 0.03
    assert AlphaPrior(0.0, [1.0, 1.0]).sample(5).shape == (1, 2)  # one vector per batch
    np.testing.assert_allclose(np.array(prior.axis_grids(3)), [[0.0, 1e-3, 1.0], [0.2, 0.35, 0.5]], rtol=1e-12)
    assert AlphaPrior(**prior.state_dict()).state_dict() == prior.state_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(low=[0.0, 0.0], high=[1.0, 1.0, 1.0]), "low has 2 entries for 3 weights"),
        (dict(high=[1.0, 0.5], distribution=["uniform", "normal"]), r"\(weight 1\), found 'normal'"),
        (dict(low=[0.0, 0.6], high=[1.0, 0.5]), r"low <= high \(weight 1\)"),
    ],
)
def test_vector_prior_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlphaPrior(**kwargs)


def test_alpha_vectors_and_ranges():
    assert as_alpha_tensor([0.1, 0.2], 5, num_weights=2).shape == (1, 2)
    assert as_alpha_tensor(torch.rand(5, 2), 5, num_weights=2).shape == (5, 2)
    with pytest.raises(ValueError, match=r"2 weights .* found shape \(\)"):
        as_alpha_tensor(0.3, 5, num_weights=2)
    with pytest.raises(ValueError, match=r"found shape \(4, 2\)"):
        as_alpha_tensor(torch.rand(4, 2), 5, num_weights=2)
    assert weight_ranges([0, 1], 2) == [(0.0, 1.0), (0.0, 1.0)]
    assert weight_ranges([[0, 1], [0, 0.5]], 2) == [(0.0, 1.0), (0.0, 0.5)]
    check_alpha([0.3, 0.5], [[0, 1], [0, 0.5]], 2)
    with pytest.raises(ValueError, match=r"outside the range .* \[0, 0.5\]"):
        check_alpha([0.3, 0.6], [[0, 1], [0, 0.5]], 2)
    with pytest.raises(ValueError, match="has 1 value.* conditioned on 2 weight"):
        check_alpha(0.3, [0, 1], 2)
    with pytest.raises(ValueError, match="3 ranges for 2 weight"):
        weight_ranges([[0, 1], [0, 1], [0, 1]], 2)


def test_network_loss_and_prior_must_agree():
    from monai_cidir.engines import CIDIRTrainer

    from tests.engines.engine_fixtures import make_blob_pair

    item = make_blob_pair(shape=(12, 12, 10))
    loss = RegistrationLoss(["bending", "jacobian"], conditioning="per_regularizer")
    sampler = lambda n: torch.zeros(n, 3)  # noqa: E731
    with pytest.raises(ValueError, match=r"2 weight\(s\) in the loss .* 1 in the network"):
        CIDIRTrainer(ConditionedINR(hidden_features=8), torch.optim.Adam, item["fixed_image"], item["moving_image"], sampler, loss=loss)


# ---------------------------------------------------------------------------- search
def _score_surface(alpha) -> float:
    """A known optimum at (0.02, 0.3), quadratic in log10 alpha (alpha 0 counts as 1e-4)."""
    la = [math.log10(max(a, 1e-4)) for a in alpha]
    return 0.9 - 0.1 * (la[0] - math.log10(0.02)) ** 2 - 0.1 * (la[1] - math.log10(0.3)) ** 2  # steeper than the tie tolerance


@pytest.mark.parametrize("rounds", [1, 2])
def test_search_refines_towards_the_known_optimum(rounds):
    from tests.engines.engine_fixtures import make_blob_pair

    item = make_blob_pair(shape=(16, 14, 12))
    model = RegistrationModel(ConditionedINR(hidden_features=8, cond_features=2), CoordinateMapping.from_image(item["fixed_image"]))
    prior = AlphaPrior(0.0, [1.0, 1.0], "log-uniform", log_floor=1e-3)
    evaluator = AlphaSelectionEvaluator(model, item, prior=prior, search=AlphaSearch(21, refine_rounds=rounds))

    ones = torch.ones(1, 1, 2, 2, 2)  # MeanDice (the key metric) still sees a prediction and a label

    def score(alpha, folding_stride=None):
        return {"alpha": tuple(float(a) for a in alpha), "dice": _score_surface(alpha), "folding": 0.0, "seconds": 0.0, "points": 0, "pred": ones, "label": ones}

    evaluator.score = score
    seen = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output["alpha"]))
    curve = evaluator.run()
    coarse = max(_score_surface((a, b)) for a in prior.axis_grids(4)[0] for b in prior.axis_grids(4)[1])
    assert len(seen) == len(curve.rows) and 16 < len(curve.rows) <= 16 + rounds * 8  # every evaluation went through the engine
    assert curve.best["dice"] > coarse
    # the 4-value log grid steps 1.5 decades (0, then 1e-3 .. 1); each round halves the step around the best
    tolerance = 0.5 * 1.5 / 2**rounds + 0.015
    assert abs(math.log10(curve.alpha[0]) - math.log10(0.02)) <= tolerance
    assert abs(math.log10(curve.alpha[1]) - math.log10(0.3)) <= tolerance
    assert isinstance(curve.alpha, list) and len(curve.alpha) == 2


def test_vector_model_needs_the_prior():
    from tests.engines.engine_fixtures import make_blob_pair

    item = make_blob_pair(shape=(12, 12, 10))
    model = RegistrationModel(ConditionedINR(hidden_features=8, cond_features=2), CoordinateMapping.from_image(item["fixed_image"]))
    with pytest.raises(ValueError, match="conditioned on 2 weights"):
        AlphaSelectionEvaluator(model, item)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def two_weight_run(tmp_path_factory):
    from monai_cidir.data import RegistrationPairDataset, make_breathing_phantom

    item = RegistrationPairDataset(make_breathing_phantom(tmp_path_factory.mktemp("phantom_k2"), seed=0, **TINY))[0]
    out = tmp_path_factory.mktemp("out_k2")
    loss = RegistrationLoss({"bending": 1.0, "jacobian": 1.0}, conditioning="per_regularizer")
    metrics = register_patient(
        item, out, seed=0, max_iterations=120, num_points=1000, num_alphas=9, loss=loss,
        network=functools.partial(ConditionedINR, hidden_features=64),
    )  # fmt: skip
    return item, out, metrics


def test_two_weights_end_to_end(two_weight_run):
    item, out, m = two_weight_run
    pdir = out / item["name"]
    assert m["alpha_names"] == ["bending", "jacobian"]
    assert isinstance(m["alpha"], list) and len(m["alpha"]) == 2
    assert m["tre_after_mean"] <= TWO_WEIGHT_TRE_RATIO * m["tre_before_mean"], (m["tre_before_mean"], m["tre_after_mean"])
    assert json.loads((pdir / "metrics.json").read_text())["alpha"] == m["alpha"]
    with open(pdir / "alpha_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["alpha_bending", "alpha_jacobian", "dice", "folding", "seconds", "tre"]  # tre: the pair has landmarks
    assert len(rows) == m["num_alphas_evaluated"] >= 9
    # the selection rule, written out here: the highest Dice wins, Dice within 1e-3 of it are ties, and
    # the smoother field wins a tie (the larger sum of alpha_r / the largest alpha_r evaluated)
    vectors = [(float(r["alpha_bending"]), float(r["alpha_jacobian"]), float(r["dice"])) for r in rows]
    highs = [max(v[i] for v in vectors) for i in (0, 1)]
    best = max(v[2] for v in vectors)
    chosen = max((v for v in vectors if v[2] >= best - 1e-3 - 1e-6), key=lambda v: (v[0] / highs[0] + v[1] / highs[1], v[:2]))
    assert m["alpha"] == pytest.approx(list(chosen[:2]), rel=1e-5, abs=1e-9), (m["alpha"], chosen)
    assert m["dice"] == pytest.approx(chosen[2], abs=1e-5)
    model = load_registration_model(pdir / "model.pt")
    assert model.info["regularizer_names"] == ["bending", "jacobian"] and model.info["cond_features"] == 2
    assert model.info["alpha"] == m["alpha"]
    pts = item["fixed_landmarks"][:5].double()
    u = model.displacement(pts, m["alpha"])
    # the two weights change the field differently: each one moves it on its own
    far = [0.0 if a > 0.5 else 1.0 for a in m["alpha"]]  # the other end of each weight's range
    for other in ([far[0], m["alpha"][1]], [m["alpha"][0], far[1]]):
        assert float((model.displacement(pts, other) - u).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="2 weights"):
        model.displacement(pts, 0.5)


def test_two_weights_reexport_at_a_given_vector(two_weight_run):
    from monai_cidir.engines import export_registration

    item, out, m = two_weight_run
    again = export_registration(item, out, alpha=[0.01, 0.1], num_alphas=0)
    assert again["alpha"] == [0.01, 0.1] and again["alpha_selection"] == "fixed"
    # the TRE of the reloaded model at that vector, computed here; not the selected vector's
    model = load_registration_model(out / item["name"] / "model.pt")
    moved = item["fixed_landmarks"] + model.displacement(item["fixed_landmarks"], [0.01, 0.1])
    assert again["tre_after_mean"] == pytest.approx(float((moved - item["moving_landmarks"]).norm(dim=1).mean()), abs=1e-4)
    assert again["tre_after_mean"] < TWO_WEIGHT_TRE_RATIO * again["tre_before_mean"]
    assert abs(again["tre_after_mean"] - m["tre_after_mean"]) > 1e-3, (again["tre_after_mean"], m["tre_after_mean"])
    with pytest.raises(ValueError, match="conditioned on 2 weight"):
        export_registration(item, out, alpha=0.1, num_alphas=0)


def test_bundle_config_keys_build_the_two_weight_loss():
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[2] / "bundles/cidir_lung_ct/configs/train.json"))
    assert parser["conditioning"] == "shared" and parser.get_parsed_content("loss").cond_features == 1
    parser["regularizer"] = {"bending": 1.0, "jacobian": 1.0}
    parser["conditioning"] = "per_regularizer"
    loss = parser.get_parsed_content("loss", lazy=False)
    assert loss.names == ["bending", "jacobian"] and loss.cond_features == 2


def test_cohort_table_and_summary_show_the_vector(tmp_path, two_weight_run):
    from monai_cidir.engines import format_summary_table, write_cohort_table

    _, _, m = two_weight_run
    path = write_cohort_table([m, {**m, "name": "other", "alpha": 0.25}], tmp_path / "metrics.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert json.loads(rows[0]["alpha"]) == m["alpha"] and float(rows[1]["alpha"]) == 0.25
    table = format_summary_table([m])
    assert f"[{m['alpha'][0]:.2g}, {m['alpha'][1]:.2g}]" in table


def test_command_line_alpha_vectors():
    """`--alpha "[0.01, 0.1]"` and per-weight `--alpha_range` reach the engines as lists; bad ones are refused."""
    from monai_cidir.engines.bundle import _normalise_options

    out = _normalise_options({"alpha": "[0.01, 0.1]", "alpha_range": "[[0, 1], [0, 0.5]]"})
    assert out["alpha"] == [0.01, 0.1] and out["alpha_range"] == [[0.0, 1.0], [0.0, 0.5]]
    assert _normalise_options({"alpha_range": [0, 1]})["alpha_range"] == [0.0, 1.0]
    with pytest.raises(ValueError, match="JSON list"):
        _normalise_options({"alpha": "[0.01, "})
    with pytest.raises(ValueError, match="low <= high"):
        _normalise_options({"alpha_range": [[0, 1], [0.6, 0.5]]})
