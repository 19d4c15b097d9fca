"""Lung masks: the lungmask backend's wiring (real code path, test-written weights) and the threshold backend."""

from __future__ import annotations

import shutil
import urllib.error

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import affine_from_spacing
from monai_cidir.data.phantom import generate_breathing_phantom
from monai_cidir.transforms.lungmask import LungMask, LungMaskd, lungmask_weights_file, threshold_lung_mask

WEIGHTS_NAME = "unet_r231-d5d2fc3d.pth"


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    """The default-size phantom (the bundle's embedded data)."""
    return generate_breathing_phantom(seed=3)


@pytest.fixture(scope="module")
def r231_weights(tmp_path_factory):
    """A weights file of lungmask's own R231 architecture (its U-Net, 3 classes) with random weights."""
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    net = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    path = tmp_path_factory.mktemp("lungmask") / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


class _DarkIsLung(torch.nn.Module):
    """Stands in for the U-Net: class 1 where lungmask's normalised input is below -500 HU; records its input."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        hu = x * 1624.0 - 1024.0
        lung = (-500.0 - hu) / 10.0
        return torch.cat([torch.zeros_like(lung), lung, torch.full_like(lung, -1e3)], 1)


# ----------------------------------------------------------------------------------------------
# threshold backend
# ----------------------------------------------------------------------------------------------
def test_threshold_backend_matches_the_phantom_lungs(phantom):
    transform = LungMaskd(("fixed_image", "moving_image"), backend="threshold")
    out = transform({k: phantom[k] for k in ("fixed_image", "moving_image")})
    for side in ("fixed", "moving"):
        mask = out[f"{side}_mask"]
        assert isinstance(mask, MetaTensor) and mask.dtype == torch.float32
        assert mask.shape == phantom[f"{side}_image"].shape
        assert torch.equal(mask.affine, phantom[f"{side}_image"].affine)
        assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
        assert _dice(mask[0], phantom[f"{side}_mask"][0]) >= 0.95  # measured 0.995


def test_threshold_backend_removes_outside_air_trachea_and_stomach_gas(phantom):
    image = phantom["fixed_image"]
    mask = threshold_lung_mask(image[0], image.affine)
    hu = image[0].numpy()
    truth = phantom["fixed_mask"][0].numpy() > 0
    # every dark voxel outside the true lungs (outside air, trachea, bronchi, stomach gas) is excluded
    dark_outside = (hu < -900) & ~truth
    assert dark_outside.sum() > 1000
    assert (mask & dark_outside).sum() < 0.01 * dark_outside.sum()
    # the trachea above the lungs (top slices: +z is superior for this affine) is not lung
    assert mask[..., -5:].sum() == 0
    # without airway removal the trachea joins the mask
    with_airways = threshold_lung_mask(image[0], image.affine, remove_airways=False)
    assert with_airways[..., -5:].sum() > 0


def test_threshold_backend_is_orientation_independent(phantom):
    """A flipped/permuted array with the matching affine gives the same mask, permuted likewise."""
    image = phantom["fixed_image"]
    hu = image[0].numpy()
    ref = threshold_lung_mask(hu, image.affine)
    # reorder the array axes to (z, x, y), flip the new first axis, and fix the affine to match
    perm = hu.transpose(2, 0, 1)[::-1]
    aff = image.affine.numpy()
    n_z = hu.shape[2]
    new_aff = np.eye(4)
    new_aff[:3, 0] = -aff[:3, 2]
    new_aff[:3, 1] = aff[:3, 0]
    new_aff[:3, 2] = aff[:3, 1]
    new_aff[:3, 3] = aff[:3, 3] + aff[:3, 2] * (n_z - 1)
    got = threshold_lung_mask(np.ascontiguousarray(perm), new_aff)
    assert _dice(got[::-1].transpose(1, 2, 0), ref) > 0.99


def test_real_ct_threshold_volume(shared_dir):
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True, ensure_channel_first=True)(str(shared_dir / "data" / "chest_ct.nii.gz"))
    mask = LungMask(backend="threshold")(image)
    voxel_ml = abs(float(torch.linalg.det(image.affine[:3, :3]))) / 1000.0
    volume = float(mask.sum()) * voxel_ml
    assert 3000.0 < volume < 7500.0  # measured 5473 ml, a breath-hold chest CT
    # the trachea in the top slices (above the lung apices) is excluded
    assert float(mask[0, :, :, -6:].sum()) == 0.0


# ----------------------------------------------------------------------------------------------
# lungmask backend
# ----------------------------------------------------------------------------------------------
def test_lungmask_backend_runs_with_a_weights_file(r231_weights, phantom):
    """The real lungmask path (LMInferer, R231 architecture) on test-written random weights."""
    image = phantom["fixed_image"]
    crop = MetaTensor(image[..., 40:42].as_tensor(), affine=image.affine.clone())
    mask = LungMask(backend="lungmask", weights=r231_weights)(crop)
    assert isinstance(mask, MetaTensor) and mask.shape == crop.shape and mask.dtype == torch.float32
    assert torch.equal(mask.affine, crop.affine)
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("layout", ["LPS", "RAS", "permuted"])
def test_lungmask_backend_orientation(r231_weights, layout):
    """lungmask sees axial slices in its LPS display order whatever our array order; labels come back on our grid.

    A dark blob at the patient's right-anterior must reach the network in the upper-left quadrant
    of its slices (rows run anterior -> posterior, columns right -> left), and the mask must
    land on the blob in our array.
    """
    if layout == "permuted":  # array axes = (S, R, A)
        shape, spacing = (6, 40, 36), (3.0, 0.8, 0.8)
        direction = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    else:
        shape, spacing = (40, 36, 6), (0.8, 0.8, 3.0)
        direction = np.diag([-1.0, -1.0, 1.0]) if layout == "LPS" else np.eye(3)
    affine = affine_from_spacing(spacing, (5.0, -7.0, 11.0), direction)
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    centre = world.reshape(-1, 3).mean(0)
    blob = ((world[..., 0] - centre[0] - 8.0) / 5.0) ** 2 + ((world[..., 1] - centre[1] - 6.0) / 3.5) ** 2 <= 1.0
    hu = np.where(blob, -900.0, 40.0).astype(np.float32)
    image = MetaTensor(torch.from_numpy(hu[None]), affine=torch.as_tensor(affine))
    transform = LungMask(backend="lungmask", weights=r231_weights)
    fake = _DarkIsLung()
    transform.inferer().model = fake
    mask = transform(image)
    assert mask.shape == image.shape
    assert _dice(mask[0], blob) > 0.9
    seen = torch.cat(fake.seen)[:, 0] * 1624.0 - 1024.0 < -500.0  # (slices, rows, columns)
    rows, cols = torch.nonzero(seen)[:, 1:].double().mean(0)
    size = seen.shape[-1]
    assert rows < 0.4 * size and cols < 0.4 * size  # anterior = top, patient right = left


def test_lungmask_uses_the_torch_hub_cache(r231_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = lungmask_weights_file("R231")
    assert cache == tmp_path / "hub" / "checkpoints" / WEIGHTS_NAME
    cache.parent.mkdir(parents=True)
    shutil.copy(r231_weights, cache)
    inferer = LungMask(backend="lungmask", download=False).inferer()
    reference = torch.load(r231_weights)
    assert torch.equal(inferer.model.state_dict()["last.bias"], reference["last.bias"])


def test_missing_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    image = MetaTensor(torch.zeros(1, 8, 8, 2), affine=torch.eye(4, dtype=torch.float64))
    # a weights file that does not exist (and its former name, model_path)
    for kwargs in ({"weights": tmp_path / "nope.pth"}, {"model_path": tmp_path / "nope.pth"}):
        with pytest.raises(FileNotFoundError, match=r"nope\.pth does not exist.*unet_r231-d5d2fc3d\.pth.*backend='threshold'"):
            LungMask(backend="lungmask", **kwargs)(image)
    with pytest.raises(ValueError, match="give the lungmask weights once"):
        LungMask(backend="lungmask", weights=tmp_path / "a.pth", model_path=tmp_path / "b.pth")
    # nothing cached, downloads disabled
    with pytest.raises(FileNotFoundError, match=r"hub/checkpoints/unet_r231-d5d2fc3d\.pth.*download=False"):
        LungMask(backend="lungmask", download=False)(image)

    # nothing cached, no network: the download error is turned into the same advice
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as info:
        LungMask(backend="lungmask")(image)
    message = str(info.value)
    for part in ("download failed", WEIGHTS_NAME, str(tmp_path / "hub" / "checkpoints"), "weights=", "backend='threshold'", "datalist"):
        assert part in message


def test_bad_weights_file_and_bad_input(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a state dict")
    image = MetaTensor(torch.zeros(1, 8, 8, 2), affine=torch.eye(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="could not load lungmask weights from .*broken.pth"):
        LungMask(backend="lungmask", model_path=bad)(image)
    with pytest.raises(ValueError, match=r"\(1, X, Y, Z\).*\(8, 8, 2\)"):
        LungMask(backend="threshold")(torch.zeros(8, 8, 2))
    with pytest.raises(ValueError, match="unknown lung mask backend"):
        LungMask(backend="otsu")


# ----------------------------------------------------------------------------------------------
# dictionary twin
# ----------------------------------------------------------------------------------------------
def test_given_masks_win_and_keys():
    hu = np.full((1, 24, 24, 16), 40.0, dtype=np.float32)
    hu[0, 4:10, 6:18, 3:13] = -850.0
    hu[0, 14:20, 6:18, 3:13] = -850.0
    image = MetaTensor(torch.from_numpy(hu), affine=torch.as_tensor(affine_from_spacing((4.0, 4.0, 4.0))))
    given = MetaTensor(torch.ones(1, 24, 24, 16), affine=image.affine.clone())
    out = LungMaskd(("fixed_image", "moving_image"), backend="threshold")(
        {"fixed_image": image, "moving_image": image, "fixed_mask": given}
    )
    assert out["fixed_mask"] is given  # from the datalist: untouched
    assert float(out["moving_mask"].sum()) == float((hu < 0).sum())  # computed: the two blocks
    # explicit output key (alias output_key), missing keys allowed
    out = LungMaskd("ct", output_key="lungs", backend="threshold", allow_missing_keys=True)({"ct": image})
    assert float(out["lungs"].sum()) == float((hu < 0).sum())
    assert LungMaskd("ct", backend="threshold", allow_missing_keys=True)({"other": 1}) == {"other": 1}
    with pytest.raises(ValueError, match="pair with keys"):
        LungMaskd(("fixed_image", "moving_image"), mask_keys="only_one", backend="threshold")
