"""Runs README's "Use the components in your own MONAI pipeline" example (readme_example.py)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).with_name("readme_example.py")


def test_readme_example_registers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes ./example_data
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"TRE ([\d.]+) mm -> ([\d.]+) mm", out).groups())
    assert before > 2.0
    assert after < 0.6 * before


def test_readme_example_is_delimited():
    text = EXAMPLE.read_text()
    assert text.count("# --- README example begins ---") == 1 and text.count("# --- README example ends ---") == 1
