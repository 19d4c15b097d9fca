"""Lung masks from CT in HU: the lungmask U-Net (R231) or an offline classical threshold method.

``LungMask`` (array) and ``LungMaskd`` (dictionary) return a 0/1 float32 MetaTensor on the
image's grid (same shape and affine). Two backends:

* ``"lungmask"``: the `lungmask <https://github.com/JoHof/lungmask>`_ package (Hofmanninger et al.
  2020), model R231, run on the image as a SimpleITK image built from the MetaTensor's affine
  (so lungmask sees the LPS orientation it was trained on, whatever the array order). Weights
  come from ``model_path`` or from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/unet_r231-d5d2fc3d.pth``); without either, lungmask downloads
  them (about 119 MB) and, when that fails, a clear error names the file, where to put it and the
  alternatives. lungmask's labels (1 = right, 2 = left lung) become one 0/1 mask.
* ``"threshold"``: :func:`threshold_lung_mask`, no weights, seconds on a 512x512x130 CT.

In ``LungMaskd`` a mask already in the item (e.g. given by the datalist) always wins.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple
from scipy import ndimage

from monai_cidir.coordinates import CoordinateMapping

__all__ = [
    "LungMask",
    "LungMaskd",
    "threshold_lung_mask",
    "lungmask_weights_file",
    "LUNGMASK_BACKENDS",
]

#: the backends of :class:`LungMask`.
LUNGMASK_BACKENDS = ("lungmask", "threshold")

_LPS_FLIP = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# threshold backend
# ----------------------------------------------------------------------------------------------
def _axes(affine: np.ndarray, spacing: np.ndarray):
    """(axial array axis, +1/-1 if it runs towards superior/inferior, left-right array axis)."""
    direction = affine[:3, :3] / spacing
    axial = int(np.argmax(np.abs(direction[2])))
    superior = 1.0 if direction[2, axial] > 0 else -1.0
    in_plane = [a for a in range(3) if a != axial]
    lateral = max(in_plane, key=lambda a: abs(direction[0, a]))
    return axial, superior, lateral


def _ellipsoid_structure(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    half = np.maximum(np.floor(radius_mm / spacing).astype(int), 0)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def _airway_mask(
    air: np.ndarray,
    axial: int,
    superior: float,
    lateral: int,
    spacing: np.ndarray,
    max_area_mm2: float,
    max_bridge_mm: float = 15.0,
) -> np.ndarray:
    """Trachea and main bronchi: tracked slice by slice from the top while they stay small 2-D components.

    A seed is a small, roundish air component near the middle of the field of view (left-right)
    in the upper third of the slices that hold air; each next slice keeps the components that
    overlap the previous slice's airway and stay small. Where an airway touches a lung in a slice
    (its component grows past the limit), the previous slice's airway footprint (grown by one
    pixel) is cut out of that slice instead, for at most ``max_bridge_mm`` in a row; tracking
    resumes when the airway is a separate small component again.
    """
    order = [axial] + [a for a in range(3) if a != axial]
    vol = np.transpose(air, order)
    if superior > 0:
        vol = vol[::-1]  # slice 0 = most superior
    in_plane = [a for a in range(3) if a != axial]
    pixel_area = float(spacing[in_plane[0]] * spacing[in_plane[1]])
    lat_dim = in_plane.index(lateral)  # the left-right axis of a slice
    max_px = max_area_mm2 / pixel_area
    min_px = 15.0 / pixel_area  # about 4.5 mm across
    max_bridge = max(2, int(round(max_bridge_mm / float(spacing[axial]))))
    airway = np.zeros(vol.shape, dtype=bool)
    occupied = np.flatnonzero(vol.reshape(vol.shape[0], -1).any(1))
    if len(occupied) == 0:
        return np.zeros_like(air)
    first, last = int(occupied[0]), int(occupied[-1])
    seed_limit = first + max(2, (last - first) // 3)
    centre = 0.5 * (vol.shape[1 + lat_dim] - 1)
    half_width_mm = 0.5 * vol.shape[1 + lat_dim] * float(spacing[lateral])
    ring = ndimage.generate_binary_structure(2, 1)
    prev = None  # the airway's small components in the previous slice
    bridge, bridge_age = None, 0  # airway footprint carried through slices where it touches a lung
    for k in range(first, last + 1):
        labels, n = ndimage.label(vol[k])
        if n == 0:
            if prev is not None:
                break
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        if prev is None and bridge is None:  # looking for the trachea
            if k > seed_limit:
                break
            objects = ndimage.find_objects(labels)
            best, best_d = 0, np.inf
            for lab in range(1, n + 1):
                if not (min_px <= areas[lab] <= max_px):
                    continue
                box = objects[lab - 1]
                if areas[lab] < 0.5 * (box[0].stop - box[0].start) * (box[1].stop - box[1].start):
                    continue  # not roundish
                mid = 0.5 * (box[lat_dim].start + box[lat_dim].stop - 1)
                d = abs(mid - centre) * float(spacing[lateral])
                if d < best_d:
                    best, best_d = lab, d
            if best == 0 or best_d > 0.2 * half_width_mm:
                continue
            prev = labels == best
            airway[k] = prev
            continue
        footprint = prev if bridge is None else (bridge if prev is None else prev | bridge)
        touched = np.unique(labels[footprint])
        touched = touched[touched > 0]
        limit = min(max_px, 2.5 * float(footprint.sum()) + min_px)
        small = touched[areas[touched] <= limit]
        merged = touched[areas[touched] > limit]
        cur = np.isin(labels, small) if len(small) else None
        remove = cur.copy() if cur is not None else np.zeros_like(footprint)
        new_bridge = None
        if len(merged):
            in_merged = np.isin(labels, merged)
            fresh = in_merged & prev if prev is not None else None
            if fresh is not None and fresh.any():
                new_bridge, bridge_age = fresh, 1
                if bridge is not None:
                    new_bridge |= in_merged & bridge
            elif bridge is not None and bridge_age < max_bridge:
                new_bridge, bridge_age = in_merged & bridge, bridge_age + 1
            if new_bridge is not None and new_bridge.any():
                remove |= in_merged & ndimage.binary_dilation(new_bridge, ring)
            else:
                new_bridge = None
        if cur is None and new_bridge is None:
            break
        airway[k] = remove
        prev, bridge = cur, new_bridge
    if superior > 0:
        airway = airway[::-1]
    return np.transpose(airway, np.argsort(order))


def threshold_lung_mask(
    image: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    threshold_hu: float = -400.0,
    smoothing_mm: float = 1.0,
    closing_mm: float = 3.0,
    remove_airways: bool = True,
    max_airway_area_mm2: float = 700.0,
    min_lung_volume_ml: float = 10.0,
) -> np.ndarray:
    """Classical lung segmentation of a CT in HU (no weights).

    1. Gaussian smoothing (``smoothing_mm``), air = ``HU < threshold_hu``.
    2. Outside-body air: air components touching the in-plane borders of the volume are removed
       (the superior/inferior borders may cut the lungs, so they do not count).
    3. Trachea and main bronchi: tracked slice by slice from the top as small 2-D air components
       near the left-right centre, and removed (``remove_airways``).
    4. The largest air component is a lung; the second largest is kept as the other lung when it
       has at least 10 % of the largest's volume and its centroid lies above the largest's lowest
       quarter (so stomach/bowel gas under the diaphragm is not taken); when the lungs touch they
       form one component. Components under ``min_lung_volume_ml`` are never lungs.
    5. Each lung: hole filling (vessels, airways inside the lung), a closing with a ball of
       ``closing_mm`` (vessels at the hilum and the pleura), hole filling again.

    Args:
        image: ``(X, Y, Z)`` HU array.
        affine: its 4x4 index -> world (RAS mm) affine.
        threshold_hu: air/tissue threshold (HU).
        smoothing_mm: Gaussian sigma before thresholding (mm); 0 disables it.
        closing_mm: closing radius (mm); 0 disables it.
        remove_airways: remove the trachea and main bronchi.
        max_airway_area_mm2: largest cross-section (mm^2) of a trachea/bronchus slice.
        min_lung_volume_ml: smallest volume (ml) a lung component may have.

    Returns:
        bool array ``(X, Y, Z)``, True inside the lungs (empty, with a warning, when no air
        component is large enough).

    Raises:
        ValueError: for an image that is not 3-D.

    Example::

        >>> mask = threshold_lung_mask(ct_hu, affine)  # doctest: +SKIP
    """
    data = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if data.ndim != 3:
        raise ValueError(f"threshold_lung_mask expects a 3-D (X, Y, Z) HU array, found shape {data.shape}")
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    spacing = CoordinateMapping(affine, data.shape).spacing.numpy()
    axial, superior, lateral = _axes(affine, spacing)

    data = data.astype(np.float32, copy=False)
    if smoothing_mm > 0:
        data = ndimage.gaussian_filter(data, sigma=smoothing_mm / spacing, truncate=3.0)
    air = data < threshold_hu
    del data

    # outside-body air: components touching the in-plane faces
    labels, n = ndimage.label(air)
    border = set()
    for a in range(3):
        if a == axial:
            continue
        for idx in (0, -1):
            border.update(np.unique(np.take(labels, idx, axis=a)).tolist())
    border.discard(0)
    if border:
        outside = np.zeros(n + 1, dtype=bool)
        outside[list(border)] = True
        air[outside[labels]] = False
    del labels

    if remove_airways:
        air &= ~_airway_mask(air, axial, superior, lateral, spacing, max_airway_area_mm2)

    labels, n = ndimage.label(air)
    del air
    if n == 0:
        warnings.warn("threshold_lung_mask: no air inside the body; returning an empty mask", stacklevel=2)
        return np.zeros(labels.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ranked = [int(i) for i in np.argsort(sizes)[::-1][:2] if sizes[i] * voxel_ml >= min_lung_volume_ml]
    if not ranked:
        warnings.warn(
            f"threshold_lung_mask: the largest air component inside the body has "
            f"{sizes.max() * voxel_ml:.1f} ml < min_lung_volume_ml={min_lung_volume_ml}; returning an empty mask",
            stacklevel=2,
        )
        return np.zeros(labels.shape, dtype=bool)
    boxes = ndimage.find_objects(labels, max_label=max(ranked))
    keep = [ranked[0]]
    if len(ranked) == 2 and sizes[ranked[1]] >= 0.1 * sizes[ranked[0]]:
        # the second lung reaches above the first one's lowest quarter (gas under the diaphragm does not)
        def height_positions(lab):
            sub = labels[boxes[lab - 1]] == lab
            k = np.nonzero(sub)[axial] + boxes[lab - 1][axial].start
            return k * superior  # larger = more superior

        first, second = height_positions(ranked[0]), height_positions(ranked[1])
        if second.mean() > np.quantile(first, 0.25):
            keep.append(ranked[1])

    mask = np.zeros(labels.shape, dtype=bool)
    struct = _ellipsoid_structure(closing_mm, spacing) if closing_mm > 0 else None
    pad = np.asarray(struct.shape) // 2 + 1 if struct is not None else np.ones(3, dtype=int)
    for lab in keep:
        box = boxes[lab - 1]
        lo = [max(s.start - p, 0) for s, p in zip(box, pad)]
        hi = [min(s.stop + p, n_) for s, p, n_ in zip(box, pad, labels.shape)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        comp = np.pad(labels[sl] == lab, [(int(p), int(p)) for p in pad])
        comp = _fill(comp)
        if struct is not None:
            comp = ndimage.binary_closing(comp, structure=struct)
            comp = _fill(comp)
        core = tuple(slice(int(p), int(p) + (b - a)) for p, a, b in zip(pad, lo, hi))
        mask[sl] |= comp[core]
    return mask


def _fill(mask: np.ndarray) -> np.ndarray:
    try:
        import fill_voids

        return fill_voids.fill(mask, in_place=False)
    except ImportError:  # fill_voids comes with lungmask; scipy is the fallback
        return ndimage.binary_fill_holes(mask)


# ----------------------------------------------------------------------------------------------
# lungmask backend
# ----------------------------------------------------------------------------------------------
def _lungmask_module():
    """Import ``lungmask.mask`` without letting it silence UserWarnings process-wide (it does at import)."""
    with warnings.catch_warnings():
        try:
            from lungmask import mask as lm_mask
        except ImportError as e:
            raise ImportError(
                "LungMask(backend='lungmask') needs the lungmask package (pip install lungmask); "
                "or use backend='threshold', or give masks in the datalist"
            ) from e
    return lm_mask


def lungmask_weights_file(modelname: str = "R231") -> Path:
    """Where torch hub caches the weights of a lungmask model (``$TORCH_HOME/hub/checkpoints/<file>``).

    Args:
        modelname: a lungmask model name (``"R231"``, ``"LTRCLobes"``, ``"R231CovidWeb"``).

    Returns:
        the cache path (it may not exist).

    Raises:
        ValueError: for an unknown model name.
    """
    urls = _lungmask_module().MODEL_URLS
    if modelname not in urls:
        raise ValueError(f"unknown lungmask model {modelname!r}; expected one of {sorted(urls)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urls[modelname][0])


def _missing_weights_message(modelname: str, cache: Path, url: str, cause: str) -> str:
    return (
        f"LungMask(backend='lungmask'): no weights for lungmask model {modelname} ({cause}). "
        f"Download {url} on a machine with internet and either place it at {cache} "
        f"(the torch hub cache: $TORCH_HOME/hub/checkpoints/{cache.name}) or pass model_path='/path/to/{cache.name}'. "
        "Alternatives: backend='threshold' (offline, no weights), or give fixed_mask/moving_mask in the datalist."
    )


def _to_sitk(image: np.ndarray, affine: np.ndarray):
    """(X, Y, Z) array + RAS affine -> a SimpleITK image with the same world geometry (ITK is LPS)."""
    import SimpleITK as sitk

    spacing = CoordinateMapping(affine, image.shape).spacing.numpy()
    direction = _LPS_FLIP @ (affine[:3, :3] / spacing)
    origin = _LPS_FLIP @ affine[:3, 3]
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(image, (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(v) for v in direction.reshape(-1)])
    return img


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
class LungMask(Transform):
    """Lung mask of a CT in HU: channel-first ``(1, X, Y, Z)`` image -> 0/1 float32 mask, same grid.

    Args:
        backend: ``"lungmask"`` (the lungmask U-Net, see the module docstring) or ``"threshold"``
            (:func:`threshold_lung_mask`).
        model_path: lungmask weights file (a state dict of lungmask's U-Net); default: the torch hub
            cache, else download.
        modelname: lungmask model (``"R231"``).
        download: let lungmask download missing weights (set ``False`` to fail at once offline).
        force_cpu: run lungmask on the CPU even when a GPU is present.
        batch_size: lungmask's slice batch size.
        threshold_kwargs: extra arguments of :func:`threshold_lung_mask` (``threshold_hu``,
            ``closing_mm``, ...).

    Raises:
        ValueError: for an unknown backend, or an input that is not ``(1, X, Y, Z)``.
        FileNotFoundError: when ``model_path`` does not exist, or weights are missing and ``download=False``.
        RuntimeError: when the weights are missing and cannot be downloaded (names the weights file,
            where to place it and the alternatives).

    Example::

        >>> mask = LungMask(backend="threshold")(item["fixed_image"])  # doctest: +SKIP
        >>> mask.shape == item["fixed_image"].shape
        True

    Inputs without an affine (plain tensors/arrays) are taken as 1 mm RAS-ordered arrays.
    """

    def __init__(
        self,
        backend: str = "lungmask",
        model_path: str | os.PathLike | None = None,
        modelname: str = "R231",
        download: bool = True,
        force_cpu: bool = False,
        batch_size: int = 20,
        threshold_kwargs: dict | None = None,
    ) -> None:
        if backend not in LUNGMASK_BACKENDS:
            raise ValueError(f"unknown lung mask backend {backend!r}; expected one of {LUNGMASK_BACKENDS}")
        self.backend = backend
        self.model_path = None if model_path is None else Path(model_path).expanduser()
        self.modelname = modelname
        self.download = download
        self.force_cpu = force_cpu
        self.batch_size = batch_size
        self.threshold_kwargs = dict(threshold_kwargs or {})
        self._inferer = None

    # -------------------------------------------------------------- lungmask
    def inferer(self):
        """The (cached) ``lungmask.LMInferer``; loads the weights on first use."""
        if self._inferer is not None:
            return self._inferer
        lm_mask = _lungmask_module()
        if self.modelname not in lm_mask.MODEL_URLS:
            raise ValueError(f"unknown lungmask model {self.modelname!r}; expected one of {sorted(lm_mask.MODEL_URLS)}")
        url = lm_mask.MODEL_URLS[self.modelname][0]
        cache = lungmask_weights_file(self.modelname)
        kwargs = {"force_cpu": self.force_cpu, "batch_size": self.batch_size, "tqdm_disable": True}
        if self.model_path is not None:
            if not self.model_path.is_file():
                raise FileNotFoundError(_missing_weights_message(self.modelname, cache, url, f"model_path {self.model_path} does not exist"))
            path = self.model_path
        elif cache.is_file():
            path = cache
        elif not self.download:
            raise FileNotFoundError(_missing_weights_message(self.modelname, cache, url, f"{cache} does not exist and download=False"))
        else:
            path = None
        try:
            with warnings.catch_warnings():
                self._inferer = lm_mask.LMInferer(
                    modelname=self.modelname, modelpath=None if path is None else str(path), **kwargs
                )
        except Exception as e:  # a failed download raises URLError/HTTPError/OSError/...; a bad file many more
            if path is None:
                raise RuntimeError(
                    _missing_weights_message(self.modelname, cache, url, f"the download failed: {type(e).__name__}: {e}")
                ) from e
            raise RuntimeError(
                f"LungMask(backend='lungmask'): could not load lungmask weights from {path} ({type(e).__name__}: {e}); "
                f"expected a state dict of lungmask's U-Net as in {url}"
            ) from e
        return self._inferer

    def _lungmask(self, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
        labels = self.inferer().apply(_to_sitk(data, affine))  # (z, y, x), input array order
        return np.transpose(np.asarray(labels), (2, 1, 0)) > 0

    # -------------------------------------------------------------- call
    def __call__(self, img) -> MetaTensor:
        """Compute the mask of a ``(1, X, Y, Z)`` HU image (MetaTensor, tensor or array)."""
        data = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if data.ndim != 4 or data.shape[0] != 1:
            raise ValueError(
                f"LungMask expects a channel-first single-channel 3-D HU image (1, X, Y, Z), found shape {tuple(data.shape)}"
            )
        affine = getattr(img, "affine", None)
        affine = np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
        data = data[0].astype(np.float32, copy=False)
        if self.backend == "threshold":
            mask = threshold_lung_mask(data, affine, **self.threshold_kwargs)
        else:
            mask = self._lungmask(data, affine)
        out = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)[None])
        if isinstance(img, MetaTensor):
            meta = {k: v for k, v in img.meta.items() if k != "affine"}
            return MetaTensor(out, affine=img.affine.clone(), meta=meta)
        return MetaTensor(out, affine=torch.as_tensor(affine))


class LungMaskd(MapTransform):
    """Dictionary twin of :class:`LungMask`: adds a lung mask per image key, unless one is there.

    A mask already present under the output key (e.g. loaded from the datalist) always wins: it is
    kept as it is and nothing is computed for that image.

    Args:
        keys: image keys (HU, channel first), e.g. ``("fixed_image", "moving_image")``.
        mask_keys: output keys paired with ``keys`` by position; default: ``<name>_image`` ->
            ``<name>_mask``, any other key -> ``<key>_mask``.
        backend: see :class:`LungMask`.
        model_path: see :class:`LungMask`.
        allow_missing_keys: do not fail when an image key is absent.
        output_key: alias of ``mask_keys`` (one key per image key).
        kwargs: other arguments of :class:`LungMask` (``modelname``, ``download``, ``threshold_kwargs``, ...).

    Raises:
        ValueError: when ``mask_keys`` does not pair with ``keys``.

    Example::

        >>> item = LungMaskd(("fixed_image", "moving_image"), backend="threshold")(item)  # doctest: +SKIP
        >>> item["fixed_mask"].shape == item["fixed_image"].shape
        True
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_keys: KeysCollection | None = None,
        backend: str = "lungmask",
        model_path: str | os.PathLike | None = None,
        allow_missing_keys: bool = False,
        output_key: KeysCollection | None = None,
        **kwargs,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mask_keys is None:
            mask_keys = output_key
        if mask_keys is None:
            mask_keys = tuple(
                f"{k[: -len('_image')]}_mask" if str(k).endswith("_image") else f"{k}_mask" for k in self.keys
            )
        self.mask_keys = ensure_tuple(mask_keys)
        if len(self.mask_keys) != len(self.keys):
            raise ValueError(f"mask_keys {self.mask_keys} must pair with keys {self.keys} by position")
        self.lung_mask = LungMask(backend=backend, model_path=model_path, **kwargs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            if d.get(mask_key) is not None:
                continue  # a given mask wins
            d[mask_key] = self.lung_mask(d[key])
        return d

