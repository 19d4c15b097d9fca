"""Lung masks from CT in HU: the lungmask U-Net (R231) or an offline classical threshold method.

``LungMask`` (array) and ``LungMaskd`` (dictionary) return a 0/1 float32 MetaTensor on the
image's grid (same shape and affine). Two backends:

* ``"lungmask"``: the `lungmask <https://github.com/JoHof/lungmask>`_ package (Hofmanninger et al.
  2020), model R231, run on the image as a SimpleITK image built from the MetaTensor's affine
  (so lungmask sees the LPS orientation it was trained on, whatever the array order). Weights
  come from a local file (``weights="/path/to/unet_r231-d5d2fc3d.pth"``, for offline sites) or from the torch hub cache
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

from monai_cidir.coordinates import CoordinateMapping
from monai_cidir.transforms.lung_threshold import threshold_lung_mask

__all__ = [
    "LungMask",
    "LungMaskd",
    "threshold_lung_mask",
    "lungmask_weights_file",
    "LUNGMASK_BACKENDS",
]

#: the backends of :class:`LungMask`.
LUNGMASK_BACKENDS = ("lungmask", "threshold")


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
        f"(the torch hub cache: $TORCH_HOME/hub/checkpoints/{cache.name}) or pass weights='/path/to/{cache.name}' (lung_mask_kwargs={{'weights': ...}} in the engines). "
        "Alternatives: backend='threshold' (offline, no weights), or give fixed_mask/moving_mask in the datalist."
    )


def _to_sitk(image: np.ndarray, affine: np.ndarray):
    """(X, Y, Z) array + RAS affine -> a SimpleITK image with the same world geometry (ITK is LPS)."""
    import SimpleITK as sitk

    origin, spacing, direction = CoordinateMapping(affine, image.shape).itk_geometry()
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
        weights: a local lungmask weights file (a state dict of lungmask's U-Net, e.g.
            ``unet_r231-d5d2fc3d.pth``) for offline sites; default: the torch hub cache, else download.
        model_path: the former name of ``weights`` (kept as an alias).
        modelname: lungmask model (``"R231"``).
        download: let lungmask download missing weights (set ``False`` to fail at once offline).
        force_cpu: run lungmask on the CPU even when a GPU is present.
        batch_size: lungmask's slice batch size.
        threshold_kwargs: extra arguments of :func:`threshold_lung_mask` (``threshold_hu``,
            ``closing_mm``, ...).

    Raises:
        ValueError: for an unknown backend, or an input that is not ``(1, X, Y, Z)``.
        FileNotFoundError: when ``weights`` does not exist, or weights are missing and ``download=False``.
        RuntimeError: when the weights are missing and cannot be downloaded (names the weights file,
            where to place it and the alternatives).

    Example::

        >>> mask = LungMask(backend="threshold")(item["fixed_image"])  # doctest: +SKIP
        >>> mask.shape == item["fixed_image"].shape
        True
        >>> LungMask(backend="lungmask", weights="/data/weights/unet_r231-d5d2fc3d.pth")  # offline  # doctest: +SKIP

    The output's ``meta["lung_mask_backend"]`` names the backend (a computed mask, see
    :class:`~monai_cidir.transforms.CheckLungMask`). Inputs without an affine (plain tensors/arrays) are taken as 1 mm RAS-ordered arrays.
    """

    def __init__(
        self,
        backend: str = "lungmask",
        weights: str | os.PathLike | None = None,
        modelname: str = "R231",
        download: bool = True,
        force_cpu: bool = False,
        batch_size: int = 20,
        threshold_kwargs: dict | None = None,
        model_path: str | os.PathLike | None = None,
    ) -> None:
        if backend not in LUNGMASK_BACKENDS:
            raise ValueError(f"unknown lung mask backend {backend!r}; expected one of {LUNGMASK_BACKENDS}")
        if weights is not None and model_path is not None and Path(weights) != Path(model_path):
            raise ValueError(f"give the lungmask weights once: weights={weights!r} and model_path={model_path!r} differ")
        weights = weights if weights is not None else model_path
        self.backend = backend
        self.weights = None if weights is None else Path(weights).expanduser()
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
        if self.weights is not None:
            if not self.weights.is_file():
                raise FileNotFoundError(_missing_weights_message(self.modelname, cache, url, f"the weights file {self.weights} does not exist"))
            path = self.weights
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
        meta = {k: v for k, v in img.meta.items() if k != "affine"} if isinstance(img, MetaTensor) else {}
        meta["lung_mask_backend"] = self.backend
        return MetaTensor(out, affine=torch.as_tensor(affine), meta=meta)


class LungMaskd(MapTransform):
    """Dictionary twin of :class:`LungMask`: adds a lung mask per image key, unless one is there.

    A mask already present under the output key (e.g. loaded from the datalist) always wins: it is
    kept as it is and nothing is computed for that image.

    Args:
        keys: image keys (HU, channel first), e.g. ``("fixed_image", "moving_image")``.
        mask_keys: output keys paired with ``keys`` by position; default: ``<name>_image`` ->
            ``<name>_mask``, any other key -> ``<key>_mask``.
        backend: see :class:`LungMask`.
        weights: see :class:`LungMask` (``model_path`` is accepted as its former name).
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
        weights: str | os.PathLike | None = None,
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
        self.lung_mask = LungMask(backend=backend, weights=weights, **kwargs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            if d.get(mask_key) is not None:
                continue  # a given mask wins
            d[mask_key] = self.lung_mask(d[key])
        return d

