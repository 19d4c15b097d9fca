"""End to end on a tiny phantom: register_patient, exports read by SimpleITK, skip/re-export, run_cohort."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from monai_cidir.coordinates import CoordinateMapping, lps_to_ras, ras_to_lps
from monai_cidir.engines import (
    REGULARIZER_SCALES,
    export_registration,
    format_summary_table,
    load_registration_model,
    register_patient,
    run_cohort,
)
from monai_cidir.engines.alphas import LOG_FLOOR
from monai_cidir.networks import ConditionedINR

sitk = pytest.importorskip("SimpleITK")

TINY = dict(shape=(48, 48, 32), spacing=(5.6, 5.6, 8.0))
FAST = dict(max_iterations=150, num_points=1000, num_alphas=11, network=lambda: ConditionedINR(hidden_features=64))


@pytest.fixture(scope="module")
def phantom_item(tmp_path_factory):
    from monai_cidir.data import RegistrationPairDataset, make_breathing_phantom

    datalist = make_breathing_phantom(tmp_path_factory.mktemp("phantom"), seed=0, **TINY)
    return RegistrationPairDataset(datalist)[0]


@pytest.fixture(scope="module")
def trained(phantom_item, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    metrics = register_patient(phantom_item, out, seed=0, **FAST)
    return out, metrics


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as png:
        assert png.format == "PNG"
        return png.size


def _sitk_tre(field_path, item) -> float:
    field = sitk.Cast(sitk.ReadImage(str(field_path)), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    fixed_lps = ras_to_lps(item["fixed_landmarks"].numpy())
    moved = lps_to_ras(np.array([tx.TransformPoint(tuple(map(float, p))) for p in fixed_lps]))
    return float(np.linalg.norm(moved - item["moving_landmarks"].numpy(), axis=1).mean())


def test_register_patient_improves_and_exports(trained, phantom_item):
    out, m = trained
    pdir = out / phantom_item["name"]
    for f in ("model.pt", "alpha_curve.csv", "alpha_curve.png", "displacement.nii.gz", "warped_moving.nii.gz", "metrics.json"):
        assert (pdir / f).is_file(), f
    assert _png_size(pdir / "registration.png") == (960, 760)
    assert m["status"] == "ok" and m["warnings"] == []  # no gate trips on a good registration
    assert m["tre_after_mean"] <= 0.5 * m["tre_before_mean"], (m["tre_before_mean"], m["tre_after_mean"])
    assert m["dice"] > m["dice_before"]
    assert m["folding"] < 1e-3
    assert json.loads((pdir / "metrics.json").read_text())["tre_after_mean"] == pytest.approx(m["tre_after_mean"])
    with open(pdir / "alpha_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11 and set(rows[0]) == {"alpha", "dice", "folding", "seconds", "tre"}  # tre: the phantom has landmarks
    assert max(float(r["dice"]) for r in rows) == pytest.approx(m["dice"], abs=1e-3 + 1e-6)  # ties within 1e-3 -> larger alpha
    # the TRE column is the landmarks' TRE at each alpha: at the chosen alpha it is metrics.json's
    chosen = min(rows, key=lambda r: abs(float(r["alpha"]) - m["alpha"]))
    assert float(chosen["tre"]) == pytest.approx(m["tre_after_mean"], abs=1e-5)
    best = min(rows, key=lambda r: float(r["tre"]))
    assert m["tre_oracle_mean"] == pytest.approx(float(best["tre"]), abs=1e-5) and m["tre_oracle_mean"] <= m["tre_after_mean"]
    assert m["alpha_oracle"] == pytest.approx(float(best["alpha"]), rel=1e-5)


def test_exported_field_gives_metrics_tre_in_simpleitk(trained, phantom_item):
    out, m = trained
    pdir = out / phantom_item["name"]
    assert _sitk_tre(pdir / "displacement.nii.gz", phantom_item) == pytest.approx(m["tre_after_mean"], abs=0.05)
    # the field sits on the fixed grid, LPS geometry (the phantom is stored LPS-oriented)
    img = sitk.ReadImage(str(pdir / "displacement.nii.gz"))
    assert img.GetSize() == tuple(phantom_item["fixed_image"].shape[1:])
    # warped moving image: on the fixed grid, closer to the fixed image than the moving one
    import nibabel as nib

    warped = nib.load(str(pdir / "warped_moving.nii.gz"))
    assert np.allclose(warped.affine, phantom_item["fixed_image"].affine.numpy(), atol=1e-4)
    fixed = phantom_item["fixed_image"][0].numpy()
    assert np.abs(warped.get_fdata() - fixed).mean() < np.abs(phantom_item["moving_image"][0].numpy() - fixed).mean()


def test_model_pt_reproduces_tre_without_images(trained, phantom_item):
    out, m = trained
    model = load_registration_model(out / phantom_item["name"] / "model.pt")
    moved = phantom_item["fixed_landmarks"] + model.displacement(phantom_item["fixed_landmarks"], m["alpha"])
    tre = (moved - phantom_item["moving_landmarks"]).norm(dim=1).mean()
    assert float(tre) == pytest.approx(m["tre_after_mean"], abs=1e-4)


def test_rerun_skips_and_reexport_at_fixed_alpha(trained, phantom_item):
    out, m = trained
    again = register_patient(phantom_item, out, seed=0, **FAST)
    assert again.get("skipped") and again["tre_after_mean"] == pytest.approx(m["tre_after_mean"])
    fixed = export_registration(phantom_item, out, alpha=1.0, num_alphas=3)
    assert fixed["alpha"] == 1.0 and fixed["seconds_training"] == pytest.approx(m["seconds_training"])
    assert m["training_device"] == fixed["training_device"] == "cpu"  # the re-export keeps where training ran
    # alpha = 1 over-regularises relative to the selected alpha: never better on lung Dice
    assert fixed["dice"] <= m["dice"] + 1e-6


def test_run_cohort_table(trained, phantom_item, capsys):
    out, m = trained
    rows = run_cohort([phantom_item], out, progress=False, **FAST)  # complete: skipped, still tabulated
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [phantom_item["name"]]
    assert float(table[0]["tre_before_mean"]) == pytest.approx(rows[0]["tre_before_mean"])
    printed = capsys.readouterr().out
    assert phantom_item["name"] in printed and "->" in printed
    assert format_summary_table(rows).splitlines()[0].split()[:3] == ["patient", "status", "alpha"]


def _tree(root):
    """Every file under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_bad_requests_stop_before_training_and_write_nothing(phantom_item, tmp_path):
    out = tmp_path / "outputs"
    with pytest.raises(ValueError, match=r"alpha 1.5 is outside the range .* \[0, 1\]"):
        register_patient(phantom_item, out, alpha=1.5, **FAST)
    with pytest.raises(ValueError, match=r"alpha -0.2 is outside"):
        register_patient(phantom_item, out, alpha=-0.2, **FAST)
    nan = phantom_item["fixed_image"].clone()
    nan[0, 3, 4, 5] = float("nan")
    with pytest.raises(ValueError, match=r"fixed_image has 1 non-finite voxel"):
        register_patient({**phantom_item, "fixed_image": nan}, out, **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            register_patient(phantom_item, out, device="cuda", **FAST)
    with pytest.raises(ValueError, match=r"invalid pair name\(s\) \['\.\./escape'\]"):
        register_patient({**phantom_item, "name": "../escape"}, out, **FAST)
    assert not out.exists() and not (tmp_path / "escape").exists()


def test_reexport_refuses_an_alpha_outside_the_trained_range(trained, phantom_item):
    out, _ = trained
    before = _tree(out)
    with pytest.raises(ValueError, match=r"alpha 1.5 is outside the range the network is trained on"):
        export_registration(phantom_item, out, alpha=1.5)
    assert _tree(out) == before  # nothing rewritten


def test_cohort_names_are_checked_before_anything_runs(phantom_item, tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "keep.txt").write_text("a file of the user's")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="no pairs to register: the dataset is empty"):
        run_cohort([], out, **FAST)
    from monai.data import Dataset

    twins = Dataset([{**phantom_item, "name": "p"}, {**phantom_item, "name": "p"}])
    with pytest.raises(ValueError, match=r"the cohort: .*repeated: \['p'\]"):
        run_cohort(twins, out, **FAST)
    outside = Dataset([{**phantom_item, "name": "/tmp/elsewhere"}])
    with pytest.raises(ValueError, match="invalid pair name"):
        run_cohort(outside, out, **FAST)
    assert _tree(tmp_path) == before  # nothing written, nothing changed


def test_a_rerun_with_other_settings_or_inputs_neither_reuses_nor_touches_the_results(trained, phantom_item):
    out, metrics = trained
    before = _tree(out)
    again = register_patient(phantom_item, out, seed=0, **FAST)  # same settings: the stored result, as it is
    assert again["skipped"] and again["tre_after_mean"] == metrics["tre_after_mean"]
    with pytest.raises(ValueError, match=r"other settings \(max_iterations: stored 150, now 120\).*overwrite=True"):
        register_patient(phantom_item, out, seed=0, **{**FAST, "max_iterations": 120})
    moved = phantom_item["moving_image"].clone()
    moved[0, 10, 10, 10] += 100.0
    with pytest.raises(ValueError, match=r"inputs: stored .*'moving_image'"):
        register_patient({**phantom_item, "moving_image": moved}, out, seed=0, **FAST)
    # a code default that defines the result (the prior's floor, 1e-3 before 0.9.0) is a setting too
    from monai_cidir.engines import alphas

    floor = alphas.LOG_FLOOR
    try:
        alphas.LOG_FLOOR = 1e-3
        with pytest.raises(ValueError, match=r"other settings \(alpha_prior: stored .*'log_floor': 1e-05.*now .*'log_floor': 0.001"):
            register_patient(phantom_item, out, seed=0, **FAST)
    finally:
        alphas.LOG_FLOOR = floor
    assert _tree(out) == before


def test_a_second_run_on_the_same_patient_folder_is_refused(trained, phantom_item, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    out, _ = trained
    lock = out / phantom_item["name"] / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))  # a live writer
    before = _tree(out)
    try:
        with pytest.raises(RuntimeError, match=r"being written by another run \(pid \d+ .*nothing was changed"):
            register_patient(phantom_item, out, seed=0, **FAST)
        assert _tree(out) == before
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "since": "then"}))  # its process ended
        assert register_patient(phantom_item, out, seed=0, **FAST)["skipped"]  # the stale lock is taken over
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_a_truncated_model_or_checkpoint_names_the_file_and_what_to_do(trained, phantom_item, tmp_path):
    import shutil

    out, _ = trained
    src = out / phantom_item["name"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy / phantom_item["name"])
    model_pt = copy / phantom_item["name"] / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"model\.pt is not a readable model\.pt .*truncated or corrupt.*overwrite=True"):
        load_registration_model(model_pt)
    ckpt = copy / phantom_item["name"] / "checkpoint.pt"
    ckpt.write_bytes(b"not a checkpoint")
    (copy / phantom_item["name"] / "metrics.json").unlink()  # so that the rerun resumes from the checkpoint
    with pytest.raises(ValueError, match=r"checkpoint\.pt is not a readable training checkpoint .*delete it"):
        register_patient(phantom_item, copy, seed=0, **FAST)


def test_runs_stopped_at_random_moments_rerun_to_the_uninterrupted_result(phantom_item, tmp_path, monkeypatch):
    """Fault injection: stop training, selection or export at a random moment; the rerun equals a clean run."""
    import random

    from ignite.engine import Events

    from monai_cidir.engines import selection as reg
    from monai_cidir.engines.alpha_selection import AlphaSelectionEvaluator

    opts = dict(FAST, max_iterations=60, num_alphas=6, checkpoint_every_s=0.0, seed=0)
    clean = register_patient(phantom_item, tmp_path / "clean", **opts)
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "clean" / phantom_item["name"] / "displacement.nii.gz")))
    rng = random.Random(13)

    class Crash(RuntimeError):
        pass

    class Kill:  # an Ignite handler that stops the run at iteration k
        def __init__(self, k):
            self.k = k

        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.k), self)

        def __call__(self, engine):
            raise Crash(f"killed at iteration {engine.state.iteration}")

    faults = {
        "training": lambda: {"handlers": [Kill(rng.randint(1, 59))]},
        "selection": lambda: _fail_after(monkeypatch, AlphaSelectionEvaluator, "score", rng.randint(1, 5), Crash),
        "export": lambda: _fail_after(monkeypatch, reg, "write_warped_image", 1, Crash),
    }
    for phase, inject in faults.items():
        out = tmp_path / phase
        extra = inject() or {}
        with pytest.raises(Crash):
            register_patient(phantom_item, out, **{**opts, **extra})
        monkeypatch.undo()
        assert not (out / phantom_item["name"] / "metrics.json").exists()  # no result claimed
        again = register_patient(phantom_item, out, **opts)
        assert again["alpha"] == clean["alpha"], phase
        assert again["tre_after_mean"] == pytest.approx(clean["tre_after_mean"], abs=1e-4), phase
        assert again["dice"] == pytest.approx(clean["dice"], abs=1e-5), phase
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / phantom_item["name"] / "displacement.nii.gz")))
        assert np.abs(got - field).max() < 1e-3, phase


def _fail_after(monkeypatch, owner, name, calls, error):
    """Make ``owner.name`` raise ``error`` on its ``calls``-th call."""
    original = getattr(owner, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] >= calls:
            raise error(f"killed in {name}, call {count['n']}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return None


def test_pairs_that_cannot_be_scored_or_do_not_overlap_stop_before_training(phantom_item, tmp_path):
    from monai.data import MetaTensor

    out = tmp_path / "outputs"
    with pytest.raises(ValueError, match=r"landmarks must pair up one to one .* \(\d+, 3\) and \(49, 3\)"):
        register_patient({**phantom_item, "moving_landmarks": phantom_item["moving_landmarks"][:49]}, out, **FAST)
    with pytest.raises(ValueError, match="selection_mode must be"):
        register_patient(phantom_item, out, **{**FAST, "selection_mode": "dice"})
    with pytest.raises(ValueError, match="num_alphas must be"):
        register_patient(phantom_item, out, **{**FAST, "num_alphas": -3})
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['num_alpha'\] \('num_alpha': did you mean 'num_alphas'\?\)"):
        register_patient(phantom_item, out, **{**FAST, "num_alpha": 5})  # a misspelt selection option
    with pytest.raises(TypeError, match="did you mean 'max_iterations'"):
        register_patient(phantom_item, out, max_iteration=5)
    assert not out.exists()
    far = phantom_item["moving_image"]
    affine = torch.as_tensor(far.affine).clone()
    affine[:3, 3] += torch.tensor([0.0, 0.0, 2000.0])  # the moving scan 2 m away: nothing to register
    moved_far = {**phantom_item, "moving_image": MetaTensor(far.as_tensor(), affine=affine),
                 "moving_mask": MetaTensor(phantom_item["moving_mask"].as_tensor(), affine=affine)}  # fmt: skip
    with pytest.raises(ValueError, match=r"the scans do not overlap in world space: check the orientation of .* lung Dice of 0.000"):
        register_patient(moved_far, out, **FAST)  # lungs of one volume that do not overlap: stopped before the pre-alignment
    assert not (out / phantom_item["name"] / "checkpoint.pt").exists()  # not trained
    half = phantom_item["moving_mask"].as_tensor().clone()
    half[..., : half.shape[-1] // 2] = 0.0  # volumes that disagree: the overlap gate leaves it to the field-of-view check
    with pytest.raises(ValueError, match=r"only 0% of the fixed lung lies inside the moving image's field of view"):
        register_patient({**moved_far, "moving_mask": MetaTensor(half, affine=affine)}, out, affine_prealign=False, **FAST)
    assert not (out / phantom_item["name"] / "checkpoint.pt").exists()  # not trained


def test_a_network_gone_non_finite_stops_the_selection(phantom_item):
    from monai_cidir.engines import AlphaSearch, AlphaSelectionEvaluator
    from monai_cidir.engines.model import RegistrationModel

    class NaNField(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, coords, alpha=None):
            return coords * self.w * float("nan")

    model = RegistrationModel(NaNField(), CoordinateMapping.from_image(phantom_item["fixed_image"]))
    ev = AlphaSelectionEvaluator(model, phantom_item, search=AlphaSearch(alphas=[0.0, 0.5, 1.0]))
    with pytest.raises(FloatingPointError, match="non-finite positions at alpha"):
        ev.run()


def test_model_pt_keeps_the_prior_and_reexport_sweeps_its_grid(trained, phantom_item, tmp_path):
    """model.pt records the training prior once (range, distribution, loss); re-export sweeps the grid
    that prior implies: log-spaced from 0 for a log-uniform prior."""
    out, m = trained
    state = torch.load(out / phantom_item["name"] / "model.pt", weights_only=False)
    assert state["alpha_range"] == [0.0, 1.0] and state["alpha_distribution"] == "log-uniform"  # the default
    assert state["alpha"] == pytest.approx(m["alpha"]) and state["regularizer"] == "bending"
    assert state["regularizer_lambda_scales"] == {"bending": REGULARIZER_SCALES["bending"]}
    log_grid = [0.0] + [LOG_FLOOR ** (1 - i / 3) for i in range(4)]  # 0, then log-spaced from the default floor to 1
    for distribution, expected in (("log-uniform", log_grid), ("uniform", [0.0, 0.25, 0.5, 0.75, 1.0])):
        state["alpha_distribution"] = state["alpha_prior"]["distribution"] = distribution  # the prior owns it; the key mirrors it
        pdir = tmp_path / distribution / phantom_item["name"]
        pdir.mkdir(parents=True)
        torch.save(state, pdir / "model.pt")
        export_registration(phantom_item, tmp_path / distribution, num_alphas=5, export_images=False)
        with open(pdir / "alpha_curve.csv") as f:
            alphas = sorted(float(r["alpha"]) for r in csv.DictReader(f))
        assert alphas == pytest.approx(expected, rel=1e-5)  # golden section is off: the grid only (the CSV keeps 6 digits)


def test_a_loss_object_and_regularizer_options_together_are_refused_before_training(phantom_item, tmp_path):
    from monai_cidir.losses import RegistrationLoss

    with pytest.raises(ValueError, match="pass either loss .* or regularizer / regularizer_scales / loss_balance, not both"):
        register_patient(phantom_item, tmp_path, loss=RegistrationLoss("jacobian"), regularizer="hyperelastic")
    with pytest.raises(TypeError, match="loss must be a monai_cidir.losses.RegistrationLoss"):
        register_patient(phantom_item, tmp_path, loss="jacobian")
    assert not any(tmp_path.iterdir())


def test_default_network_is_the_log_alpha_conditioned_inr_with_options_on_top():
    from monai_cidir.engines import default_network

    net = default_network(hidden_features=8, num_hidden_layers=1, modulation="per_neuron")()
    assert type(net).__name__ == "ConditionedINR" and net.alpha_encoding == "log" and net.modulation == "per_neuron"
    assert default_network(alpha_encoding="linear", hidden_features=8)().alpha_encoding == "linear"  # an option wins
