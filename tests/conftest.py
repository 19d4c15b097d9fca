"""Shared pytest fixtures.

``shared_dir`` is the project's ``../shared`` folder (real CT, DIR-LAB landmark files);
tests that need it skip cleanly when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("MONAI_CIDIR_SHARED", REPO_ROOT.parent / "shared"))

# CI has 2 cores: keep torch from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` folder beside the checkout; skips the test when absent."""
    if not (SHARED_DIR / "data").is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DIR / 'data'}")
    return SHARED_DIR
