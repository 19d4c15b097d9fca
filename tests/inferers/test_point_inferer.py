"""PointInferer: chunked network calls give the unchunked result, per-point arguments included."""

from __future__ import annotations

import pytest
import torch

from monai_cidir.inferers import PointInferer
from monai_cidir.networks import ConditionedINR


def test_chunks_give_the_same_values_with_per_point_alpha():
    torch.manual_seed(0)
    net = ConditionedINR(hidden_features=16).double()
    x = torch.rand(1000, 3, dtype=torch.float64) * 2 - 1
    alpha = torch.rand(1000, 1, dtype=torch.float64)  # one alpha per point: cut with the points
    calls = []

    def counted(points, a):
        calls.append(points.shape[0])
        return net(points, a)

    out = PointInferer(chunk_size=300)(x, counted, alpha)
    assert calls == [300, 300, 300, 100]
    assert torch.allclose(out, net(x, alpha), atol=1e-12)
    # one alpha for every point is passed unchanged to each chunk
    assert torch.allclose(PointInferer(chunk_size=7)(x, net, 0.3), net(x, 0.3), atol=1e-12)


def test_tuple_outputs_are_concatenated_and_none_kept():
    torch.manual_seed(0)
    net = ConditionedINR(hidden_features=16).double()
    x = torch.rand(50, 3, dtype=torch.float64)
    u, jac, hess = PointInferer(chunk_size=16, device="cpu")(x, net.forward_with_derivatives, 0.5, order=1)
    u0, jac0, _ = net.forward_with_derivatives(x, 0.5, order=1)
    assert hess is None and u.shape == (50, 3) and jac.shape == (50, 3, 3)
    assert torch.allclose(u, u0, atol=1e-12) and torch.allclose(jac, jac0, atol=1e-12)


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="chunk_size must be a positive number of points, found 0"):
        PointInferer(chunk_size=0)
    with pytest.raises(ValueError, match=r"expects points as a \(N, D\) tensor, found torch.Size\(\[5\]\)"):
        PointInferer()(torch.zeros(5), lambda p: p)
