"""benchmarks/compare.py end to end on a tiny phantom with tiny budgets (one process per run)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.peers.elastix import elastix_available  # noqa: E402
from monai_cidir.engines import alpha_grid  # noqa: E402


@pytest.mark.slow
def test_compare_tiny_phantom(tmp_path):
    methods = ["cidir"] + (["elastix_default"] if elastix_available() else [])
    args = [
        "--cases", "phantom_s0", "--phantom-shape", "40", "40", "28", "--methods", ",".join(methods),
        "--iterations", "12", "--num-points", "300", "--time-limit", "30", "--eval-every", "0.2", "--num-alphas", "3",
        "--engine-option", "affine_prealign=false", "--elastix-max-iterations", "5", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compare.py"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    rows = {r["method"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    assert sorted(rows) == sorted(methods)
    assert all(not r["error"] for r in rows.values())
    before = {float(r["tre_before_mean"]) for r in rows.values()}
    assert len(before) == 1 and before.pop() > 2.0  # the same data for every method
    for r in rows.values():
        assert float(r["tre_mean"]) < 0.8 * float(r["tre_before_mean"])  # every method registers
        assert float(r["dice"]) > float(r["dice_before"])
        assert float(r["peak_rss_mb"]) >= float(r["import_rss_mb"]) > 50
        assert float(r["folding"]) < 0.01
        assert float(r["tre_p95"]) >= float(r["tre_mean"])
    c = rows["cidir"]
    assert int(c["iterations"]) == 12 and float(c["seconds_per_step"]) > 0
    grid = alpha_grid(0.0, 1.0, 3, "log-uniform")  # the default prior's selection grid: 0, 1e-3, 1
    assert float(c["alpha_oracle"]) == pytest.approx(min(grid, key=lambda a: abs(a - float(c["alpha_oracle"]))))
    assert float(c["alpha"]) == pytest.approx(min(grid, key=lambda a: abs(a - float(c["alpha"]))))
    assert float(c["tre_oracle_mean"]) <= float(c["tre_mean"]) + 1e-9
    md = (out / "compare.md").read_text()
    assert "python benchmarks/compare.py --cases phantom_s0" in md and "## Targets" in md
    assert "21-value alpha sweep, phantom_s0" in md
    assert (out / "curves_phantom_s0.png").stat().st_size > 1000
    import json

    curve = json.loads((out / "runs" / "phantom_s0__cidir" / "run.json").read_text())["curve"]
    assert curve[0][1] == 0 and curve[-1][1] == 12
    assert curve[0][2] == pytest.approx(float(c["tre_before_mean"]), abs=0.3)  # starts near the identity
    assert curve[-1][2] < curve[0][2]
    from monai_cidir.engines import load_registration_model

    model = load_registration_model(next((out / "runs" / "phantom_s0__cidir").rglob("model.pt")))
    assert model.network.alpha_encoding == "log"  # the bundle's network (register_patient's default), not the paper's linear input
    # the TRE per alpha on the selection's grid, computed here from model.pt and the phantom's files:
    # the oracle is its minimum, the cost of the Dice choice is the chosen alpha's TRE minus it
    from monai_cidir.data import RegistrationPairDataset

    item = RegistrationPairDataset(out / "data" / "phantom_s0" / "datalist.json")[0]
    per_alpha = {a: float((model.transform_points(item["fixed_landmarks"], a) - item["moving_landmarks"]).norm(dim=1).mean()) for a in grid}
    assert float(c["tre_oracle_mean"]) == pytest.approx(min(per_alpha.values()), abs=1e-4)
    chosen = min(grid, key=lambda a: abs(a - float(c["alpha"])))
    assert float(c["tre_loss_dice_choice"]) == pytest.approx(per_alpha[chosen] - min(per_alpha.values()), abs=1e-4)
    # benchmarks/alpha_sweep.py on the trained model: the band sweep equals the whole-grid sweep
    from benchmarks.alpha_sweep import main as sweep_main, sweep_case

    r = sweep_case(out / "runs" / "phantom_s0__cidir", num_alphas=5)
    assert r["max_dice_difference"] <= 1e-7 and r["band_alpha"] == r["whole_alpha"]
    assert r["band_points"][2] < r["grid_points"]  # (min, mean, max) points mapped per alpha
    assert sweep_main(["--output", str(out), "--num-alphas", "3", "--markdown", str(out / "sweep.md")]) == 0
    assert "| phantom_s0 |" in (out / "sweep.md").read_text()
