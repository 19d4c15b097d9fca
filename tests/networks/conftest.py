"""Fixtures for the network tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Run these small-tensor tests on one thread.

    They consist of many tiny ops; with two OpenMP threads on a shared, busy machine each
    parallel region can wait for a descheduled thread (measured: 3 s on one thread against
    30-60 s on two at load average 8). The results do not depend on the thread count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
