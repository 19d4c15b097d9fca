"""SlidingBreathingMotion and make_realistic_pair: exact inverse, sliding, density, offset, field of view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.data import SlidingBreathingMotion, generate_breathing_phantom, make_realistic_pair, moving_grid
from monai_cidir.data.realistic import REALISTIC_PADDING_HU


@pytest.fixture(scope="module")
def phantom():
    return generate_breathing_phantom(seed=0, shape=(48, 48, 32), num_landmarks=100, noise_hu=0.0)


@pytest.fixture(scope="module")
def motion(phantom):
    return SlidingBreathingMotion.from_lung_mask(
        phantom["fixed_mask"], amplitude_mm=10.0, rotation_deg=(2.0, -1.0, 3.0), translation_mm=(5.0, 25.0, -12.0), seed=3
    )


def _lung_points(phantom, n=2000, seed=0):
    mapping = CoordinateMapping.from_image(phantom["fixed_mask"])
    world = mapping.world_grid(dtype=torch.float64)[phantom["fixed_mask"][0] > 0].numpy()
    return world[np.random.default_rng(seed).choice(len(world), n, replace=False)]


def test_inverse_is_exact_everywhere(phantom, motion):
    mapping = CoordinateMapping.from_image(phantom["fixed_image"])
    p = mapping.world_grid(dtype=torch.float64).reshape(-1, 3).numpy()[::7]  # body, lungs, outside
    assert np.abs(motion.inverse(motion(p)) - p).max() < 1e-5


def test_sliding_is_a_tangential_jump_at_the_footprint_edge(phantom, motion):
    """Across the footprint's lateral edge u_z jumps by ~A s(z); the in-plane components do not."""
    row = motion.footprint[:, motion.footprint.shape[1] // 2]
    edge = int(np.flatnonzero(row)[0])  # first footprint cell along x at mid y
    x_edge = motion.footprint_origin[0] + edge
    y_mid = motion.footprint_origin[1] + motion.footprint.shape[1] // 2
    z = motion.lung_min[2] + 0.2 * (motion.lung_max[2] - motion.lung_min[2])  # near the base
    inside, outside = np.array([[x_edge + 0.6, y_mid, z]]), np.array([[x_edge - 1.4, y_mid, z]])
    u_in = motion.si_displacement(motion._P(inside))
    u_out = motion.si_displacement(motion._P(outside))
    assert u_out[0] == 0.0 and u_in[0] > 0.6 * motion.amplitude_mm  # the chest wall stays, the lung moves
    d = motion.in_plane_displacement(inside) - motion.in_plane_displacement(outside)
    assert np.abs(d).max() < 0.2  # continuous in-plane (2 mm apart, gradient < 0.1)


def test_jacobian_determinant_matches_the_map(phantom, motion):
    """det from the composition formula equals the central-difference det of the whole map (off the edge)."""
    p = _lung_points(phantom, 300)
    h = 0.01
    jac = np.stack([(motion(p + h * e) - motion(p - h * e)) / (2 * h) for e in np.eye(3)], axis=-1)
    expected = np.linalg.det(jac)
    near_edge = motion.in_footprint((p[:, :2] + 2 * h)) != motion.in_footprint((p[:, :2] - 2 * h))
    got = motion.jacobian_determinant(p)
    assert np.abs(got - expected)[~near_edge].max() < 1e-4
    assert 0.6 < got.min() and got.max() < 1.05  # exhale: the lungs shrink, most at the base


def test_diaphragm_motion_decays_towards_the_apex(phantom, motion):
    p = _lung_points(phantom, 2000)
    q = motion.inverse(motion(p))  # (exercise both directions)
    assert np.abs(q - p).max() < 1e-5
    rel = (motion(p) - motion.translation_mm) - p  # rotation is small: the breathing part dominates
    z = p[:, 2]
    base, apex = rel[z <= np.quantile(z, 0.1), 2].mean(), rel[z >= np.quantile(z, 0.9), 2].mean()
    assert base > 0.6 * motion.amplitude_mm and apex < 0.35 * motion.amplitude_mm


def test_serialisation_round_trip(motion, tmp_path):
    import json

    path = tmp_path / "m.json"
    path.write_text(json.dumps(motion.to_dict()))
    again = SlidingBreathingMotion.load(path)
    p = np.random.default_rng(1).normal(size=(50, 3)) * 40 + motion.center
    assert np.array_equal(again(p), motion(p))


def test_too_large_amplitude_and_empty_mask_are_errors(phantom):
    with pytest.raises(ValueError, match="too large"):
        SlidingBreathingMotion.from_lung_mask(phantom["fixed_mask"], amplitude_mm=200.0)
    with pytest.raises(ValueError, match="empty"):
        SlidingBreathingMotion.from_lung_mask(phantom["fixed_mask"] * 0)


def test_moving_grid_follows_the_offset_and_crops():
    fixed = CoordinateMapping(np.diag([2.0, 2.0, 3.0, 1.0]), (50, 40, 30))
    grid = moving_grid(fixed, (10.0, -6.0, 4.0), spacing=(2.5, 2.0, 3.0), crop_mm=((4.0, 6.0), (0.0, 0.0), (9.0, 0.0)))
    assert grid.spatial_shape == (36, 40, 27)  # (98 - 10) / 2.5 + 1, 40, (87 - 9) / 3 + 1
    assert torch.allclose(grid.affine[:3, 3], torch.tensor([14.0, -6.0, 13.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="leaves no field of view"):
        moving_grid(fixed, (0, 0, 0), crop_mm=((60.0, 60.0), (0, 0), (0, 0)))


def test_realistic_pair_ground_truth_density_and_files(phantom, tmp_path):
    pair = make_realistic_pair(
        phantom["fixed_image"], mask=phantom["fixed_mask"], seed=2, amplitude_mm=10.0, translation_mm=(0.0, 22.0, 8.0),
        rotation_deg=(1.0, 0.0, 0.0), noise_hu=0.0, moving_crop_mm=((6.0, 0.0), (0.0, 0.0), (0.0, 9.0)), num_landmarks=60,
        output_dir=tmp_path, name="r",
    )  # fmt: skip
    motion = pair["motion"]
    fixed, moving = pair["fixed_landmarks"].numpy(), pair["moving_landmarks"].numpy()
    assert np.array_equal(moving, motion(fixed))
    gm = CoordinateMapping.from_image(pair["moving_image"])
    assert gm.spatial_shape != CoordinateMapping.from_image(pair["fixed_image"]).spatial_shape
    idx = gm.world_to_index(torch.from_numpy(moving)).numpy()
    assert np.all(idx >= 0) and np.all(idx <= np.asarray(gm.spatial_shape) - 1)  # in the moving field of view
    assert np.linalg.norm(moving - fixed, axis=1).mean() > 20.0  # the rigid offset dominates before registration
    # density: at moving voxels inside the lung, HU + 1000 = (fixed HU at phi^-1(q) + 1000) / det
    fmap = CoordinateMapping.from_image(pair["fixed_image"])
    q = gm.world_grid(dtype=torch.float64).reshape(-1, 3)[pair["moving_mask"][0].reshape(-1) > 0][::5].numpy()
    p = motion.inverse(q)
    lung = fmap.sample(pair["fixed_mask"][0].double(), torch.from_numpy(p)).numpy() > 0.999
    hu_f = fmap.sample(pair["fixed_image"][0].double(), torch.from_numpy(p)).numpy()[lung]
    expected = (hu_f + 1000.0) / motion.jacobian_determinant(p[lung]) - 1000.0
    got = gm.sample(pair["moving_image"][0].double(), torch.from_numpy(q[lung])).numpy()
    assert lung.sum() > 100 and np.abs(got - expected).max() <= 0.5 + 1e-3  # whole-HU rounding only
    assert np.mean(got - hu_f) > 5.0  # the exhaled lung is denser
    # written as a datalist that loads, with the motion file
    from monai_cidir.data import load_pair_datalist
    from monai_cidir.transforms import LoadRegistrationPaird

    item = LoadRegistrationPaird()(load_pair_datalist(pair["datalist"])[0])
    assert np.abs(item["moving_landmarks"].numpy() - moving).max() < 1e-5
    assert torch.equal(item["moving_image"].as_tensor(), pair["moving_image"].as_tensor())
    again = SlidingBreathingMotion.load(tmp_path / "r_motion.json")
    assert np.array_equal(again(fixed), moving)


def test_padding_where_the_anatomy_left_the_fixed_scan(phantom):
    pair = make_realistic_pair(
        phantom["fixed_image"], mask=phantom["fixed_mask"], amplitude_mm=8.0, translation_mm=(0.0, 0.0, 0.0),
        rotation_deg=(0.0, 0.0, 0.0), noise_hu=30.0, moving_crop_mm=((0.0, 0.0), (0.0, 0.0), (0.0, -30.0)), num_landmarks=40,
    )  # fmt: skip
    img = pair["moving_image"][0]
    assert float((img[:, :, -3:] == REALISTIC_PADDING_HU).float().mean()) > 0.9  # extended beyond the fixed scan
    # inside the fixed scan's extent only the in-plane contraction uncovers a thin border
    assert float((img[:, :, :-12] == REALISTIC_PADDING_HU).float().mean()) < 0.05
    assert float(img[img > REALISTIC_PADDING_HU].std()) > 0  # noise added, padding untouched


def test_realistic_pair_on_the_real_ct(shared_dir):
    """The benchmark's use: the real chest CT, 20 mm diaphragm motion, 30 mm offset, a cropped moving scan."""
    pair = make_realistic_pair(
        shared_dir / "data" / "chest_ct.nii.gz", seed=0, amplitude_mm=20.0, translation_mm=(0.0, 24.0, 18.0),
        moving_crop_mm=((0.0, 0.0), (0.0, 0.0), (0.0, 30.0)), num_landmarks=100,
    )  # fmt: skip
    fixed, moving = pair["fixed_landmarks"].numpy(), pair["moving_landmarks"].numpy()
    assert np.array_equal(moving, pair["motion"](fixed))
    before = np.linalg.norm(moving - fixed, axis=1)
    assert 20.0 < before.mean() < 60.0
    mapping = CoordinateMapping.from_image(pair["fixed_mask"])
    idx = mapping.world_to_index(torch.from_numpy(fixed)).round().long()
    assert float(pair["fixed_mask"][0][idx[:, 0], idx[:, 1], idx[:, 2]].mean()) == 1.0
