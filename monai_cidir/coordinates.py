"""The one place that maps between array index, world millimetres and network coordinates.

Conventions (used everywhere in monai_cidir):

* **Array index** ``(i, j, k)`` indexes the spatial axes of a channel-first MONAI array
  ``(C, X, Y, Z)``; 0-based; a voxel centre sits on an integer index.
* **World** coordinates are millimetres in **RAS** (the convention of MONAI's
  ``LoadImage``/``MetaTensor.affine`` and of NIfTI): ``world = affine @ [i, j, k, 1]``.
  Files that store LPS (ITK/elastix point files, CSV landmarks, ITK displacement
  fields) are converted at the file boundary with :func:`lps_to_ras` / :func:`ras_to_lps`.
* **Normalised** coordinates are what the networks see: ``x = (world - center) / scale``
  with one isotropic ``scale`` (mm), so that every derivative converts to millimetres by a
  single factor: for a displacement ``u_mm(p) = scale * u_n((p - center) / scale)``,
  ``du_mm/dp = du_n/dx`` (dimensionless) and ``d2u_mm/dp2 = d2u_n/dx2 / scale`` (1/mm).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from monai.utils import convert_to_tensor
import torch.nn.functional as F

__all__ = ["CoordinateMapping", "lps_to_ras", "ras_to_lps", "affine_from_spacing"]

_LPS_RAS_FLIP = (-1.0, -1.0, 1.0)


def lps_to_ras(points: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Convert world points or vectors (..., 3) between LPS and RAS (negate x and y).

    The operation is its own inverse; :func:`ras_to_lps` is the same function.

    Args:
        points: array or tensor whose last dimension holds (x, y, z).

    Returns:
        the converted points, same type and shape.

    Example::

        >>> lps_to_ras(np.array([1.0, 2.0, 3.0]))
        array([-1., -2.,  3.])
    """
    if isinstance(points, torch.Tensor):
        flip = torch.tensor(_LPS_RAS_FLIP, dtype=points.dtype, device=points.device)
    else:
        points = np.asarray(points, dtype=np.float64)
        flip = np.asarray(_LPS_RAS_FLIP)
    if points.shape[-1] != 3:
        raise ValueError(f"expected points of shape (..., 3), found {tuple(points.shape)}")
    return points * flip


ras_to_lps = lps_to_ras


def affine_from_spacing(
    spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0), direction: np.ndarray | None = None
) -> np.ndarray:
    """Build a 4x4 index-to-world affine from spacing, origin and a direction matrix.

    Args:
        spacing: voxel size in mm along the three array axes.
        origin: world position (mm) of voxel index (0, 0, 0).
        direction: 3x3 matrix whose columns are the world directions of the array axes
            (identity when omitted).

    Returns:
        the float64 4x4 affine ``world = A @ [i, j, k, 1]``.

    Example::

        >>> affine_from_spacing((2.0, 2.0, 5.0))[:3, :3].diagonal()
        array([2., 2., 5.])
    """
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


class CoordinateMapping:
    """Index <-> world (mm, RAS) <-> normalised mapping of one image grid.

    The network's normalised frame is centred on ``center`` (default: the world
    position of the grid's centre) and divided by one isotropic ``scale`` (default:
    half the largest physical extent of the grid, so the volume fits in [-1, 1]^3).

    Args:
        affine: 4x4 index-to-world affine (RAS mm), e.g. ``MetaTensor.affine``.
        spatial_shape: the array's spatial shape ``(X, Y, Z)``.
        center: world centre of the normalised frame (mm); default the grid centre.
        scale: the isotropic normalisation length (mm); default half the largest extent.

    Example::

        >>> m = CoordinateMapping(affine_from_spacing((1.0, 1.0, 2.5)), (100, 100, 40))
        >>> p = m.index_to_world(torch.tensor([[10.0, 20.0, 5.0]]))
        >>> torch.allclose(m.world_to_index(p), torch.tensor([[10.0, 20.0, 5.0]]))
        True
    """

    def __init__(
        self,
        affine: torch.Tensor | np.ndarray,
        spatial_shape: Sequence[int],
        center: Sequence[float] | torch.Tensor | None = None,
        scale: float | None = None,
    ) -> None:
        affine = torch.as_tensor(np.asarray(affine, dtype=np.float64) if not isinstance(affine, torch.Tensor) else affine)
        affine = affine.detach().to(torch.float64).cpu()
        if affine.shape != (4, 4):
            raise ValueError(f"expected a 4x4 affine, found shape {tuple(affine.shape)}")
        if abs(float(torch.linalg.det(affine[:3, :3]))) < 1e-12:
            raise ValueError(f"the affine's 3x3 part is singular:\n{affine}")
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"expected a 3-D spatial shape, found {spatial_shape}")
        self.affine = affine
        self.inverse_affine = torch.linalg.inv(affine)
        self.spatial_shape = shape
        corners = torch.tensor(
            [[a * (n - 1) for a, n in zip(c, shape)] for c in np.ndindex(2, 2, 2)], dtype=torch.float64
        )
        world_corners = self._apply(affine, corners)
        if center is None:
            center = 0.5 * (world_corners.min(0).values + world_corners.max(0).values)
        self.center = torch.as_tensor(center, dtype=torch.float64).reshape(3)
        if scale is None:
            extent = world_corners.max(0).values - world_corners.min(0).values
            scale = max(float(extent.max()) / 2.0, 1e-6)
        if not scale > 0:
            raise ValueError(f"scale must be positive, found {scale}")
        self.scale = float(scale)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_image(cls, image: torch.Tensor, center=None, scale: float | None = None) -> CoordinateMapping:
        """Mapping of a channel-first MetaTensor ``(C, X, Y, Z)`` (uses its ``affine``).

        Args:
            image: a MetaTensor (or any tensor with an ``affine`` attribute), channel first.
            center: see the class.
            scale: see the class.

        Raises:
            ValueError: when the image is not channel-first 3-D or has no affine.
        """
        affine = getattr(image, "affine", None)
        if affine is None:
            raise ValueError("expected a MetaTensor with an 'affine'; found a plain tensor without one")
        if image.ndim != 4:
            raise ValueError(f"expected a channel-first 3-D image (C, X, Y, Z), found shape {tuple(image.shape)}")
        return cls(affine, image.shape[1:], center=center, scale=scale)

    def state_dict(self) -> dict:
        """Plain-data state (saved in model.pt) from which :meth:`from_state_dict` rebuilds the mapping."""
        return {
            "affine": self.affine.clone(),
            "spatial_shape": list(self.spatial_shape),
            "center": self.center.clone(),
            "scale": self.scale,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> CoordinateMapping:
        """Rebuild a mapping saved by :meth:`state_dict`."""
        return cls(state["affine"], state["spatial_shape"], center=state["center"], scale=state["scale"])

    # ------------------------------------------------------------------ properties
    @property
    def spacing(self) -> torch.Tensor:
        """Voxel size (mm) along each array axis."""
        return torch.linalg.norm(self.affine[:3, :3], dim=0)

    def itk_geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(origin, spacing, direction)`` of this grid in ITK's convention (LPS world), float64.

        ``origin`` (3,) and ``direction`` (3, 3; columns are the array axes) are the RAS affine's,
        flipped by :func:`ras_to_lps`; ``spacing`` (3,) is the voxel size. The one place that turns a
        grid into the geometry of an ITK / SimpleITK image (exported fields, segmentation backends).

        Raises:
            ValueError: when the direction is not orthonormal (ITK cannot represent it).

        Example::

            >>> origin, spacing, direction = CoordinateMapping(affine_from_spacing((2.0, 2.0, 3.0)), (4, 4, 4)).itk_geometry()
            >>> direction.diagonal()
            array([-1., -1.,  1.])
        """
        aff = self.affine.numpy().astype(np.float64)
        spacing = np.linalg.norm(aff[:3, :3], axis=0)
        direction = ras_to_lps((aff[:3, :3] / spacing).T).T  # flip the rows: world axes RAS -> LPS
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError(f"the image's direction is not orthonormal, which ITK cannot represent:\n{direction}")
        return ras_to_lps(aff[:3, 3]), spacing, direction

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing.tolist())
        ce = ", ".join(f"{c:.4g}" for c in self.center.tolist())
        return f"CoordinateMapping(shape={self.spatial_shape}, spacing=({sp}), center=({ce}), scale={self.scale:.4g})"

    # ------------------------------------------------------------------ point maps
    @staticmethod
    def _apply(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        m = matrix.to(dtype=points.dtype, device=points.device)
        return points @ m[:3, :3].T + m[:3, 3]

    @staticmethod
    def _check(points) -> torch.Tensor:
        points = torch.as_tensor(points)
        if not points.is_floating_point():
            points = points.to(torch.float64)
        if points.shape[-1] != 3:
            raise ValueError(f"expected points of shape (..., 3), found {tuple(points.shape)}")
        return points

    def index_to_world(self, index) -> torch.Tensor:
        """Continuous 0-based array index (..., 3) -> world RAS mm (..., 3)."""
        return self._apply(self.affine, self._check(index))

    def world_to_index(self, world) -> torch.Tensor:
        """World RAS mm (..., 3) -> continuous 0-based array index (..., 3)."""
        return self._apply(self.inverse_affine, self._check(world))

    def world_to_normalized(self, world) -> torch.Tensor:
        """World RAS mm (..., 3) -> the network's normalised coordinates."""
        world = self._check(world)
        return (world - self.center.to(world)) / self.scale

    def normalized_to_world(self, coords) -> torch.Tensor:
        """The network's normalised coordinates (..., 3) -> world RAS mm."""
        coords = self._check(coords)
        return coords * self.scale + self.center.to(coords)

    # ------------------------------------------------------------------ derivative units
    def displacement_to_world(self, u: torch.Tensor) -> torch.Tensor:
        """A displacement in normalised units -> millimetres."""
        return u * self.scale

    def displacement_to_normalized(self, u: torch.Tensor) -> torch.Tensor:
        """A displacement in millimetres -> normalised units."""
        return u / self.scale

    def jacobian_to_world(self, jacobian: torch.Tensor) -> torch.Tensor:
        """du/dx in normalised units -> du_mm/dp_mm: unchanged, the scale cancels."""
        return jacobian

    def hessian_to_world(self, hessian: torch.Tensor) -> torch.Tensor:
        """d2u/dx2 in normalised units -> d2u_mm/dp_mm2 (1/mm): divided by ``scale``."""
        return hessian / self.scale

    # ------------------------------------------------------------------ sub-grids (the grid object)
    def _derived(self, affine: torch.Tensor, shape: Sequence[int]) -> CoordinateMapping:
        """A grid of the same world that keeps this grid's normalised frame (``center``, ``scale``)."""
        return CoordinateMapping(affine, shape, center=self.center, scale=self.scale)

    def region(self, slices: Sequence[slice]) -> CoordinateMapping:
        """The sub-grid of index slices ``start:stop:step`` per axis.

        Voxel ``i`` of the result is voxel ``start + i * step`` of this grid (its affine scales the
        columns by ``step`` and moves the origin to ``start``); the normalised frame is this grid's,
        so a network's coordinates do not change. ``grid.region(s).world_grid()`` equals
        ``grid.world_grid()[s]``.

        Raises:
            ValueError: for anything but three slices, or a slice that selects no voxel.
        """
        slices = tuple(slices)
        if len(slices) != 3 or not all(isinstance(sl, slice) for sl in slices):
            raise ValueError(f"expected three index slices, found {slices!r}")
        ranges = [range(*sl.indices(n)) for sl, n in zip(slices, self.spatial_shape)]
        if any(len(r) == 0 or r.step < 0 for r in ranges):
            raise ValueError(f"the slices {slices} select no voxel of the grid {self.spatial_shape} (or step backwards)")
        affine = self.affine.clone()
        affine[:3, 3] = self.index_to_world(torch.tensor([float(r.start) for r in ranges], dtype=torch.float64))
        affine[:3, :3] = self.affine[:3, :3] * torch.tensor([float(r.step) for r in ranges], dtype=torch.float64)
        return self._derived(affine, [len(r) for r in ranges])

    def resample(self, shape: Sequence[int]) -> CoordinateMapping:
        """The same field of view sampled with ``shape`` voxels per axis: the first and last voxel
        centres of each axis stay where they are (as :meth:`world_grid` with ``shape``); an axis
        of one voxel keeps the first centre."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"expected a 3-D shape of at least one voxel per axis, found {shape}")
        step = [(n - 1) / (s - 1) if s > 1 else 1.0 for n, s in zip(self.spatial_shape, shape)]
        affine = self.affine.clone()
        affine[:3, :3] = self.affine[:3, :3] * torch.tensor(step, dtype=torch.float64)
        return self._derived(affine, shape)

    def bounding_slices(self, mask, margin_mm: float = 0.0, step: int | Sequence[int] = 1) -> tuple[slice, ...]:
        """Index slices of a mask's bounding box on this grid, grown by ``margin_mm`` on every side
        (clipped to the grid), every ``step`` voxels (an int or one per axis).

        Args:
            mask: an array on this grid, ``(X, Y, Z)`` or channel-first; voxels above 0.5 count.
            margin_mm: the margin (mm), converted per axis with the voxel size (rounded up).
            step: the voxel stride of the slices.

        Raises:
            ValueError: when the mask is empty or not on this grid.
        """
        m = convert_to_tensor(mask, track_meta=False)
        if tuple(m.shape[-3:]) != self.spatial_shape:
            raise ValueError(f"mask of spatial shape {tuple(m.shape[-3:])} on a grid of shape {self.spatial_shape}")
        idx = torch.nonzero(m.reshape(m.shape[-3:]) > 0.5)
        if idx.numel() == 0:
            raise ValueError("the mask is empty: it has no bounding box")
        lo, hi = idx.min(0).values, idx.max(0).values
        steps = [int(step)] * 3 if np.ndim(step) == 0 else [int(v) for v in step]
        out = []
        for a in range(3):
            pad = int(math.ceil(margin_mm / float(self.spacing[a])))
            out.append(slice(max(0, int(lo[a]) - pad), min(self.spatial_shape[a], int(hi[a]) + pad + 1), steps[a]))
        return tuple(out)

    def crop(self, mask, margin_mm: float = 0.0, step: int | Sequence[int] = 1) -> CoordinateMapping:
        """The sub-grid over a mask's bounding box grown by ``margin_mm`` (see :meth:`bounding_slices`)."""
        return self.region(self.bounding_slices(mask, margin_mm, step))

    @property
    def num_points(self) -> int:
        """Voxels of the grid."""
        return int(np.prod(self.spatial_shape))

    def points_at(self, flat) -> torch.Tensor:
        """World points (float64, ``(n, 3)``) of flat C-order voxel indices of this grid."""
        flat = np.asarray(flat.cpu() if torch.is_tensor(flat) else flat, dtype=np.int64).reshape(-1)
        index = np.stack(np.unravel_index(flat, self.spatial_shape), axis=-1).astype(np.float64)
        return self.index_to_world(torch.from_numpy(index))

    def iter_points(self, chunk_size: int = 65536) -> Iterator[tuple[slice, torch.Tensor]]:
        """Walk the voxel centres in flat C-order chunks, never the whole grid at once.

        Yields:
            ``(flat_slice, world_points (n, 3) float64)``.

        Example::

            >>> grid = CoordinateMapping(affine_from_spacing((2.0, 2.0, 3.0)), (4, 5, 6))
            >>> sum(len(w) for _, w in grid.iter_points(chunk_size=7)) == grid.num_points
            True
        """
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, found {chunk_size}")
        total = self.num_points
        for begin in range(0, total, int(chunk_size)):
            end = min(begin + int(chunk_size), total)
            yield slice(begin, end), self.points_at(np.arange(begin, end))

    # ------------------------------------------------------------------ grids and sampling
    def world_grid(self, shape: Sequence[int] | None = None, dtype=torch.float32, device=None) -> torch.Tensor:
        """World coordinates of voxel centres, shape ``(X, Y, Z, 3)``.

        Args:
            shape: a coarser/finer sampling of the same field of view (default: the grid itself);
                the first and last samples of each axis stay on the first and last voxel centres.
            dtype: output dtype.
            device: output device.
        """
        shape = self.spatial_shape if shape is None else tuple(int(s) for s in shape)
        axes = [
            torch.linspace(0, n - 1, s, dtype=torch.float64) if s > 1 else torch.zeros(1, dtype=torch.float64)
            for n, s in zip(self.spatial_shape, shape)
        ]
        index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return self.index_to_world(index).to(dtype=dtype, device=device)

    def world_to_grid_sample(self, world: torch.Tensor) -> torch.Tensor:
        """World mm (..., 3) -> the [-1, 1] coordinates of ``grid_sample(align_corners=True)``.

        The result's last dimension is ordered (k, j, i), as ``grid_sample`` expects for an
        input laid out ``(N, C, X, Y, Z)``.
        """
        index = self.world_to_index(world)
        size = torch.tensor(self.spatial_shape, dtype=index.dtype, device=index.device)
        g = 2.0 * index / (size - 1).clamp(min=1) - 1.0
        return g.flip(-1)

    def sample(
        self,
        image: torch.Tensor,
        world: torch.Tensor,
        mode: str = "bilinear",
        padding_mode: str = "border",
    ) -> torch.Tensor:
        """Differentiable (trilinear) sampling of this grid's image at world points.

        Args:
            image: ``(X, Y, Z)`` or channel-first ``(C, X, Y, Z)`` array on this grid.
            world: points in world mm, shape ``(N, 3)``; gradients flow to them.
            mode: ``"bilinear"`` (trilinear in 3-D) or ``"nearest"``.
            padding_mode: ``grid_sample`` padding for points outside the grid.

        Returns:
            ``(N,)`` for a 3-D input, ``(C, N)`` for a channel-first input.

        Raises:
            ValueError: when the image's spatial shape is not this grid's.
        """
        data = torch.as_tensor(image)
        squeeze = data.ndim == 3
        vol = data[None] if squeeze else data
        if tuple(vol.shape[1:]) != self.spatial_shape:
            raise ValueError(
                f"image of spatial shape {tuple(vol.shape[1:])} sampled with a mapping of shape {self.spatial_shape}"
            )
        if world.ndim != 2 or world.shape[-1] != 3:
            raise ValueError(f"expected world points of shape (N, 3), found {tuple(world.shape)}")
        vol = convert_to_tensor(vol, track_meta=False)
        dtype = world.dtype if world.is_floating_point() else torch.float32
        grid = self.world_to_grid_sample(world.to(dtype)).reshape(1, 1, 1, -1, 3)
        out = F.grid_sample(
            vol[None].to(dtype=dtype, device=world.device), grid, mode=mode, padding_mode=padding_mode, align_corners=True
        )
        out = out.reshape(vol.shape[0], -1)
        return out[0] if squeeze else out
