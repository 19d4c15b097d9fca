"""Affine pre-alignment: a 30 mm / 4 degree offset pair is brought to ~1 voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_fixtures import make_blob_pair
from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.engines import RegistrationModel, fit_affine, landmark_tre, make_point_sampler


class _Zero(torch.nn.Module):
    """A field that is exactly zero (the model then is the affine alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, coords, alpha):
        return coords * self.w


def _rigid_pair():
    th = np.deg2rad(4.0)
    rz = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(th / 2), -np.sin(th / 2)], [0, np.sin(th / 2), np.cos(th / 2)]])
    rot = rz @ rx
    t = np.array([24.0, -12.0, 13.4])  # 30 mm
    return make_blob_pair(maps=(lambda p: p @ rot.T + t, lambda q: (q - t) @ rot), moving_origin_shift=tuple(t))


def test_affine_prealign_registers_30mm_offset():
    item = _rigid_pair()
    before = landmark_tre(None, None, item)["mean"]
    assert before > 29.0
    result = fit_affine(
        item["fixed_image"], item["moving_image"], make_point_sampler(item["fixed_mask"], seed=0),
        item["fixed_mask"], item["moving_mask"],
    )
    assert result.kept and result.ncc_affine > 0.95 > result.ncc_identity
    model = RegistrationModel(_Zero(), CoordinateMapping.from_image(item["fixed_image"]), result.matrix)
    after = landmark_tre(model, 0.0, item)["mean"]
    assert after < 1.5, (before, after)  # voxels are 4 x 4 x 5 mm


def test_affine_not_kept_for_aligned_pair():
    item = make_blob_pair()  # identical images: the identity is already optimal
    result = fit_affine(
        item["fixed_image"], item["moving_image"], make_point_sampler(item["fixed_mask"], seed=0),
        item["fixed_mask"], item["moving_mask"], levels=[(20, 0.0)],
    )
    assert not result.kept
    assert torch.equal(result.matrix, torch.eye(4, dtype=torch.float64))
    assert result.ncc_identity > 0.999


def test_affine_levels_are_checked_before_fitting():
    item = make_blob_pair()
    sampler = make_point_sampler(item["fixed_mask"], seed=0)
    for bad in ([(20, 6.0, 1)], [], [(-1, 0.0)], [(20, -2.0)], [(2.5, 0.0)], 20):
        with pytest.raises(ValueError, match=r"levels must be \(steps >= 0, sigma_mm >= 0\) pairs"):
            fit_affine(item["fixed_image"], item["moving_image"], sampler, levels=bad)
