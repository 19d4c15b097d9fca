"""Closed-form value, Jacobian and Hessian of a sine MLP w.r.t. its input (functional core).

No nested autograd: the derivatives are computed by explicit formulas whose result is an ordinary
differentiable function of the parameters, so a loss on them backpropagates in one pass.

**Forward propagation.** A point's state after a layer is kept as one *stacked* tensor ``T`` of
shape (S, N, F):

* ``T[0]``: the activations ``h`` (N, F);
* ``T[1 + j]``: ``dh/dx_j`` for the three input coordinates ``j = 0, 1, 2``;
* ``T[4 + m]``: the six unique second derivatives ``d2h/dx_p dx_q`` in the order of
  :data:`HESSIAN_PAIRS` ``((0,0), (1,1), (2,2), (0,1), (0,2), (1,2))`` (forward Hessian only).

A linear layer acts on every slot with one matmul ``T.view(S*N, F) @ W.T`` (the bias only enters
slot 0). A sine layer ``h' = a*sin(w*z + c) + d`` (``w = b*omega_0``) maps, with
``k1 = sigma'(z) = a*w*cos(s)``, ``k2 = sigma''(z) = -a*w**2*sin(s)`` and ``s = w*z + c``:

* value: ``a*sin(s) + d``;
* Jacobian: ``k1 * Jz``;
* Hessian: ``k1 * Hz + k2 * Jz_p * Jz_q`` (for the first layer ``Jz = W0`` and ``Hz = 0``).

**Adjoint Hessian** (the default for a displacement, :func:`hessian_adjoint_step`). Only value and
Jacobian go forward (S = 4); then, since an MLP is linear maps and element-wise activations,
``d2u_i/dx_p dx_q = sum_l sum_f delta_l[i, f] * k2_l[f] * Jz_l[f, p] * Jz_l[f, q]`` with the adjoint
``delta_l = du/dh_l`` swept backwards from the output, one row per output component. For 3 output
components that is 4 + 3 = 7 rows per point through each hidden matmul instead of 10, about 30% fewer
FLOPs for the same exact result. :func:`sine_mlp_derivatives` runs either strategy.

The element-wise blocks are custom :class:`torch.autograd.Function` objects with hand-written
backwards; they work on chunks of points small enough to stay in cache and save only what the
backward needs. Their backwards are first order (``once_differentiable``): training can
backpropagate through the derivatives, but not differentiate that gradient again. On CPU the
networks push large batches through in blocks of points (:func:`block_points`) so every stacked
tensor stays near 8 MiB.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "HESSIAN_PAIRS",
    "num_slots",
    "block_points",
    "first_sine_layer",
    "sine_layer",
    "linear_layer",
    "split_stacked",
    "hessian_adjoint_step",
    "sine_mlp_derivatives",
    "per_layer_parameters",
]

HESSIAN_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
"""The (p, q) index pairs of the six unique Hessian slots, in stacked order."""

# position of d2/dx_p dx_q among the six unique slots
_HESSIAN_SLOT = ((0, 3, 4), (3, 1, 5), (4, 5, 2))

# element-wise work is done on chunks of about 256K elements (1 MiB in float32) per temporary, so
# they stay in cache; about one block (see below) of the paper-size network. Smaller chunks measured
# no faster on one thread and slower on two (more, shorter parallel regions).
_CHUNK_ELEMENTS = 1 << 18


def num_slots(order: int) -> int:
    """Number of stacked slots for a derivative order: 4 (order 1) or 10 (order 2).

    Raises:
        ValueError: if ``order`` is not 1 or 2.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Jacobian) or 2 (Jacobian and Hessian), found {order!r}")
    return 4 if order == 1 else 10


# points per block of the whole network: keeps each stacked tensor near 8 MiB, below glibc's
# mmap threshold, so freed blocks are reused instead of page-faulted in again, and in the L3 cache
# (measured: about 15% faster than one block for a 10,000-point training step on CPU).
_BLOCK_BYTES = 8 << 20


def block_points(n: int, features: int, order: int, device: torch.device) -> int:
    """Points per block when a large batch is propagated through the network block by block.

    On CPU, stacked tensors of about 8 MiB avoid the page faults of fresh large allocations
    and stay in cache; on accelerators the whole batch is one block.
    """
    if device.type != "cpu":
        return max(n, 1)
    return max(1, _BLOCK_BYTES // (4 * num_slots(order) * max(features, 1)))


def _chunk_points(n: int, features: int, device: torch.device) -> int:
    if device.type != "cpu":  # accelerators prefer a few large kernels
        return max(n, 1)
    return max(1, _CHUNK_ELEMENTS // max(features, 1))


def _point_slices(n: int, features: int, device: torch.device):
    """The slices of ``n`` points that the kernels walk, each at most :func:`_chunk_points` long."""
    step = _chunk_points(n, features, device)
    return (slice(n0, n0 + step) for n0 in range(0, n, step))


def _over_features(jw: torch.Tensor, hw: torch.Tensor | None) -> tuple:
    """The first layer's weight products ``(S, F)`` as ``(S, 1, F)``, broadcast over the points."""
    return jw[:, None, :], None if hw is None else hw[:, None, :]


def _rows(p, sl: slice):
    """Slice per-point parameters (N, 1) or (N, F); leave floats and one-row tensors as they are."""
    if isinstance(p, torch.Tensor) and p.shape[0] != 1:
        return p[sl]
    return p


def _accumulate(total, sl: slice, values: torch.Tensor | None, like) -> None:
    """Accumulate an element-wise (Nc, F) gradient into ``total``, shaped like the parameter ``like``.

    The parameter is (1, 1) (one value), (N, 1) (per point), (1, F) (per neuron) or (N, F) (per
    point and neuron): the gradient is summed over the axes the parameter is broadcast along.
    """
    if total is None:
        return
    if like.shape[1] == 1:
        values = values.sum(1, keepdim=True)
    if like.shape[0] != 1:
        total[sl] += values
    else:
        total += values.sum(0, keepdim=True)


class _Params:
    """The activation parameters of one chunk: floats (fixed SIREN values) or tensors."""

    def __init__(self, a, w, c, d, sl: slice):
        self.a, self.w, self.c, self.d = (_rows(p, sl) for p in (a, w, c, d))
        self.aw = self.a * self.w
        self.aww = self.aw * self.w


def _activate(z: torch.Tensor, p: _Params, out0: torch.Tensor, sn: torch.Tensor, cs: torch.Tensor) -> None:
    """Write ``a*sin(w*z + c) + d`` into ``out0`` and sin(s), cos(s) into ``sn``, ``cs``. ``z`` is overwritten."""
    s = z.mul_(p.w)
    if not (isinstance(p.c, float) and p.c == 0.0):
        s.add_(p.c)
    torch.sin(s, out=sn)
    torch.cos(s, out=cs)
    torch.mul(sn, p.a, out=out0)
    if not (isinstance(p.d, float) and p.d == 0.0):
        out0.add_(p.d)


def _scalar_chain(z, sn, cs, g0, gk1, gk2, p: _Params, want_a: bool, want_w: bool):
    """Backward of (value, k1, k2) with respect to s, a and w.

    Returns (g_s, g_a, g_w), each element-wise (Nc, F) (g_a, g_w None when not wanted); reduce
    them to the parameters' shapes with :func:`_accumulate`.
    """
    # dvalue/ds = a*cos, dk1/ds = -a*w*sin, dk2/ds = -a*w^2*cos
    big_a = g0 if gk2 is None else g0 - gk2 * (p.w * p.w)
    gs = cs * big_a
    gs.sub_(sn * gk1 * p.w)
    g_a = (sn * big_a + cs * gk1 * p.w) if want_a else None
    g_w = None
    if want_w:
        # ds/dw = z, dk1/dw = a*cos, dk2/dw = -2*a*w*sin
        g_w = z * gs * p.a
        g_w.add_(cs * gk1 * p.a)
        if gk2 is not None:
            g_w.sub_(sn * gk2 * (2.0 * p.aw))
    gs.mul_(p.a)
    return gs, g_a, g_w


def _param_buffers(ctx, like_tensors, offset: int):
    """Zero gradient buffers for the tensor-valued a, w, c, d (None for floats / not needed)."""
    out = []
    for i, p in enumerate(like_tensors):
        if isinstance(p, torch.Tensor) and ctx.needs_input_grad[offset + i]:
            out.append(torch.zeros_like(p))
        else:
            out.append(None)
    return out


def _pack(ctx, a, w, c, d):
    ctx.param_is_tensor = [isinstance(p, torch.Tensor) for p in (a, w, c, d)]
    ctx.param_floats = [None if t else float(p) for t, p in zip(ctx.param_is_tensor, (a, w, c, d))]
    return [p for p in (a, w, c, d) if isinstance(p, torch.Tensor)]


def _unpack(ctx, saved):
    saved = list(saved)
    return [saved.pop(0) if t else f for t, f in zip(ctx.param_is_tensor, ctx.param_floats)]


def _chain_to_params(z, sn, cs, g0, gk1, gk2, p, sl, grads, params):
    """Chain a chunk's gradients through the activation: accumulate those of the modulation
    parameters ``(a, w, c, d)`` into ``grads`` and return the gradient at the sine's input."""
    ga, gw, gc, gd = grads
    a, w, c, d = params
    gs, g_a, g_w = _scalar_chain(z, sn, cs, g0, gk1, gk2, p, ga is not None, gw is not None)
    _accumulate(gc, sl, gs, c)
    _accumulate(gd, sl, g0, d)
    _accumulate(ga, sl, g_a, a)
    _accumulate(gw, sl, g_w, w)
    return gs


def _forward_outputs(ctx, out, k1_all, k2_all):
    """A sine block's outputs: ``out``, or with the activation's factors ``k1``, ``k2`` when they were
    asked for (``with_k``); their gradients may then be ``None`` (not materialised as zeros)."""
    if k1_all is None:
        return out
    ctx.set_materialize_grads(False)
    return out, k1_all, k2_all


class _SineLayer(torch.autograd.Function):
    """Element-wise block of a hidden sine layer on stacked pre-activations (S, N, F)."""

    @staticmethod
    def forward(ctx, z_stack, bias, a, w, c, d, with_k=False):
        s_slots, n, f = z_stack.shape
        out = torch.empty_like(z_stack)
        sin_all, cos_all = torch.empty_like(z_stack[0]), torch.empty_like(z_stack[0])
        k1_all = torch.empty_like(z_stack[0]) if with_k else None
        k2_all = torch.empty_like(z_stack[0]) if with_k else None
        for sl in _point_slices(n, f, z_stack.device):
            p = _Params(a, w, c, d, sl)
            zc, oc, sn, cs = z_stack[:, sl], out[:, sl], sin_all[sl], cos_all[sl]
            _activate(zc[0] + bias, p, oc[0], sn, cs)
            k1 = cs * p.aw if k1_all is None else torch.mul(cs, p.aw, out=k1_all[sl])
            torch.mul(zc[1:], k1, out=oc[1:])
            if k2_all is not None:
                torch.mul(sn, -p.aww, out=k2_all[sl])
            if s_slots == 10:
                jz = zc[1:4]
                k2 = sn * (-p.aww)
                t = jz * k2
                oc[4:7].addcmul_(t, jz)
                oc[7].addcmul_(t[0], jz[1])
                oc[8].addcmul_(t[0], jz[2])
                oc[9].addcmul_(t[1], jz[2])
        ctx.save_for_backward(z_stack, bias, sin_all, cos_all, *_pack(ctx, a, w, c, d))
        return _forward_outputs(ctx, out, k1_all, k2_all)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, gk1_ext=None, gk2_ext=None):
        z_stack, bias, sin_all, cos_all, *saved = ctx.saved_tensors
        a, w, c, d = _unpack(ctx, saved)
        s_slots, n, f = z_stack.shape
        grad = torch.zeros_like(z_stack) if grad is None else grad.contiguous()
        gz = torch.empty_like(z_stack)
        gbias = torch.zeros_like(bias) if ctx.needs_input_grad[1] else None
        ga, gw, gc, gd = _param_buffers(ctx, (a, w, c, d), 2)
        for sl in _point_slices(n, f, z_stack.device):
            p = _Params(a, w, c, d, sl)
            zc, gc_in, gzc = z_stack[:, sl], grad[:, sl], gz[:, sl]
            sn, cs = sin_all[sl], cos_all[sl]
            z = zc[0] + bias if gw is not None else None
            k1 = cs * p.aw
            # dL/dk1 = sum over derivative slots of G * Z
            gk1 = (gc_in[1:] * zc[1:]).sum(0)
            if gk1_ext is not None:
                gk1 += gk1_ext[sl]
            torch.mul(gc_in[1:], k1, out=gzc[1:])
            gk2 = None if gk2_ext is None else gk2_ext[sl]
            if s_slots == 10:
                jz, gh = zc[1:4], gc_in[4:10]
                k2 = sn * (-p.aww)
                q = gh[0:3] * jz  # G_pp * J_p
                gk2 = (q * jz).sum(0) if gk2 is None else (q * jz).sum(0).add_(gk2)
                gk2.addcmul_(gh[3], jz[0] * jz[1]).addcmul_(gh[4], jz[0] * jz[2]).addcmul_(gh[5], jz[1] * jz[2])
                r = q.mul_(2.0)
                r[0].addcmul_(gh[3], jz[1]).addcmul_(gh[4], jz[2])
                r[1].addcmul_(gh[3], jz[0]).addcmul_(gh[5], jz[2])
                r[2].addcmul_(gh[4], jz[0]).addcmul_(gh[5], jz[1])
                gzc[1:4].addcmul_(r, k2)
            gs = _chain_to_params(z, sn, cs, gc_in[0], gk1, gk2, p, sl, (ga, gw, gc, gd), (a, w, c, d))
            torch.mul(gs, p.w, out=gzc[0])
            if gbias is not None:
                gbias += gzc[0].sum(0)
        return gz, gbias, ga, gw, gc, gd, None


class _FirstSineLayer(torch.autograd.Function):
    """Element-wise block of the first sine layer: ``Jz`` is the weight, ``Hz`` is zero."""

    @staticmethod
    def forward(ctx, z0, jw, hw, a, w, c, d, with_k=False):
        n, f = z0.shape
        s_slots = 4 if hw is None else 10
        out = z0.new_empty((s_slots, n, f))
        sin_all, cos_all = torch.empty_like(z0), torch.empty_like(z0)
        k1_all = torch.empty_like(z0) if with_k else None
        k2_all = torch.empty_like(z0) if with_k else None
        jw3, hw3 = _over_features(jw, hw)
        for sl in _point_slices(n, f, z0.device):
            p = _Params(a, w, c, d, sl)
            oc, sn, cs = out[:, sl], sin_all[sl], cos_all[sl]
            _activate(z0[sl].clone(), p, oc[0], sn, cs)
            k1 = cs * p.aw if k1_all is None else torch.mul(cs, p.aw, out=k1_all[sl])
            torch.mul(jw3, k1, out=oc[1:4])
            if k2_all is not None:
                torch.mul(sn, -p.aww, out=k2_all[sl])
            if hw3 is not None:
                torch.mul(hw3, sn * (-p.aww), out=oc[4:10])
        ctx.save_for_backward(z0, jw, hw, sin_all, cos_all, *_pack(ctx, a, w, c, d))
        return _forward_outputs(ctx, out, k1_all, k2_all)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, gk1_ext=None, gk2_ext=None):
        z0, jw, hw, sin_all, cos_all, *saved = ctx.saved_tensors
        a, w, c, d = _unpack(ctx, saved)
        n, f = z0.shape
        s_slots = 4 if hw is None else 10
        grad = z0.new_zeros((s_slots, n, f)) if grad is None else grad.contiguous()
        gz0 = torch.empty_like(z0)
        gjw = torch.zeros_like(jw) if ctx.needs_input_grad[1] else None
        ghw = torch.zeros_like(hw) if hw is not None and ctx.needs_input_grad[2] else None
        ga, gw, gc, gd = _param_buffers(ctx, (a, w, c, d), 3)
        jw3, hw3 = _over_features(jw, hw)
        for sl in _point_slices(n, f, z0.device):
            p = _Params(a, w, c, d, sl)
            gc_in = grad[:, sl]
            z = z0[sl]
            sn, cs = sin_all[sl], cos_all[sl]
            gj = gc_in[1:4]
            gk1 = (gj * jw3).sum(0)
            if gk1_ext is not None:
                gk1 += gk1_ext[sl]
            if gjw is not None:
                gjw += (gj * (cs * p.aw)).sum(1)
            gk2 = None if gk2_ext is None else gk2_ext[sl]
            if hw3 is not None:
                gh = gc_in[4:10]
                gk2 = (gh * hw3).sum(0) if gk2 is None else (gh * hw3).sum(0).add_(gk2)
                if ghw is not None:
                    ghw -= (gh * (sn * p.aww)).sum(1)
            gs = _chain_to_params(z, sn, cs, gc_in[0], gk1, gk2, p, sl, (ga, gw, gc, gd), (a, w, c, d))
            torch.mul(gs, p.w, out=gz0[sl])
        return gz0, gjw, ghw, ga, gw, gc, gd, None


def first_sine_layer(coords, weight, bias, a, w, c, d, order: int = 2) -> torch.Tensor:
    """First layer ``h = a*sin(w*(W x + bias) + c) + d`` with its derivatives w.r.t. ``x``.

    Args:
        coords: input points (N, in_features); the derivatives are taken w.r.t. them (in_features must be 3).
        weight, bias: the layer's parameters (F, in_features), (F,).
        a, w, c, d: activation parameters, each a float or a tensor of shape (1, 1) (one value),
            (N, 1) (per point), (1, F) (per neuron) or (N, F) (per point and neuron); ``w`` is the
            frequency factor including omega_0 (``b * omega_0``).
        order: 1 (value and Jacobian) or 2 (also the Hessian).

    Returns:
        the stacked tensor (S, N, F), S = 4 or 10 (see the module docstring).
    """
    s_slots = num_slots(order)
    z0 = torch.addmm(bias, coords, weight.t())
    jw = weight.t()
    hw = None
    if s_slots == 10:
        hw = torch.stack([jw[p] * jw[q] for p, q in HESSIAN_PAIRS])
    return _FirstSineLayer.apply(z0, jw.contiguous(), hw, a, w, c, d)


def linear_layer(stacked: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply the weight of a linear layer to every slot of a stacked tensor (bias not added).

    Args:
        stacked: (S, N, F_in).
        weight: (F_out, F_in).

    Returns:
        (S, N, F_out) ``= stacked @ weight.T``, one matmul.
    """
    s_slots, n, f = stacked.shape
    return torch.mm(stacked.reshape(s_slots * n, f), weight.t()).view(s_slots, n, weight.shape[0])


def sine_layer(stacked: torch.Tensor, weight, bias, a, w, c, d) -> torch.Tensor:
    """Hidden layer ``h' = a*sin(w*(W h + bias) + c) + d`` on a stacked tensor, derivatives included.

    Args:
        stacked: (S, N, F_in) value and derivatives of the layer's input.
        weight, bias: the layer's parameters (F_out, F_in), (F_out,).
        a, w, c, d: activation parameters (see :func:`first_sine_layer`).

    Returns:
        the stacked tensor (S, N, F_out) of the output.
    """
    return _SineLayer.apply(linear_layer(stacked, weight), bias, a, w, c, d)


def split_stacked(stacked: torch.Tensor, bias: torch.Tensor | None = None):
    """Turn the stacked output of the last (linear) layer into ``(u, jacobian, hessian)``.

    Args:
        stacked: (S, N, D) as produced by :func:`linear_layer`.
        bias: optional bias (D,) added to the value.

    Returns:
        u (N, D), jacobian (N, D, 3) with ``[n, i, j] = du_i/dx_j`` and hessian (N, D, 3, 3) with
        ``[n, i, j, k] = d2u_i/dx_j dx_k`` (None when S = 4).
    """
    u = stacked[0] if bias is None else stacked[0] + bias
    jacobian = stacked[1:4].permute(1, 2, 0).contiguous()
    hessian = None
    if stacked.shape[0] == 10:
        idx = torch.tensor(_HESSIAN_SLOT, device=stacked.device).view(-1)
        full = stacked[4:10].index_select(0, idx)  # (9, N, D) in (j, k) order
        hessian = full.permute(1, 2, 0).reshape(stacked.shape[1], stacked.shape[2], 3, 3)
    return u, jacobian, hessian


def _unique_hessian_to_full(unique: torch.Tensor) -> torch.Tensor:
    """(N, D, 6) unique entries in :data:`HESSIAN_PAIRS` order -> (N, D, 3, 3)."""
    idx = torch.tensor(_HESSIAN_SLOT, device=unique.device).view(-1)
    return unique.index_select(2, idx).view(unique.shape[0], unique.shape[1], 3, 3)


def _pairs(jz: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Products ``jz_p * jz_q`` for :data:`HESSIAN_PAIRS`: jz (3, n, F) -> out (n, 6, F)."""
    for m, (p, q) in enumerate(HESSIAN_PAIRS):
        torch.mul(jz[p], jz[q], out=out[:, m])
    return out


class _AdjointHessian(torch.autograd.Function):
    """One layer of the adjoint Hessian sweep (see :func:`hessian_adjoint_step`), chunked over points."""

    @staticmethod
    def forward(ctx, delta, z_or_jz, k1, k2, with_next):
        # z_or_jz: (3, 1, F) Jacobian shared by all points, or the (4, N, F) pre-activation stack
        jz = z_or_jz[1:4] if z_or_jz.shape[0] == 4 else z_or_jz
        n, f = k1.shape
        dims = delta.shape[0]
        contribution = k1.new_empty((n, dims, 6))
        g = k1.new_empty((dims, n, f)) if with_next else None
        shared_j = z_or_jz.shape[0] != 4
        if shared_j:  # first layer: the products are the same for every point
            pairs_t = _pairs(jz, k1.new_empty((1, 6, f)))[0].t()  # (F, 6)
        for sl in _point_slices(n, f, k1.device):
            dc = delta if delta.shape[1] == 1 else delta[:, sl]
            e = dc * k2[sl]  # (D, nc, F)
            if shared_j:
                contribution[sl] = torch.matmul(e, pairs_t).transpose(0, 1)
            else:
                pairs = _pairs(jz[:, sl], k1.new_empty((e.shape[1], 6, f)))
                torch.bmm(e.transpose(0, 1), pairs.transpose(1, 2), out=contribution[sl])
            if g is not None:
                torch.mul(dc, k1[sl], out=g[:, sl])
        ctx.save_for_backward(delta, z_or_jz, k1, k2)
        ctx.set_materialize_grads(False)
        return (contribution, g) if with_next else contribution

    @staticmethod
    @once_differentiable
    def backward(ctx, g_contribution, g_next=None):
        delta, z_or_jz, k1, k2 = ctx.saved_tensors
        stacked = z_or_jz.shape[0] == 4
        jz = z_or_jz[1:4] if stacked else z_or_jz
        n, f = k1.shape
        dims = delta.shape[0]
        shared_d, shared_j = delta.shape[1] == 1, not stacked
        g_delta = torch.zeros_like(delta) if shared_d else torch.empty_like(delta)
        g_z = torch.empty_like(z_or_jz) if stacked else None
        g_jz = g_z[1:4] if stacked else None
        g_pairs_shared = k1.new_zeros((6, f)) if shared_j else None
        g_k1 = torch.zeros_like(k1) if g_next is not None else None
        g_k2 = torch.zeros_like(k2) if g_contribution is not None else None
        if shared_j:
            pairs_shared = _pairs(jz, k1.new_empty((1, 6, f)))[0]  # (6, F)
        for sl in _point_slices(n, f, k1.device):
            dc = delta if shared_d else delta[:, sl]
            gd = None
            if g_next is not None:
                gn = g_next[:, sl]
                gd = gn * k1[sl]
                g_k1[sl] = (gn * dc).sum(0)
            if g_contribution is not None:
                gc_in = g_contribution[sl].contiguous()  # (nc, D, 6)
                nc = gc_in.shape[0]
                if shared_j:
                    g_e = torch.matmul(gc_in, pairs_shared).transpose(0, 1)  # (D, nc, F)
                else:
                    pairs = _pairs(jz[:, sl], k1.new_empty((nc, 6, f)))
                    g_e = torch.bmm(gc_in, pairs).transpose(0, 1)
                e = dc * k2[sl]
                g_pairs = torch.bmm(gc_in.transpose(1, 2).contiguous(), e.transpose(0, 1).contiguous())  # (nc, 6, F)
                g_k2[sl] = (g_e * dc).sum(0)
                gd = g_e * k2[sl] if gd is None else gd.addcmul_(g_e, k2[sl])
                if shared_j:
                    g_pairs_shared += g_pairs.sum(0)
                else:
                    _pairs_backward(jz[:, sl], g_pairs.transpose(0, 1), g_jz[:, sl])
            if gd is None:
                gd = torch.zeros_like(dc) if not shared_d else None
            if shared_d:
                if gd is not None:
                    g_delta += gd.sum(1, keepdim=True)
            else:
                g_delta[:, sl] = gd
        if shared_j:
            g_jz = torch.empty_like(jz)
            _pairs_backward(jz, g_pairs_shared[:, None, :], g_jz)
            return g_delta, g_jz, g_k1, g_k2, None
        if g_contribution is None:
            g_jz.zero_()
        g_z[0].zero_()
        return g_delta, g_z, g_k1, g_k2, None


def _pairs_backward(jz: torch.Tensor, g_pairs: torch.Tensor, out: torch.Tensor) -> None:
    """Gradient of :func:`_pairs` w.r.t. jz: g_pairs (6, n, F) -> out (3, n, F)."""
    torch.mul(g_pairs[0:3], jz, out=out).mul_(2.0)
    out[0].addcmul_(g_pairs[3], jz[1]).addcmul_(g_pairs[4], jz[2])
    out[1].addcmul_(g_pairs[3], jz[0]).addcmul_(g_pairs[5], jz[2])
    out[2].addcmul_(g_pairs[4], jz[0]).addcmul_(g_pairs[5], jz[1])


def hessian_adjoint_step(delta, jz, k1, k2, weight=None):
    """One layer of the adjoint sweep for the Hessian of a sine MLP.

    For an MLP the Hessian of output ``u_i`` w.r.t. the input is a sum over sine layers ``l``
    and their units ``f``: ``d2u_i/dx_p dx_q = sum_l sum_f delta_l[i, f] * sigma''(z_lf) * dz_lf/dx_p *
    dz_lf/dx_q`` with the adjoint ``delta_l[i, f] = du_i/dh_lf`` (``h_l`` the layer's output). The
    adjoints are propagated backwards like a gradient, one row per output component:
    ``delta_{l-1} = (delta_l * sigma'(z_l)) @ W_l``.

    Args:
        delta: (D, N, F) or (D, 1, F) adjoint ``du/dh`` of this layer's output.
        jz: Jacobian of the layer's pre-activation ``z`` w.r.t. the input: (3, 1, F) when it is the
            same for every point (first layer), or the layer's stacked pre-activation (4, N, F) whose
            slots 1-3 hold it.
        k1, k2: (N, F) ``sigma'(z)`` and ``sigma''(z)``.
        weight: the layer's weight (F, F_in) to propagate the adjoint to the previous layer, or None.

    Returns:
        ``(contribution, next_delta)``: the layer's share of the Hessian (N, D, 6) (unique entries
        in :data:`HESSIAN_PAIRS` order) and the previous layer's adjoint (D, N, F_in) or None.
    """
    if weight is None:
        return _AdjointHessian.apply(delta, jz, k1, k2, False), None
    contribution, g = _AdjointHessian.apply(delta, jz, k1, k2, True)
    return contribution, linear_layer(g, weight.t())


def per_layer_parameters(a, w, c, d, num_layers: int) -> list[tuple]:
    """``[(a_l, w_l, c_l, d_l)]`` for ``num_layers`` sine layers.

    Each of ``a, w, c, d`` is either one value for every layer (a float or tensor, see
    :func:`first_sine_layer`) or a list/tuple with one value per layer.

    Raises:
        ValueError: for a list whose length is not ``num_layers``.
    """
    out = []
    for p in (a, w, c, d):
        if isinstance(p, (list, tuple)):
            if len(p) != num_layers:
                raise ValueError(f"expected one activation parameter per sine layer ({num_layers}), found {len(p)}")
            out.append(list(p))
        else:
            out.append([p] * num_layers)
    return list(zip(*out))


def sine_mlp_derivatives(coords, layers, a, w, c, d, order: int = 2, hessian: str = "adjoint"):
    """Value, Jacobian and Hessian of a sine MLP w.r.t. its input, in closed form.

    The network is ``layers[0..L-1]`` sine layers ``h = a*sin(w*(W h + bias) + c) + d`` and a linear
    output ``layers[L]``. Value and Jacobian are always propagated forward (4 slots per point). The
    Hessian is computed either

    * ``"adjoint"``: by :func:`hessian_adjoint_step` (one adjoint row per output component: cheaper
      than 6 Hessian slots whenever the output has fewer than 6 components), or
    * ``"forward"``: by propagating the 6 unique Hessian entries forward too (10 slots per point).

    Both are exact and differentiable w.r.t. every parameter (first order).

    Args:
        coords: (N, 3) input points.
        layers: sequence of :class:`torch.nn.Linear`, the last one the output layer.
        a, w, c, d: activation parameters (see :func:`first_sine_layer`), shared by every sine
            layer, or each a list with one entry per sine layer (see :func:`per_layer_parameters`).
        order: 1 (value and Jacobian) or 2 (also the Hessian).
        hessian: ``"adjoint"`` or ``"forward"``.

    Returns:
        ``(u, jacobian, hessian)`` as :func:`split_stacked`.

    Raises:
        ValueError: for an unknown ``hessian`` strategy or ``order``.
    """
    if hessian not in ("adjoint", "forward"):
        raise ValueError(f"hessian must be 'adjoint' or 'forward', found {hessian!r}")
    num_slots(order)
    first, hidden, last = layers[0], layers[1:-1], layers[-1]
    params = per_layer_parameters(a, w, c, d, len(layers) - 1)
    if order == 1 or hessian == "forward":
        t = first_sine_layer(coords, first.weight, first.bias, *params[0], order=order)
        for layer, p in zip(hidden, params[1:]):
            t = sine_layer(t, layer.weight, layer.bias, *p)
        return split_stacked(linear_layer(t, last.weight), last.bias)

    z0 = torch.addmm(first.bias, coords, first.weight.t())
    jw = first.weight.t()
    t, k1, k2 = _FirstSineLayer.apply(z0, jw.contiguous(), None, *params[0], True)
    saved = [(jw[:, None, :], k1, k2)]
    for layer, p in zip(hidden, params[1:]):
        z = linear_layer(t, layer.weight)
        t, k1, k2 = _SineLayer.apply(z, layer.bias, *p, True)
        saved.append((z, k1, k2))
    u, jacobian, _ = split_stacked(linear_layer(t, last.weight), last.bias)
    delta = last.weight[:, None, :]  # du_i/dh_L: (D, 1, F)
    unique = None
    for index in range(len(saved) - 1, -1, -1):
        jz, k1, k2 = saved[index]
        weight = layers[index].weight if index > 0 else None
        contribution, delta = hessian_adjoint_step(delta, jz, k1, k2, weight)
        unique = contribution if unique is None else unique + contribution
    return u, jacobian, _unique_hessian_to_full(unique)
