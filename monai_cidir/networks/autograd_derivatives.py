"""Reference derivatives of a coordinate network by nested ``torch.autograd.grad`` (the IDIR way)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["autograd_derivatives"]


def autograd_derivatives(
    network: nn.Module, coords: torch.Tensor, alpha=None, order: int = 2, create_graph: bool = True
):
    """Displacement, Jacobian and Hessian of ``network`` at ``coords`` by nested reverse-mode autograd.

    This is the baseline that :meth:`~monai_cidir.networks.inr.ConditionedINR.forward_with_derivatives`
    replaces: 3 ``autograd.grad`` calls give the Jacobian rows and 9 more the Hessian, as in IDIR.
    Each point's output must depend only on its own input (true for the coordinate MLPs here), so
    summing over points before differentiating gives per-point derivatives.

    Args:
        network: called as ``network(coords)`` when ``alpha`` is None, else ``network(coords, alpha)``;
            must return (N, D).
        coords: (N, 3) input points. If they do not require gradients, a detached copy that does is used.
        alpha: passed to the network when not None.
        order: 1 (Jacobian only) or 2 (Jacobian and Hessian).
        create_graph: keep the graph of the highest derivative, so a loss on it can be
            backpropagated to the parameters (training). The Jacobian always keeps its graph when
            ``order == 2``.

    Returns:
        ``(u, jacobian, hessian)``: u (N, D); jacobian (N, D, 3) ``[n, i, j] = du_i/dx_j``;
        hessian (N, D, 3, 3) ``[n, i, j, k] = d2u_i/dx_j dx_k`` or None when ``order == 1``.

    Raises:
        ValueError: if ``order`` is not 1 or 2 or ``coords`` is not (N, 3).

    Example::

        >>> from monai_cidir.networks import SirenINR
        >>> net = SirenINR(hidden_features=32)
        >>> u, jac, hess = autograd_derivatives(net, torch.rand(5, 3))
        >>> hess.shape
        torch.Size([5, 3, 3, 3])
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Jacobian) or 2 (Jacobian and Hessian), found {order!r}")
    if not isinstance(coords, torch.Tensor) or coords.ndim != 2 or coords.shape[1] != 3:
        shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ValueError(f"coords must be a tensor of shape (N, 3), found {shape}")
    x = coords if coords.requires_grad else coords.detach().requires_grad_(True)
    with torch.enable_grad():
        u = network(x) if alpha is None else network(x, alpha)
        dims = u.shape[1]
        keep_jacobian = create_graph or order == 2
        rows = [torch.autograd.grad(u[:, i].sum(), x, create_graph=keep_jacobian)[0] for i in range(dims)]
        jacobian = torch.stack(rows, dim=1)  # (N, D, 3)
        hessian = None
        if order == 2:
            entries = [
                torch.autograd.grad(jacobian[:, i, j].sum(), x, retain_graph=True, create_graph=create_graph)[0]
                for i in range(dims)
                for j in range(3)
            ]
            hessian = torch.stack(entries, dim=1).view(x.shape[0], dims, 3, 3)
    return u, jacobian, hessian
