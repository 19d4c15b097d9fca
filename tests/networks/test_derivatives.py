"""forward_with_derivatives (forward mode) against nested autograd, values and parameter gradients."""

from __future__ import annotations

import pytest
import torch

import monai_cidir.networks.forward_mode as fm
from monai_cidir.networks import ConditionedINR, SirenINR, autograd_derivatives


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _network(kind, dtype, hidden=48, layers=3):
    torch.manual_seed(11)
    if kind == "siren":
        net = SirenINR(hidden_features=hidden, num_hidden_layers=layers)
    else:  # "conditioned" (the paper's shared modulation), "per_layer" or "per_neuron"
        modulation = "shared" if kind == "conditioned" else kind
        net = ConditionedINR(hidden_features=hidden, num_hidden_layers=layers, modulation=modulation)
        with torch.no_grad():  # away from the (1, 1, 0, 0) start so that a, b, c, d all matter
            net.harmonizer.head.weight.normal_(std=0.2)
            net.harmonizer.head.bias.normal_(std=0.2)
    return net.to(dtype)


def _inputs(n, dtype, per_point):
    g = torch.Generator().manual_seed(12)
    x = torch.rand(n, 3, generator=g, dtype=dtype) * 2 - 1
    alpha = torch.rand(n, 1, generator=g, dtype=dtype) if per_point else 0.35
    return x, alpha


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several point blocks and several chunks per block, so the loops are exercised."""
    monkeypatch.setattr(fm, "_BLOCK_BYTES", 4 * 10 * 48 * 16)  # 16 points per block at order 2
    monkeypatch.setattr(fm, "_CHUNK_ELEMENTS", 48 * 5)  # 5 points per chunk


MODES = ["adjoint", "forward"]


KINDS = ["siren", "conditioned", "per_layer", "per_neuron"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("per_point", [False, True], ids=["batch-alpha", "per-point-alpha"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_values_match_nested_autograd(kind, per_point, dtype, tol, mode, small_blocks):
    net = _network(kind, dtype)
    x, alpha = _inputs(50, dtype, per_point)
    want = autograd_derivatives(net, x, alpha, order=2)
    got = net.forward_with_derivatives(x, alpha, order=2, hessian_mode=mode)
    assert [tuple(t.shape) for t in got] == [(50, 3), (50, 3, 3), (50, 3, 3, 3)]
    for g, w in zip(got, want):
        assert _rel(g, w) <= tol
    # the Hessian is symmetric in (j, k) and order 1 gives the same Jacobian
    torch.testing.assert_close(got[2], got[2].transpose(2, 3), rtol=0, atol=0)
    u1, j1, h1 = net.forward_with_derivatives(x, alpha, order=1)
    assert h1 is None
    assert _rel(j1, want[1]) <= tol and _rel(u1, want[0]) <= tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("per_point", [False, True], ids=["batch-alpha", "per-point-alpha"])
def test_parameter_gradients_match_nested_autograd(kind, per_point, mode, small_blocks):
    net = _network(kind, torch.float64)
    x, alpha = _inputs(40, torch.float64, per_point)
    params = [p for p in net.parameters()]

    def loss(u, jac, hess):  # touches every output: value, Jacobian and Hessian terms
        return (u**2).sum() + ((jac - 0.1) ** 2).sum() + 1e-3 * (hess**2).sum((1, 2, 3)).mean()

    want = torch.autograd.grad(loss(*autograd_derivatives(net, x, alpha)), params, allow_unused=True)
    got = torch.autograd.grad(
        loss(*net.forward_with_derivatives(x, alpha, hessian_mode=mode)), params, allow_unused=True
    )
    for p, g, w in zip(params, got, want):
        if w is None:
            assert g is None or g.abs().max() == 0
            continue
        assert _rel(g, w) <= 1e-8, p.shape
    if kind != "siren":  # the harmonizer is trained through the derivatives too
        head = [i for i, (name, _) in enumerate(net.named_parameters()) if name == "harmonizer.head.weight"][0]
        assert got[head].abs().max() > 0


@pytest.mark.parametrize("mode", MODES)
def test_bending_energy_gradient_float32_paper_size(mode):
    """One training step's loss (bending energy) on the paper-size network, float32."""
    net = _network("conditioned", torch.float32, hidden=256, layers=3)
    x, alpha = _inputs(64, torch.float32, per_point=True)
    params = [p for name, p in net.named_parameters() if name != "layers.3.bias"]  # not in the Hessian
    e_ref = (autograd_derivatives(net, x, alpha)[2] ** 2).sum((1, 2, 3)).mean()
    e_fwd = (net.forward_with_derivatives(x, alpha, hessian_mode=mode)[2] ** 2).sum((1, 2, 3)).mean()
    assert _rel(e_fwd, e_ref) <= 1e-4
    for g, w in zip(torch.autograd.grad(e_fwd, params), torch.autograd.grad(e_ref, params)):
        assert _rel(g, w) <= 1e-4


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_points(n):
    net = _network("conditioned", torch.float64, hidden=8)
    x, alpha = _inputs(n, torch.float64, per_point=True)
    params = list(net.parameters())[:-1]
    want = autograd_derivatives(net, x, alpha)
    for mode in MODES:
        got = net.forward_with_derivatives(x, alpha, hessian_mode=mode)
        for g, w in zip(got, want):
            assert _rel(g, w) <= 1e-10
        g_got = torch.autograd.grad(got[2].pow(2).sum(), params, allow_unused=True)
        g_want = torch.autograd.grad(want[2].pow(2).sum(), params, retain_graph=True, allow_unused=True)
        for g, w in zip(g_got, g_want):
            assert (g is None and w is None) or _rel(g, w) <= 1e-10


def test_more_outputs_pick_the_forward_hessian(monkeypatch):
    """With 7 outputs the 6 forward Hessian slots are cheaper than 7 adjoint rows: chosen by default."""
    torch.manual_seed(3)
    net = SirenINR(out_features=7, hidden_features=16).double()
    x, _ = _inputs(10, torch.float64, per_point=False)
    calls = []
    original = fm.sine_mlp_derivatives
    monkeypatch.setattr(fm, "sine_mlp_derivatives", lambda *a, **k: calls.append(a[-1]) or original(*a, **k))
    got = net.forward_with_derivatives(x)
    assert calls == ["forward"]
    want = autograd_derivatives(net, x)
    assert got[2].shape == (10, 7, 3, 3)
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-10
    for g, w in zip(net.forward_with_derivatives(x, hessian_mode="adjoint"), want):
        assert _rel(g, w) <= 1e-10
    with pytest.raises(ValueError, match="hessian_mode"):
        net.forward_with_derivatives(x, hessian_mode="reverse")


def test_forward_mode_needs_no_autograd_graph():
    net = _network("conditioned", torch.float64, hidden=16)
    x, alpha = _inputs(20, torch.float64, per_point=True)
    want = autograd_derivatives(net, x, alpha)
    with torch.no_grad():
        got = net.forward_with_derivatives(x, alpha)
    assert not got[2].requires_grad
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-10


def test_autograd_reference_options():
    net = _network("siren", torch.float64, hidden=16)
    x, _ = _inputs(10, torch.float64, per_point=False)
    u, jac, hess = autograd_derivatives(net, x, order=1)
    assert hess is None and jac.shape == (10, 3, 3)
    _, _, hess = autograd_derivatives(net, x, create_graph=False)
    assert not hess.requires_grad
    x.requires_grad_(True)  # a caller's leaf is used as is, so derivatives w.r.t. coords are possible
    u = autograd_derivatives(net, x, order=1)[0]
    assert torch.autograd.grad(u.sum(), x)[0].shape == (10, 3)
    with pytest.raises(ValueError, match="order must be 1"):
        autograd_derivatives(net, x, order=0)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        autograd_derivatives(net, x[:, :2])


@pytest.mark.parametrize("param_kind", ["float", "batch", "per-point"])
@pytest.mark.parametrize("order", [1, 2])
def test_layer_functions_pass_gradcheck(param_kind, order, monkeypatch):
    """Hand-written backwards of the element-wise blocks against finite differences."""
    monkeypatch.setattr(fm, "_CHUNK_ELEMENTS", 4 * 2)  # several chunks of 2 points
    g = torch.Generator().manual_seed(13)
    n, f_in, f = 5, 3, 4

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * scale + offset).requires_grad_(True)

    if param_kind == "float":
        a, w, c, d = 1.3, 2.0, 0.2, -0.1
    else:
        rows = 1 if param_kind == "batch" else n
        a, w, c, d = rand(rows, 1, offset=0.5), rand(rows, 1, scale=3.0), rand(rows, 1), rand(rows, 1)
    x = rand(n, 3)
    w0, b0 = rand(f, 3, offset=-0.5), rand(f)
    t_in = rand(fm.num_slots(order), n, f_in, offset=-0.5)
    w1, b1 = rand(f, f_in, offset=-0.5), rand(f)
    params = [p for p in (a, w, c, d) if isinstance(p, torch.Tensor)]

    def first(x, w0, b0, *p):
        it = iter(p)
        pa, pw, pc, pd = (next(it) if isinstance(q, torch.Tensor) else q for q in (a, w, c, d))
        return fm.first_sine_layer(x, w0, b0, pa, pw, pc, pd, order=order)

    def hidden(t, w1, b1, *p):
        it = iter(p)
        pa, pw, pc, pd = (next(it) if isinstance(q, torch.Tensor) else q for q in (a, w, c, d))
        return fm.sine_layer(t, w1, b1, pa, pw, pc, pd)

    # fast mode: compares random projections of the Jacobians (few evaluations, still exact to 1e-6)
    assert torch.autograd.gradcheck(first, (x, w0, b0, *params), fast_mode=True)
    assert torch.autograd.gradcheck(hidden, (t_in, w1, b1, *params), fast_mode=True)

    # the variants that also return sigma' and sigma'' for the adjoint sweep
    if order == 1:

        def first_k(x, w0, b0, *p):
            it = iter(p)
            pa, pw, pc, pd = (next(it) if isinstance(q, torch.Tensor) else q for q in (a, w, c, d))
            z0 = torch.addmm(b0, x, w0.t())
            return fm._FirstSineLayer.apply(z0, w0.t().contiguous(), None, pa, pw, pc, pd, True)

        def hidden_k(t, w1, b1, *p):
            it = iter(p)
            pa, pw, pc, pd = (next(it) if isinstance(q, torch.Tensor) else q for q in (a, w, c, d))
            return fm._SineLayer.apply(fm.linear_layer(t, w1), b1, pa, pw, pc, pd, True)

        assert torch.autograd.gradcheck(first_k, (x, w0, b0, *params), fast_mode=True)
        assert torch.autograd.gradcheck(hidden_k, (t_in, w1, b1, *params), fast_mode=True)


@pytest.mark.parametrize("shared_delta", [False, True], ids=["delta-per-point", "delta-shared"])
@pytest.mark.parametrize("shared_j", [False, True], ids=["jz-per-point", "jz-shared"])
@pytest.mark.parametrize("with_next", [False, True], ids=["last", "with-next"])
def test_adjoint_step_passes_gradcheck(shared_delta, shared_j, with_next, monkeypatch):
    monkeypatch.setattr(fm, "_CHUNK_ELEMENTS", 4 * 2)  # several chunks of 2 points
    g = torch.Generator().manual_seed(14)
    n, f, dims = 5, 4, 2

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5).requires_grad_(True)

    delta = rand(dims, 1 if shared_delta else n, f)
    z_or_jz = rand(3, 1, f) if shared_j else rand(4, n, f)
    k1, k2 = rand(n, f), rand(n, f)
    weight = rand(f, 3) if with_next else None

    def step(delta, z_or_jz, k1, k2, *w):
        contribution, nxt = fm.hessian_adjoint_step(delta, z_or_jz, k1, k2, w[0] if w else None)
        return contribution if nxt is None else (contribution, nxt)

    inputs = (delta, z_or_jz, k1, k2) + ((weight,) if with_next else ())
    assert torch.autograd.gradcheck(step, inputs, fast_mode=True)
    # and the value: sum_f delta * k2 * jz_p * jz_q
    jz = z_or_jz if shared_j else z_or_jz[1:4]
    want = torch.stack([(delta * k2 * jz[p] * jz[q]).sum(-1) for p, q in fm.HESSIAN_PAIRS], -1).transpose(0, 1)
    torch.testing.assert_close(step(*inputs)[0] if with_next else step(*inputs), want)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_with_respect_to_coordinates(mode):
    """Losses on u, J and H also differentiate correctly w.r.t. the input points (third order)."""
    net = _network("conditioned", torch.float64, hidden=16)
    x, alpha = _inputs(7, torch.float64, per_point=True)
    x.requires_grad_(True)

    def loss(u, jac, hess):
        return u.sum() + (jac**2).sum() + (hess**2).sum()

    got = torch.autograd.grad(loss(*net.forward_with_derivatives(x, alpha, hessian_mode=mode)), x)[0]
    want = torch.autograd.grad(loss(*autograd_derivatives(net, x, alpha)), x)[0]
    assert _rel(got, want) <= 1e-10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_point", [False, True], ids=["batch-alpha", "per-point-alpha"])
@pytest.mark.parametrize("modulation", ["shared", "per_neuron"])
def test_two_weights_match_nested_autograd(modulation, per_point, mode, small_blocks):
    """K = 2 conditioning values (one weight per regularizer): values and parameter gradients."""
    torch.manual_seed(5)
    net = ConditionedINR(hidden_features=48, num_hidden_layers=3, modulation=modulation, cond_features=2).double()
    with torch.no_grad():
        net.harmonizer.head.weight.normal_(std=0.2)
        net.harmonizer.head.bias.normal_(std=0.2)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(40, 3, generator=g, dtype=torch.float64) * 2 - 1
    alpha = torch.rand(40, 2, generator=g, dtype=torch.float64) if per_point else torch.tensor([0.3, 0.05], dtype=torch.float64)
    want = autograd_derivatives(net, x, alpha, order=2)
    got = net.forward_with_derivatives(x, alpha, order=2, hessian_mode=mode)
    for a, b in zip(got, want):
        assert _rel(a, b) <= 1e-8
    params = list(net.parameters())

    def loss(u, jac, hess):
        return (u**2).sum() + ((jac - 0.1) ** 2).sum() + 1e-3 * (hess**2).sum((1, 2, 3)).mean()

    g_want = torch.autograd.grad(loss(*want), params, allow_unused=True)
    g_got = torch.autograd.grad(loss(*net.forward_with_derivatives(x, alpha, hessian_mode=mode)), params, allow_unused=True)
    for p, a, b in zip(params, g_got, g_want):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        assert _rel(a, b) <= 1e-8, p.shape
    # both weights reach the harmonizer: its first layer's two input columns get gradients
    first = net.harmonizer.hidden[0].weight
    grad = torch.autograd.grad(loss(*net.forward_with_derivatives(x, alpha)), first)[0]
    assert grad.shape[-1] == 2 and bool((grad.abs().sum(0) > 0).all())
