"""Landmark files: every format lands on the same world RAS points; writers round-trip; clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing, ras_to_lps
from monai_cidir.data import LandmarkFormatError, detect_landmark_format, load_landmarks, save_landmarks


@pytest.fixture
def reference():
    """An oblique, anisotropic, off-origin grid: a landmark at voxel v must come out at affine @ v."""
    t = math.radians(20.0)
    rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    affine = affine_from_spacing((0.8, 1.2, 2.5), origin=(-120.0, 35.0, -60.0), direction=rot @ np.diag([-1, -1, 1]))
    return MetaTensor(torch.zeros(1, 30, 20, 10), affine=torch.as_tensor(affine))


@pytest.fixture
def voxels():
    return np.array([[0, 0, 0], [29, 19, 9], [10, 5, 3], [7, 13, 8]], dtype=np.int64)  # 0-based


def _expected(reference, voxels) -> torch.Tensor:
    a = reference.affine.to(torch.float64)
    return torch.as_tensor(voxels, dtype=torch.float64) @ a[:3, :3].T + a[:3, 3]


def _write(path, text, crlf=False):
    path.write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode())
    return path


def test_dirlab_txt_one_based_crlf(tmp_path, reference, voxels):
    body = "".join("\t".join(str(v + 1) for v in row) + "\n" for row in voxels)
    path = _write(tmp_path / "case_300_T00_xyz.txt", body, crlf=True)
    assert detect_landmark_format(path) == "dirlab"
    pts = load_landmarks(path, reference_image=reference)
    assert pts.dtype == torch.float64 and pts.shape == (4, 3)
    torch.testing.assert_close(pts, _expected(reference, voxels), rtol=0, atol=1e-9)
    # the contract: inverse(affine) @ point is the voxel index
    torch.testing.assert_close(
        CoordinateMapping.from_image(reference).world_to_index(pts), torch.as_tensor(voxels, dtype=torch.float64)
    )
    # a 4x4 affine or a CoordinateMapping works as reference too
    torch.testing.assert_close(load_landmarks(path, reference_image=reference.affine), pts)
    torch.testing.assert_close(load_landmarks(path, reference_image=CoordinateMapping.from_image(reference)), pts)


def test_voxel_formats_need_a_reference(tmp_path):
    path = _write(tmp_path / "lm.txt", "1\t2\t3\n")
    with pytest.raises(ValueError, match="reference_image"):
        load_landmarks(path)


def test_elastix_index_and_point(tmp_path, reference, voxels):
    expected = _expected(reference, voxels)
    body = "index\n4\n" + "".join(" ".join(str(v) for v in row) + "\n" for row in voxels)
    path = _write(tmp_path / "index.txt", body)
    torch.testing.assert_close(load_landmarks(path, reference_image=reference), expected, rtol=0, atol=1e-9)
    lps = ras_to_lps(expected).numpy()
    body = "point\n4\n" + "".join(" ".join(f"{v:.10f}" for v in row) + "\n" for row in lps)
    path = _write(tmp_path / "point.txt", body)
    torch.testing.assert_close(load_landmarks(path), expected, rtol=0, atol=1e-9)  # no reference needed


def test_transformix_output_points(tmp_path, reference, voxels):
    expected = _expected(reference, voxels)
    moved = expected + torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64)
    lines = []
    for i, (v, p, q) in enumerate(zip(voxels, ras_to_lps(expected).numpy(), ras_to_lps(moved).numpy())):
        fmt = lambda a: " ".join(f"{x:.6f}" for x in a)  # noqa: E731
        lines.append(
            f"Point\t{i}\t; InputIndex = [ {' '.join(map(str, v))} ]\t; InputPoint = [ {fmt(p)} ]\t; "
            f"OutputIndexFixed = [ 0 0 0 ]\t; OutputPoint = [ {fmt(q)} ]\t; Deformation = [ 1.5 2.0 3.25 ]\n"
        )
    path = _write(tmp_path / "outputpoints.txt", "".join(lines))
    assert detect_landmark_format(path) == "transformix"
    torch.testing.assert_close(load_landmarks(path), moved, rtol=0, atol=1e-5)
    torch.testing.assert_close(load_landmarks(path, transformix_field="InputPoint"), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        load_landmarks(path, reference, transformix_field="InputIndex"), expected, rtol=0, atol=1e-9
    )


def test_csv_lps_header(tmp_path, reference, voxels):
    expected = _expected(reference, voxels)
    lps = ras_to_lps(expected).numpy()
    body = "label,X,Y,Z\n" + "".join(f"p{i},{x:.10f},{y:.10f},{z:.10f}\n" for i, (x, y, z) in enumerate(lps))
    path = _write(tmp_path / "lm.csv", body, crlf=True)
    torch.testing.assert_close(load_landmarks(path), expected, rtol=0, atol=1e-9)


def test_fcsv_ras_and_lps(tmp_path):
    ras = torch.tensor([[10.0, -20.0, 30.0]], dtype=torch.float64)
    header = (
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = {}\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
    )
    row = "vtkMRMLMarkupsFiducialNode_0,{},0,0,0,1,1,1,0,F-1,,\n"
    p1 = _write(tmp_path / "ras.fcsv", header.format("RAS") + row.format("10,-20,30"))
    p2 = _write(tmp_path / "lps.fcsv", header.format("LPS") + row.format("-10,20,30"))
    torch.testing.assert_close(load_landmarks(p1), ras)
    torch.testing.assert_close(load_landmarks(p2), ras)


@pytest.mark.parametrize("name, head", [("out.csv", "x,y,z"), ("out.txt", "point"), ("out.fcsv", "# Markups")])
def test_save_load_round_trip_in_lps(tmp_path, name, head):
    pts = torch.tensor([[1.25, -2.5, 3.0], [-100.123456, 50.5, -7.75]], dtype=torch.float64)
    path = save_landmarks(tmp_path / "sub" / name, pts)
    text = path.read_text()
    assert text.startswith(head)
    assert "-1.250000" in text and "2.500000" in text  # stored as LPS: x and y negated
    torch.testing.assert_close(load_landmarks(path), pts, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_error_names_path_line_expected_found(tmp_path, reference):
    path = _write(tmp_path / "bad.txt", "1\t2\t3\n4\t5\n")
    with pytest.raises(LandmarkFormatError) as e:
        load_landmarks(path, reference_image=reference)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and "expected 3" in msg and "found 2" in msg


def test_elastix_count_mismatch(tmp_path):
    path = _write(tmp_path / "p.txt", "point\n3\n1 2 3\n4 5 6\n")
    with pytest.raises(LandmarkFormatError, match="announces 3 points, found 2"):
        load_landmarks(path)


def test_csv_without_xyz_header(tmp_path):
    path = _write(tmp_path / "p.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(LandmarkFormatError, match="x,y,z"):
        load_landmarks(path)


def test_undetectable_format(tmp_path):
    path = _write(tmp_path / "p.txt", "1.5 2.5 3.5\n")  # headerless floats: neither DIR-LAB nor a known header
    with pytest.raises(LandmarkFormatError, match="format="):
        load_landmarks(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_landmarks(tmp_path / "nope.csv")


def test_save_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        save_landmarks(tmp_path / "x.csv", torch.zeros(3, 2))
