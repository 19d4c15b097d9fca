"""The bundle as MONAI sees it: ConfigWorkflow's required properties, and components swapped by
config overrides (network, similarity, regularizer, optimizer, lr schedule, handler, evaluator)."""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, run

from monai_cidir.engines import AlphaSelectionEvaluator, CIDIRTrainer, CohortInferenceWorkflow, CohortTrainingWorkflow
from monai_cidir.engines.bundle import make_phantom_cohort
from monai_cidir.handlers import AlphaChoice
from monai_cidir.inferers import PointInferer

CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "cidir_lung_ct" / "configs"
TINY_PHANTOM = {"shape": (40, 40, 28), "spacing": (6.3, 6.3, 9.0), "num_landmarks": 30}


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "data"
    make_phantom_cohort(root, num_patients=1, seed=0, **TINY_PHANTOM)
    return root


def test_train_config_has_every_property_monai_requires(phantom_dir, tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", dataset_dir=str(phantom_dir), output_dir=str(tmp_path / "out")
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    trainer, evaluator = workflow.trainer, workflow.parser.get_parsed_content("validate#evaluator")
    assert isinstance(trainer, functools.partial) and trainer.func is CIDIRTrainer  # one fresh trainer per patient
    assert isinstance(evaluator, functools.partial) and evaluator.func is AlphaSelectionEvaluator
    assert workflow.max_epochs == math.ceil(600 / 100) and trainer.keywords["max_epochs"] == workflow.max_epochs
    assert trainer.keywords["regularization_points"] == 500  # the regularizer on 500 of the 2000 points per step
    assert [item["name"] for item in workflow.train_dataset] == ["phantom_seed0"]
    assert callable(workflow.train_inferer)
    network = workflow.network_def()
    assert type(network).__name__ == "ConditionedINR" and network.layers[0].out_features == 256
    assert isinstance(workflow.parser.get_parsed_content("workflow"), CohortTrainingWorkflow)


def test_inference_config_has_every_property_monai_requires(phantom_dir, tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), workflow_type="infer", dataset_dir=str(phantom_dir), output_dir=str(tmp_path / "out")
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.inferer, PointInferer) and workflow.inferer.chunk_size == 65536
    assert workflow.evaluator.func is AlphaSelectionEvaluator
    assert workflow.network_def is None  # the network stored in model.pt, unless one is given
    assert isinstance(workflow.parser.get_parsed_content("workflow"), CohortInferenceWorkflow)


SWAPS = {
    "network_def#hidden_features": 32,
    "network_def#num_hidden_layers": 2,
    "loss#similarity": {"_target_": "torch.nn.MSELoss"},
    "regularizer": "jacobian",
    "optimizer": {"_target_": "torch.optim.SGD", "_mode_": "callable", "lr": 1e-3, "momentum": 0.9},
    "lr_scheduler": "step",
    "train#handlers#1#tag_name": "swapped_loss",
    "train#handlers#1#name": "cidir_swap_test",  # a logger of its own, created (and captured) in this test
    "train#handlers#1#iteration_log": True,
    "validate#evaluator#search#num_alphas": 3,
    "validate#evaluator#key_metric#_target_": "tests.bundle.test_bundle_workflow.SmallestAlphaChoice",
}


class SmallestAlphaChoice(AlphaChoice):
    """A selection rule of its own (the smallest alpha, whatever its Dice), to see that the key metric decides."""

    @property
    def name(self) -> str:
        return "smallest_alpha"

    def choose(self, rows):
        return min(rows, key=lambda r: r["alpha"])


def test_components_are_swapped_by_config_overrides(phantom_dir, tmp_path, monkeypatch, capfd):
    """What the overrides name is what runs: the outputs record the swapped network, loss,
    optimizer, schedule, handler and evaluator."""
    monkeypatch.chdir(tmp_path)
    run(
        "training",
        config_file=str(CONFIGS / "train.json"),
        dataset_dir=str(phantom_dir),
        device="cpu",
        max_iterations=6,
        num_points=200,
        affine_prealign="false",
        **SWAPS,
    )
    pdir = tmp_path / "outputs" / "phantom_seed0"
    state = torch.load(pdir / "model.pt", weights_only=False)
    network = state["network"]
    assert network.layers[0].out_features == 32 and len(network.layers) == 3  # 2 hidden layers + output
    assert state["regularizer_names"] == ["jacobian"]
    settings = json.loads((pdir / "settings.json").read_text())
    assert settings["optimizer"]["callable"] == "torch.optim.sgd.SGD" and settings["optimizer"]["keywords"]["momentum"] == 0.9
    assert settings["lr_schedule"] == "step" and settings["trainer"]["keywords"]["lr_schedule"] == "step"
    assert "MSELoss" in settings["loss"]
    metrics = json.loads((pdir / "metrics.json").read_text())
    assert metrics["iterations"] == 6 and metrics["num_alphas_evaluated"] == 3
    with open(pdir / "alpha_curve.csv") as f:
        curve = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    first = min(curve, key=lambda r: r["alpha"])
    assert metrics["alpha"] == first["alpha"] == 0.0 and metrics["dice"] == pytest.approx(first["dice"], abs=1e-6)
    logged = capfd.readouterr()
    text = (logged.out + logged.err).replace("\r", "\n")
    assert sum("-- swapped_loss:" in line for line in text.splitlines()) == 6  # the StatsHandler, renamed, every iteration
    assert "best metric of smallest_alpha" in text  # the configured key metric is the evaluator's


def test_a_trainer_factory_that_sets_a_per_patient_option_is_refused(phantom_dir, tmp_path):
    """The workflow owns the per-patient arguments (loss, prior, device, checkpoint path): a partial
    that also sets one is an error before training, naming the keys."""
    from monai_cidir.engines import register_patient
    from monai_cidir.engines.bundle import make_dataset

    item = make_dataset(phantom_dir)[0]
    trainer = functools.partial(CIDIRTrainer, max_iterations=2, device="cpu")
    with pytest.raises(ValueError, match=r"sets \['device'\] itself"):
        register_patient(item, tmp_path, trainer=trainer, num_alphas=0, alpha=0.5, affine_prealign=False)
    # an evaluator whose search is a partial instead of an AlphaSearch: refused before training too
    from monai_cidir.engines import AlphaSearch

    evaluator = functools.partial(AlphaSelectionEvaluator, search=functools.partial(AlphaSearch, 5))
    with pytest.raises(TypeError, match="AlphaSearch instance"):
        register_patient(item, tmp_path, evaluator=evaluator, max_iterations=2, affine_prealign=False)
    assert not (tmp_path / item["name"] / "checkpoint.pt").exists()
