"""benchmarks/selection_rule.py replays the lung-Dice rule on stored alpha curves (no model needed)."""

from __future__ import annotations

import pytest

from benchmarks.selection_rule import main, replay


def _curve(path, rows):
    path.write_text("alpha,dice,folding,seconds,tre\n" + "".join(f"{a},{d},0,0.1,{t}\n" for a, d, t in rows))
    return path


def test_replay_gives_choice_oracle_and_loss():
    # creeping Dice towards alpha 0 while the TRE rises: a tight tie follows the Dice, a wider one does not
    rows = [{"alpha": 0.0, "dice": 0.9850, "folding": 0.0, "tre": 0.50}, {"alpha": 0.1, "dice": 0.9843, "folding": 0.0, "tre": 0.30},
            {"alpha": 1.0, "dice": 0.9838, "folding": 0.0, "tre": 0.25}]  # fmt: skip
    r = replay(rows, [1e-4, 1e-3, 2e-3])
    assert (r["oracle_alpha"], r["oracle_tre"]) == (1.0, 0.25)
    assert [v["alpha"] for v in r["rules"].values()] == [0.0, 0.1, 1.0]
    assert [v["loss"] for v in r["rules"].values()] == pytest.approx([0.25, 0.05, 0.0])


def test_curves_option_writes_the_table(tmp_path, capsys):
    curve = _curve(tmp_path / "alpha_curve_x.csv", [(0, 0.9850, 0.5), (0.1, 0.9843, 0.3), (1, 0.9838, 0.25)])
    out = tmp_path / "rule.md"
    assert main(["--curves", str(curve), "--tolerances", "1e-4,2e-3", "--markdown", str(out)]) == 0
    table = out.read_text()
    assert "| alpha_curve_x | 1: 0.250 | 0, 0.500, +0.250 | 1, 0.250, +0.000 |" in table
    bad = _curve(tmp_path / "no_tre.csv", [])
    bad.write_text("alpha,dice,folding\n0,0.9,0\n")
    with pytest.raises(SystemExit, match="expected an alpha_curve.csv with a 'tre' column"):
        main(["--curves", str(bad)])
