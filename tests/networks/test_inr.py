"""ConditionedINR / SirenINR: initialisation, alpha handling, closed-form derivatives, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monai_cidir.networks import ConditionedINR, Harmonizer, SirenINR, autograd_derivatives


class _Constant(nn.Module):
    """A stand-in harmonizer that returns fixed (a, b, c, d) for every alpha row."""

    def __init__(self, a, b, c, d):
        super().__init__()
        self.register_buffer("params", torch.tensor([a, b, c, d], dtype=torch.float64))

    def forward(self, alpha):
        return self.params.to(alpha).expand(alpha.shape[0], 4)


def _points(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g, dtype=dtype) * 2 - 1


def test_paper_architecture_and_siren_initialisation():
    torch.manual_seed(0)
    net = ConditionedINR()
    shapes = [tuple(layer.weight.shape) for layer in net.layers]
    assert shapes == [(256, 3), (256, 256), (256, 256), (3, 256)]
    assert net.layers[0].weight.abs().max() <= 1 / 3
    assert net.layers[0].weight.abs().max() > 0.9 / 3  # uniform over the whole range, not smaller
    bound = math.sqrt(6 / 256) / 32
    for layer in net.layers[1:]:
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(net.layers[-1].bias) == 0


def test_initial_displacement_is_small():
    torch.manual_seed(0)
    x = _points(2000, torch.float32)
    for net in (SirenINR(), ConditionedINR()):
        u = net(x, 0.5)
        rms = u.pow(2).mean().sqrt().item()
        # SIREN init of the last layer: std(u) ~ sqrt(256 * (6/256)/(3 * 32**2) * E[sin^2]) ~ 0.03
        assert 0.005 < rms < 0.06
        assert u.abs().max() < 0.25


def test_conditioned_network_is_the_siren_at_initialisation():
    torch.manual_seed(3)
    siren = SirenINR(hidden_features=64).double()
    cond = ConditionedINR(hidden_features=64).double()
    missing, unexpected = cond.load_state_dict(siren.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("harmonizer.") for k in missing)
    x = _points(100)
    for alpha in (0.0, 0.7, torch.rand(100, 1, dtype=torch.float64)):
        torch.testing.assert_close(cond(x, alpha), siren(x), rtol=0, atol=1e-14)
        for got, want in zip(cond.forward_with_derivatives(x, alpha), siren.forward_with_derivatives(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_siren_ignores_alpha():
    torch.manual_seed(0)
    net = SirenINR(hidden_features=16)
    x = _points(10, torch.float32)
    torch.testing.assert_close(net(x, alpha=0.3), net(x))
    torch.testing.assert_close(net.forward_with_derivatives(x, 0.3)[2], net.forward_with_derivatives(x)[2])


def _one_layer_closed_form(x, w0, b0, w1, b1, a, b, c, d, omega):
    """u = W1 (a sin(b omega (W0 x + b0) + c) + d) + b1 and its exact derivatives."""
    k = b * omega
    s = k * (x @ w0.T + b0) + c  # (N, F)
    u = (a * torch.sin(s) + d) @ w1.T + b1
    jac = torch.einsum("if,nf,fj->nij", w1, a * k * torch.cos(s), w0)
    hess = torch.einsum("if,nf,fj,fk->nijk", w1, -a * k * k * torch.sin(s), w0, w0)
    return u, jac, hess


@pytest.mark.parametrize("conditioned", [False, True])
def test_derivatives_match_closed_form(conditioned):
    torch.manual_seed(4)
    omega = 5.0
    if conditioned:
        params = (1.7, 0.6, 0.4, -0.3)
        net = ConditionedINR(hidden_features=7, num_hidden_layers=1, omega_0=omega, harmonizer=_Constant(*params))
    else:
        params = (1.0, 1.0, 0.0, 0.0)
        net = SirenINR(hidden_features=7, num_hidden_layers=1, omega_0=omega)
    net = net.double()
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.normal_()
            layer.bias.normal_()
    x = _points(40)
    want = _one_layer_closed_form(
        x, net.layers[0].weight, net.layers[0].bias, net.layers[1].weight, net.layers[1].bias, *params, omega
    )
    with torch.no_grad():
        got = net.forward_with_derivatives(x, 0.2)
        torch.testing.assert_close(net(x, 0.2), want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-10)
    for g, w in zip(autograd_derivatives(net, x, 0.2), want):
        torch.testing.assert_close(g.detach(), w, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(
    "alpha",
    [0.25, torch.tensor(0.25), torch.tensor([0.25]), torch.tensor([[0.25]]), torch.full((6, 1), 0.25)],
    ids=["float", "0d", "(1,)", "(1,1)", "(N,1)"],
)
def test_accepted_alpha_shapes_agree(alpha):
    torch.manual_seed(5)
    net = ConditionedINR(hidden_features=8, harmonizer=_Constant(1.3, 0.8, 0.1, 0.2)).double()
    x = _points(6)
    ref = net(x, torch.full((6, 1), 0.25, dtype=torch.float64))
    torch.testing.assert_close(net(x, alpha), ref)


def test_per_point_alpha_matches_one_alpha_per_batch():
    torch.manual_seed(6)
    net = ConditionedINR(hidden_features=16).double()
    with torch.no_grad():
        net.harmonizer.head.weight.normal_(std=0.3)
        net.harmonizer.head.bias.normal_(std=0.3)
    x = _points(30)
    alphas = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).repeat_interleave(10)[:, None]
    per_point = net.forward_with_derivatives(x, alphas)
    for i, value in enumerate((0.1, 0.5, 0.9)):
        sl = slice(10 * i, 10 * i + 10)
        per_batch = net.forward_with_derivatives(x[sl], value)
        for p, q in zip(per_point, per_batch):
            assert (p[sl] - q).abs().max() <= 1e-12 * q.abs().max()
    # and the harmonizer really makes alpha matter
    assert (net(x[:10], 0.1) - net(x[:10], 0.9)).abs().max() > 1e-3


def test_cond_features_above_one():
    torch.manual_seed(7)
    net = ConditionedINR(hidden_features=8, cond_features=2).double()
    with torch.no_grad():
        net.harmonizer.head.weight.normal_(std=0.3)
    x = _points(5)
    one = net(x, torch.tensor([0.2, 0.4], dtype=torch.float64))
    torch.testing.assert_close(net(x, torch.tensor([[0.2, 0.4]] * 5, dtype=torch.float64)), one)
    with pytest.raises(ValueError, match=r"found shape \(5, 1\)"):
        net(x, torch.rand(5, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="found shape"):
        net(x, 0.3)


@pytest.mark.parametrize(
    "alpha, message",
    [
        (None, "needs alpha"),
        ("0.5", "found str"),
        (torch.rand(4), r"found shape \(4,\)"),
        (torch.rand(3, 1), r"found shape \(3, 1\)"),
        (torch.rand(4, 2), r"found shape \(4, 2\)"),
        (torch.rand(4, 1, 1), r"found shape \(4, 1, 1\)"),
    ],
)
def test_alpha_errors(alpha, message):
    net = ConditionedINR(hidden_features=8)
    x = _points(4, torch.float32)
    with pytest.raises(ValueError, match=message):
        net(x, alpha)
    with pytest.raises(ValueError, match=message):
        net.forward_with_derivatives(x, alpha)


def test_coordinate_and_order_errors():
    net = SirenINR(hidden_features=8)
    with pytest.raises(ValueError, match=r"coords of shape \(N, 3\), found \(4, 2\)"):
        net(torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"found \(3,\)"):
        net.forward_with_derivatives(torch.rand(3))
    with pytest.raises(ValueError, match="dtype and device"):
        net(torch.rand(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        net([[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="order must be 1"):
        net.forward_with_derivatives(torch.rand(4, 3), order=3)
    with pytest.raises(ValueError, match="positive"):
        SirenINR(num_hidden_layers=0)
    with pytest.raises(ValueError, match="omega_0"):
        ConditionedINR(omega_0=0.0)


@pytest.mark.parametrize("network_cls", [ConditionedINR, SirenINR])
def test_inference_path_folds_alpha_into_the_weights(network_cls):
    """Without gradients the network runs as a plain sine MLP with folded weights: same values."""
    torch.manual_seed(3)
    net = network_cls(hidden_features=48).double()
    with torch.no_grad():
        for p in net.parameters():  # move (a, b, c, d) away from (1, 1, 0, 0)
            p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(5000, 3, dtype=torch.float64) * 2 - 1  # > inference_block: several blocks
    reference = net(x, 0.37)  # the autograd-ready path
    assert reference.requires_grad
    with torch.no_grad():
        folded = net(x, 0.37)
        a, b, c, d = (float(v) for v in net.activation_parameters(x[:1], 0.37)) if network_cls is ConditionedINR else (1, 1, 0, 0)
        if network_cls is ConditionedINR:
            assert abs(a - 1) + abs(b - 1) + abs(c) + abs(d) > 0.01
        layers = net.folded_layers(a, b, c, d)
    assert len(layers) == len(net.layers) and layers[0][0].shape == (3, 48)
    torch.testing.assert_close(folded, reference.detach(), rtol=1e-10, atol=1e-12)
    # per-point alpha keeps the general path, without gradients too
    with torch.no_grad():
        per_point = net(x[:100], torch.full((100, 1), 0.37, dtype=torch.float64))
    torch.testing.assert_close(per_point, reference[:100].detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("network_cls", [ConditionedINR, SirenINR])
def test_inference_jacobian_matches_the_training_path(network_cls):
    """order=1 without gradients runs forward mode through the folded layers: same u and Jacobian."""
    torch.manual_seed(4)
    net = network_cls(hidden_features=40).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(2500, 3, dtype=torch.float64) * 2 - 1  # > inference_block / 4: several blocks
    u, jac, _ = net.forward_with_derivatives(x, 0.6, order=1)  # the differentiable path
    assert jac.requires_grad
    with torch.no_grad():
        u_f, jac_f, hess_f = net.forward_with_derivatives(x, 0.6, order=1)
    assert hess_f is None and jac_f.shape == (2500, 3, 3)
    # float64, relative to the largest entry (the folded weights round differently)
    assert float((u_f - u.detach()).abs().max()) <= 1e-9 * float(u.abs().max())
    assert float((jac_f - jac.detach()).abs().max()) <= 1e-9 * float(jac.abs().max())
    # and against nested autograd on a few points
    _, jac_ag, _ = autograd_derivatives(net, x[:50], torch.tensor([0.6], dtype=torch.float64), order=1)
    assert float((jac_f[:50] - jac_ag.detach()).abs().max()) <= 1e-9 * float(jac_ag.abs().max())


@pytest.mark.parametrize("modulation", ["per_layer", "per_neuron"])
def test_modulated_networks_fold_and_start_as_the_same_siren(modulation):
    """Per-layer / per-neuron modulation: a fresh network equals the shared one (same weights), and
    its inference path (weights folded per neuron) equals the autograd-ready path at any alpha."""
    torch.manual_seed(5)
    shared = ConditionedINR(hidden_features=24).double()
    torch.manual_seed(5)
    net = ConditionedINR(hidden_features=24, modulation=modulation).double()
    groups = {"per_layer": 3, "per_neuron": 3 * 24}[modulation]
    assert net.harmonizer.head.out_features == 4 * groups
    x = torch.rand(3000, 3, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(x, 0.8), shared(x, 0.8), rtol=0, atol=0)
        net.harmonizer.head.weight.normal_(std=0.3)  # every (a, b, c, d) set now differs
        net.harmonizer.head.bias.normal_(std=0.3)
        a = net.activation_parameters(x[:1], 0.8)[0]
        assert a.shape == (1, groups) and float(a.std()) > 0.05
    reference = net(x, 0.8)
    assert reference.requires_grad
    with torch.no_grad():
        folded = net(x, 0.8)
        u, jac, _ = net.forward_with_derivatives(x, 0.8, order=1)
    torch.testing.assert_close(folded, reference.detach(), rtol=1e-10, atol=1e-12)
    _, jac_ag, _ = autograd_derivatives(net, x[:40], torch.tensor([0.8], dtype=torch.float64), order=1)
    torch.testing.assert_close(jac[:40], jac_ag.detach(), rtol=1e-9, atol=1e-11)


def test_modulation_errors_name_the_option():
    with pytest.raises(ValueError, match="modulation must be one of"):
        ConditionedINR(modulation="per_voxel")
    with pytest.raises(ValueError, match="needs a harmonizer with 12 outputs, found 4"):
        ConditionedINR(modulation="per_layer", harmonizer=Harmonizer())


def test_log_alpha_encoding_spreads_small_alphas_and_keeps_exact_derivatives():
    """``alpha_encoding="log"``: the harmonizer reads log(1 + alpha / floor) / log(1 + 1 / floor)
    (0 at alpha 0, 1 at alpha 1); forward-mode derivatives still equal autograd's."""
    import math

    from monai_cidir.networks import autograd_derivatives

    net = ConditionedINR(hidden_features=32, alpha_encoding="log", alpha_floor=1e-3).double()
    a = torch.tensor([[0.0], [1e-3], [0.01], [0.1], [1.0]], dtype=torch.float64)
    expect = torch.log1p(a / 1e-3) / math.log1p(1e3)
    assert torch.allclose(net.encode_alpha(a), expect, atol=1e-15)
    assert net.encode_alpha(a)[[0, -1]].flatten().tolist() == pytest.approx([0.0, 1.0])
    assert ConditionedINR().encode_alpha(a) is a  # the paper's linear input
    torch.manual_seed(0)
    for p in net.harmonizer.head.parameters():
        torch.nn.init.normal_(p, std=0.3)  # let alpha change (a, b, c, d)
    x = (torch.rand(40, 3, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    alpha = torch.rand(40, 1, dtype=torch.float64) ** 3
    u, jac, hess = net.forward_with_derivatives(x, alpha, order=2)
    u0, jac0, hess0 = autograd_derivatives(net, x, alpha, order=2)
    assert torch.allclose(u, u0, atol=1e-10) and torch.allclose(jac, jac0, atol=1e-8) and torch.allclose(hess, hess0, atol=1e-6)
    assert not torch.allclose(net(x, 0.001), net(x, 0.01), atol=1e-6)
    with pytest.raises(ValueError, match="alpha_encoding must be one of"):
        ConditionedINR(alpha_encoding="sqrt")
    with pytest.raises(ValueError, match="alpha_floor must be positive"):
        ConditionedINR(alpha_encoding="log", alpha_floor=0.0)
