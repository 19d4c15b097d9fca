"""Per-patient outputs: displacement field, warped moving image, alpha curve (CSV + PNG), JSON.

``displacement.nii.gz`` is written by ITK as a 3-component float vector image with the
fixed image's geometry in ITK's LPS convention and LPS vectors in mm, so that
``sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64))``
maps a fixed-space point ``p`` (LPS) to ``p + u(p)``, its position in the moving image.
Everything is evaluated in chunks (:meth:`RegistrationModel.map_grid`), so memory stays at
a few copies of the output array: a 512x512x136 field needs about 0.9 GB.

The network is the export's cost (about 265 KFLOP per voxel for the default 256-wide network:
a 256 x 256 x 100 grid is 1.7 TFLOP, 16 s on 2 cores). :func:`map_displacement` therefore maps
every voxel of the lung region exactly and the rest of the grid trilinearly from a coarse grid
(``coarse_mm``); the SIREN field is smooth on that scale (on a 256 x 256 x 100 realistic case a
6 mm grid reproduced every voxel within 0.023 mm, a 4 mm grid within 0.010 mm), and every export
measures the interpolation error at random voxels outside the region and reports it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_tensor

from monai_cidir.coordinates import CoordinateMapping, ras_to_lps
from monai_cidir.engines.model import RegistrationModel
from monai_cidir.utils import atomic_path

__all__ = [
    "dilate_mask",
    "map_displacement",
    "write_displacement_field",
    "write_warped_image",
    "write_alpha_curve",
    "plot_alpha_curve",
    "plot_alpha_map",
    "write_json",
    "plot_lung_masks",
]

def dilate_mask(mask, mapping: CoordinateMapping, margin_mm: float) -> np.ndarray:
    """A boolean mask grown by a box of ``margin_mm`` along each axis (separable max-pooling).

    Args:
        mask: array or tensor on the grid of ``mapping`` (leading singleton axes allowed).
        mapping: the grid (its spacing converts ``margin_mm`` to voxels per axis).
        margin_mm: half-width of the box (mm); every voxel within it of a mask voxel is set.

    Returns:
        bool array of the grid's spatial shape.
    """
    import torch.nn.functional as F

    m = torch.as_tensor(np.asarray(mask)).reshape(tuple(int(n) for n in mapping.spatial_shape)) > 0.5
    out = m.float()[None, None]
    for axis, sp in enumerate(mapping.spacing.tolist()):
        r = int(np.ceil(margin_mm / sp))
        if r > 0:
            kernel = [1, 1, 1]
            kernel[axis] = 2 * r + 1
            pad = [0, 0, 0]
            pad[axis] = r
            out = F.max_pool3d(out, kernel_size=tuple(kernel), stride=1, padding=tuple(pad))
    return out[0, 0].numpy() > 0.5


def map_displacement(
    model: RegistrationModel,
    alpha: float,
    exact_mask: np.ndarray | None = None,
    coarse_mm: float | None = 6.0,
    chunk_size: int = 65536,
    check_points: int = 2048,
) -> tuple[np.ndarray, dict]:
    """The total displacement on the fixed grid: exact in ``exact_mask``, interpolated elsewhere.

    The network is evaluated on a coarse grid spanning the whole image (at most ``coarse_mm``
    apart along each axis, first and last voxels included) and trilinearly interpolated to every
    voxel; every voxel of ``exact_mask`` is then mapped exactly. ``check_points`` random voxels
    outside the mask are mapped exactly too, to measure the interpolation error.

    Args:
        model: the trained registration (its mapping is the fixed grid).
        alpha: the regularisation weight.
        exact_mask: bool array of the grid's shape, the voxels mapped exactly (e.g. the lung mask
            grown by 10 mm: :func:`dilate_mask`); ``None`` maps every voxel exactly.
        coarse_mm: the coarse grid's largest spacing (mm); ``None`` maps every voxel exactly.
        chunk_size: points per network call.
        check_points: voxels outside the mask mapped exactly to measure the error (0: none).

    Returns:
        ``(field, info)``: the float32 ``(X, Y, Z, 3)`` displacement (RAS mm, as
        :meth:`RegistrationModel.map_grid`) and a dict with ``exact_fraction`` (voxels mapped
        exactly / all) and ``interpolation_max_mm`` / ``interpolation_p99_mm`` (over the checked
        voxels; 0 when every voxel is exact).

    Example::

        >>> lung = dilate_mask(item["fixed_mask"], model.mapping, 10.0)
        >>> field, info = map_displacement(model, 0.5, lung)
        >>> info["interpolation_max_mm"] < 0.05
        True
    """
    import torch.nn.functional as F

    mapping = model.mapping
    shape = tuple(int(n) for n in mapping.spatial_shape)
    if exact_mask is None or coarse_mm is None:
        return model.map_grid(alpha, chunk_size=chunk_size), {"exact_fraction": 1.0, "interpolation_max_mm": 0.0, "interpolation_p99_mm": 0.0}
    if not coarse_mm > 0:
        raise ValueError(f"coarse_mm must be positive or None, found {coarse_mm}")
    exact_mask = np.asarray(exact_mask, dtype=bool)
    if exact_mask.shape != shape:
        raise ValueError(f"exact_mask must have the fixed grid's shape {shape}, found {exact_mask.shape}")

    def at_voxels(flat: np.ndarray) -> np.ndarray:
        out = np.empty((flat.size, 3), dtype=np.float32)
        for s in range(0, flat.size, chunk_size):
            out[s : s + chunk_size] = model.displacement(mapping.points_at(flat[s : s + chunk_size]), alpha, chunk_size).numpy()
        return out

    extent = (np.asarray(shape) - 1) * mapping.spacing.numpy()
    sizes = [max(2, int(np.ceil(e / coarse_mm)) + 1) if n > 1 else 1 for e, n in zip(extent, shape)]
    coarse_world = mapping.world_grid(sizes, dtype=torch.float64).reshape(-1, 3)  # first / last centres kept
    coarse = model.displacement(coarse_world, alpha, chunk_size).float().reshape(*sizes, 3)
    field = _upsample_field(coarse, shape)
    flat_field = field.reshape(-1, 3)
    inside = np.flatnonzero(exact_mask)
    flat_field[inside] = at_voxels(inside)
    info = {"exact_fraction": float(inside.size / exact_mask.size), "interpolation_max_mm": 0.0, "interpolation_p99_mm": 0.0}
    outside = np.flatnonzero(~exact_mask)
    if check_points > 0 and outside.size:
        pick = np.random.default_rng(0).choice(outside, size=min(int(check_points), outside.size), replace=False)
        err = np.linalg.norm(flat_field[pick] - at_voxels(pick), axis=1)
        info.update(interpolation_max_mm=float(err.max()), interpolation_p99_mm=float(np.percentile(err, 99)))
    return field, info


def _upsample_field(coarse: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """Trilinear (``align_corners=True``) upsampling of a coarse ``(x, y, z, 3)`` field to ``(*shape, 3)``, written
    slice by slice into the output (in-plane first, then along the last axis): memory is the output plus the
    coarse slices upsampled in-plane, not the three full-size copies of one ``F.interpolate`` call."""
    import torch.nn.functional as F

    nx, ny, nz = (int(n) for n in shape)
    planes = F.interpolate(coarse.permute(2, 3, 0, 1), size=(nx, ny), mode="bilinear", align_corners=True)  # (cz, 3, X, Y)
    planes = planes.permute(0, 2, 3, 1).contiguous().numpy()  # (cz, X, Y, 3)
    out = np.empty((nx, ny, nz, 3), dtype=np.float32)
    cz = planes.shape[0]
    for k in range(nz):
        t = k * (cz - 1) / (nz - 1) if nz > 1 and cz > 1 else 0.0
        k0 = min(int(np.floor(t)), cz - 1)
        w = np.float32(t - k0)
        out[:, :, k] = planes[k0] if w == 0 or k0 + 1 >= cz else (1 - w) * planes[k0] + w * planes[k0 + 1]
    return out


def write_displacement_field(
    model: RegistrationModel, alpha: float, path: str | os.PathLike, chunk_size: int = 65536, field: np.ndarray | None = None
) -> Path:
    """Write the total displacement (affine + INR, world mm) on the fixed grid as an ITK field.

    Args:
        model: the trained registration (its mapping is the fixed grid).
        alpha: the regularisation weight to export.
        path: output file (``.nii.gz``, ``.mha``, ``.nrrd``: any ITK vector format).
        chunk_size: points per network call.
        field: the displacement ``model.map_grid(alpha)`` when already computed (not modified).

    Returns:
        the path written.
    """
    import itk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if field is None:
        field = model.map_grid(alpha, chunk_size=chunk_size)  # (X, Y, Z, 3) RAS mm, float32
    # RAS -> LPS vectors (ras_to_lps) while laying the array out as ITK's (z, y, x, c)
    array = np.ascontiguousarray(field.transpose(2, 1, 0, 3))
    array *= ras_to_lps(np.ones(3)).astype(np.float32)  # RAS -> LPS vectors, in place (no float64 copy)
    origin, spacing, direction = model.mapping.itk_geometry()
    image = itk.image_view_from_array(array, is_vector=True)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    itk.imwrite(image, str(path), compression=True)
    return path


def write_warped_image(
    model: RegistrationModel,
    alpha: float,
    moving_image: torch.Tensor,
    path: str | os.PathLike,
    mode: str = "bilinear",
    chunk_size: int = 65536,
    field: np.ndarray | None = None,
) -> Path:
    """Resample the moving image onto the fixed grid through ``phi`` and write it (NIfTI, RAS).

    Args:
        model: the trained registration.
        alpha: the regularisation weight.
        moving_image: moving MetaTensor ``(1, X, Y, Z)``.
        path: output ``.nii.gz``.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"`` (for masks).
        chunk_size: points per network call.
        field: the displacement ``model.map_grid(alpha)`` when already computed: the network is
            then not evaluated again (the export of both files maps the grid once).

    Returns:
        the path written.
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mmap = CoordinateMapping.from_image(moving_image)
    data = convert_to_tensor(moving_image, track_meta=False).float()

    def fn(world, moved):
        return mmap.sample(data, moved.float(), mode=mode)[0][:, None]

    if field is None:
        warped = model.map_grid(alpha, fn=fn, channels=1, chunk_size=chunk_size)[..., 0]
    else:
        disp = torch.from_numpy(field.reshape(-1, 3))
        warped = np.empty(disp.shape[0], dtype=np.float32)
        for flat, world in model.mapping.iter_points(chunk_size):
            warped[flat] = fn(world, world + disp[flat].to(world.dtype))[:, 0].numpy()
        warped = warped.reshape(model.mapping.spatial_shape)
    nib.save(nib.Nifti1Image(warped, model.mapping.affine.numpy()), str(path))
    return path


def write_alpha_curve(rows: Sequence[dict], path: str | os.PathLike, names: Sequence[str] | None = None) -> Path:
    """Write ``alpha_curve.csv``: columns alpha, dice, folding, seconds (and ``tre``, mm, when every
    row has one: pairs with landmarks), one row per evaluated alpha.

    For a model conditioned on K weights (rows whose ``alpha`` is a tuple) the alpha column is
    replaced by one column per weight, ``alpha_<name>`` (``names``: the regularizers in order;
    default ``alpha_0``, ``alpha_1``, ...): a table over the evaluated vectors.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["alpha"])
    k = len(rows[0]["alpha"]) if rows and isinstance(rows[0]["alpha"], tuple) else 1
    names = list(names) if names is not None and len(names) == k else [str(i) for i in range(k)]
    tre = bool(rows) and all("tre" in r for r in rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["alpha"] if k == 1 else [f"alpha_{n}" for n in names]) + ["dice", "folding", "seconds"] + (["tre"] if tre else []))
        for r in rows:
            alphas = [r["alpha"]] if k == 1 else list(r["alpha"])
            extra = [f"{r['tre']:.6f}"] if tre else []
            w.writerow([f"{a:.6g}" for a in alphas] + [f"{r['dice']:.6f}", f"{r['folding']:.6g}", f"{r['seconds']:.4f}"] + extra)
    return path


def _symlog_axis(ax, values: Sequence[float], axis: str = "x") -> bool:
    """A symlog axis when the values are log-spaced (a log-uniform prior's grid); True if set."""
    positive = [v for v in values if v > 0]
    if not positive or min(positive) >= 0.05 * max(positive):
        return False
    set_scale, set_lim = (ax.set_xscale, ax.set_xlim) if axis == "x" else (ax.set_yscale, ax.set_ylim)
    set_scale("symlog", linthresh=min(positive))
    set_lim(-0.5 * min(positive), 1.6 * max(positive))  # room for the chosen-alpha marker at the top end
    return True


def _save_figure(fig, ax, path: Path, title: str = "") -> Path:
    """Title ``ax`` (when given), lay ``fig`` out, write it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_alpha_map(rows: Sequence[dict], best_alpha: Sequence[float], path: str | os.PathLike, names: Sequence[str], title: str = "") -> Path:
    """Write ``alpha_curve.png`` for two weights: the evaluated vectors coloured by lung Dice, the choice marked.

    Points with folding are drawn as crosses. More than two weights: Dice against the evaluation order.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 4.6), dpi=100)
    dice = np.array([r["dice"] for r in rows])
    if len(best_alpha) == 2:
        x = [r["alpha"][0] for r in rows]
        y = [r["alpha"][1] for r in rows]
        folds = np.array([r["folding"] > 0 for r in rows])
        art = ax.scatter(np.array(x)[~folds], np.array(y)[~folds], c=dice[~folds], cmap="viridis", s=60,
                         vmin=dice.min(), vmax=dice.max(), edgecolors="k", linewidths=0.3, label="no folding")
        if folds.any():
            ax.scatter(np.array(x)[folds], np.array(y)[folds], c=dice[folds], cmap="viridis", s=60, marker="X",
                       vmin=dice.min(), vmax=dice.max(), label="folding > 0")
        ax.plot([best_alpha[0]], [best_alpha[1]], marker="*", color="tab:red", ms=18, mec="k", ls="none",
                label=f"chosen [{best_alpha[0]:.3g}, {best_alpha[1]:.3g}]")
        fig.colorbar(art, ax=ax, label="lung Dice")
        log_x = _symlog_axis(ax, x, "x")
        log_y = _symlog_axis(ax, y, "y")
        ax.set_xlabel(f"alpha {names[0]}" + (" (symlog)" if log_x else ""))
        ax.set_ylabel(f"alpha {names[1]}" + (" (symlog)" if log_y else ""))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=7, frameon=False)
    else:
        ax.plot(range(len(rows)), dice, "o-", ms=3)
        ax.set_xlabel("evaluated alpha vector")
        ax.set_ylabel("lung Dice")
    return _save_figure(fig, ax, path, title)


def plot_alpha_curve(rows: Sequence[dict], best_alpha: float, path: str | os.PathLike, title: str = "") -> Path:
    """Write ``alpha_curve.png``: Dice and folding against alpha, the chosen alpha marked; below, the
    landmark TRE against alpha when the rows have it (the oracle alpha marked too)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = sorted(rows, key=lambda r: r["alpha"])
    a = [r["alpha"] for r in rows]
    tre = bool(rows) and all("tre" in r for r in rows)
    if tre:
        fig, (ax, ax_tre) = plt.subplots(2, 1, figsize=(5.5, 5.5), dpi=100, sharex=True, height_ratios=(3, 2))
    else:
        fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    ax.plot(a, [r["dice"] for r in rows], "o-", color="tab:blue", ms=3, label="lung Dice")
    bottom = ax_tre if tre else ax
    bottom.set_xlabel("alpha")
    if _symlog_axis(ax, a, "x"):  # a log-spaced grid (log-uniform prior)
        bottom.set_xlabel("alpha (linear below the smallest positive alpha, logarithmic above)")
    ax.set_ylabel("lung Dice", color="tab:blue")
    ax.axvline(best_alpha, color="k", ls="--", lw=1, label=f"chosen alpha = {best_alpha:.3g}")
    ax2 = ax.twinx()
    ax2.plot(a, [100 * r["folding"] for r in rows], "s-", color="tab:red", ms=3, label="folding")
    ax2.set_ylabel("folding (% of lung points)", color="tab:red")
    ax2.set_ylim(bottom=0.0)  # a fraction: no negative axis when nothing folds
    ax.legend(loc="lower center", fontsize=8)
    if tre:
        oracle = min(rows, key=lambda r: r["tre"])
        ax_tre.plot(a, [r["tre"] for r in rows], "o-", color="tab:green", ms=3, label="landmark TRE")
        ax_tre.axvline(best_alpha, color="k", ls="--", lw=1)
        ax_tre.axvline(oracle["alpha"], color="tab:green", ls=":", lw=1, label=f"lowest TRE at alpha = {oracle['alpha']:.3g}")
        ax_tre.set_ylabel("TRE (mm)", color="tab:green")
        ax_tre.legend(loc="upper center", fontsize=8)
    return _save_figure(fig, ax, path, title)


def _radiological(image, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu, mask, spacing)`` reoriented to the closest LPS axes (array axes -> patient left, posterior, superior)."""
    from monai.utils import convert_to_numpy
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    affine = convert_to_numpy(image.affine).astype(np.float64)
    # nibabel's codes name where each axis points in RAS+ world (MONAI's affine): "L" = towards the patient's left
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(("L", "P", "S")))
    hu = apply_orientation(convert_to_numpy(image).reshape(np.shape(image)[-3:]), transform)
    m = apply_orientation(convert_to_numpy(mask).reshape(np.shape(mask)[-3:]) > 0.5, transform)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[transform[:, 0].astype(int).argsort()]
    return hu, m, spacing


def _largest_component_centre(m: np.ndarray) -> np.ndarray | None:
    """Mean voxel index of a mask's largest connected component (``None`` when empty), found on the mask's box."""
    from scipy import ndimage

    lo = [np.flatnonzero(m.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    if any(len(v) == 0 for v in lo):
        return None
    box = tuple(slice(int(v[0]), int(v[-1]) + 1) for v in lo)
    labels, _ = ndimage.label(m[box])
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return np.argwhere(labels == largest).mean(0) + np.array([sl.start for sl in box])


def _mask_slices(m: np.ndarray, axis: int, slices: int, centre: np.ndarray | None = None) -> list[int]:
    """One slice through the largest component's centre (``centre``: when already known), or ``slices``
    spread over the mask's extent."""
    if not m.any():
        return [m.shape[axis] // 2] if slices == 1 else list(np.linspace(0, m.shape[axis] - 1, slices + 2)[1:-1].round().astype(int))
    if slices == 1:
        centre = _largest_component_centre(m) if centre is None else centre
        return [int(round(float(centre[axis])))]
    inside = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))
    return list(np.linspace(inside[0], inside[-1], slices + 2)[1:-1].round().astype(int))


def plot_lung_masks(panels: Sequence[tuple[str, object, object]], path: str | os.PathLike, title: str = "", slices: int = 1) -> Path:
    """Write a PNG of lung-mask contours (red) over CT slices, in radiological display.

    Each panel is one image: axial (anterior up, patient right on the left), coronal (superior
    up, patient right on the left) and sagittal (superior up, anterior on the left) slices through
    the centre of the mask's largest component (``slices=1``: one row per image) or spread over the
    mask's extent (one row per image and view). A window of -1000..300 HU; padding shows black.

    Args:
        panels: ``(label, image, mask)`` per image: MetaTensors ``(1, X, Y, Z)`` on the same grid.
        path: the PNG to write.
        title: figure title.
        slices: slices per view.

    Returns:
        the path written.

    Example::

        >>> plot_lung_masks([("fixed", item["fixed_image"], item["fixed_mask"])], "lung_masks.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, cols = (len(panels), 3) if slices == 1 else (3 * len(panels), slices)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows + 0.4), dpi=80, squeeze=False)
    for p, (label, image, mask) in enumerate(panels):
        hu, m, sp = _radiological(image, mask)
        centre = _largest_component_centre(m) if slices == 1 else None  # one labelling for the three views
        for v, (axis, view) in enumerate(((2, "axial"), (1, "coronal"), (0, "sagittal"))):
            for c, k in enumerate(_mask_slices(m, axis, slices, centre)):
                ax = axes[p, v] if slices == 1 else axes[3 * p + v, c]
                i, j = [a for a in range(3) if a != axis]  # image columns run along i, rows along j
                img, msk = np.take(hu, k, axis=axis).T, np.take(m, k, axis=axis).T
                if view != "axial":  # superior up
                    img, msk = img[::-1], msk[::-1]
                ax.imshow(img, cmap="gray", vmin=-1000, vmax=300, aspect=sp[j] / sp[i], interpolation="nearest")
                if msk.any() and not msk.all():
                    ax.contour(msk, [0.5], colors="r", linewidths=0.8)
                ax.set_title(f"{label}: {view} slice {k}", fontsize=8)
                ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.1 * rows + 0.4) if title else 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write JSON atomically (a temporary file, then a rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    return path


