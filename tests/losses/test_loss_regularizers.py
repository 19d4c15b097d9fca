"""Regularisers against closed-form values of analytic fields, autograd and finite differences."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import monai_cidir.losses.functional as functional
import monai_cidir.losses.regularization as regularization
from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing
from monai_cidir.losses import (
    BendingEnergyRegularizer,
    HyperelasticRegularizer,
    JacobianRegularizer,
    cofactor_matrix,
    determinant_3x3,
    hyperelastic_terms,
    jacobian_determinant,
    smooth_clamp_determinant,
)

DT = torch.float64


def _rotation(axis, angle) -> torch.Tensor:
    """Rodrigues' formula."""
    k = torch.as_tensor(axis, dtype=DT)
    k = k / k.norm()
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=DT)
    return torch.eye(3, dtype=DT) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def _field_derivatives(field, points):
    """Jacobian (N, 3, 3) and Hessian (N, 3, 3, 3) of an analytic field by autograd, [n, i, j(, k)]."""
    jac = torch.stack([torch.autograd.functional.jacobian(field, p) for p in points])
    hes = torch.stack(
        [torch.stack([torch.autograd.functional.hessian(lambda q, i=i: field(q)[i], p) for i in range(3)]) for p in points]
    )
    return jac, hes


# --------------------------------------------------------------------------- bending energy
def test_bending_energy_of_quadratic_field_is_sum_of_squared_hessians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, 3, generator=g, dtype=DT)
    a = 0.5 * (a + a.transpose(1, 2))  # symmetric A_i: u_i(x) = 0.5 x^T A_i x + b_i . x
    b = torch.randn(3, 3, generator=g, dtype=DT)

    def field(x):
        return 0.5 * torch.einsum("j,ijk,k->i", x, a, x) + b @ x

    points = torch.randn(6, 3, generator=g, dtype=DT)
    _, hessian = _field_derivatives(field, points)
    torch.testing.assert_close(hessian, a.expand(6, 3, 3, 3))  # the [n, i, j, k] convention
    expected = float((a**2).sum())
    # the explicit IDIR-style expansion, every mixed term counted twice
    expansion = sum(
        float(a[i, 0, 0] ** 2 + a[i, 1, 1] ** 2 + a[i, 2, 2] ** 2 + 2 * a[i, 0, 1] ** 2 + 2 * a[i, 0, 2] ** 2 + 2 * a[i, 1, 2] ** 2)
        for i in range(3)
    )
    assert expected == pytest.approx(expansion, rel=1e-14)
    reg = BendingEnergyRegularizer()
    assert float(reg(hessian)) == pytest.approx(expected, rel=1e-12)
    assert float(BendingEnergyRegularizer(reduction="sum")(hessian)) == pytest.approx(6 * expected, rel=1e-12)
    per_point = BendingEnergyRegularizer(reduction="none")(hessian)
    assert per_point.shape == (6,)
    np.testing.assert_allclose(per_point.numpy(), expected, rtol=1e-12)


def test_bending_energy_single_mixed_term_counts_twice_and_affine_costs_nothing():
    def field(x):  # u_x = x * y, u_y = u_z = 0
        return torch.stack([x[0] * x[1], 0 * x[0], 0 * x[0]])

    points = torch.tensor([[0.1, -0.4, 2.0], [3.0, 1.0, -1.0]], dtype=DT)
    _, hessian = _field_derivatives(field, points)
    assert float(BendingEnergyRegularizer()(hessian)) == pytest.approx(2.0, rel=1e-14)

    mat = torch.tensor([[0.2, -0.1, 0.3], [0.0, 0.5, 0.1], [0.4, 0.0, -0.2]], dtype=DT)
    _, hessian = _field_derivatives(lambda x: mat @ x + 1.0, points)
    assert float(BendingEnergyRegularizer()(hessian)) == 0.0


def test_bending_energy_in_millimetres_scales_with_the_mapping():
    # u_n(x) = 0.5 c x^2 in normalised units -> u_mm(p) = scale * u_n(p / scale): u_mm'' = c / scale
    mapping = CoordinateMapping(affine_from_spacing((0.8, 0.8, 2.5)), (64, 64, 40))
    c = 0.7
    hessian_n = torch.zeros(3, 3, 3, 3, dtype=DT)
    hessian_n[:, 0, 0, 0] = c
    energy_mm = BendingEnergyRegularizer()(mapping.hessian_to_world(hessian_n))
    assert float(energy_mm) == pytest.approx((c / mapping.scale) ** 2, rel=1e-14)


# --------------------------------------------------------------------------- determinants and cofactors
def test_determinant_and_cofactor_match_linalg_and_stay_defined_when_singular():
    g = torch.Generator().manual_seed(2)
    mats = torch.randn(50, 3, 3, generator=g, dtype=DT)
    torch.testing.assert_close(determinant_3x3(mats), torch.linalg.det(mats))
    expected_cof = torch.linalg.det(mats)[:, None, None] * torch.linalg.inv(mats).transpose(1, 2)
    torch.testing.assert_close(cofactor_matrix(mats), expected_cof)
    singular = mats.clone()
    singular[:, :, 2] = singular[:, :, 0] - 2 * singular[:, :, 1]  # rank 2
    cof = cofactor_matrix(singular)
    assert torch.isfinite(cof).all()
    det = determinant_3x3(singular)
    torch.testing.assert_close(det, torch.zeros(50, dtype=DT), atol=1e-12, rtol=0)
    # A^T cof(A) = det(A) I holds for singular matrices too (here: = 0)
    torch.testing.assert_close(singular.transpose(1, 2) @ cof, torch.zeros(50, 3, 3, dtype=DT), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- Jacobian regulariser
@pytest.mark.parametrize(
    "matrix, expected",
    [
        ([[2, 0, 0], [0, 1, 0], [0, 0, 1]], 1.0),  # stretch x2: det 2
        ([[2, 0, 0], [0, 2, 0], [0, 0, 2]], 7.0),  # isotropic x2: det 8
        ([[2, 0, 0], [0, 1, 0], [0, 0, 0.5]], 0.0),  # volume preserving
        ([[1, 0.7, -0.3], [0, 1, 0.2], [0, 0, 1]], 0.0),  # shear: det 1
        ([[-1, 0, 0], [0, 1, 0], [0, 0, 1]], 2.0),  # mirror (folded): det -1
        ([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]], 0.875),  # compression: det 1/8
    ],
)
def test_jacobian_regularizer_of_affine_maps(matrix, expected):
    # phi(x) = A x + b  ->  displacement Jacobian J = A - I, obtained here by autograd on the field
    a = torch.tensor(matrix, dtype=DT)
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]], dtype=DT)
    jac, _ = _field_derivatives(lambda x: a @ x + torch.tensor([5.0, -1.0, 2.0], dtype=DT) - x, points)
    torch.testing.assert_close(jac, (a - torch.eye(3, dtype=DT)).expand(2, 3, 3))
    assert float(JacobianRegularizer()(jac)) == pytest.approx(expected, abs=1e-14)


def test_jacobian_regularizer_of_rotations_and_random_maps():
    rot = _rotation((1.0, 2.0, -0.5), 0.8)
    assert float(JacobianRegularizer()((rot - torch.eye(3, dtype=DT))[None])) == pytest.approx(0.0, abs=1e-14)
    g = torch.Generator().manual_seed(3)
    jac = 0.4 * torch.randn(40, 3, 3, generator=g, dtype=DT)
    expected = (torch.linalg.det(jac + torch.eye(3, dtype=DT)) - 1).abs().mean()
    assert float(JacobianRegularizer()(jac)) == pytest.approx(float(expected), rel=1e-12)


# --------------------------------------------------------------------------- hyperelastic regulariser
def test_hyperelastic_rotation_costs_only_length():
    for axis, angle in [((0, 0, 1), 0.3), ((1.0, -2.0, 0.5), 1.1), ((0.3, 0.3, 1.0), 2.5)]:
        rot = _rotation(axis, angle)
        jac = (rot - torch.eye(3, dtype=DT))[None]
        terms = HyperelasticRegularizer().terms(jac)
        assert float(terms["area"]) == pytest.approx(0.0, abs=1e-20)
        assert float(terms["volume"]) == pytest.approx(0.0, abs=1e-20)
        # 0.5 ||R - I||_F^2 = 3 - tr R = 2 - 2 cos(angle)
        assert float(terms["length"]) == pytest.approx(2 - 2 * math.cos(angle), rel=1e-12)


@pytest.mark.parametrize(
    "scales, alphas",
    [((2.0, 1.0, 1.0), (1.0, 1.0, 1.0)), ((2.0, 1.0, 1.0), (2.0, 0.5, 4.0)), ((0.5, 1.0, 1.0), (1.0, 1.0, 1.0)), ((1.3, 0.8, 1.5), (0.7, 1.1, 0.9))],
)
def test_hyperelastic_of_scalings_matches_closed_form(scales, alphas):
    s1, s2, s3 = scales
    # length 0.5 sum (s_i - 1)^2; cof(diag s) = diag(s2 s3, s1 s3, s1 s2); det = s1 s2 s3
    length = 0.5 * sum((s - 1) ** 2 for s in scales)
    area = sum(max(c * c - 1, 0.0) ** 2 for c in (s2 * s3, s1 * s3, s1 * s2))
    det = s1 * s2 * s3
    volume = (det - 1) ** 4 / det**2
    expected = alphas[0] * length + alphas[1] * area + alphas[2] * volume
    jac = torch.diag(torch.tensor(scales, dtype=DT) - 1)[None].expand(3, 3, 3)
    reg = HyperelasticRegularizer(*alphas)
    assert float(reg(jac)) == pytest.approx(expected, rel=1e-13)
    if scales == (2.0, 1.0, 1.0):  # spelled out: 0.5 + 18 + 0.25
        assert (length, area, volume) == (0.5, 18.0, 0.25)


def test_hyperelastic_general_affine_matches_linalg():
    g = torch.Generator().manual_seed(4)
    jac = 0.3 * torch.randn(30, 3, 3, generator=g, dtype=DT)
    phi = jac + torch.eye(3, dtype=DT)
    det = torch.linalg.det(phi)
    assert (det > 0.1).all()  # outside the clamp: the exact formula
    cof = det[:, None, None] * torch.linalg.inv(phi).transpose(1, 2)
    expected = (
        0.5 * (jac**2).sum((1, 2))
        + torch.clamp((cof**2).sum(1) - 1, min=0).pow(2).sum(1)
        + (det - 1) ** 4 / det**2
    )
    torch.testing.assert_close(HyperelasticRegularizer(reduction="none")(jac), expected)


def test_hyperelastic_is_finite_for_folded_points_and_pushes_det_up():
    eps = 0.1
    jac = torch.zeros(4, 3, 3, dtype=DT)
    jac[0, 0, 0] = -2.0  # mirror: det -1
    jac[1, 0, 0] = -1.0  # collapse: det 0
    jac[2] = -101.0 * torch.eye(3, dtype=DT)  # det -1e6
    jac[3, 0, 0] = -0.95  # det 0.05, inside the clamp
    jac.requires_grad_(True)
    reg = HyperelasticRegularizer(alpha_length=0.0, alpha_area=0.0, alpha_volume=1.0, det_epsilon=eps, reduction="none")
    values = reg(jac)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(jac.grad).all()
    det = jacobian_determinant(jac.detach())
    d = eps / 2 + eps / 2 * torch.exp(2 * (det - eps) / eps)  # the documented clamp
    torch.testing.assert_close(values.detach(), (d - 1) ** 4 / d**2)
    bound = (1 - eps / 2) ** 4 / (eps / 2) ** 2  # about 326
    assert (values <= bound).all() and float(values[0]) == pytest.approx(bound, rel=1e-6)
    # gradient w.r.t. the stretched/compressed diagonal entry increases det for the moderately folded points
    assert jac.grad[0, 0, 0] < 0 and jac.grad[1, 0, 0] < 0 and jac.grad[3, 0, 0] < 0
    # the full energy stays finite too, in float32 as used in training
    full = HyperelasticRegularizer()(jac.detach())
    assert torch.isfinite(full)
    jac32 = jac.detach().float().requires_grad_(True)
    full32 = HyperelasticRegularizer()(jac32)
    full32.backward()
    assert torch.isfinite(full32) and torch.isfinite(jac32.grad).all()
    assert float(full32) == pytest.approx(float(full), rel=1e-5)


def test_smooth_clamp_is_c1_increasing_and_bounded():
    eps = 0.1
    det = torch.tensor([eps - 1e-7, eps, eps + 1e-7], dtype=DT, requires_grad=True)
    out = smooth_clamp_determinant(det, eps)
    grads = torch.autograd.grad(out.sum(), det)[0]
    torch.testing.assert_close(out.detach(), det.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(grads, torch.ones(3, dtype=DT), atol=1e-5, rtol=0)
    xs = torch.linspace(-50, 3, 2001, dtype=DT)
    ys = smooth_clamp_determinant(xs, eps)
    assert (ys[1:] >= ys[:-1]).all() and (ys >= eps / 2).all()  # saturates at eps/2 once exp underflows
    torch.testing.assert_close(ys[xs >= eps], xs[xs >= eps])
    with pytest.raises(ValueError, match="epsilon"):
        HyperelasticRegularizer(det_epsilon=0.0)


def test_regularizer_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(5)
    jac = 0.5 * torch.randn(8, 3, 3, generator=g, dtype=DT)
    jac[0] = torch.diag(torch.tensor([-1.7, 0.1, 0.2], dtype=DT))  # folded
    jac[1] = torch.diag(torch.tensor([-0.93, 0.05, 0.0], dtype=DT))  # det ~0.07: in the clamp
    jac.requires_grad_(True)
    hessian = torch.randn(5, 3, 3, 3, generator=g, dtype=DT, requires_grad=True)
    weight = torch.rand(8, generator=g, dtype=DT)
    assert torch.autograd.gradcheck(lambda j: HyperelasticRegularizer(0.7, 1.3, 0.9)(j, weight=weight), (jac,))
    assert torch.autograd.gradcheck(lambda j: JacobianRegularizer()(j), (jac,))
    assert torch.autograd.gradcheck(lambda h: BendingEnergyRegularizer()(h), (hessian,))


# --------------------------------------------------------------------------- weights and errors
def test_per_point_weights():
    g = torch.Generator().manual_seed(6)
    jac = 0.3 * torch.randn(10, 3, 3, generator=g, dtype=DT)
    hessian = torch.randn(10, 3, 3, 3, generator=g, dtype=DT)
    alpha = torch.rand(10, generator=g, dtype=DT)
    lam = 5.0 * alpha  # e.g. lambda(alpha_n) = scale * alpha_n
    for reg, x in [(BendingEnergyRegularizer(), hessian), (JacobianRegularizer(), jac), (HyperelasticRegularizer(), jac)]:
        per_point = type(reg)(reduction="none")(x)
        expected = float((lam * per_point).mean())
        assert float(reg(x, weight=lam)) == pytest.approx(expected, rel=1e-13)
        assert float(reg(x, weight=lam[:, None])) == pytest.approx(expected, rel=1e-13)  # (N, 1) accepted
        assert float(reg(x, weight=2.0)) == pytest.approx(2 * float(per_point.mean()), rel=1e-13)
    with pytest.raises(ValueError, match=r"\(7,\).*\(10,\)"):
        JacobianRegularizer()(jac, weight=torch.ones(7, dtype=DT))


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match=r"hessian.*\(\.\.\., 3, 3, 3\).*\(10, 3, 3\)"):
        BendingEnergyRegularizer()(torch.zeros(10, 3, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\).*\(10, 9\)"):
        JacobianRegularizer()(torch.zeros(10, 9))


def test_terms_sum_to_the_energy_and_docstring_examples():
    g = torch.Generator().manual_seed(7)
    jac = 0.3 * torch.randn(10, 3, 3, generator=g, dtype=DT)
    reg = HyperelasticRegularizer(0.5, 2.0, 3.0)
    t = reg.terms(jac)
    expected = (0.5 * t["length"] + 2.0 * t["area"] + 3.0 * t["volume"]).mean()
    assert float(reg(jac)) == pytest.approx(float(expected), rel=1e-14)
    length, area, volume = hyperelastic_terms(jac)
    torch.testing.assert_close(length, t["length"])
    for module in (functional, regularization):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
