"""multi_gpu_train.json: a 2-process CPU torchrun splits 2 phantom patients across the ranks.

Each rank trains a different patient (one INR each, Gloo on CPU) and rank 0 writes a cohort
table with both. Per-patient TRE before registration is checked against the landmarks: if a
process group existed during training, MONAI's cumulative metrics would average the ranks'
patients together.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "cidir_lung_ct"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_partitions_patients_across_ranks(tmp_path):
    from monai_cidir.data import RegistrationPairDataset
    from monai_cidir.engines import landmark_tre

    configs = [str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "multi_gpu_train.json")]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", str(configs),
        "--phantom#shape", "[48,48,32]", "--phantom#spacing", "[5.6,5.6,8.0]", "--phantom#num_landmarks", "50", "--phantom#num_patients", "2",
        "--max_iterations", "15", "--num_points", "400", "--num_alphas", "3", "--affine_prealign", "false",
        "--log_every", "100",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # each rank got its own patient
    assigned = dict(re.findall(r"rank (\d) of 2: patient indices \[(\d)\]", log))
    assert assigned == {"0": "0", "1": "1"}, log[-4000:]
    with open(tmp_path / "outputs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["phantom_seed0", "phantom_seed1"]
    assert not list((tmp_path / "outputs").glob("metrics_rank*.csv"))
    assert "phantom_seed1" in proc.stdout  # rank 0 printed the whole cohort

    # metrics are each patient's own (not averaged across ranks by a live process group)
    dataset = RegistrationPairDataset(str(tmp_path / "data" / "cidir_phantom" / "datalist.json"))
    for item in dataset:
        m = json.loads((tmp_path / "outputs" / item["name"] / "metrics.json").read_text())
        assert m["tre_before_mean"] == pytest.approx(landmark_tre(None, None, item)["mean"], abs=1e-9)
        assert m["tre_after_mean"] < m["tre_before_mean"]
