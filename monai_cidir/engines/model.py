"""The trained registration of one patient: INR + coordinate mapping + optional affine.

:class:`RegistrationModel` is the single place where the transform of cIDIR is
composed. A fixed-space world point ``p`` (RAS mm) maps to the moving image at::

    phi(p) = A p + t + u(p, alpha),    u(p, alpha) = scale * net((p - center) / scale, alpha)

where ``(A, t)`` is the optional affine pre-alignment (identity when absent) and ``net`` is
the INR (normalised units, see :mod:`monai_cidir.coordinates`). The total displacement is
``d(p) = phi(p) - p``; its Jacobian is ``A - I + J_u`` (dimensionless, ``[n, i, j] = dd_i/dp_j``)
and its Hessian is ``H_u / scale`` (1/mm, the affine part has none).

``model.pt`` (written by :func:`save_registration_model`) holds the pickled network and
its state dict, the fixed image's :class:`~monai_cidir.coordinates.CoordinateMapping` state
and the affine, so :func:`load_registration_model` evaluates the field at any alpha
without the images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.inferers import PointInferer
from monai_cidir.utils import atomic_path

__all__ = [
    "RegistrationModel",
    "save_registration_model",
    "load_registration_model",
    "iter_grid_chunks",
    "region_shape",
    "as_alpha_tensor",
]

MODEL_FORMAT_VERSION = 1


def as_alpha_tensor(alpha, num_points: int | None = None, dtype=torch.float32, device=None, num_weights: int = 1) -> torch.Tensor:
    """Bring alpha to a network-ready tensor: ``(1,)`` for one value, ``(N, 1)`` per point;
    with ``num_weights = K > 1`` (one weight per regularizer), ``(1, K)`` or ``(N, K)``.

    Args:
        alpha: a float, a 0-d/1-element tensor, or ``N`` values (``(N,)`` or ``(N, 1)``); for
            ``K > 1`` a K-vector (list, tuple or tensor) or ``(N, K)`` rows.
        num_points: the number of points (to check per-point alpha).
        dtype: output dtype.
        device: output device.
        num_weights: ``K``, the network's ``cond_features``.

    Returns:
        ``(1,)``, ``(N, 1)``, ``(1, K)`` or ``(N, K)`` tensor.

    Raises:
        ValueError: when a per-point alpha does not match ``num_points`` or a vector has the wrong length.
    """
    a = torch.as_tensor(alpha, dtype=dtype, device=device)
    k = int(num_weights)
    if k > 1:
        if a.numel() == k and (a.ndim <= 1 or a.shape[0] == 1):
            return a.reshape(1, k)
        if a.ndim != 2 or a.shape[1] != k or (num_points is not None and a.shape[0] != num_points):
            raise ValueError(
                f"alpha must be {k} weights (one per regularizer), or ({num_points if num_points is not None else 'N'}, {k}) "
                f"rows per point; found shape {tuple(a.shape)}"
            )
        return a
    if a.numel() == 1:
        return a.reshape(1)
    a = a.reshape(-1, 1)
    if num_points is not None and a.shape[0] != num_points:
        raise ValueError(f"per-point alpha has {a.shape[0]} values for {num_points} points")
    return a


def _rows(alpha):
    """Alpha as a tensor when it is array-like (so per-point rows are cut into the inferer's chunks)."""
    if isinstance(alpha, (list, tuple, np.ndarray)):
        return torch.as_tensor(np.asarray(alpha, dtype=np.float64))
    return alpha


def _walked_grid(mapping: CoordinateMapping, shape=None, region=None) -> CoordinateMapping:
    grid = mapping if shape is None else mapping.resample(shape)
    return grid if region is None else grid.region(region)


def iter_grid_chunks(
    mapping: CoordinateMapping, shape=None, chunk_size: int = 65536, region: tuple[slice, ...] | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield the world points of a grid in flat (C-order) chunks, never the whole grid at once:
    :meth:`CoordinateMapping.iter_points` of ``mapping.resample(shape).region(region)``.

    Args:
        mapping: the grid's mapping.
        shape: sample the mapping's field of view with this shape (default: the grid itself,
            see :meth:`CoordinateMapping.resample`).
        chunk_size: points per chunk.
        region: optional per-axis index slices (of ``shape``) restricting the grid; the flat
            order is then that of the region's shape.

    Yields:
        ``(flat_slice, world_points (n, 3) float64)``.
    """
    yield from _walked_grid(mapping, shape, region).iter_points(chunk_size)


def region_shape(mapping: CoordinateMapping, shape=None, region=None) -> tuple[int, ...]:
    """The shape of the grid that :func:`iter_grid_chunks` walks for these arguments."""
    return _walked_grid(mapping, shape, region).spatial_shape


class RegistrationModel(nn.Module):
    """A fixed->moving transform ``phi(p) = A p + t + u(p, alpha)`` in world RAS mm.

    Args:
        network: an INR with ``forward(coords, alpha)`` and
            ``forward_with_derivatives(coords, alpha, order)`` on normalised coordinates
            (:class:`~monai_cidir.networks.ConditionedINR` or ``SirenINR``).
        mapping: the fixed image's mapping; it defines the network's normalised frame.
        affine: optional 4x4 world (RAS mm) affine of the pre-alignment, fixed -> moving.
        derivatives: ``"forward"`` (the network's exact forward-mode derivatives) or
            ``"autograd"`` (nested autograd, :func:`monai_cidir.networks.autograd_derivatives`).

    Example::

        >>> model = RegistrationModel(ConditionedINR(), CoordinateMapping.from_image(fixed))
        >>> moved, jac, hess = model.forward_with_derivatives(points_mm, alpha=0.3, order=2)
        >>> u_mm = model.displacement(points_mm, alpha=0.3)
    """

    def __init__(
        self,
        network: nn.Module,
        mapping: CoordinateMapping,
        affine: torch.Tensor | np.ndarray | None = None,
        derivatives: str = "forward",
    ) -> None:
        super().__init__()
        if derivatives not in ("forward", "autograd"):
            raise ValueError(f"derivatives must be 'forward' or 'autograd', found {derivatives!r}")
        self.network = network
        self.mapping = mapping
        self.derivatives = derivatives
        self.set_affine(affine)

    # ------------------------------------------------------------------ affine part
    def set_affine(self, affine) -> None:
        """Set (or clear with ``None``) the pre-alignment affine (4x4, world RAS mm)."""
        if affine is None:
            self.affine = None
            return
        a = torch.as_tensor(np.asarray(affine, dtype=np.float64) if not isinstance(affine, torch.Tensor) else affine)
        a = a.detach().to(torch.float64).cpu()
        if a.shape != (4, 4):
            raise ValueError(f"expected a 4x4 affine, found shape {tuple(a.shape)}")
        self.affine = a

    def apply_affine(self, points: torch.Tensor) -> torch.Tensor:
        """``A p + t`` (identity without an affine), same dtype/device as ``points``."""
        if self.affine is None:
            return points
        a = self.affine.to(dtype=points.dtype, device=points.device)
        return points @ a[:3, :3].T + a[:3, 3]

    def affine_jacobian(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """``A - I`` (3x3): the affine's contribution to the displacement Jacobian."""
        if self.affine is None:
            return torch.zeros(3, 3, dtype=dtype, device=device)
        return (self.affine[:3, :3] - torch.eye(3, dtype=torch.float64)).to(dtype=dtype, device=device)

    # ------------------------------------------------------------------ evaluation
    @property
    def num_weights(self) -> int:
        """How many weights alpha has (the network's ``cond_features``; 1 for one shared alpha)."""
        return int(getattr(self.network, "cond_features", 1))

    def _param(self) -> torch.Tensor:
        return next(self.network.parameters())

    def forward_with_derivatives(self, points: torch.Tensor, alpha, order: int = 1):
        """Moved positions and the INR's derivatives in millimetres.

        Args:
            points: fixed-space world points (N, 3) mm.
            alpha: one value or N values (per-point alpha); with :attr:`num_weights` ``K > 1``
                a K-vector or ``(N, K)`` rows.
            order: 0 (no derivatives), 1 (Jacobian) or 2 (Jacobian and Hessian).

        Returns:
            ``(moved (N, 3) mm, jacobian (N, 3, 3) or None, hessian (N, 3, 3, 3) 1/mm or None)``;
            the derivatives are the INR residual's ``u`` only (add :meth:`affine_jacobian`
            for the total displacement's Jacobian).
        """
        p = self._param()
        points = points.to(dtype=p.dtype, device=p.device)
        coords = self.mapping.world_to_normalized(points)
        a = as_alpha_tensor(alpha, points.shape[0], dtype=p.dtype, device=p.device, num_weights=self.num_weights)
        jac = hess = None
        if order == 0:
            u = self.network(coords, a)
        elif self.derivatives == "forward":
            u, jac, hess = self.network.forward_with_derivatives(coords, a, order=order)
        else:
            from monai_cidir.networks import autograd_derivatives

            u, jac, hess = autograd_derivatives(self.network, coords, a, order=order)
        moved = self.apply_affine(points) + self.mapping.displacement_to_world(u)
        if jac is not None:
            jac = self.mapping.jacobian_to_world(jac)
        if hess is not None:
            hess = self.mapping.hessian_to_world(hess)
        return moved, jac, hess

    def forward(self, points: torch.Tensor, alpha) -> torch.Tensor:
        """Moved positions ``phi(p)`` (N, 3) mm of fixed-space world points."""
        return self.forward_with_derivatives(points, alpha, order=0)[0]

    @torch.no_grad()
    def transform_points(self, points, alpha, chunk_size: int = 65536) -> torch.Tensor:
        """``phi(p)`` for any number of points, in chunks, without gradients (float64 out)."""
        pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 3)
        if not len(pts):
            return pts.clone()
        return PointInferer(chunk_size, device="cpu")(pts, self._moved_double, _rows(alpha))

    def _moved_double(self, points: torch.Tensor, alpha) -> torch.Tensor:
        return self.forward(points, alpha).double()

    @torch.no_grad()
    def displacement(self, points, alpha, chunk_size: int = 65536) -> torch.Tensor:
        """Total displacement ``phi(p) - p`` (N, 3) world mm (float64) at fixed-space points."""
        pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 3)
        return self.transform_points(pts, alpha, chunk_size) - pts

    def displacement_jacobian(self, points, alpha, chunk_size: int = 32768) -> torch.Tensor:
        """Jacobian of the total displacement, ``A - I + J_u`` (N, 3, 3), without gradients."""
        pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 3)
        if not len(pts):
            return torch.zeros(0, 3, 3)
        return PointInferer(chunk_size, device="cpu")(pts, self._total_jacobian, _rows(alpha))

    def _total_jacobian(self, points: torch.Tensor, alpha) -> torch.Tensor:
        with torch.enable_grad() if self.derivatives == "autograd" else torch.no_grad():
            _, jac, _ = self.forward_with_derivatives(points, alpha, order=1)
        return jac.detach() + self.affine_jacobian(jac.dtype, jac.device)

    @torch.no_grad()
    def map_grid(
        self,
        alpha,
        mapping: CoordinateMapping | None = None,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        channels: int = 3,
        chunk_size: int = 65536,
        shape=None,
        region=None,
    ) -> np.ndarray:
        """Evaluate a function of ``(p, phi(p))`` on a grid in chunks (bounded memory).

        Args:
            alpha: the regularisation weight.
            mapping: the grid (default: the fixed image's).
            fn: ``fn(points, moved) -> (n, channels)`` (default: the displacement ``moved - points``).
            channels: the output channels of ``fn``.
            chunk_size: points per chunk.
            shape: optional resampled grid shape (see :func:`iter_grid_chunks`).
            region: optional index slices of the grid.

        Returns:
            float32 array ``(*grid_shape, channels)`` (``channels == 1`` keeps the last axis).
        """
        grid = _walked_grid(self.mapping if mapping is None else mapping, shape, region)
        sub = grid.spatial_shape
        out = np.empty((grid.num_points, channels), dtype=np.float32)
        for flat, world in grid.iter_points(chunk_size):
            moved = self.forward(world, alpha).double()
            value = moved - world if fn is None else fn(world, moved)
            out[flat] = value.reshape(len(world), channels).float().cpu().numpy()
        return out.reshape(*sub, channels)


def save_registration_model(model: RegistrationModel, path: str | os.PathLike, **extra) -> Path:
    """Write ``model.pt``: the network (pickled module and state dict), mapping and affine.

    Args:
        model: the trained model.
        path: the output file (written atomically: a temporary file then a rename).
        extra: plain-data entries stored alongside (e.g. ``alpha``, ``alpha_range``, ``regularizer``).

    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format_version": MODEL_FORMAT_VERSION,
        "network": model.network,
        "network_state_dict": model.network.state_dict(),
        "mapping": model.mapping.state_dict(),
        "affine": None if model.affine is None else model.affine.clone(),
        "derivatives": model.derivatives,
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_torch_file(path: str | os.PathLike, device, what: str, remedy: str):
    """``torch.load`` with an error that names the file and what to do when it is truncated or corrupt.

    Raises:
        ValueError: for a file torch cannot read (truncated copy, interrupted write, another format).
    """
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 (zip, pickle and torch errors alike: the file is unusable)
        raise ValueError(f"{path} is not a readable {what} (truncated or corrupt: {type(e).__name__}: {e}); {remedy}") from None


def load_registration_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", network_def: Callable[..., nn.Module] | None = None
) -> RegistrationModel:
    """Reload a :class:`RegistrationModel` written by :func:`save_registration_model`.

    The network object is unpickled (``weights_only=False``): load only files you trust,
    e.g. those this package wrote. The extra entries are available as ``model.info``.

    Args:
        path: a ``model.pt`` file.
        device: where to put the network.
        network_def: ``None``: the network stored in the file. A factory (the bundle's
            ``network_def``): the architecture to build (with the stored ``cond_features`` when it
            is above 1), into which the stored weights are loaded.

    Returns:
        the model, in eval mode; ``model.displacement(world_points, alpha)`` gives mm.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is not a monai_cidir model, or its weights do not fit ``network_def``.

    Example::

        >>> model = load_registration_model("outputs/case1/model.pt")
        >>> u = model.displacement(torch.tensor([[10.0, -20.0, 30.0]]), alpha=0.4)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"registration model not found: {path}")
    state = load_torch_file(path, device, "model.pt", "rerun training for this patient (overwrite=True, --overwrite true) or restore the file")
    if not isinstance(state, dict) or "network" not in state or "mapping" not in state:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a monai_cidir model.pt: expected keys 'network' and 'mapping', found {found}")
    if network_def is None:
        network = state["network"]
        network.load_state_dict(state["network_state_dict"])
    else:
        network = _build_network(network_def, state, path)
    network.to(device).eval()
    model = RegistrationModel(
        network,
        CoordinateMapping.from_state_dict(state["mapping"]),
        affine=state.get("affine"),
        derivatives=state.get("derivatives", "forward"),
    )
    model.info = {
        k: v
        for k, v in state.items()
        if k not in ("network", "network_state_dict", "mapping", "affine", "derivatives")
    }
    return model


def _build_network(network_def: Callable[..., nn.Module], state: dict, path: Path) -> nn.Module:
    """``network_def()`` holding the stored weights, or an error naming both architectures."""
    k = int(state.get("cond_features", 1) or 1)
    network = network_def(**({"cond_features": k} if k > 1 else {}))
    stored = state["network"]
    # what shapes no weight (frequency, alpha input): equal weights would give another field, silently
    differ = [a for a in _UNWEIGHTED if getattr(stored, a, _DEFAULTS.get(a)) != getattr(network, a, _DEFAULTS.get(a))]
    if type(network) is not type(stored) or differ:
        raise ValueError(
            f"{path}: network_def builds {type(network).__name__} ({_summary(network)}), but the model was trained with "
            f"{type(stored).__name__} ({_summary(stored)}); they differ in {differ or ['class']}, which the weights do not "
            "record: give the training's network_def, or none to use the stored network"
        )
    try:
        network.load_state_dict(state["network_state_dict"])
    except RuntimeError as e:
        raise ValueError(
            f"{path}: the stored weights do not fit network_def ({type(network).__name__}): the model was trained with "
            f"{type(state['network']).__name__} ({_summary(state['network'])}), network_def builds {_summary(network)}; "
            f"give the training's network_def, or none to use the stored network. torch: {_first_problem(e)}"
        ) from None
    return network


_UNWEIGHTED = ("omega_0", "modulation", "alpha_encoding", "alpha_floor")
_DEFAULTS = {"modulation": "shared", "alpha_encoding": "linear", "alpha_floor": 1e-3}  # networks saved before these existed


def _summary(network: nn.Module) -> str:
    keys = ("hidden_features", "num_hidden_layers", "omega_0", "cond_features", "modulation", "alpha_encoding")
    layers = getattr(network, "layers", None)
    shape = {"hidden_features": layers[0].out_features, "num_hidden_layers": len(layers) - 1} if layers is not None else {}
    found = {**shape, **{k: getattr(network, k) for k in keys if hasattr(network, k)}}
    return ", ".join(f"{k}={v}" for k, v in found.items())


def _first_problem(error: Exception) -> str:
    """The first specific line of torch's load_state_dict error (a size mismatch or a missing key)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
