"""Fault injection: does the test suite fail when the behaviour breaks?

Each fault is one exact text substitution in the package (or a benchmark script) that breaks one
documented behaviour: the sign of the loss, the bending scale, the RAS/LPS flip of the exported
field, the quality check's verdict, resuming an interrupted patient, the alpha choice, ... The
tool copies the repository (``monai_cidir/``, ``tests/``, ``bundles/``, ``benchmarks/`` without its
results, ``pyproject.toml``) to a temporary folder, first runs every selected test there unchanged
(they must pass, otherwise "caught" means nothing), then for each fault applies its substitution,
runs the few tests that guard that behaviour (``PYTHONPATH`` at the copy), records whether they
failed, and restores the file. It prints a Markdown table (fault, file, tests run, caught or not,
seconds) and exits 1 when a fault is not caught, the clean run fails, or a substitution does not
match exactly once (the code moved: update the fault here).

Run it after each large change. Each fault runs only its few tests: from seconds (unit tests) to one
training of the end-to-end fixtures (``tests/engines/test_registration.py``, 150 iterations) for the
faults that need a trained model; ``--only`` narrows the run, ``--skip-clean`` skips the clean run::

    python benchmarks/fault_injection.py                      # every fault
    python benchmarks/fault_injection.py --only scale,resume  # faults whose name contains a word
    python benchmarks/fault_injection.py --list               # the faults and their tests
    python benchmarks/fault_injection.py --markdown benchmarks/results/fault_injection/table.md

Adding a fault: a :class:`Fault` with the file, the exact old text (unique in that file), the new
text, and the narrowest tests that should fail (pytest node ids relative to the repository root).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("monai_cidir", "tests", "bundles", "benchmarks", "pyproject.toml")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "results")

REG = "tests/engines/test_registration.py"


@dataclasses.dataclass(frozen=True)
class Fault:
    """One injected fault: replace ``old`` (exactly once) by ``new`` in ``path``; ``tests`` must fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


FAULTS: tuple[Fault, ...] = (
    # ------------------------------------------------------------------ the holes issue 29 closed
    Fault(
        "quality-failed patient no longer fails the cohort (API)",
        "monai_cidir/engines/registration.py",
        'failed = [r["name"] for r in rows if r.get("status") == "failed"]',
        'failed = [r["name"] for r in rows if r.get("error")]',
        ("tests/engines/test_quality.py::test_a_patient_worse_than_its_affine_fails_the_cohort",),
    ),
    Fault(
        "quality-failed patient no longer makes the bundle exit 1",
        "monai_cidir/engines/bundle.py",
        'failed = [r for r in rows if r.get("status") == "failed"]',
        'failed = [r for r in rows if r.get("error")]',
        ("tests/bundle/test_bundle.py::test_a_patient_worse_than_no_registration_exits_non_zero",),
    ),
    Fault(
        "bending scale 3e3 -> 30",
        "monai_cidir/losses/registration.py",
        '{"bending": 3e3,',
        '{"bending": 30.0,',
        ("tests/losses/test_registration_loss.py", "tests/engines/test_trainer.py::test_loss_is_minus_ncc_plus_alpha_times_scaled_regularizers"),
    ),
    Fault(
        "snapped TRE in metrics.json written unsnapped",
        "monai_cidir/engines/selection.py",
        "TargetRegistrationError(snap=snap, moving_grid=grid if snap else None,",
        "TargetRegistrationError(snap=False, moving_grid=None,",
        (f"{REG}::test_snapped_tre_in_metrics_json_is_a_snap_on_the_moving_grid",),
    ),
    Fault(
        "an interrupted patient restarts instead of resuming",
        "monai_cidir/engines/registration.py",
        'if options["resume"] and trainer.resume():',
        'if False and options["resume"] and trainer.resume():',
        (f"{REG}::test_an_interrupted_patient_trains_only_the_remaining_iterations",),
    ),
    Fault(
        "alpha choice always takes the largest alpha (end to end)",
        "monai_cidir/handlers/alpha_choice.py",
        "ties = [r for r in pool if r[self.score_key] >= top - self.tie_tolerance]",
        "ties = pool",
        (f"{REG}::test_register_patient_improves_and_exports", f"{REG}::test_rerun_skips_and_reexport_at_another_alpha"),
    ),
    # ------------------------------------------------------------------ the rewritten weak tests
    Fault(
        "re-export reports the TRE before registration as after",
        "monai_cidir/engines/selection.py",
        '("tre_after", landmark_tre(model, alpha, item))',
        '("tre_after", landmark_tre(None, None, item))',
        (f"{REG}::test_rerun_skips_and_reexport_at_another_alpha", "tests/engines/test_multi_weight.py::test_two_weights_reexport_at_a_given_vector"),
    ),
    Fault(
        "K-weight ties go to the least smooth field",
        "monai_cidir/handlers/alpha_choice.py",
        "return (sum(a / h for a, h in zip(values, highs)), values)",
        "return (-sum(a / h for a, h in zip(values, highs)), values)",
        ("tests/engines/test_multi_weight.py::test_two_weights_end_to_end",),
    ),
    Fault(
        "a good image file is re-read on every check",
        "monai_cidir/data/validation.py",
        "if stamp in _CHECKED:",
        "if False:",
        ("tests/data/test_validation.py::test_check_image_file_passes_a_good_file_once",),
    ),
    Fault(
        "a rewritten image file is not checked again",
        "monai_cidir/data/validation.py",
        "stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)",
        "stamp = (str(path.resolve()), stat.st_size, 0)",
        ("tests/data/test_validation.py::test_check_image_file_passes_a_good_file_once",),
    ),
    Fault(
        "compare.py's TRE cost of the Dice choice loses its sign",
        "benchmarks/methods.py",
        "tre_loss_dice_choice=chosen_tre - per_alpha[best],",
        "tre_loss_dice_choice=chosen_tre + per_alpha[best],",
        ("tests/benchmarks/test_compare_smoke.py::test_compare_tiny_phantom",),
    ),
    Fault(
        "conditioning.py's single-alpha TRE is the TRE before",
        "benchmarks/conditioning.py",
        'cache[key] = {"alpha": a, "tre": _tre(net, item, a),',
        'cache[key] = {"alpha": a, "tre": out["tre_before"],',
        ("tests/benchmarks/test_conditioning.py::test_conditioning_gap_table",),
    ),
    Fault(
        "default learning rate 1e-4 -> 2e-5 (end-to-end TRE bounds)",
        "monai_cidir/engines/options.py",
        "learning_rate: float = 1e-4",
        "learning_rate: float = 2e-5",
        (f"{REG}::test_register_patient_improves_and_exports",),
    ),
    Fault(
        "lung_masks.png not written",
        "monai_cidir/engines/registration.py",
        'options["lung_mask_kwargs"], overlay=pdir / "lung_masks.png")',
        'options["lung_mask_kwargs"], overlay=None)',
        ("tests/engines/test_quality.py::test_cohort_runs_every_patient_then_fails",),
    ),
    # ------------------------------------------------------------------ faults the suite already caught
    Fault(
        "NCC loss sign",
        "monai_cidir/losses/image_dissimilarity.py",
        "loss = -global_ncc(fixed_values, moving_values, eps=self.eps)",
        "loss = global_ncc(fixed_values, moving_values, eps=self.eps)",
        ("tests/losses/test_loss_ncc.py",),
    ),
    Fault(
        "bending energy sign",
        "monai_cidir/losses/functional.py",
        "return hessian.square().sum(dim=(-3, -2, -1))",
        "return -hessian.square().sum(dim=(-3, -2, -1))",
        ("tests/losses/test_loss_regularizers.py",),
    ),
    Fault(
        "exported displacement left in RAS (no LPS flip)",
        "monai_cidir/engines/export.py",
        "array *= ras_to_lps(np.ones(3)).astype(np.float32)",
        "array *= np.ones(3, dtype=np.float32)",
        ("tests/engines/test_export.py::test_displacement_field_is_an_itk_transform_on_oblique_grid",),
    ),
    Fault(
        "LPS landmark files read as RAS",
        "monai_cidir/data/landmarks.py",
        "return lps_to_ras(torch.as_tensor(np.asarray(points, dtype=np.float64)))",
        "return torch.as_tensor(np.asarray(points, dtype=np.float64))",
        ("tests/data/test_landmarks.py",),
    ),
    Fault(
        "ITK geometry: origin not flipped to LPS",
        "monai_cidir/coordinates.py",
        "return ras_to_lps(aff[:3, 3]), spacing, direction",
        "return aff[:3, 3], spacing, direction",
        ("tests/coordinates/test_coordinates.py::test_itk_geometry_matches_what_itk_reads",),
    ),
    Fault(
        "ITK geometry: direction not flipped to LPS",
        "monai_cidir/coordinates.py",
        "direction = ras_to_lps((aff[:3, :3] / spacing).T).T",
        "direction = aff[:3, :3] / spacing",
        ("tests/coordinates/test_coordinates.py::test_itk_geometry_matches_what_itk_reads",),
    ),
    Fault(
        "status always ok",
        "monai_cidir/engines/quality.py",
        'status = "failed" if failures else ("warning" if warnings else "ok")',
        'status = "ok"',
        ("tests/engines/test_quality.py::test_assess_registration_rules", "tests/engines/test_quality.py::test_worse_than_its_affine_is_failed_and_said"),
    ),
    # ------------------------------------------------------------------ clinical scans (issue 26)
    Fault(
        "DICOM slices stacked in file order, not along the slice normal",
        "monai_cidir/data/dicom.py",
        '    order = np.argsort(ipp @ normal, kind="stable")',
        "    order = np.arange(len(ipp))",
        ("tests/data/test_dicom.py",),
    ),
    Fault(
        "DICOM slice axis signed by SpacingBetweenSlices (ITK 5.4's mirror)",
        "monai_cidir/data/dicom.py",
        "    affine[:3, 2] = geo.normal * step",
        "    affine[:3, 2] = geo.normal * step * (1 if float(series.datasets[0].get('SpacingBetweenSlices', 1) or 1) > 0 else -1)",
        ("tests/data/test_dicom.py",),
    ),
    Fault(
        "folding gate off (22% folding reads ok)",
        "monai_cidir/engines/quality.py",
        "    if folding is not None and folding > MAX_LUNG_FOLDING:",
        "    if False:",
        ("tests/engines/test_quality.py::test_absolute_gates_hold_whatever_the_affine_did",),
    ),
    Fault(
        "scans that do not overlap are trained anyway",
        "monai_cidir/engines/quality.py",
        "    if agree and dice < MIN_OVERLAP_DICE:",
        "    if False:",
        ("tests/engines/test_quality.py::test_mirrored_scan_stops_before_training_and_whole_fov_masks_warn",),
    ),
)


def copy_repo(dest: Path) -> None:
    """The parts of the repository the tests need (not ``benchmarks/results``)."""
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORED)
        elif src.is_file():
            shutil.copy2(src, dest / name)


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, int, str, float]:
    """pytest on ``tests`` in ``root``: ``(verdict, exit code, last lines, seconds)``; verdict is
    ``passed`` (exit 0), ``failed`` (exit 1: a test failed), or ``error`` (anything else, a timeout too)."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", -1, f"timed out after {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    first_error = next((line for line in lines if line.startswith("E ")), "")  # what failed: the first assertion line
    tail = "\n".join([first_error[:160]] * bool(first_error) + lines[-15:])
    verdict = {0: "passed", 1: "failed"}.get(proc.returncode, "error")
    return verdict, proc.returncode, tail, seconds


def inject(root: Path, fault: Fault) -> str:
    """Apply the fault to the copy; returns the original text of the file (to restore it)."""
    path = root / fault.path
    text = path.read_text()
    count = text.count(fault.old)
    if count != 1:
        raise SystemExit(
            f"fault {fault.name!r}: the text to replace occurs {count} times in {fault.path} (expected exactly once); "
            f"the code moved: update benchmarks/fault_injection.py.\n  text: {fault.old!r}"
        )
    path.write_text(text.replace(fault.old, fault.new))
    return text


def _summary(tail: str) -> str:
    """The pytest summary line (``1 failed, 2 passed in 3.4s``) of a run's last lines."""
    lines = [line for line in tail.splitlines() if " in " in line and ("passed" in line or "failed" in line or "error" in line)]
    return lines[-1].strip("= ") if lines else tail.splitlines()[-1] if tail else ""


def table(rows: list[dict]) -> str:
    lines = ["| fault | file | tests run | result | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        tests = "<br>".join(f"`{t.replace('tests/', '')}`" for t in r["tests"])
        lines.append(f"| {r['name']} | `{r['path']}` | {tests} | {r['result']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated words: run the faults whose name contains one of them")
    p.add_argument("--list", action="store_true", help="print the faults and their tests, run nothing")
    p.add_argument("--skip-clean", action="store_true", help="skip the clean run (the selected tests unchanged must pass)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    words = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    faults = [f for f in FAULTS if not words or any(w in f.name.lower() for w in words)]
    if not faults:
        p.error(f"no fault name contains any of {words}")
    if args.list:
        bad = 0
        for f in faults:
            count = (REPO / f.path).read_text().count(f.old)
            bad += count != 1
            print(f"{f.name}\n  {f.path}: {f.old!r} -> {f.new!r} (matches {count}x)\n  tests: {' '.join(f.tests)}")
        return 1 if bad else 0
    with tempfile.TemporaryDirectory(prefix="cidir_faults_") as tmp:
        root = Path(tmp)
        copy_repo(root)
        for f in faults:  # every substitution matches once before anything runs
            (root / f.path).write_text(inject(root, f))
        ok = True
        rows = []
        if not args.skip_clean:
            selected = tuple(dict.fromkeys(t for f in faults for t in f.tests))
            verdict, code, tail, seconds = run_tests(root, selected, args.timeout)
            print(f"clean run ({len(selected)} test selections): {verdict} in {seconds:.0f} s: {_summary(tail)}", flush=True)
            if verdict != "passed":
                print(tail)
                print("the selected tests fail without a fault: fix them first, 'caught' would mean nothing")
                return 1
        for f in faults:
            original = inject(root, f)
            try:
                verdict, code, tail, seconds = run_tests(root, f.tests, args.timeout)
            finally:
                (root / f.path).write_text(original)
            caught = verdict == "failed"
            ok &= caught
            why = tail.splitlines()[0].replace("|", "/") if tail.startswith("E ") else ""
            result = f"caught ({_summary(tail)}{': `' + why[1:].strip() + '`' if why else ''})" if caught else f"**NOT CAUGHT** ({verdict}: {_summary(tail)})"
            rows.append({**dataclasses.asdict(f), "result": result, "seconds": seconds, "caught": caught})
            print(f"{'caught' if caught else 'NOT CAUGHT'}: {f.name} ({seconds:.0f} s)", flush=True)
            if not caught and verdict == "error":
                print(tail)
    out = table(rows)
    print()
    print(out)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        header = f"`python benchmarks/fault_injection.py{' --only ' + args.only if args.only else ''}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        args.markdown.write_text(header + out + "\n")
    caught = sum(r["caught"] for r in rows)  # not from the text: pytest's own "DID NOT RAISE" would read as missed
    print(f"\n{caught} of {len(rows)} faults caught")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
