"""RegistrationModel: affine + INR composition, derivative units, grids in chunks, model.pt round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing
from monai_cidir.engines import RegistrationModel, iter_grid_chunks, load_registration_model, save_registration_model
from monai_cidir.networks import ConditionedINR


def _mapping():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return CoordinateMapping(affine_from_spacing((2.0, 1.5, 3.0), (10.0, -20.0, 5.0), rot), (9, 8, 7))


def _affine():
    a = np.eye(4)
    a[:3, :3] += np.array([[0.02, -0.01, 0.0], [0.015, -0.03, 0.01], [0.0, 0.02, 0.05]])
    a[:3, 3] = [3.0, -2.0, 7.5]
    return torch.as_tensor(a)


def test_grid_chunks_match_world_grid_and_regions():
    m = _mapping()
    full = torch.cat([w for _, w in iter_grid_chunks(m, chunk_size=100)])
    assert torch.allclose(full, m.world_grid(dtype=torch.float64).reshape(-1, 3), atol=1e-9)
    region = (slice(1, 8, 2), slice(0, 8, 3), slice(2, 7, 1))
    sub = torch.cat([w for _, w in iter_grid_chunks(m, chunk_size=7, region=region)])
    expect = m.world_grid(dtype=torch.float64)[region].reshape(-1, 3)
    assert torch.allclose(sub, expect, atol=1e-9)


def test_affine_composition_and_derivative_units():
    torch.manual_seed(0)
    m = _mapping()
    net = ConditionedINR(hidden_features=32)
    model = RegistrationModel(net, m, _affine())
    p = m.world_grid(dtype=torch.float32).reshape(-1, 3)[::5]
    moved, jac, hess = model.forward_with_derivatives(p, 0.3, order=2)
    u_n, jac_n, hess_n = net.forward_with_derivatives(m.world_to_normalized(p), torch.tensor([0.3]), order=2)
    a = _affine().float()
    assert torch.allclose(moved, p @ a[:3, :3].T + a[:3, 3] + m.scale * u_n, atol=1e-4)
    assert torch.allclose(jac, jac_n) and torch.allclose(hess, hess_n / m.scale)
    # total displacement Jacobian = (A - I) + J_u; checked against finite differences of the displacement
    jt = model.displacement_jacobian(p[:3].double(), 0.3)
    eps = 1e-3
    for j in range(3):
        dp = torch.zeros(3, dtype=torch.float64)
        dp[j] = eps
        fd = (model.displacement(p[:3].double() + dp, 0.3) - model.displacement(p[:3].double() - dp, 0.3)) / (2 * eps)
        assert torch.allclose(jt[:, :, j].double(), fd, atol=2e-3)


def test_model_round_trip(tmp_path):
    torch.manual_seed(1)
    m = _mapping()
    model = RegistrationModel(ConditionedINR(hidden_features=32), m, _affine())
    path = save_registration_model(model, tmp_path / "model.pt", alpha=0.25, alpha_range=[0.0, 1.0])
    loaded = load_registration_model(path)
    p = torch.randn(50, 3, dtype=torch.float64) * 10
    for alpha in (0.0, 0.7):
        assert torch.allclose(loaded.displacement(p, alpha), model.displacement(p, alpha), atol=1e-6)
    assert loaded.info["alpha"] == 0.25
    assert loaded.mapping.spatial_shape == m.spatial_shape


def test_per_point_alpha_is_cut_into_the_chunks_of_transform_points():
    torch.manual_seed(0)
    model = RegistrationModel(ConditionedINR(hidden_features=16), _mapping(), _affine())
    p = _mapping().world_grid(dtype=torch.float64).reshape(-1, 3)  # 504 points
    alpha = torch.linspace(0.0, 1.0, len(p))[:, None]
    chunked = model.transform_points(p, alpha, chunk_size=100)
    assert torch.allclose(chunked, model.transform_points(p, alpha, chunk_size=10_000), atol=1e-6)
    jac = model.displacement_jacobian(p, alpha, chunk_size=64)
    assert torch.allclose(jac, model.displacement_jacobian(p, alpha, chunk_size=10_000), atol=1e-6)


def test_reload_into_the_network_def_and_a_clear_error_when_it_does_not_fit(tmp_path):
    from functools import partial

    torch.manual_seed(0)
    model = RegistrationModel(ConditionedINR(hidden_features=16, num_hidden_layers=2), _mapping(), _affine())
    save_registration_model(model, tmp_path / "model.pt", cond_features=1)
    p = _mapping().world_grid(dtype=torch.float64).reshape(-1, 3)[::7]
    again = load_registration_model(tmp_path / "model.pt", network_def=partial(ConditionedINR, hidden_features=16, num_hidden_layers=2))
    assert torch.allclose(again.displacement(p, 0.4), model.displacement(p, 0.4), atol=1e-9)
    with pytest.raises(ValueError, match=r"do not fit network_def .*hidden_features=16, num_hidden_layers=2.*network_def builds hidden_features=32"):
        load_registration_model(tmp_path / "model.pt", network_def=partial(ConditionedINR, hidden_features=32, num_hidden_layers=2))
    # the same weights under another alpha input or frequency would be another field: refused, not loaded
    for other in ({"alpha_encoding": "log"}, {"omega_0": 30.0}):
        with pytest.raises(ValueError, match=rf"they differ in \['{next(iter(other))}'\]"):
            load_registration_model(tmp_path / "model.pt", network_def=partial(ConditionedINR, hidden_features=16, num_hidden_layers=2, **other))
