"""RegistrationLoss: the similarity plus lambda(alpha)-weighted regularizers, against closed forms."""

from __future__ import annotations

import pytest
import torch

from monai_cidir.losses import (
    REGULARIZER_SCALES,
    BendingEnergyRegularizer,
    GlobalNCCLoss,
    JacobianRegularizer,
    RegistrationLoss,
)


def _derivatives(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    jac = 0.05 * torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
    hess = 1e-3 * torch.randn(n, 3, 3, 3, generator=g, dtype=torch.float64)
    hess = 0.5 * (hess + hess.transpose(2, 3))
    values = torch.rand(2, n, generator=g, dtype=torch.float64)
    return values[0], values[1], jac, hess


def test_one_alpha_weights_every_term_by_alpha_times_its_scale():
    fixed, moving, jac, hess = _derivatives()
    loss = RegistrationLoss({"bending": 1.0, "jacobian": 0.5})
    terms = loss(fixed, moving, jac, hess, torch.tensor([0.3], dtype=torch.float64))
    bend = 0.3 * 3e3 * BendingEnergyRegularizer()(hess)  # the documented default scales (README): bending 3e3 mm^2, Jacobian 5
    jreg = 0.3 * 0.5 * 5.0 * JacobianRegularizer()(jac)
    sim = GlobalNCCLoss()(fixed, moving)
    torch.testing.assert_close(terms["reg_bending"], bend)
    torch.testing.assert_close(terms["reg_jacobian"], jreg)
    torch.testing.assert_close(terms["similarity"], sim)
    torch.testing.assert_close(terms["loss"], sim + bend + jreg)
    assert loss.order == 2 and loss.names == ["bending", "jacobian"] and loss.cond_features == 1
    assert RegistrationLoss("jacobian").order == 1


def test_the_documented_default_scales():
    """lambda(alpha) = alpha * scale with the scales README and the module docstring state (bending 3e3 mm^2,
    Jacobian 5, hyperelastic 50): literals here, so a changed default fails until the documentation moves too."""
    assert REGULARIZER_SCALES == {"bending": 3e3, "jacobian": 5.0, "hyperelastic": 50.0}
    assert RegistrationLoss().scales == {"bending": 3e3}  # bending is the default regularizer
    assert RegistrationLoss(["jacobian", "hyperelastic"]).scales == {"jacobian": 5.0, "hyperelastic": 50.0}
    fixed, moving, jac, hess = _derivatives(n=8)
    terms = RegistrationLoss()(fixed, moving, jac, hess, torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(terms["reg_bending"], 3e3 * BendingEnergyRegularizer()(hess))  # alpha = 1: lambda = 3000


def test_per_point_alpha_weights_each_point():
    fixed, moving, jac, hess = _derivatives(n=6)
    alpha = torch.linspace(0, 1, 6, dtype=torch.float64)[:, None]
    terms = RegistrationLoss("bending", scales={"bending": 10.0})(fixed, moving, jac, hess, alpha)
    per_point = BendingEnergyRegularizer(reduction="none")(hess)
    torch.testing.assert_close(terms["reg_bending"], (10.0 * alpha[:, 0] * per_point).mean())


def test_per_regularizer_alpha_moves_only_its_own_term():
    fixed, moving, jac, hess = _derivatives()
    loss = RegistrationLoss(["bending", "jacobian"], conditioning="per_regularizer")
    assert loss.cond_features == 2
    base = loss(fixed, moving, jac, hess, torch.tensor([[0.2, 0.4]], dtype=torch.float64))
    moved_bending = loss(fixed, moving, jac, hess, torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    moved_jacobian = loss(fixed, moving, jac, hess, torch.tensor([[0.2, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(moved_bending["reg_bending"], 3 * base["reg_bending"])
    torch.testing.assert_close(moved_bending["reg_jacobian"], base["reg_jacobian"])
    torch.testing.assert_close(moved_jacobian["reg_jacobian"], 2 * base["reg_jacobian"])
    torch.testing.assert_close(moved_jacobian["reg_bending"], base["reg_bending"])
    jreg = 0.4 * 5.0 * JacobianRegularizer()(jac)
    torch.testing.assert_close(base["reg_jacobian"], jreg)


def test_bad_specifications_are_named():
    with pytest.raises(ValueError, match="unknown regularizer 'bend'"):
        RegistrationLoss("bend")
    with pytest.raises(ValueError, match="unknown name 'jacobain'"):
        RegistrationLoss("bending", scales={"jacobain": 1.0})
    with pytest.raises(ValueError, match="conditioning must be one of"):
        RegistrationLoss("bending", conditioning="separate")
    with pytest.raises(ValueError, match=">= 0"):
        RegistrationLoss({"bending": -1.0})
    loss = RegistrationLoss(["bending", "jacobian"], conditioning="per_regularizer")
    fixed, moving, jac, hess = _derivatives(n=4)
    with pytest.raises(ValueError, match="2 value\\(s\\) per row"):
        loss(fixed, moving, jac, hess, torch.rand(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 value\\(s\\) per row"):  # 4 alphas are not 2 rows of 2
        loss(fixed, moving, jac, hess, torch.rand(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the Hessian"):
        RegistrationLoss("bending")(fixed, moving, jac, None, torch.tensor([0.5]))


def test_balance_divides_each_points_share_by_one_plus_lambda_over_reference():
    fixed, moving, jac, hess = _derivatives(n=8)
    loss = RegistrationLoss("bending", scales={"bending": 100.0}, balance=50.0)
    # one alpha: the whole loss is scaled by 50 / (50 + 100 alpha); the optimum is unchanged
    plain = RegistrationLoss("bending", scales={"bending": 100.0})
    one = loss(fixed, moving, jac, hess, torch.tensor([0.5], dtype=torch.float64))
    ref = plain(fixed, moving, jac, hess, torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(one["loss"], ref["loss"] * 50.0 / 100.0)
    torch.testing.assert_close(one["similarity"], ref["similarity"])  # reported unweighted
    # per point: similarity gradient through moving value n scaled by s_n, regularizer by s_n * lambda_n
    alpha = torch.linspace(0, 1, 8, dtype=torch.float64)[:, None]
    share = 50.0 / (50.0 + 100.0 * alpha[:, 0])
    m = moving.clone().requires_grad_(True)
    terms = loss(fixed, m, jac, hess, alpha)
    torch.testing.assert_close(terms["similarity"], GlobalNCCLoss()(fixed, moving))
    per_point = BendingEnergyRegularizer(reduction="none")(hess)
    torch.testing.assert_close(terms["reg_bending"], (share * 100.0 * alpha[:, 0] * per_point).mean())
    (grad,) = torch.autograd.grad(terms["loss"], m)
    m0 = moving.clone().requires_grad_(True)
    (plain_grad,) = torch.autograd.grad(GlobalNCCLoss()(fixed, m0), m0)
    torch.testing.assert_close(grad, share * plain_grad)
    with pytest.raises(ValueError, match="balance must be a positive"):
        RegistrationLoss(balance=0.0)
