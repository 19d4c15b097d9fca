"""Exports: ITK displacement-field geometry on an oblique LPS grid, bounded memory, cohort runner with progress."""

from __future__ import annotations

import csv
import tracemalloc

import numpy as np
import pytest
import torch
from engine_fixtures import breathing_motion, make_blob_pair

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing, lps_to_ras, ras_to_lps
from monai_cidir.engines import RegistrationModel, run_cohort, write_displacement_field
from monai_cidir.networks import ConditionedINR

sitk = pytest.importorskip("SimpleITK")


class _Zero(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, coords, alpha):
        return coords * self.w


def test_displacement_field_is_an_itk_transform_on_oblique_grid(tmp_path):
    # an LPS-stored image as MONAI sees it (x and y flipped) with a 20 degree rotation
    th = np.deg2rad(20.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0.0], [np.sin(th), np.cos(th), 0.0], [0.0, 0.0, 1.0]])
    direction = np.diag([-1.0, -1.0, 1.0]) @ rot
    mapping = CoordinateMapping(affine_from_spacing((2.0, 2.5, 3.0), (40.0, -30.0, 12.0), direction), (12, 10, 8))
    affine = np.eye(4)
    affine[:3, :3] += [[0.03, 0.01, 0.0], [-0.02, 0.04, 0.01], [0.0, 0.02, -0.05]]
    affine[:3, 3] = [4.0, -3.0, 6.0]
    model = RegistrationModel(_Zero(), mapping, torch.as_tensor(affine))
    path = write_displacement_field(model, 0.5, tmp_path / "d.nii.gz", chunk_size=100)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    # interior points (the field is affine, so ITK's linear interpolation is exact)
    index = torch.tensor([[2.3, 4.1, 3.7], [8.9, 1.5, 5.2], [5.0, 5.0, 1.0]], dtype=torch.float64)
    p = mapping.index_to_world(index)
    expect = p @ torch.as_tensor(affine[:3, :3]).T + torch.as_tensor(affine[:3, 3])
    got = lps_to_ras(np.array([tx.TransformPoint(tuple(map(float, q))) for q in ras_to_lps(p.numpy())]))
    assert np.allclose(got, expect.numpy(), atol=1e-3)


def test_export_memory_is_a_few_copies_of_the_field(tmp_path):
    mapping = CoordinateMapping(affine_from_spacing((1.0, 1.0, 1.0)), (48, 48, 40))
    model = RegistrationModel(ConditionedINR(hidden_features=16), mapping)
    field_bytes = 48 * 48 * 40 * 3 * 4
    tracemalloc.start()
    write_displacement_field(model, 0.5, tmp_path / "d.nii.gz", chunk_size=4096)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # output array + one (z, y, x) copy; torch work per chunk is bounded by chunk_size
    assert peak < 2.5 * field_bytes + 4e6, (peak, field_bytes)


def test_run_cohort_trains_each_pair_and_tabulates(tmp_path, capsys):
    items = [dict(make_blob_pair(shape=(20, 18, 16), spacing=(7.0, 7.0, 8.0), motion=breathing_motion(), seed=s)) for s in (1, 2)]
    rows = run_cohort(
        items, tmp_path, progress=True, max_iterations=15, num_points=300, num_alphas=3, export_images=False,
        affine_prealign=False, network=lambda: ConditionedINR(hidden_features=16),
    )
    assert [r["name"] for r in rows] == ["blob1", "blob2"] and all(r["iterations"] == 15 for r in rows)
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["name"] for t in table] == ["blob1", "blob2"]
    assert float(table[1]["tre_before_mean"]) == pytest.approx(rows[1]["tre_before_mean"])
    assert all((tmp_path / n / "checkpoint.pt").is_file() and (tmp_path / n / "model.pt").is_file() for n in ("blob1", "blob2"))
    assert "blob2" in capsys.readouterr().out


def test_exports_from_a_precomputed_field_equal_the_direct_ones(tmp_path):
    """select_and_export maps the grid once and gives the field to both writers: same files."""
    import nibabel as nib

    from monai_cidir.engines import write_warped_image

    mapping = CoordinateMapping(affine_from_spacing((2.0, 2.0, 3.0), (5.0, -4.0, 2.0)), (14, 12, 9))
    torch.manual_seed(0)
    model = RegistrationModel(ConditionedINR(hidden_features=16), mapping)
    moving = torch.rand(1, 16, 13, 10) * 100
    from monai.data import MetaTensor

    moving = MetaTensor(moving, affine=torch.as_tensor(affine_from_spacing((1.9, 2.1, 2.8), (3.0, -5.0, 1.0))))
    field = model.map_grid(0.3, chunk_size=100)
    kept = field.copy()
    a = write_warped_image(model, 0.3, moving, tmp_path / "a.nii.gz", chunk_size=100)
    b = write_warped_image(model, 0.3, moving, tmp_path / "b.nii.gz", chunk_size=100, field=field)
    assert np.allclose(nib.load(a).get_fdata(), nib.load(b).get_fdata(), atol=1e-3)
    c = write_displacement_field(model, 0.3, tmp_path / "c.nii.gz", chunk_size=100)
    d = write_displacement_field(model, 0.3, tmp_path / "d.nii.gz", field=field)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(c))), sitk.GetArrayFromImage(sitk.ReadImage(str(d))))
    assert np.array_equal(field, kept)  # the caller's field is not modified


class _Wavy(torch.nn.Module):
    """A smooth field with a known length scale: u = 0.02 sin(k . x) per component (normalised units)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, coords, alpha):
        phase = self.k * (coords @ torch.tensor([[1.0, 0.3, -0.5], [0.2, 1.0, 0.4], [-0.3, 0.6, 1.0]], dtype=coords.dtype))
        return 0.02 * torch.sin(phase) * self.w


def test_map_displacement_is_exact_in_the_region_and_reports_its_error_outside():
    from monai_cidir.engines.export import dilate_mask, map_displacement

    mapping = CoordinateMapping(affine_from_spacing((2.0, 2.0, 3.0), (-40.0, 10.0, 5.0)), (40, 36, 20))
    model = RegistrationModel(_Wavy(4.0), mapping)
    seed = np.zeros((40, 36, 20), bool)
    seed[12:26, 10:20, 6:14] = True
    region = dilate_mask(seed, mapping, 7.0)  # 4, 4 and 3 voxels along x, y, z
    box = np.zeros_like(seed)
    box[8:30, 6:24, 3:17] = True
    assert np.array_equal(region, box)
    exact = model.map_grid(0.5)
    field, info = map_displacement(model, 0.5, region, coarse_mm=8.0, check_points=4096)
    assert np.allclose(field[region], exact[region], atol=1e-6)  # the region is mapped voxel by voxel
    assert info["exact_fraction"] == pytest.approx(box.mean())
    err = np.linalg.norm(field - exact, axis=-1)
    outside = ~region
    # the sampled check sees (almost) the whole error outside the region...
    assert info["interpolation_max_mm"] <= err[outside].max() + 1e-6
    assert info["interpolation_max_mm"] >= 0.8 * err[outside].max()
    # ...and trilinear interpolation converges at second order: half the coarse spacing, a quarter of the error
    finer, _ = map_displacement(model, 0.5, region, coarse_mm=4.0)
    ratio = err[outside].max() / np.linalg.norm(finer - exact, axis=-1)[outside].max()
    assert 2.5 < ratio < 6.0, ratio
    # coarse_mm=None (or no region) maps every voxel exactly
    full, info = map_displacement(model, 0.5, region, coarse_mm=None)
    assert np.array_equal(full, exact) and info["exact_fraction"] == 1.0


def test_the_coarse_field_is_upsampled_as_one_trilinear_interpolation():
    """Slice by slice (in-plane, then along z) gives torch's trilinear interpolation with aligned corners."""
    import torch.nn.functional as F

    from monai_cidir.engines.export import _upsample_field

    torch.manual_seed(0)
    for sizes, shape in (((9, 7, 5), (40, 31, 23)), ((4, 5, 1), (10, 11, 1)), ((6, 6, 2), (12, 12, 2))):
        coarse = torch.randn(*sizes, 3)
        reference = F.interpolate(coarse.permute(3, 0, 1, 2)[None], size=shape, mode="trilinear", align_corners=True)[0].permute(1, 2, 3, 0)
        np.testing.assert_allclose(_upsample_field(coarse, shape), reference.numpy(), atol=1e-5)
