"""CoordinateMapping: round trips, anisotropic spacing, non-identity direction, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing, lps_to_ras, ras_to_lps


def _rotation_z(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture
def oblique():
    direction = _rotation_z(30.0) @ np.diag([-1.0, 1.0, 1.0])
    affine = affine_from_spacing((0.7, 1.3, 2.5), origin=(-100.0, 20.0, 5.0), direction=direction)
    return CoordinateMapping(affine, (40, 30, 20))


def test_round_trips(oblique):
    idx = torch.rand(100, 3, dtype=torch.float64) * torch.tensor([39.0, 29.0, 19.0])
    world = oblique.index_to_world(idx)
    torch.testing.assert_close(oblique.world_to_index(world), idx, rtol=0, atol=1e-10)
    norm = oblique.world_to_normalized(world)
    torch.testing.assert_close(oblique.normalized_to_world(norm), world, rtol=0, atol=1e-10)


def test_known_positions_anisotropic(oblique):
    # moving one index step along axis 2 moves 2.5 mm along world z; along axis 0, 0.7 mm
    p0 = oblique.index_to_world(torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p0, torch.tensor([-100.0, 20.0, 5.0], dtype=torch.float64))
    d2 = oblique.index_to_world(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)) - p0
    torch.testing.assert_close(d2, torch.tensor([0.0, 0.0, 2.5], dtype=torch.float64))
    d0 = oblique.index_to_world(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)) - p0
    assert float(d0.norm()) == pytest.approx(0.7)
    # x axis flipped then rotated by 30 degrees
    assert float(d0[0]) == pytest.approx(-0.7 * math.cos(math.radians(30)))
    torch.testing.assert_close(oblique.spacing, torch.tensor([0.7, 1.3, 2.5], dtype=torch.float64))


def test_normalised_frame_is_isotropic_and_fits(oblique):
    world = oblique.world_grid(dtype=torch.float64).reshape(-1, 3)
    norm = oblique.world_to_normalized(world)
    assert float(norm.abs().max()) == pytest.approx(1.0, abs=1e-9)
    # one scale for all axes: distances scale by exactly 1/scale
    a, b = world[0], world[-1]
    assert float((oblique.world_to_normalized(a) - oblique.world_to_normalized(b)).norm()) == pytest.approx(
        float((a - b).norm()) / oblique.scale
    )


def test_derivative_units():
    # u_n(x) = 0.5 x^2 (component 0) -> u_mm(p) = s * 0.5 ((p - c)/s)^2 -> d2u_mm/dp2 = 1/s
    m = CoordinateMapping(affine_from_spacing((2.0, 2.0, 2.0)), (11, 11, 11))
    s = m.scale
    hess_n = torch.zeros(1, 3, 3, 3)
    hess_n[0, 0, 0, 0] = 1.0
    assert float(m.hessian_to_world(hess_n)[0, 0, 0, 0]) == pytest.approx(1.0 / s)
    # and numerically, by finite differences of the mm field
    def u_mm(p):
        x = m.world_to_normalized(p)
        return m.displacement_to_world(0.5 * x[..., 0] ** 2)

    p = torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)
    h = 1e-3
    e = torch.tensor([h, 0.0, 0.0], dtype=torch.float64)
    fd = (u_mm(p + e) - 2 * u_mm(p) + u_mm(p - e)) / h**2
    assert float(fd) == pytest.approx(1.0 / s, rel=1e-5)


def test_sample_matches_linear_function_and_is_differentiable(oblique):
    # an image that is an affine function of world position is sampled exactly by trilinear interpolation
    world = oblique.world_grid(dtype=torch.float64)
    coeff = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    image = (world @ coeff + 7.0)[None]
    idx = torch.rand(50, 3, dtype=torch.float64) * torch.tensor([39.0, 29.0, 19.0])
    pts = oblique.index_to_world(idx).requires_grad_(True)
    vals = oblique.sample(image, pts)
    torch.testing.assert_close(vals[0], pts.detach() @ coeff + 7.0, rtol=0, atol=1e-8)
    vals.sum().backward()
    torch.testing.assert_close(pts.grad, coeff.expand(50, 3), rtol=0, atol=1e-6)


def test_from_image_and_state_dict():
    affine = torch.as_tensor(affine_from_spacing((1.5, 1.5, 3.0), origin=(1.0, 2.0, 3.0)))
    img = MetaTensor(torch.zeros(1, 8, 9, 10), affine=affine)
    m = CoordinateMapping.from_image(img)
    m2 = CoordinateMapping.from_state_dict(m.state_dict())
    p = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(m2.world_to_normalized(p), m.world_to_normalized(p))
    with pytest.raises(ValueError, match="channel-first"):
        CoordinateMapping.from_image(MetaTensor(torch.zeros(8, 9, 10), affine=affine))
    with pytest.raises(ValueError, match="4x4"):
        CoordinateMapping(torch.eye(3), (2, 2, 2))


def test_lps_ras():
    p = np.array([[1.0, -2.0, 3.0]])
    np.testing.assert_allclose(lps_to_ras(p), [[-1.0, 2.0, 3.0]])
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(p)), p)
    t = torch.tensor([[1.0, -2.0, 3.0]])
    torch.testing.assert_close(lps_to_ras(t), torch.tensor([[-1.0, 2.0, 3.0]]))


def test_itk_geometry_matches_what_itk_reads(tmp_path):
    """The grid's ITK geometry (LPS) equals what ITK itself reads from a NIfTI file with that RAS affine."""
    import itk
    import nibabel as nib

    from monai_cidir.coordinates import CoordinateMapping

    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 0.8, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), dtype=np.float32), affine), str(tmp_path / "grid.nii.gz"))
    image = itk.imread(str(tmp_path / "grid.nii.gz"))
    origin, spacing, direction = CoordinateMapping(affine, (5, 6, 7)).itk_geometry()
    np.testing.assert_allclose(origin, np.asarray(image.GetOrigin()), atol=1e-4)
    np.testing.assert_allclose(spacing, np.asarray(image.GetSpacing()), atol=1e-5)
    np.testing.assert_allclose(direction, itk.array_from_matrix(image.GetDirection()), atol=1e-5)
    sheared = affine.copy()
    sheared[0, 1] += 0.5
    with pytest.raises(ValueError, match="not orthonormal"):
        CoordinateMapping(sheared, (5, 6, 7)).itk_geometry()


def test_sub_grids_keep_the_world_and_the_normalised_frame(oblique):
    """region / resample / crop are grids of the same world: their voxel centres are the parent's
    (sliced or resampled), and a network's normalised coordinates of a point do not change."""
    whole = oblique.world_grid(dtype=torch.float64)
    slices = (slice(2, 9, 3), slice(0, 12, 2), slice(1, 6))
    sub = oblique.region(slices)
    assert sub.spatial_shape == (3, 6, 5)
    assert torch.allclose(sub.world_grid(dtype=torch.float64), whole[slices], atol=1e-9)
    assert torch.equal(sub.center, oblique.center) and sub.scale == oblique.scale
    p = whole[slices].reshape(-1, 3)
    assert torch.allclose(sub.world_to_normalized(p), oblique.world_to_normalized(p))
    coarse = oblique.resample((4, 5, 1))
    assert torch.allclose(coarse.world_grid(dtype=torch.float64), oblique.world_grid((4, 5, 1), dtype=torch.float64), atol=1e-9)
    # chunked walking covers every voxel once, in C order, whatever the chunk size
    walked = torch.cat([w for _, w in sub.iter_points(chunk_size=4)])
    assert torch.allclose(walked, whole[slices].reshape(-1, 3), atol=1e-9) and len(walked) == sub.num_points
    assert torch.allclose(sub.points_at([0, sub.num_points - 1]), walked[[0, -1]])
    # crop to a mask with a margin in mm: 2 mm at 1.5 mm voxels is 2 voxels, clipped at the border
    grid = CoordinateMapping(affine_from_spacing((1.5, 1.0, 3.0)), (10, 12, 7))
    mask = torch.zeros(1, 10, 12, 7)
    mask[0, 1:4, 5:7, 3] = 1
    assert grid.bounding_slices(mask, margin_mm=2.0) == (slice(0, 6, 1), slice(3, 9, 1), slice(2, 5, 1))
    cropped = grid.crop(mask, margin_mm=2.0)
    assert cropped.spatial_shape == (6, 6, 3)
    assert torch.allclose(cropped.index_to_world(torch.zeros(3, dtype=torch.float64)), grid.index_to_world(torch.tensor([0.0, 3.0, 2.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="empty"):
        grid.crop(torch.zeros(1, 10, 12, 7))
    with pytest.raises(ValueError, match="select no voxel"):
        grid.region((slice(4, 4), slice(None), slice(None)))
