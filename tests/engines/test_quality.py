"""A failed registration is visible without landmarks: status rules, early mask errors, cohort exit status."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from engine_fixtures import breathing_motion, make_blob_pair

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.engines import RegistrationModel, register_patient, run_cohort, select_and_export, selection_evaluator
from monai_cidir.engines.quality import assess_registration, prepare_lung_masks, registration_quality
from monai_cidir.engines.registration import RegistrationFailed
from monai_cidir.networks import ConditionedINR
from monai_cidir.transforms import LungMaskError

FAST = dict(max_iterations=15, num_points=300, num_alphas=3, export_images=False, network=lambda: ConditionedINR(hidden_features=16))


def _pair(seed=1, **kwargs):
    return dict(make_blob_pair(shape=(20, 18, 16), spacing=(7.0, 7.0, 8.0), motion=breathing_motion(), seed=seed, **kwargs))


def _no_lung(seed=3):
    """A pair whose images hold no air inside the body and no masks: the computed lung mask is empty."""
    item = _pair(seed=seed)
    for side in ("fixed", "moving"):
        image = item[f"{side}_image"]
        image.as_tensor().clamp_(min=40.0)  # lung and outside air become soft tissue
        del item[f"{side}_mask"]
    item["name"] = "no_lung"
    return item


def test_assess_registration_rules():
    base = {"ncc_affine": 0.80, "ncc_after": 0.90, "dice_affine": 0.95, "dice": 0.96, "affine_prealign": True, "fixed_lung_ml": 3000.0, "moving_lung_ml": 2500.0}
    assert assess_registration(base) == ("ok", [], [])
    status, failures, _ = assess_registration({**base, "ncc_after": 0.79})
    assert status == "failed" and "worse than its affine: lung NCC 0.7900 after cIDIR < 0.8000" in failures[0]
    assert assess_registration({**base, "ncc_after": 0.796})[0] == "ok"  # within the tolerance (0.005)
    status, failures, _ = assess_registration({**base, "dice": 0.93, "affine_prealign": False})
    assert status == "failed" and "worse than no registration (no affine kept): lung Dice" in failures[0]
    status, _, warnings = assess_registration({**base, "moving_lung_ml": 1400.0})
    assert status == "warning" and "lung volumes differ by 2.1x" in warnings[0]
    masks = {"fixed": {"plausible": False, "image": "f.nii", "problems": ["120 mL of lung"]}, "moving": {"plausible": True}}
    status, _, warnings = assess_registration({**base, "lung_masks": masks})
    assert status == "warning" and warnings == ["implausible given fixed lung mask (f.nii): 120 mL of lung"]


def test_quality_numbers_of_the_identity_and_the_affine():
    """A model with zero residual: cIDIR equals its affine; without an affine all three NCCs are equal."""
    item, _ = prepare_lung_masks(_pair())
    net = ConditionedINR(hidden_features=16)
    with torch.no_grad():
        net.layers[-1].weight.zero_()
        net.layers[-1].bias.zero_()
    model = RegistrationModel(net, CoordinateMapping.from_image(item["fixed_image"]))
    q = registration_quality(model, 0.5, item)
    assert q["ncc_before"] == pytest.approx(q["ncc_affine"]) and q["ncc_affine"] == pytest.approx(q["ncc_after"])
    shift = np.eye(4)
    shift[:3, 3] = [3.0, -2.0, 4.0]
    model.set_affine(shift)
    q2 = registration_quality(model, 0.5, item)
    assert q2["ncc_before"] == pytest.approx(q["ncc_before"]) and q2["ncc_affine"] == pytest.approx(q2["ncc_after"])
    assert q2["ncc_affine"] != pytest.approx(q2["ncc_before"])


def test_worse_than_its_affine_is_failed_and_said(tmp_path, caplog):
    """A residual field of large random motion: lung NCC and Dice fall below the affine's; status failed, WARNING logged."""
    item, reports = prepare_lung_masks(_pair())
    torch.manual_seed(0)
    net = ConditionedINR(hidden_features=32, omega_0=60.0)
    with torch.no_grad():
        net.layers[-1].weight.mul_(20.0)  # displacements of several centimetres, changing every few mm
    model = RegistrationModel(net, CoordinateMapping.from_image(item["fixed_image"]))
    with caplog.at_level(logging.WARNING, logger="monai_cidir.engines"):
        m = select_and_export(model, item, tmp_path / "blob1", selection_evaluator(num_alphas=0), alpha=0.5, export_images=False)
    assert m["status"] == "failed", m
    assert m["ncc_after"] < m["ncc_affine"] - 0.005
    assert any("registration FAILED: worse than no registration" in r.message and r.levelname == "WARNING" for r in caplog.records)
    stored = json.loads((tmp_path / "blob1" / "metrics.json").read_text())
    assert stored["status"] == "failed" and stored["warnings"] == m["warnings"]


def test_implausible_computed_mask_stops_before_training(tmp_path):
    with pytest.raises(LungMaskError, match=r"no_lung: fixed_image \(computed \(threshold\)\): 0 mL.*the mask is empty"):
        register_patient(_no_lung(), tmp_path, **FAST)
    assert not (tmp_path / "no_lung" / "checkpoint.pt").exists() and not (tmp_path / "no_lung" / "model.pt").exists()


def test_cohort_runs_every_patient_then_fails(tmp_path, capsys):
    """One patient stops on its mask, the other finishes and is kept; the table says which; then RegistrationFailed."""
    with pytest.raises(RegistrationFailed, match=r"1 of 2 patient\(s\) failed:\n  no_lung: LungMaskError") as info:
        run_cohort([_no_lung(), _pair(seed=2)], tmp_path, progress=False, affine_prealign=False, **FAST)
    rows = {r["name"]: r for r in info.value.rows}
    assert rows["no_lung"]["status"] == "failed" and "the mask is empty" in rows["no_lung"]["error"]
    assert rows["blob2"]["status"] in ("ok", "warning") and (tmp_path / "blob2" / "metrics.json").is_file()
    for name in ("no_lung", "blob2"):  # the masks' picture: written before training, also for the rejected mask
        assert (tmp_path / name / "lung_masks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    blob = rows["blob2"]
    for key in ("fixed_lung_ml", "moving_lung_ml", "ncc_before", "ncc_affine", "ncc_after", "dice_before", "dice_affine", "dice"):
        assert np.isfinite(blob[key]), key
    assert blob["lung_masks"]["fixed"]["volume_ml"] == blob["fixed_lung_ml"] > 300.0
    with open(tmp_path / "metrics.csv") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert table["no_lung"]["status"] == "failed" and "LungMaskError" in table["no_lung"]["error"]
    assert float(table["blob2"]["ncc_after"]) == pytest.approx(blob["ncc_after"])
    printed = capsys.readouterr().out
    assert "FAILED no_lung: LungMaskError" in printed and "blob2" in printed


def _scrambled_network():
    """An INR whose output is several centimetres of motion changing every few mm (SIREN at omega_0 60,
    output layer x20): with a zero learning rate it stays so, and the result is worse than no registration."""
    net = ConditionedINR(hidden_features=32, omega_0=60.0)
    with torch.no_grad():
        net.layers[-1].weight.mul_(20.0)
    return net


SCRAMBLED = dict(FAST, network=_scrambled_network, init_output_scale=None, learning_rate=0.0, max_iterations=2, affine_prealign=False)


def test_a_patient_worse_than_its_affine_fails_the_cohort(tmp_path, capsys):
    """Not an exception: a patient that trains and exports, but whose lung NCC and Dice fall below
    no registration, is 'failed' and makes the cohort raise RegistrationFailed (the API's exit status 1);
    its outputs are kept and the reason is the quality check's."""
    with pytest.raises(RegistrationFailed, match=r"1 of 1 patient\(s\) failed:\n  blob2: worse than no registration") as info:
        run_cohort([_pair(seed=2)], tmp_path, progress=False, **SCRAMBLED)
    (row,) = info.value.rows
    assert row["status"] == "failed" and "error" not in row  # trained and exported, failed by the check
    assert row["ncc_after"] < row["ncc_before"] - 0.005, row
    stored = json.loads((tmp_path / "blob2" / "metrics.json").read_text())
    assert stored["status"] == "failed" and stored["warnings"] == row["warnings"]
    with open(tmp_path / "metrics.csv") as f:
        (table,) = list(csv.DictReader(f))
    assert table["status"] == "failed"
    assert "FAILED blob2" in capsys.readouterr().out
    # raise_on_failure=False (the bundle's call) returns the rows with the same verdict
    rows = run_cohort([_pair(seed=2)], tmp_path, progress=False, raise_on_failure=False, **SCRAMBLED)
    assert [r["status"] for r in rows] == ["failed"]


# ---------------------------------------------------------------------------- absolute gates (issue 26)
def _mirrored_z(image, keep_origin=True):
    """The volume with its slice axis reversed in the affine, voxels untouched (ITK 5.4 on a DICOM series
    with a negative SpacingBetweenSlices: the first slice stays, the others run the other way)."""
    from monai.data import MetaTensor

    affine = torch.as_tensor(image.affine, dtype=torch.float64).clone()
    if not keep_origin:
        affine[:3, 3] += affine[:3, 2] * (image.shape[-1] - 1)
    affine[:3, 2] = -affine[:3, 2]
    return MetaTensor(image.as_tensor().clone(), affine=affine, meta={"filename_or_obj": "/data/fixed_series"})


def _zero_residual_model(item, affine=None):
    net = ConditionedINR(hidden_features=16)
    with torch.no_grad():
        net.layers[-1].weight.zero_()
        net.layers[-1].bias.zero_()
    model = RegistrationModel(net, CoordinateMapping.from_image(item["fixed_image"]))
    if affine is not None:
        model.set_affine(affine)
    return model


def test_absolute_gates_hold_whatever_the_affine_did():
    from monai_cidir.engines import quality

    base = {"ncc_affine": 0.80, "ncc_after": 0.90, "dice_affine": 0.95, "dice": 0.96, "dice_before": 0.6, "folding": 0.0,
            "affine_prealign": True, "fixed_lung_ml": 3000.0, "moving_lung_ml": 2900.0, "dice_range": 0.01,
            "fixed_mask_fov_fraction": 0.2, "moving_mask_fov_fraction": 0.25}  # fmt: skip
    assert assess_registration(base) == ("ok", [], [])
    status, failures, _ = assess_registration({**base, "folding": 0.22})  # issue 26: 22% folding read "ok"
    assert status == "failed" and failures == [failures[0]] and failures[0].startswith("22.0% of the lung folds")
    assert assess_registration({**base, "folding": 0.9 * quality.MAX_LUNG_FOLDING})[0] == "ok"
    status, failures, _ = assess_registration({**base, "dice": 0.5, "dice_affine": 0.5})  # as bad as its affine: no relative rule
    assert status == "failed" and failures == ["lung Dice 0.500 after cIDIR (at least 0.9 expected): the lungs are not aligned; open registration.png: a mirrored or shifted scan shows at a glance"]
    assert assess_registration({**base, "dice": 0.824, "dice_affine": 0.749})[0] == "failed"  # the real pair mirrored in place
    status, failures, _ = assess_registration({**base, "dice_before": 0.037})
    assert status == "failed" and "the scans do not overlap in world space (lung Dice 0.037 before registration" in failures[0]
    assert assess_registration({**base, "dice_before": 0.037, "moving_lung_ml": 1000.0})[1] == []  # volumes disagree: other masks, not placement
    status, failures, warnings = assess_registration({**base, "fixed_mask_fov_fraction": 1.0, "moving_mask_fov_fraction": 0.999, "dice_range": 0.0})
    assert status == "warning" and failures == [] and len(warnings) == 2
    assert "covers (nearly) the whole field of view (fixed 100%, moving 100% of the image)" in warnings[0] and "selection cannot choose" in warnings[0]
    assert "lung Dice is flat over every scored alpha (range 0 < 1e-06)" in warnings[1] and "alpha=..." in warnings[1]
    assert assess_registration({**base, "dice_range": 1.2e-4}) == ("ok", [], [])  # nearly flat: the quick start's phantom


def test_mask_overlap_dice_is_the_reported_dice_before():
    """The pre-training overlap is measured as metrics.json's dice_before (the evaluator's identity score)."""
    from monai_cidir.engines import AlphaSelectionEvaluator
    from monai_cidir.engines.quality import mask_overlap_dice

    item, _ = prepare_lung_masks(_pair())
    model = _zero_residual_model(item)
    expected = AlphaSelectionEvaluator(model, item).score_identity()
    assert 0.5 < expected < 1.0
    assert mask_overlap_dice(item) == pytest.approx(expected, abs=1e-6)
    mirrored = {**item, "fixed_image": _mirrored_z(item["fixed_image"]), "fixed_mask": _mirrored_z(item["fixed_mask"])}
    assert mask_overlap_dice(mirrored) < 0.05  # the lungs moved by the scan's own length


def test_folding_or_low_dice_at_the_exported_alpha_is_failed(tmp_path):
    """A reflecting affine (a mirrored axis) folds every lung point; a 6 cm shift leaves the lungs apart.
    cIDIR equals its affine in both, so only the absolute gates can fail them; registration.png is written."""
    from PIL import Image

    item, reports = prepare_lung_masks(_pair())
    center = item["fixed_image"].affine[:3, :3].double() @ (torch.tensor(item["fixed_image"].shape[1:], dtype=torch.float64) - 1) / 2
    center += item["fixed_image"].affine[:3, 3].double()
    mirror = torch.eye(4, dtype=torch.float64)
    mirror[2, 2], mirror[2, 3] = -1.0, 2 * float(center[2])  # z -> -z about the grid centre
    shift = torch.eye(4, dtype=torch.float64)
    shift[0, 3] = 60.0
    for name, affine, reason in (("mirror", mirror, "of the lung folds"), ("shift", shift, "after cIDIR (at least 0.9 expected)")):
        model = _zero_residual_model(item, affine)
        m = select_and_export(model, {**item, "name": name}, tmp_path / name, selection_evaluator(num_alphas=0), alpha=0.5, export_images=False,
                              previous={"affine_prealign": True, **{"fixed_lung_ml": reports["fixed"]["volume_ml"], "moving_lung_ml": reports["moving"]["volume_ml"]}})  # fmt: skip
        assert m["status"] == "failed", (name, m)
        assert m["dice"] == pytest.approx(m["dice_affine"]) and m["ncc_after"] == pytest.approx(m["ncc_affine"])  # no relative rule
        assert any(reason in w for w in m["warnings"]), (name, m["warnings"])
        png = tmp_path / name / "registration.png"
        assert Image.open(png).size == (960, 760) and Image.open(png).format == "PNG"
    assert m["folding"] == 0.0 and m["dice"] < 0.9  # the shift


def test_mirrored_scan_stops_before_training_and_whole_fov_masks_warn(tmp_path, capsys):
    """Issue 26's sabotaged inputs in one cohort: the fixed series read mirrored in z (ITK 5.4) stops
    before training naming its file; given masks covering the whole field of view train, then warn
    that the selection cannot choose. The cohort ends with RegistrationFailed (the bundle's exit 1)."""
    from monai.data import MetaTensor
    from PIL import Image

    mirrored = _pair(seed=4)
    mirrored.update(name="mirrored", fixed_image=_mirrored_z(mirrored["fixed_image"]), fixed_mask=_mirrored_z(mirrored["fixed_mask"]))
    whole = _pair(seed=2)
    for side in ("fixed", "moving"):
        image = whole[f"{side}_image"]
        whole[f"{side}_mask"] = MetaTensor(torch.ones_like(image.as_tensor()), affine=image.affine)
    whole["name"] = "whole_fov"
    with pytest.raises(RegistrationFailed, match=r"1 of 2 patient\(s\) failed:\n  mirrored: ValueError: mirrored: the scans do not overlap") as info:
        run_cohort([mirrored, whole], tmp_path, progress=False, affine_prealign=False, **{**FAST, "num_alphas": 5})
    rows = {r["name"]: r for r in info.value.rows}
    error = rows["mirrored"]["error"]
    assert "the scans do not overlap in world space: check the orientation of" in error and "/data/fixed_series" in error
    assert not (tmp_path / "mirrored" / "checkpoint.pt").exists() and not (tmp_path / "mirrored" / "model.pt").exists()  # not trained
    assert (tmp_path / "mirrored" / "registration.png").is_file()  # the "before" half: where the scans lie
    w = rows["whole_fov"]
    assert w["status"] == "warning" and w["fixed_mask_fov_fraction"] == 1.0 and w["dice_range"] == 0.0, w
    assert any("covers (nearly) the whole field of view" in x and "selection cannot choose" in x for x in w["warnings"])
    assert Image.open(tmp_path / "whole_fov" / "registration.png").size == (960, 760)
    printed = capsys.readouterr().out
    assert "FAILED mirrored: ValueError: mirrored: the scans do not overlap" in printed and "WARNING whole_fov: the lung mask covers" in printed
