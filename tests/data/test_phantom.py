"""Synthetic breathing phantom: exact ground truth, motion model, files and datalist contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_cidir.coordinates import CoordinateMapping, lps_to_ras
from monai_cidir.data.phantom import BreathingMotion, generate_breathing_phantom, make_breathing_phantom

TINY = {"shape": (48, 48, 32), "num_landmarks": 100}


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def tiny():
    return generate_breathing_phantom(seed=0, **TINY)


@pytest.fixture(scope="module")
def tiny_clean():
    """No noise: intensities are the analytic anatomy, for exact comparisons."""
    return generate_breathing_phantom(seed=1, noise_hu=0.0, **TINY)


def test_item_follows_the_contract(tiny):
    for key in ("fixed_image", "moving_image", "fixed_mask", "moving_mask"):
        img = tiny[key]
        assert img.shape == (1, 48, 48, 32) and img.dtype == torch.float32
        assert img.affine.shape == (4, 4)
    for key in ("fixed_mask", "moving_mask"):
        assert set(torch.unique(tiny[key]).tolist()) == {0.0, 1.0}
    assert tiny["fixed_landmarks"].dtype == torch.float64 and tiny["fixed_landmarks"].shape == (100, 3)
    # default orientation is LPS-ordered arrays (as ITK/DICOM CTs load): affine diag (-sx, -sy, +sz)
    assert torch.allclose(tiny["fixed_image"].affine[:3, :3].diagonal(), torch.tensor([-2.8, -2.8, 3.2], dtype=torch.float64))
    # HU ranges: air outside, lung parenchyma, bright bone
    f = tiny["fixed_image"][0]
    lung = f[tiny["fixed_mask"][0] > 0]
    assert f.min() < -950 and f.max() > 400
    assert -880 < float(lung.median()) < -780


def test_landmark_ground_truth_is_exact(tiny):
    motion = tiny["motion"]
    fixed, moving = tiny["fixed_landmarks"], tiny["moving_landmarks"]
    assert torch.allclose(moving, motion(fixed), atol=1e-9, rtol=0)
    assert np.abs(motion.inverse(moving.numpy()) - fixed.numpy()).max() < 1e-6
    # landmarks are inside the fixed lungs (nearest voxel of the true mask)
    idx = CoordinateMapping.from_image(tiny["fixed_mask"]).world_to_index(fixed).round().long()
    assert tiny["fixed_mask"][0][idx[:, 0], idx[:, 1], idx[:, 2]].float().mean() == 1.0
    # ... and they actually move: 5-15 mm peak, a few mm on average
    dist = (moving - fixed).norm(dim=1)
    assert 1.0 < float(dist.mean()) < float(dist.max()) <= 15.0


def test_exhale_intensity_at_moving_landmark_matches_inhale_at_fixed(tiny_clean):
    item = tiny_clean
    fmap = CoordinateMapping.from_image(item["fixed_image"])
    mmap = CoordinateMapping.from_image(item["moving_image"])
    # landmarks sit on vessels: brighter than the -850 HU parenchyma
    assert float(fmap.sample(item["fixed_image"][0], item["fixed_landmarks"]).median()) > -600
    # thin vessels alias under trilinear sampling: compare images smoothed by one voxel
    fixed = torch.from_numpy(ndimage.gaussian_filter(item["fixed_image"][0].numpy(), 1.0))
    moving = torch.from_numpy(ndimage.gaussian_filter(item["moving_image"][0].numpy(), 1.0))
    f_at_fixed = fmap.sample(fixed, item["fixed_landmarks"]).numpy()
    m_at_moving = mmap.sample(moving, item["moving_landmarks"]).numpy()
    m_at_fixed = mmap.sample(moving, item["fixed_landmarks"]).numpy()
    err_true = float(np.median(np.abs(m_at_moving - f_at_fixed)))
    err_none = float(np.median(np.abs(m_at_fixed - f_at_fixed)))
    assert err_true < 15.0  # measured 8.6 HU
    assert err_none > 3.0 * err_true  # without the motion the vessels are missed (measured 42 HU)
    assert np.corrcoef(f_at_fixed, m_at_moving)[0, 1] > 0.9  # measured 0.96 (0.46 without motion)


def test_motion_peak_and_diaphragm_gradient(tiny):
    mask = tiny["fixed_mask"]
    mapping = CoordinateMapping.from_image(mask)
    world = mapping.world_grid(dtype=torch.float64)[mask[0] > 0]
    u = torch.as_tensor(tiny["motion"].displacement(world.numpy())).norm(dim=1)
    assert 5.0 <= float(u.max()) <= 15.0
    z = world[:, 2]
    lo, hi = torch.quantile(z, 0.2), torch.quantile(z, 0.8)
    base, apex = u[z <= lo].mean(), u[z >= hi].mean()
    assert float(base) > 2.0 * float(apex)  # the diaphragm moves most
    # superior-inferior dominates: exhale moves the base towards S (+z in RAS)
    uz = tiny["motion"].displacement(world.numpy())[:, 2]
    assert float(np.median(uz[(z <= lo).numpy()])) > 4.0


def test_masks_follow_the_motion(tiny):
    """The exhale mask equals the inhale mask pulled back through the motion; exhale lungs are smaller."""
    fixed_mask, moving_mask = tiny["fixed_mask"], tiny["moving_mask"]
    mmap = CoordinateMapping.from_image(moving_mask)
    fmap = CoordinateMapping.from_image(fixed_mask)
    q = mmap.world_grid(dtype=torch.float64).reshape(-1, 3)
    p = torch.as_tensor(tiny["motion"].inverse(q.numpy()))
    pulled = fmap.sample(fixed_mask[0].double(), p, padding_mode="zeros").reshape(moving_mask.shape[1:])
    assert _dice(pulled, moving_mask[0]) > 0.95
    assert 0.7 < float(moving_mask.sum() / fixed_mask.sum()) < 0.97


def test_motion_numpy_torch_autograd_and_serialisation(tiny, tmp_path):
    motion = tiny["motion"]
    pts = np.random.default_rng(0).uniform(-60, 60, size=(50, 3)) + motion.center
    u_np = motion.displacement(pts)
    t = torch.tensor(pts, requires_grad=True)
    u_t = motion.displacement(t)
    assert np.abs(u_t.detach().numpy() - u_np).max() < 1e-12
    # the Jacobian by autograd agrees with central differences, and det(I + J) > 0
    jac = torch.stack([torch.autograd.grad(u_t[:, i].sum(), t, retain_graph=True)[0] for i in range(3)], 1)
    h = 1e-4
    fd = np.stack([(motion.displacement(pts + h * e) - motion.displacement(pts - h * e)) / (2 * h) for e in np.eye(3)], -1)
    assert np.abs(jac.numpy() - fd).max() < 1e-6
    assert float(torch.linalg.det(torch.eye(3, dtype=torch.float64) + jac).min()) > 0.5
    # JSON round trip rebuilds the exact map
    path = tmp_path / "motion.json"
    path.write_text(json.dumps(motion.to_dict()))
    again = BreathingMotion.load(path)
    assert np.abs(again.displacement(pts) - u_np).max() == 0.0
    with pytest.raises(ValueError, match="lung_min < lung_max"):
        BreathingMotion((0, 0, 0), (1, 1, 0))


def test_orientation_is_a_pure_relabelling_of_the_same_world(tiny_clean):
    """An RAS-ordered phantom is the LPS one with x and y flipped: same anatomy, same world landmarks."""
    ras = generate_breathing_phantom(seed=1, noise_hu=0.0, orientation="RAS", **TINY)
    assert torch.allclose(ras["fixed_landmarks"], tiny_clean["fixed_landmarks"], atol=1e-9)
    flipped = torch.flip(tiny_clean["fixed_image"].as_tensor(), dims=(1, 2))
    assert float((ras["fixed_image"].as_tensor() - flipped).abs().max()) <= 1.0  # whole-HU rounding ties
    assert torch.equal(torch.flip(tiny_clean["moving_mask"].as_tensor(), dims=(1, 2)), ras["moving_mask"].as_tensor())
    with pytest.raises(ValueError, match="orientation"):
        generate_breathing_phantom(orientation="LPX", **TINY)


def test_files_datalist_determinism_and_no_overwrite(tmp_path, tiny):
    datalist = make_breathing_phantom(tmp_path, seed=0, **TINY)
    assert datalist == tmp_path / "datalist.json"
    content = json.loads(datalist.read_text())
    (record,) = content["training"]
    assert record["name"] == "phantom_seed0"
    for key in ("fixed_image", "moving_image", "fixed_mask", "moving_mask", "fixed_landmarks", "moving_landmarks"):
        assert (tmp_path / record[key]).is_file() and not record[key].startswith("/")
    # CSV: header x,y,z, world LPS mm
    lines = (tmp_path / record["moving_landmarks"]).read_text().splitlines()
    assert lines[0] == "x,y,z" and len(lines) == 101
    lps = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert np.abs(lps_to_ras(lps) - tiny["moving_landmarks"].numpy()).max() < 1e-5
    # same arguments again: deterministic, so nothing differs and nothing is rewritten
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    make_breathing_phantom(tmp_path, seed=0, **TINY)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "datalist.json"} == {
        k: v for k, v in stamp.items() if k != "datalist.json"
    }
    # another seed under the same name differs: refused, files untouched
    with pytest.raises(FileExistsError, match="phantom_seed0_inhale.nii.gz"):
        make_breathing_phantom(tmp_path, seed=1, name="phantom_seed0", **TINY)
    # another seed under its own name joins the datalist
    make_breathing_phantom(tmp_path, seed=1, **TINY)
    content = json.loads(datalist.read_text())
    assert [r["name"] for r in content["training"]] == ["phantom_seed0", "phantom_seed1"]
    assert BreathingMotion.load(tmp_path / content["motion"]["phantom_seed1"]).amplitude_mm == 10.0


def test_written_datalist_loads_as_the_contract_says(tmp_path, tiny):
    from monai_cidir.data import load_pair_datalist
    from monai_cidir.transforms import LoadRegistrationPaird

    make_breathing_phantom(tmp_path, seed=0, **TINY)
    (record,) = load_pair_datalist(tmp_path / "datalist.json")
    item = LoadRegistrationPaird()(record)
    assert item["name"] == "phantom_seed0"
    for key in ("fixed_image", "moving_image", "fixed_mask", "moving_mask"):
        assert item[key].shape == tiny[key].shape and item[key].dtype == torch.float32
        assert torch.allclose(torch.as_tensor(item[key].affine, dtype=torch.float64), tiny[key].affine, atol=1e-5)
        assert torch.equal(item[key].as_tensor(), tiny[key].as_tensor())  # int16 HU / uint8 stored exactly
    for key in ("fixed_landmarks", "moving_landmarks"):
        assert item[key].dtype == torch.float64
        assert float((item[key] - tiny[key]).abs().max()) < 1e-5


# ----------------------------------------------------------------------------------------------
# make_breathing_pair: the same motion on a given CT
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_from_phantom(tmp_path_factory, tiny):
    """make_breathing_pair on the tiny phantom's inhale CT (a stand-in for a real CT), written to disk."""
    from monai_cidir.data.phantom import make_breathing_pair

    out = tmp_path_factory.mktemp("pair")
    return make_breathing_pair(tiny["fixed_image"], seed=5, amplitude_mm=8.0, num_landmarks=100, output_dir=out, name="ct")


def test_pair_ground_truth_and_masks(pair_from_phantom, tiny):
    pair = pair_from_phantom
    assert torch.equal(pair["fixed_image"].as_tensor(), tiny["fixed_image"].as_tensor())
    # the threshold lung mask stands in for the missing mask
    assert _dice(pair["fixed_mask"][0], tiny["fixed_mask"][0]) > 0.95
    fixed, moving = pair["fixed_landmarks"], pair["moving_landmarks"]
    assert fixed.shape == (100, 3) and fixed.dtype == torch.float64
    assert torch.allclose(moving, pair["motion"](fixed), atol=1e-9, rtol=0)
    idx = CoordinateMapping.from_image(pair["fixed_mask"]).world_to_index(fixed)
    assert torch.allclose(idx, idx.round(), atol=1e-6)  # voxel centres
    idx = idx.round().long()
    assert float(pair["fixed_mask"][0][idx[:, 0], idx[:, 1], idx[:, 2]].mean()) == 1.0
    # landmarks are spread: no two closer than one voxel
    assert float(torch.pdist(fixed).min()) >= 2.8 - 1e-6
    # the moving image is the fixed one pulled back through the motion
    mapping = CoordinateMapping.from_image(pair["fixed_image"])
    q = mapping.world_grid(dtype=torch.float64).reshape(-1, 3)[::97]
    p = torch.as_tensor(pair["motion"].inverse(q.numpy()))
    expected = mapping.sample(pair["fixed_image"][0], p.float(), padding_mode="border")
    got = pair["moving_image"][0].reshape(-1)[::97]
    assert float((got - expected).abs().max()) <= 0.5 + 1e-3  # rounding to whole HU only
    assert 0.7 < float(pair["moving_mask"].sum() / pair["fixed_mask"].sum()) < 0.99


def test_pair_files_load_as_the_contract_says(pair_from_phantom):
    from monai_cidir.data import load_pair_datalist
    from monai_cidir.transforms import LoadRegistrationPaird

    pair = pair_from_phantom
    content = json.loads(pair["datalist"].read_text())
    assert [r["name"] for r in content["training"]] == ["ct"]
    (record,) = load_pair_datalist(pair["datalist"])
    item = LoadRegistrationPaird()(record)
    for key in ("fixed_image", "moving_image", "fixed_mask", "moving_mask"):
        assert torch.equal(item[key].as_tensor(), pair[key].as_tensor())
    for key in ("fixed_landmarks", "moving_landmarks"):
        assert float((item[key] - pair[key]).abs().max()) < 1e-5
    motion = BreathingMotion.load(pair["datalist"].parent / content["motion"]["ct"])
    assert np.abs(motion(item["fixed_landmarks"].numpy()) - item["moving_landmarks"].numpy()).max() < 1e-5


def test_pair_input_errors(tiny):
    from monai_cidir.data.phantom import make_breathing_pair

    with pytest.raises(FileNotFoundError, match="no_such_ct.nii.gz"):
        make_breathing_pair("no_such_ct.nii.gz")
    with pytest.raises(ValueError, match="on the CT's grid"):
        make_breathing_pair(tiny["fixed_image"], mask=tiny["fixed_mask"][..., :16])
    with pytest.raises(ValueError, match="only .* qualify as landmarks"):
        make_breathing_pair(tiny["fixed_image"], mask=tiny["fixed_mask"], num_landmarks=100000)


def test_pair_on_the_real_ct(shared_dir):
    """The benchmark use: a real chest CT with a known dense breathing motion."""
    from monai_cidir.data.phantom import make_breathing_pair

    pair = make_breathing_pair(shared_dir / "data" / "chest_ct.nii.gz", seed=0, amplitude_mm=10.0)
    assert pair["name"] == "chest_ct_seed0"
    fixed, moving = pair["fixed_landmarks"], pair["moving_landmarks"]
    assert fixed.shape == (300, 3)
    assert torch.allclose(moving, pair["motion"](fixed), atol=1e-9, rtol=0)
    mapping = CoordinateMapping.from_image(pair["fixed_image"])
    idx = mapping.world_to_index(fixed).round().long()
    assert float(pair["fixed_mask"][0][idx[:, 0], idx[:, 1], idx[:, 2]].mean()) == 1.0
    # peak displacement inside the lungs 5-15 mm, largest at the base
    world = mapping.world_grid(dtype=torch.float64)[pair["fixed_mask"][0] > 0].numpy()
    u = np.linalg.norm(pair["motion"].displacement(world), axis=1)
    assert 5.0 <= u.max() <= 15.0  # measured 9.2 mm
    z = world[:, 2]
    assert u[z <= np.quantile(z, 0.2)].mean() > 2.0 * u[z >= np.quantile(z, 0.8)].mean()
    # landmarks are at bright structures: the image smoothed by a voxel agrees far better with the motion than without
    fixed_s = torch.from_numpy(ndimage.gaussian_filter(pair["fixed_image"][0].numpy(), 1.0))
    moving_s = torch.from_numpy(ndimage.gaussian_filter(pair["moving_image"][0].numpy(), 1.0))
    a, b = mapping.sample(fixed_s, fixed).numpy(), mapping.sample(moving_s, moving).numpy()
    c = mapping.sample(moving_s, fixed).numpy()
    assert np.corrcoef(a, b)[0, 1] > 0.97 and np.corrcoef(a, c)[0, 1] < np.corrcoef(a, b)[0, 1] - 0.05  # 0.99 vs 0.86


def test_make_breathing_phantom_names_an_unknown_argument_and_refuses_a_positional_seed(tmp_path):
    with pytest.raises(TypeError, match="amplitude"):
        make_breathing_phantom(tmp_path, amplitude=5.0)  # the argument is amplitude_mm
    with pytest.raises(TypeError):
        make_breathing_phantom(tmp_path, 1)  # seed is a keyword: a positional 1 must not become overwrite
    assert not any(tmp_path.iterdir())  # nothing written
