"""README.md stays true: the quick-start blocks CI runs exist, and the pipeline example is the tested file."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example_block() -> str:
    text = (ROOT / "tests" / "bundle" / "readme_example.py").read_text()
    return text.split("# --- README example begins ---\n")[1].split("# --- README example ends ---")[0].strip()


def test_readme_example_is_the_tested_file():
    readme = (ROOT / "README.md").read_text()
    assert _example_block() in readme


def test_quick_start_blocks_present():
    readme = (ROOT / "README.md").read_text()
    run = readme.split("<!-- ci:run -->", 1)[1].split("```")[1]
    test = readme.split("<!-- ci:test -->", 1)[1].split("```")[1]
    assert "pip install torch==2.13.0" in run and "python -m monai.bundle run training" in run
    assert "bundles/cidir_lung_ct/configs/train.json" in run
    assert (ROOT / "bundles/cidir_lung_ct/configs/train.json").is_file()
    assert "pytest" in test and '".[test]"' in test
