"""Implicit neural representations of a displacement field: the SIREN of IDIR and cIDIR's conditioned INR.

Both networks map normalised coordinates (N, 3) (see :class:`monai_cidir.coordinates.CoordinateMapping`)
to a displacement (N, 3) in normalised units. Every hidden layer applies
``sigma(z) = a * sin(b * omega_0 * z + c) + d`` to its pre-activation ``z = W h + bias``; for
:class:`SirenINR` ``(a, b, c, d) = (1, 1, 0, 0)``, for :class:`ConditionedINR` they come from a
:class:`~monai_cidir.networks.harmonizer.Harmonizer` fed with alpha (four numbers shared by all layers,
as in the paper). ``forward_with_derivatives`` returns the exact Jacobian and Hessian w.r.t. the
normalised input in closed form (forward-mode Jacobian, adjoint or forward Hessian; see
:mod:`monai_cidir.networks.forward_mode`), without nested autograd; convert them to millimetres with
``CoordinateMapping.jacobian_to_world`` / ``hessian_to_world``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from monai_cidir.networks import forward_mode as fm
from monai_cidir.networks.harmonizer import Harmonizer

__all__ = ["SirenINR", "ConditionedINR"]


class _SineINR(nn.Module):
    """Shared body: layers ``layers[0..L-1]`` are sine layers, ``layers[L]`` is the linear output."""

    def __init__(
        self, in_features: int, out_features: int, hidden_features: int, num_hidden_layers: int, omega_0: float
    ) -> None:
        super().__init__()
        if min(in_features, out_features, hidden_features, num_hidden_layers) < 1:
            raise ValueError(
                "in_features, out_features, hidden_features and num_hidden_layers must be positive, found "
                f"{(in_features, out_features, hidden_features, num_hidden_layers)}"
            )
        if not omega_0 > 0:
            raise ValueError(f"omega_0 must be positive, found {omega_0}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.omega_0 = float(omega_0)
        widths = [self.in_features] + [int(hidden_features)] * int(num_hidden_layers) + [self.out_features]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SIREN initialisation (Sitzmann et al. 2020), as in IDIR.

        First layer weights ``U(-1/fan_in, 1/fan_in)``, all later weights
        ``U(-sqrt(6/fan_in)/omega_0, +sqrt(6/fan_in)/omega_0)``; hidden biases keep PyTorch's default
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; the output bias is zero so the initial displacement is
        small and centred on zero.
        """
        for i, layer in enumerate(self.layers):
            fan_in = layer.in_features
            bound = 1.0 / fan_in if i == 0 else math.sqrt(6.0 / fan_in) / self.omega_0
            layer.weight.uniform_(-bound, bound)
            bias_bound = 1.0 / math.sqrt(fan_in)
            layer.bias.uniform_(-bias_bound, bias_bound)
        nn.init.zeros_(self.layers[-1].bias)

    # --- subclasses provide the activation parameters -------------------------------------------
    def activation_parameters(self, coords: torch.Tensor, alpha=None):
        """Return ``(a, b, c, d)``: floats, or tensors of shape (1, 1) (one alpha) or (N, 1) (per point)."""
        raise NotImplementedError

    def layer_parameters(self, coords: torch.Tensor, alpha=None) -> list[tuple]:
        """``[(a, w, c, d)]`` for every sine layer, ``w = b * omega_0``; each a float or a tensor
        (1 or N rows; 1 or ``hidden_features`` columns). By default the same set for every layer."""
        a, b, c, d = self.activation_parameters(coords, alpha)
        return [(a, b * self.omega_0, c, d)] * (len(self.layers) - 1)

    def _check_coords(self, coords) -> torch.Tensor:
        if not isinstance(coords, torch.Tensor):
            raise TypeError(f"coords must be a torch.Tensor of shape (N, {self.in_features}), found {type(coords)}")
        if coords.ndim != 2 or coords.shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects coords of shape (N, {self.in_features}), found {tuple(coords.shape)}"
            )
        weight = self.layers[0].weight
        if coords.dtype != weight.dtype or coords.device != weight.device:
            raise ValueError(
                f"coords must have the network's dtype and device ({weight.dtype}, {weight.device}), "
                f"found ({coords.dtype}, {coords.device}); use coords.to(...) or network.to(...)"
            )
        return coords

    #: points per block on the inference path (activations of a block stay in the CPU's L2 cache).
    inference_block = 2048

    def forward(self, coords: torch.Tensor, alpha=None) -> torch.Tensor:
        """Displacement (N, out_features) at ``coords`` (N, in_features), normalised units.

        Without gradients and with one alpha for the batch, the activation parameters are folded
        into the weights (:meth:`folded_layers`) and the points go through in cache-sized blocks:
        one ``addmm`` and one in-place ``sin`` per layer (about 4x faster on a CPU, same values up
        to float rounding).
        """
        coords = self._check_coords(coords)
        params = self.layer_parameters(coords, alpha)
        if self._inference(coords, params):
            return self._forward_folded(coords, self.fold(params))
        h = coords
        for layer, (a, w, c, d) in zip(self.layers[:-1], params):
            s = layer(h) * w
            if not (isinstance(c, float) and c == 0.0):
                s = s + c
            h = torch.sin(s)
            if not (isinstance(a, float) and a == 1.0):
                h = h * a
            if not (isinstance(d, float) and d == 0.0):
                h = h + d
        return self.layers[-1](h)

    @torch.no_grad()
    def folded_layers(self, a, b, c, d) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The network for one alpha as a plain sine MLP: ``[(W_l^T, bias_l)]`` per layer.

        ``a sin(b omega_0 (W h + bias) + c) + d`` feeding the next layer ``W' (.) + bias'`` equals
        ``sin((b omega_0 W) h + b omega_0 bias + c)`` feeding ``(a W') (.) + bias' + d W' 1``: the
        scalars move into the weights, so evaluating needs no element-wise work beyond ``sin``.

        Args:
            a, b, c, d: the activation parameters (floats or one-element tensors), as returned by
                :meth:`activation_parameters` for a single alpha.
        """
        a, b, c, d = (float(p.detach().reshape(-1)[0]) if isinstance(p, torch.Tensor) else float(p) for p in (a, b, c, d))
        return self.fold([(a, b * self.omega_0, c, d)] * (len(self.layers) - 1))

    @torch.no_grad()
    def fold(self, params: list[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`folded_layers` for per-layer parameters ``[(a, w, c, d)]`` (``w = b * omega_0``), as
        :meth:`layer_parameters` returns them for one alpha: floats, or one-row tensors with one
        column (one value for the layer) or one per neuron.

        Per neuron ``f``, ``a_f sin(w_f z_f + c_f) + d_f`` folds into row ``f`` of the layer
        (``w_f`` scales it, ``c_f`` shifts its bias) and column ``f`` of the next one (``a_f``
        scales it, ``d_f`` adds ``W'[:, f] d_f`` to the next bias).
        """

        def vector(p):  # a float or (1, 1) / (1, F) tensor -> float or (F,) tensor
            if not isinstance(p, torch.Tensor):
                return float(p)
            p = p.detach().reshape(-1)
            return float(p[0]) if p.numel() == 1 else p

        out, scale, shift = [], 1.0, 0.0
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            weight = layer.weight * scale
            bias = layer.bias + (layer.weight @ shift if isinstance(shift, torch.Tensor) else shift * layer.weight.sum(1))
            if i < last:
                a, w, c, d = (vector(p) for p in params[i])
                w_col = w[:, None] if isinstance(w, torch.Tensor) else w
                weight, bias = weight * w_col, bias * w + c
                scale, shift = a, d
            out.append((weight.t().contiguous(), bias.contiguous()))
        return out

    def _block(self, coords: torch.Tensor, divisor: int = 1) -> int:
        """Points per block: cache-sized on a CPU, the whole batch on an accelerator."""
        if coords.device.type != "cpu":
            return max(1, coords.shape[0])
        return max(1, self.inference_block // divisor)

    def _inference(self, coords: torch.Tensor, params: list[tuple]) -> bool:
        """True when no gradient is needed and one alpha serves the whole batch (the folded path);
        ``params`` as :meth:`layer_parameters` returns them."""
        if torch.is_grad_enabled() and (coords.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return all(not isinstance(p, torch.Tensor) or p.shape[0] == 1 for layer in params for p in layer)

    def _jacobian_folded(self, coords: torch.Tensor, layers) -> tuple[torch.Tensor, torch.Tensor]:
        """Value and Jacobian ``[n, i, j] = du_i/dx_j`` through the folded layers, forward mode, in blocks.

        Per layer ``h' = sin(z)``, ``dh'/dx_j = cos(z) * (dh/dx_j @ W^T)``: one matmul on a (3N, F)
        stack besides the value's, and no element-wise work for (a, b, c, d).
        """
        n, block = coords.shape[0], self._block(coords, 4)
        u = coords.new_empty(n, self.out_features)
        jac = coords.new_empty(n, 3, self.out_features)  # [n, j, i] while filling
        for n0 in range(0, n, block):
            x = coords[n0 : n0 + block]
            m = x.shape[0]
            weight_t, bias = layers[0]
            z = torch.addmm(bias, x, weight_t)
            tangent = weight_t[None] * torch.cos(z)[:, None, :]
            h = z.sin_()
            for weight_t, bias in layers[1:-1]:
                z = torch.addmm(bias, h, weight_t)
                tangent = torch.mm(tangent.reshape(m * 3, -1), weight_t).reshape(m, 3, -1).mul_(torch.cos(z)[:, None, :])
                h = z.sin_()
            weight_t, bias = layers[-1]
            torch.addmm(bias, h, weight_t, out=u[n0 : n0 + block])
            jac[n0 : n0 + block] = torch.mm(tangent.reshape(m * 3, -1), weight_t).reshape(m, 3, -1)
        return u, jac.transpose(1, 2)

    def _forward_folded(self, coords: torch.Tensor, layers) -> torch.Tensor:
        out = coords.new_empty(coords.shape[0], self.out_features)
        block = self._block(coords)
        for n0 in range(0, coords.shape[0], block):
            h = coords[n0 : n0 + block]
            for weight_t, bias in layers[:-1]:
                h = torch.addmm(bias, h, weight_t).sin_()
            torch.addmm(layers[-1][1], h, layers[-1][0], out=out[n0 : n0 + block])
        return out

    def forward_with_derivatives(
        self, coords: torch.Tensor, alpha=None, order: int = 2, hessian_mode: str | None = None
    ):
        """Displacement and its exact derivatives w.r.t. the normalised coordinates, in closed form.

        No nested autograd: value and Jacobian are propagated forward through the layers together
        (one matmul per layer on a (4*N, F) stack); the Hessian follows from the same quantities by
        an adjoint sweep with one row per output component, or by propagating its six unique entries
        forward as well (see :func:`monai_cidir.networks.forward_mode.sine_mlp_derivatives`). On CPU,
        large batches go through in blocks of points. The result is differentiable w.r.t. the
        parameters (first order), so a loss on it can be backpropagated.

        Args:
            coords: (N, 3) normalised coordinates (same dtype/device as the network).
            alpha: as in :meth:`forward`.
            order: 1 (Jacobian only) or 2 (Jacobian and Hessian).
            hessian_mode: ``"adjoint"``, ``"forward"``, or None to pick the cheaper one
                (adjoint when the output has fewer than 6 components, as for a displacement).

        Returns:
            ``(u, jacobian, hessian)``: u (N, out_features); jacobian (N, out_features, 3) with
            ``[n, i, j] = du_i/dx_j``; hessian (N, out_features, 3, 3) with
            ``[n, i, j, k] = d2u_i/dx_j dx_k``, or None when ``order == 1``.

        Raises:
            ValueError: for coords or alpha of the wrong shape, ``order`` not in (1, 2) or an unknown
                ``hessian_mode``.
        """
        fm.num_slots(order)
        coords = self._check_coords(coords)
        if self.in_features != 3:
            raise ValueError(f"derivatives are implemented for 3-D coordinates, this network has {self.in_features}")
        if hessian_mode is None:
            hessian_mode = "adjoint" if self.out_features < 6 else "forward"
        if hessian_mode not in ("adjoint", "forward"):
            raise ValueError(f"hessian_mode must be 'adjoint', 'forward' or None, found {hessian_mode!r}")
        params = self.layer_parameters(coords, alpha)
        if order == 1 and self._inference(coords, params):
            return self._jacobian_folded(coords, self.fold(params)) + (None,)
        n = coords.shape[0]
        step = fm.block_points(n, self.layers[0].out_features, order, coords.device)
        outputs = []
        for n0 in range(0, n, step):
            sl = slice(n0, n0 + step)
            block = [tuple(p[sl] if isinstance(p, torch.Tensor) and p.shape[0] != 1 else p for p in layer) for layer in params]
            a, w, c, d = (list(p) for p in zip(*block))
            outputs.append(fm.sine_mlp_derivatives(coords[sl], self.layers, a, w, c, d, order, hessian_mode))
        if len(outputs) == 1:
            return outputs[0]
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs))


class SirenINR(_SineINR):
    """The unconditioned IDIR network: a SIREN ``3 -> 256 x 3 -> 3`` with ``sin(omega_0 * z)`` activations.

    ``alpha`` is accepted and ignored in :meth:`forward` and :meth:`forward_with_derivatives`, so one
    training engine can drive this network and :class:`ConditionedINR` the same way.

    Args:
        in_features: input dimension (3 for spatial coordinates).
        out_features: output dimension (3 for a displacement).
        hidden_features: width of every hidden layer.
        num_hidden_layers: number of hidden (sine) layers.
        omega_0: frequency factor multiplying every hidden pre-activation (IDIR uses 32).

    Raises:
        ValueError: for non-positive sizes or ``omega_0``.

    Example::

        >>> net = SirenINR()
        >>> u, jac, hess = net.forward_with_derivatives(torch.rand(10, 3) * 2 - 1)
        >>> u.shape, jac.shape, hess.shape
        (torch.Size([10, 3]), torch.Size([10, 3, 3]), torch.Size([10, 3, 3, 3]))
    """

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 3,
        hidden_features: int = 256,
        num_hidden_layers: int = 3,
        omega_0: float = 32.0,
    ) -> None:
        super().__init__(in_features, out_features, hidden_features, num_hidden_layers, omega_0)

    def activation_parameters(self, coords: torch.Tensor, alpha=None):
        """The fixed SIREN activation: ``(a, b, c, d) = (1.0, 1.0, 0.0, 0.0)``; alpha is ignored."""
        return 1.0, 1.0, 0.0, 0.0


ALPHA_ENCODINGS = ("linear", "log")


class ConditionedINR(_SineINR):
    """cIDIR's main network: a sine MLP whose activation ``a*sin(b*omega_0*z + c) + d`` depends on alpha.

    ``(a, b, c, d)`` are predicted by the harmonizer from alpha, shared by all hidden layers. At
    initialisation the default harmonizer gives ``a = b = 1, c = d = 0`` for every alpha, so the
    network equals a SIREN with the same weights (SIREN initialisation, zero output bias).

    Args:
        in_features: input dimension (3 for spatial coordinates).
        out_features: output dimension (3 for a displacement).
        hidden_features: width of every hidden layer (the paper: 256).
        num_hidden_layers: number of hidden (sine) layers (the paper: 3).
        omega_0: frequency factor multiplying every hidden pre-activation.
        cond_features: number of conditioning values (1: the regularisation weight alpha).
        harmonizer: module mapping alpha (B, cond_features) to (B, 4 * G) activation parameters
            (column blocks a, b, c, d; see :class:`~monai_cidir.networks.Harmonizer`); default
            ``Harmonizer(cond_features, (128, 64, 32), 4 * G)``.
        modulation: how many activation parameter sets alpha controls: ``"shared"`` (the paper:
            one ``(a, b, c, d)`` for every hidden layer, G = 1), ``"per_layer"`` (one set per hidden
            layer, G = ``num_hidden_layers``) or ``"per_neuron"`` (one set per hidden neuron, G =
            ``num_hidden_layers * hidden_features``, FiLM-like). Every mode starts as the same SIREN.
        alpha_encoding: what the harmonizer reads: ``"linear"`` (the paper: alpha itself) or
            ``"log"``: ``log(1 + alpha / alpha_floor) / log(1 + 1 / alpha_floor)``, which is 0 at
            alpha 0, 1 at alpha 1 and spreads every decade above ``alpha_floor`` evenly, so that
            alphas 0.001, 0.01 and 0.1 give the harmonizer inputs 0.10, 0.35 and 0.67 instead of
            nearly the same number.
        alpha_floor: the alpha below which the ``"log"`` encoding becomes linear (positive).

    Raises:
        ValueError: for non-positive sizes or ``omega_0``, an unknown ``modulation`` or
            ``alpha_encoding``, a non-positive ``alpha_floor``, or a harmonizer whose output does not
            match the modulation.

    Example::

        >>> net = ConditionedINR()
        >>> x = torch.rand(1000, 3) * 2 - 1
        >>> u = net(x, 0.5)                                   # one alpha for the batch
        >>> u, jac, hess = net.forward_with_derivatives(x, torch.rand(1000, 1))  # one alpha per point
    """

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 3,
        hidden_features: int = 256,
        num_hidden_layers: int = 3,
        omega_0: float = 32.0,
        cond_features: int = 1,
        harmonizer: nn.Module | None = None,
        modulation: str = "shared",
        alpha_encoding: str = "linear",
        alpha_floor: float = 1e-3,
    ) -> None:
        super().__init__(in_features, out_features, hidden_features, num_hidden_layers, omega_0)
        if cond_features < 1:
            raise ValueError(f"cond_features must be positive, found {cond_features}")
        if alpha_encoding not in ALPHA_ENCODINGS:
            raise ValueError(f"alpha_encoding must be one of {ALPHA_ENCODINGS}, found {alpha_encoding!r}")
        if not alpha_floor > 0:
            raise ValueError(f"alpha_floor must be positive, found {alpha_floor}")
        self.alpha_encoding = alpha_encoding
        self.alpha_floor = float(alpha_floor)
        groups = {"shared": 1, "per_layer": int(num_hidden_layers), "per_neuron": int(num_hidden_layers) * int(hidden_features)}
        if modulation not in groups:
            raise ValueError(f"modulation must be one of {sorted(groups)}, found {modulation!r}")
        self.cond_features = int(cond_features)
        self.modulation = modulation
        self.harmonizer = Harmonizer(self.cond_features, out_features=4 * groups[modulation]) if harmonizer is None else harmonizer
        found = getattr(self.harmonizer, "groups", 1)
        if found != groups[modulation]:
            raise ValueError(
                f"modulation {modulation!r} needs a harmonizer with {4 * groups[modulation]} outputs, found {4 * found}"
            )

    def _alpha_rows(self, alpha, n: int, like: torch.Tensor) -> torch.Tensor:
        """Validate alpha and return it as (1, cond_features) or (n, cond_features)."""
        k = self.cond_features
        expected = f"a float (cond_features=1), or a tensor of shape (), (1,), ({k},), (1, {k}) or (N={n}, {k})"
        if alpha is None:
            raise ValueError(f"ConditionedINR needs alpha: {expected}; found None")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, torch.Tensor)):
            raise ValueError(f"alpha must be {expected}; found {type(alpha).__name__}")
        alpha = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
        shape = tuple(alpha.shape)
        if alpha.ndim == 0 and k == 1:
            return alpha.reshape(1, 1)
        if alpha.ndim == 1 and shape[0] == k:
            return alpha.reshape(1, k)
        if alpha.ndim == 2 and shape[1] == k and shape[0] in (1, n):
            return alpha
        raise ValueError(f"alpha must be {expected}; found shape {shape}")

    def encode_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """The harmonizer's input for alpha rows (B, cond_features): alpha itself or its log encoding."""
        if getattr(self, "alpha_encoding", "linear") == "linear":  # networks saved before the option existed
            return alpha
        return torch.log1p(alpha / self.alpha_floor) / math.log1p(1.0 / self.alpha_floor)

    def activation_parameters(self, coords: torch.Tensor, alpha=None):
        """The harmonizer's ``(a, b, c, d)`` for alpha, each (1, G) (one alpha) or (N, G) (per point).

        Args:
            coords: the points (N, 3) (only their number, dtype and device are used).
            alpha: see :meth:`forward`.

        Returns:
            tuple of four tensors a, b, c, d.

        Raises:
            ValueError: if alpha is missing or has an unsupported shape.
        """
        rows = self._alpha_rows(alpha, coords.shape[0], self.layers[0].weight)
        params = self.harmonizer(self.encode_alpha(rows))
        g = getattr(self.harmonizer, "groups", 1)
        if params.ndim != 2 or params.shape[1] != 4 * g:
            raise ValueError(f"the harmonizer must return (B, {4 * g}) columns: blocks a, b, c, d; found {tuple(params.shape)}")
        return tuple(params[:, i * g : (i + 1) * g] for i in range(4))

    def layer_parameters(self, coords: torch.Tensor, alpha=None) -> list[tuple]:
        """``[(a, w, c, d)]`` per hidden layer (``w = b * omega_0``): columns 1 (shared, per layer) or
        ``hidden_features`` (per neuron); rows 1 (one alpha) or N (per point)."""
        a, b, c, d = self.activation_parameters(coords, alpha)
        mode = getattr(self, "modulation", "shared")  # networks saved before modulation existed
        num = len(self.layers) - 1
        if mode == "shared":
            return [(a, b * self.omega_0, c, d)] * num
        width = 1 if mode == "per_layer" else self.layers[0].out_features
        cols = [slice(i * width, (i + 1) * width) for i in range(num)]
        return [(a[:, sl], b[:, sl] * self.omega_0, c[:, sl], d[:, sl]) for sl in cols]

    def forward(self, coords: torch.Tensor, alpha=None) -> torch.Tensor:
        """Displacement (N, out_features) at ``coords``, conditioned on ``alpha``.

        Args:
            coords: (N, 3) normalised coordinates (same dtype and device as the network).
            alpha: a float, or a tensor of shape (), (1,), (cond_features,), (1, cond_features)
                (one alpha for the whole batch) or (N, cond_features) (one alpha per point).

        Returns:
            the displacement (N, out_features) in normalised units.

        Raises:
            ValueError: for coords or alpha of the wrong shape, dtype or device.
        """
        return super().forward(coords, alpha)
