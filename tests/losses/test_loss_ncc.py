"""GlobalNCCLoss against closed-form values, numpy and finite differences."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import monai_cidir.losses.image_dissimilarity as image_dissimilarity
from monai_cidir.losses import GlobalNCCLoss, global_ncc


@pytest.mark.parametrize("dtype, eps, tol", [(torch.float64, 0.0, 1e-12), (torch.float64, 1e-6, 1e-6), (torch.float32, 1e-6, 1e-5)])
def test_affine_relation_gives_minus_one(dtype, eps, tol):
    x = torch.linspace(-3.0, 5.0, 257, dtype=dtype)
    loss = GlobalNCCLoss(eps=eps)
    assert float(loss(x, 2 * x + 1)) == pytest.approx(-1.0, abs=tol)
    # anti-correlated: NCC = -1, loss = +1
    assert float(loss(x, -3 * x + 2)) == pytest.approx(1.0, abs=tol)
    # invariant to a positive affine change of either intensity scale
    y = torch.sin(3 * x)
    assert float(loss(x, y)) == pytest.approx(float(loss(10 * x - 4, 0.5 * y + 7)), abs=tol)


def test_matches_numpy_corrcoef_per_row_and_reductions():
    g = torch.Generator().manual_seed(0)
    fixed = torch.randn(4, 300, generator=g, dtype=torch.float64)
    moving = 0.6 * fixed + torch.randn(4, 300, generator=g, dtype=torch.float64)
    expected = -np.array([np.corrcoef(f, m)[0, 1] for f, m in zip(fixed.numpy(), moving.numpy())])
    per_row = GlobalNCCLoss(eps=0.0, reduction="none")(fixed, moving)
    assert per_row.shape == (4,)
    np.testing.assert_allclose(per_row.numpy(), expected, rtol=1e-12)
    assert float(GlobalNCCLoss(eps=0.0)(fixed, moving)) == pytest.approx(expected.mean(), rel=1e-12)
    assert float(GlobalNCCLoss(eps=0.0, reduction="sum")(fixed, moving)) == pytest.approx(expected.sum(), rel=1e-12)
    # an (N,) input is one row: 0-d with "none"
    one = GlobalNCCLoss(eps=0.0, reduction="none")(fixed[0], moving[0])
    assert one.shape == () and float(one) == pytest.approx(expected[0], rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_inputs_are_finite(dtype):
    x = torch.linspace(0, 1, 50, dtype=dtype)
    cases = [
        (torch.full((50,), 0.3, dtype=dtype), torch.full((50,), -2.0, dtype=dtype)),  # both constant
        (x.clone(), torch.full((50,), 0.7, dtype=dtype)),  # moving constant (e.g. all points outside)
        (torch.full((50,), 1024.0, dtype=dtype), x.clone()),  # fixed constant
    ]
    for fixed, moving in cases:
        fixed.requires_grad_(True)
        moving.requires_grad_(True)
        loss = GlobalNCCLoss()(fixed, moving)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
        assert torch.isfinite(fixed.grad).all() and torch.isfinite(moving.grad).all()
    # both constant: nothing to correlate, zero gradient
    assert torch.all(cases[0][0].grad == 0) and torch.all(cases[0][1].grad == 0)


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    fixed = torch.randn(2, 20, generator=g, dtype=torch.float64, requires_grad=True)
    moving = (0.3 * fixed + torch.randn(2, 20, generator=g, dtype=torch.float64)).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, m: GlobalNCCLoss()(f, m), (fixed, moving))


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 11\)"):
        global_ncc(torch.zeros(4, 10), torch.zeros(4, 11))
    with pytest.raises(ValueError, match="reduction"):
        GlobalNCCLoss(reduction="median")


def test_docstring_examples():
    assert doctest.testmod(image_dissimilarity, optionflags=doctest.ELLIPSIS).failed == 0
