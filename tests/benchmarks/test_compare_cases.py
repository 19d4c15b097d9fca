"""benchmarks/compare.py case selection: DIR-LAB from a user's folder, skips, the run plan."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.compare import _plan, build_parser, prepare_cases  # noqa: E402
from benchmarks.methods import load_case  # noqa: E402
from monai_cidir.data import dirlab_affine  # noqa: E402


def _fake_dirlab_case1(root: Path, rng: np.random.Generator) -> np.ndarray:
    """DIR-LAB case 1 as distributed (headerless int16 HU+1024, z-y-x order, 1-based landmarks)."""
    size = (256, 256, 94)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size], indexing="ij")
    body = ((x - 128) / 110) ** 2 + ((y - 128) / 90) ** 2 < 1
    lungs = (((np.abs(x - 128) - 50) / 35) ** 2 + ((y - 120) / 55) ** 2 + ((z - 47) / 40) ** 2) < 1
    hu = np.full(size, -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[lungs] = -850.0
    folder = root / "Case1Pack"
    (folder / "Images").mkdir(parents=True)
    (folder / "ExtremePhases").mkdir()
    for phase in ("T00", "T50"):
        raw = (hu + 1024).astype("<i2").transpose(2, 1, 0)  # (z, y, x) on disk
        raw.tofile(folder / "Images" / f"case1_{phase}_s.img")
    inside = np.argwhere(lungs)
    picks = inside[rng.choice(len(inside), 300, replace=False)] + 1  # 1-based voxel indices
    for phase in ("T00", "T50"):
        lines = "".join(f"{a}\t{b}\t{c}\r\n" for a, b, c in picks)
        (folder / "ExtremePhases" / f"Case1_300_{phase}_xyz.txt").write_text(lines, newline="")
    return picks


def test_dirlab_cases_load_with_masks(tmp_path):
    picks = _fake_dirlab_case1(tmp_path / "dirlab", np.random.default_rng(0))
    args = build_parser().parse_args(
        ["--cases", "dirlab", "--dirlab", str(tmp_path / "dirlab"), "--dirlab-cases", "1,2", "--output", str(tmp_path / "out")]
    )
    cases, skipped = prepare_cases(args)
    assert [c["name"] for c in cases] == ["dirlab_case01"] and cases[0]["group"] == "dirlab"
    assert len(skipped) == 1 and skipped[0].startswith("dirlab_case02:")  # absent case 2 is skipped, named
    item = load_case(cases[0]["record"])
    affine = dirlab_affine(1)
    expected = torch.from_numpy((picks - 1.0) @ affine[:3, :3].T + affine[:3, 3])  # world RAS mm
    assert torch.allclose(item["fixed_landmarks"], expected, atol=1e-6)
    assert item["fixed_image"].shape == (1, 256, 256, 94)
    assert float(item["fixed_image"].min()) == -1000.0
    mask = item["fixed_mask"][0] > 0
    lungs = (item["fixed_image"][0] - (-850.0)).abs() < 1  # the lung voxels as drawn
    inter = float((mask & lungs).sum())
    assert 2 * inter / float(mask.sum() + lungs.sum()) > 0.9  # the threshold backend found the lungs


def test_absent_data_is_skipped_and_plan(tmp_path):
    args = build_parser().parse_args(
        ["--cases", "phantom_s1,chest,dirlab,nonsense", "--chest-ct", str(tmp_path / "missing.nii.gz"),
         "--phantom-shape", "32", "32", "24", "--output", str(tmp_path / "out")]
    )  # fmt: skip
    cases, skipped = prepare_cases(args)
    assert [c["name"] for c in cases] == ["phantom_s1"]
    text = " ".join(skipped)
    assert "missing.nii.gz not found" in text and "no --dirlab PATH" in text and "nonsense: unknown case" in text
    two = [{"name": "a", "group": "phantom"}, {"name": "b", "group": "phantom"}, {"name": "c", "group": "chest"}]
    methods = ["cidir", "idir_autograd"]
    assert [(c["name"], m) for c, m in _plan(two, methods, "first")] == [("a", "cidir"), ("a", "idir_autograd"), ("b", "cidir"), ("c", "cidir")]
    assert sum(m == "idir_autograd" for _, m in _plan(two, methods, "groups")) == 2
    assert sum(m == "idir_autograd" for _, m in _plan(two, methods, "all")) == 3


@pytest.mark.parametrize("bad", ["--methods=cidir,demons", "--engine-option=oops"])
def test_bad_arguments_exit_with_a_message(tmp_path, bad, capsys):
    from benchmarks.compare import main

    with pytest.raises(SystemExit) as e:
        main(["--cases", "phantom_s0", bad, "--estimate", "--output", str(tmp_path)])
    assert "demons" in str(e.value) or "KEY=VALUE" in str(e.value)
