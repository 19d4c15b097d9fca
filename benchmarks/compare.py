"""monai_cidir against its peers, side by side, on the same data, masks, machine and threads.

One command (from the repository root)::

    python benchmarks/compare.py                               # everything (smooth 34 min + realistic 62 min measured, 2 CPU cores)
    python benchmarks/compare.py --cases realistic             # the realistic suite only
    python benchmarks/compare.py --cases phantom --methods cidir,elastix_default --iterations 200
    python benchmarks/compare.py --dirlab /data/dirlab --cases dirlab --dirlab-cases 1,2
    python benchmarks/compare.py --estimate                    # print the plan and the time bound only

Cases (``--cases``, groups or names, comma separated):

* ``phantom``: the synthetic breathing phantom (:func:`monai_cidir.data.make_breathing_phantom`)
  at seeds 0 and 1 (``phantom_s0``, ``phantom_s1``);
* ``chest``: ``../shared/data/chest_ct.nii.gz`` (or ``--chest-ct PATH``) with three synthetic
  breathing motions of 8, 11.5 and 15 mm peak (:func:`monai_cidir.data.make_breathing_pair`,
  300 landmarks, exact ground truth) - ``chest_m0``, ``chest_m1``, ``chest_m2``; skipped when
  the CT is absent;
* ``realistic``: :data:`REALISTIC_CASES`, :func:`monai_cidir.data.make_realistic_pair` on the
  chest CT (``real_r0`` ... ``real_r2``) and on the real pair's baseline scan (``--real-pair``,
  ``real_r3``): sliding at the lung outline, lung density following 1/det, 15-25 mm diaphragm
  motion, a 24-37 mm rigid offset, the moving scan's own field of view, noise, crops through the
  lungs; 300 exact landmarks each; skipped when the source CT is absent;
* ``dirlab``: DIR-LAB 4DCT cases under ``--dirlab PATH`` (``dirlab_case01`` ...); skipped without it.

Methods (``--methods``): ``cidir``, ``idir``, ``idir_autograd``, ``elastix_default``,
``elastix_lung`` (see :mod:`benchmarks.methods`; elastix is skipped when itk-elastix is absent).
``idir_autograd`` is IDIR's nested-autograd training for the same iterations (no time limit): the same accuracy
is expected and only its time differs (about 6x per step), so by default it runs on the run's first
case only (``--autograd-cases groups``: the first case of each group; ``all``: every case).

Each (case, method) runs in its own Python process (``python benchmarks/compare.py --worker``)
with ``--threads`` threads for torch, OpenMP, MKL and ITK, so its peak resident memory
(``ru_maxrss`` of that process, imports included; the import-only baseline is reported beside
it) and its wall-clock are its own. Outputs in ``--output`` (default ``benchmarks/results``):
``compare.md`` (the table, the targets, the exact command), ``compare.csv`` (every figure),
``curves_<case>.png`` (TRE against training time for the INR methods) and ``runs/`` (one JSON
per run; a rerun with ``--resume`` reuses them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("MONAI_CIDIR_SHARED", REPO.parent / "shared"))

INR_METHODS = ("cidir", "idir", "idir_autograd")
ELASTIX_METHODS = ("elastix_default", "elastix_lung")
METHODS = INR_METHODS + ELASTIX_METHODS
#: peak superior-inferior motion (mm) and seed of the three synthetic motions on the real CT.
CHEST_MOTIONS = ((8.0, 0), (11.5, 1), (15.0, 2))
PHANTOM_SEEDS = (0, 1)
#: the realistic cases (:func:`monai_cidir.data.make_realistic_pair`): source CT, then the motion,
#: rigid offset, moving field of view and crops. ``chest`` is ``--chest-ct``, ``pair`` the baseline
#: scan of ``--real-pair`` (a different real CT: one lung, 1.37 x 1.37 x 2.5 mm, -2048 padding).
REALISTIC_CASES = {
    "real_r0": ("chest", dict(seed=0, amplitude_mm=15.0, translation_mm=(4.0, 20.0, 12.0), rotation_deg=(1.5, 0.0, 1.0),
                              moving_crop_mm=((15.0, 0.0), (0.0, 10.0), (0.0, 0.0)))),
    "real_r1": ("chest", dict(seed=1, amplitude_mm=20.0, translation_mm=(-8.0, 28.0, 16.0), rotation_deg=(2.0, 1.0, -1.0),
                              moving_spacing=(1.5, 1.5, 4.0), moving_crop_mm=((0.0, 0.0), (0.0, 0.0), (0.0, 40.0)))),
    "real_r2": ("chest", dict(seed=2, amplitude_mm=25.0, translation_mm=(10.0, -22.0, 28.0), rotation_deg=(-2.0, 0.0, 2.0),
                              fixed_crop=((40, 256), (0, 256), (0, 64)), moving_crop_mm=((0.0, 20.0), (10.0, 0.0), (0.0, 0.0)))),
    "real_r3": ("pair", dict(seed=3, amplitude_mm=20.0, translation_mm=(6.0, 18.0, -24.0), rotation_deg=(1.0, -1.5, 0.0),
                             moving_crop_mm=((0.0, 0.0), (0.0, 0.0), (15.0, 0.0)))),
}

#: the full run's budgets (2 CPU cores; see ``--estimate``).
DEFAULTS = {
    "iterations": 200,
    "num_points": 4000,
    "time_limit": 180.0,
    "eval_every": 5.0,
    "idir_alpha": 0.5,
    "num_alphas": 21,
}

LABELS = {
    "cidir": "monai_cidir cIDIR (alpha by Dice)",
    "idir": "SirenINR / IDIR (fixed alpha)",
    "idir_autograd": "IDIR, nested autograd",
    "elastix_default": "elastix default",
    "elastix_lung": "elastix lung-tuned",
}

__all__ = ["main", "prepare_cases", "run_case_method", "write_reports", "METHODS", "DEFAULTS"]


# ---------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/compare.py",
        description="Benchmark monai_cidir cIDIR against IDIR-style INR training and elastix (TRE, Dice, "
        "folding, time, memory), one process per run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cases", default="phantom,chest,realistic,dirlab", help="groups (phantom, chest, realistic, dirlab) or case names")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--iterations", type=int, default=DEFAULTS["iterations"], help="INR training steps per case")
    p.add_argument("--num-points", type=int, default=DEFAULTS["num_points"], help="INR points per step")
    p.add_argument(
        "--time-limit", type=float, default=DEFAULTS["time_limit"], help="INR training seconds per case and method (stops early)"
    )
    p.add_argument("--eval-every", type=float, default=DEFAULTS["eval_every"], help="seconds of training between TRE evaluations")
    p.add_argument("--idir-alpha", type=float, default=DEFAULTS["idir_alpha"], help="IDIR's fixed regularisation weight")
    p.add_argument("--num-alphas", type=int, default=DEFAULTS["num_alphas"], help="cIDIR alpha sweep size")
    p.add_argument("--elastix-max-iterations", type=int, default=None, help="cap elastix iterations per resolution (quick runs)")
    p.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra register_patient option for the INR methods, e.g. affine_prealign=false or regularization_points=1000 (repeatable)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an extra cIDIR method NAME (starting with cidir_) with these register_patient options on top of --engine-option, "
        'e.g. cidir_jacobian=\'{"regularizer": "jacobian"}\' or cidir_two=\'{"loss": {"regularizer": {"bending": 1, "jacobian": 1}, '
        '"conditioning": "per_regularizer"}}\' (repeatable; add NAME to --methods)',
    )
    p.add_argument(
        "--autograd-cases",
        default="first",
        choices=("first", "groups", "all"),
        help="where idir_autograd runs: the run's first case, the first case of each group, or every case",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for every method (torch, OpenMP, MKL)")
    p.add_argument(
        "--elastix-threads", type=int, default=None, help="elastix/ITK threads (default: --threads; 0 lets elastix use every core)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phantom-shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="phantom size (default: its own)")
    p.add_argument("--chest-ct", type=Path, default=DEFAULT_SHARED / "data" / "chest_ct.nii.gz")
    p.add_argument("--real-pair", type=Path, default=DEFAULT_SHARED / "data" / "real_lung_pair", help="folder with baseline.mha (source CT of real_r3)")
    p.add_argument("--dirlab", type=Path, default=None, help="DIR-LAB root (Case1Pack ... Case10Pack)")
    p.add_argument("--dirlab-cases", default="1,2,3,4,5,6,7,8,9,10")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--data-dir", type=Path, default=None, help="where generated cases go (default OUTPUT/data)")
    p.add_argument("--resume", action="store_true", help="reuse run JSONs already in OUTPUT/runs")
    p.add_argument("--run-timeout", type=float, default=None, help="kill a run after this many seconds (default: 3 x time limit + 300)")
    p.add_argument("--estimate", action="store_true", help="print the plan and the time estimate, run nothing")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def _engine_options(items: list[str], flag: str = "--engine-option", partial: bool = True) -> dict:
    """``KEY=JSON`` items as register_patient options; ``partial``: a ``network`` dict becomes a ConditionedINR
    partial (in-process callers; the worker processes get plain JSON and convert it themselves)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"{flag} expects KEY=VALUE (VALUE in JSON), found {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return _network_partial(out) if partial else out


def _network_partial(options: dict) -> dict:
    """``network={"modulation": "per_neuron"}`` (JSON) becomes the pipeline's network with those options on top."""
    if isinstance(options.get("network"), dict):
        from monai_cidir.engines.registration import default_network

        options = {**options, "network": default_network(**options["network"])}
    return options


def _variants(items: list[str]) -> dict[str, dict]:
    """``--variant NAME=JSON``: extra cIDIR methods, each with its own register_patient options."""
    out = _engine_options(items, "--variant", partial=False)
    for name, options in out.items():
        if not name.startswith("cidir_") or name in METHODS or not isinstance(options, dict):
            raise SystemExit(f"--variant expects cidir_<name>={{options as a JSON object}}, found {name}={options!r}")
    return out


def _alpha(value) -> str:
    """An alpha for the report: ``0.32``, or ``[0.01, 0.1]`` for one weight per regularizer."""
    from monai_cidir.engines.alpha_selection import format_alpha

    if value is None:
        return "-"
    return format_alpha(value, ".3g" if isinstance(value, (list, tuple)) else ".2f")


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


# ---------------------------------------------------------------------------- cases
def prepare_cases(args) -> tuple[list[dict], list[str]]:
    """Generate/locate the cases the arguments select.

    Returns:
        ``(cases, skipped)``: each case ``{"name", "group", "record"}`` (a datalist or DIR-LAB
        record with absolute paths); ``skipped`` lists human-readable reasons.
    """
    from monai_cidir.data import load_pair_datalist, make_breathing_pair, make_breathing_phantom

    wanted = _split(args.cases)
    groups = {"phantom", "chest", "realistic", "dirlab"}
    want_group = {g for g in wanted if g in groups}
    want_name = {n for n in wanted if n not in groups}
    data_dir = Path(args.data_dir or (args.output / "data"))
    cases: list[dict] = []
    skipped: list[str] = []

    def selected(name: str, group: str) -> bool:
        return group in want_group or name in want_name

    for seed in PHANTOM_SEEDS:
        name = f"phantom_s{seed}"
        if not selected(name, "phantom"):
            continue
        kwargs = {} if args.phantom_shape is None else {"shape": tuple(args.phantom_shape)}
        datalist = make_breathing_phantom(data_dir / name, seed=seed, name=name, **kwargs)
        cases.append({"name": name, "group": "phantom", "record": load_pair_datalist(datalist)[0]})
    _realistic_cases(args, data_dir, selected, cases, skipped)
    chest = [(f"chest_m{i}", amp, seed) for i, (amp, seed) in enumerate(CHEST_MOTIONS)]
    if any(selected(n, "chest") for n, _, _ in chest):
        if not Path(args.chest_ct).is_file():
            skipped.append(f"chest: {args.chest_ct} not found")
        else:
            for name, amp, seed in chest:
                if not selected(name, "chest"):
                    continue
                datalist = data_dir / name / "datalist.json"
                if not datalist.is_file():
                    make_breathing_pair(args.chest_ct, seed=seed, amplitude_mm=amp, num_landmarks=300, output_dir=data_dir / name, name=name)
                cases.append({"name": name, "group": "chest", "record": load_pair_datalist(datalist)[0], "amplitude_mm": amp})
    if "dirlab" in want_group or any(n.startswith("dirlab") for n in want_name):
        if args.dirlab is None:
            skipped.append("dirlab: no --dirlab PATH given")
        else:
            from monai_cidir.data import dirlab_datalist

            for c in [int(v) for v in _split(args.dirlab_cases)]:
                name = f"dirlab_case{c:02d}"
                if "dirlab" not in want_group and name not in want_name:
                    continue
                try:
                    record = dirlab_datalist(args.dirlab, [c])[0]
                except (FileNotFoundError, ValueError) as e:
                    skipped.append(f"{name}: {e}")
                    continue
                cases.append({"name": name, "group": "dirlab", "record": record})
    known = {c["name"] for c in cases}
    for n in sorted(want_name - known):
        if not any(s.startswith(n.split("_")[0]) for s in skipped):
            skipped.append(f"{n}: unknown case name (groups: phantom, chest, realistic, dirlab; names like phantom_s0, chest_m1, real_r0, dirlab_case03)")
    return cases, skipped


def _realistic_cases(args, data_dir: Path, selected, cases: list, skipped: list) -> None:
    """The realistic group: :data:`REALISTIC_CASES` made from the real CTs that are present."""
    from monai_cidir.data import load_pair_datalist, make_realistic_pair

    sources = {"chest": Path(args.chest_ct), "pair": Path(args.real_pair) / "baseline.mha"}
    for name, (source, kwargs) in REALISTIC_CASES.items():
        if not selected(name, "realistic"):
            continue
        if not sources[source].is_file():
            skipped.append(f"{name}: {sources[source]} not found")
            continue
        datalist = data_dir / name / "datalist.json"
        if not datalist.is_file():
            print(f"making {name} from {sources[source]} ...", flush=True)
            make_realistic_pair(sources[source], num_landmarks=300, output_dir=data_dir / name, name=name, **kwargs)
        cases.append({"name": name, "group": "realistic", "record": load_pair_datalist(datalist)[0]})


def _methods(args) -> tuple[list[str], list[str]]:
    methods = _split(args.methods)
    variants = _variants(args.variant)
    bad = [m for m in methods if m not in METHODS and m not in variants]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}: expected a subset of {','.join(METHODS)}")
    skipped = []
    if any(m in ELASTIX_METHODS for m in methods):
        if not _elastix_installed():
            skipped = [m for m in methods if m in ELASTIX_METHODS]
            methods = [m for m in methods if m not in ELASTIX_METHODS]
    return methods, skipped


def _elastix_installed() -> bool:
    """Whether itk-elastix is installed, without importing ITK (1 GB) into the parent process."""
    from importlib import metadata

    try:
        metadata.version("itk-elastix")
        return True
    except metadata.PackageNotFoundError:
        return False


def _plan(cases: list[dict], methods: list[str], autograd_cases: str) -> list[tuple[dict, str]]:
    first = {}
    for c in cases:
        first.setdefault(c["group"], c["name"])
    plan = []
    for i, c in enumerate(cases):
        for m in methods:
            if m == "idir_autograd":
                if autograd_cases == "first" and i > 0:
                    continue
                if autograd_cases == "groups" and first[c["group"]] != c["name"]:
                    continue
            plan.append((c, m))
    return plan


#: rough seconds on 2 idle cores, for the plan's estimate: INR step at 4,000 points, alpha
#: selection per alpha, elastix registration (small phantom / 256x256x64 CT), per-process overhead.
#: Measured on the chest CT case under a 7x oversubscribed 2-core machine and scaled down: cIDIR
#: 0.59 s/step, 9.6 s/alpha; elastix default 104 s, lung-tuned 359 s.
_COST = {
    "step": 0.2,
    "autograd_factor": 5.0,
    "per_alpha": {"phantom": 0.5, "other": 2.0},
    "elastix_default": {"phantom": 25.0, "other": 80.0},
    "elastix_lung": {"phantom": 70.0, "other": 220.0},
    "overhead": 20.0,
}


def _estimate(plan, args) -> tuple[float, float]:
    """(expected, upper bound) seconds of the plan on 2 idle cores (see ``_COST``)."""
    expected = bound = 0.0
    for case, method in plan:
        size = "phantom" if case["group"] == "phantom" else "other"
        if method in INR_METHODS or method.startswith("cidir_"):
            step = _COST["step"] * args.num_points / 4000 * (_COST["autograd_factor"] if method == "idir_autograd" else 1.0)
            select = args.num_alphas * _COST["per_alpha"][size] if method.startswith("cidir") else 0.0
            train = args.iterations * step if method == "idir_autograd" else min(args.iterations * step, args.time_limit)
            expected += train + select + _COST["overhead"]
            bound += (args.iterations * step * 2 if method == "idir_autograd" else args.time_limit) + 2 * select + 2 * _COST["overhead"]
        else:
            base = _COST[method][size] if args.elastix_max_iterations is None else 10.0
            expected += base + _COST["overhead"] + 10
            bound += 3 * base + 2 * _COST["overhead"]
    return expected, bound


# ---------------------------------------------------------------------------- one run
def _child_env(threads: int, itk_threads: int | None) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    if itk_threads:
        env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(itk_threads)
    else:
        env.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
    # made torch steps up to 10x slower (measured); on an idle machine it changes nothing.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_case_method(case: dict, method: str, budget: dict, run_dir: Path, timeout: float) -> dict:
    """Run one (case, method) in a fresh Python process; return its result with peak memory.

    The child reports its own peak resident set size (``VmHWM`` of ``/proc/self/status``: the
    high-water mark of its own address space; ``ru_maxrss`` would also count the parent's memory
    inherited through fork + exec). A run that fails or times out returns ``{"error": ...}``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"case": case, "method": method, "budget": budget, "workdir": str(run_dir / "work")}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1, default=str))
    result_path = run_dir / "result.json"
    result_path.unlink(missing_ok=True)
    log = open(run_dir / "log.txt", "w")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(budget["threads"], budget.get("elastix_threads")), cwd=str(REPO))
    deadline = start + timeout
    status = rusage = None
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, rusage = os.wait4(proc.pid, 0)
            status = None
            break
        time.sleep(0.2)
    proc.returncode = 0  # reaped by wait4 above
    log.close()
    wall = time.perf_counter() - start
    out = {"case": case["name"], "group": case["group"], "method": method, "process_seconds": wall}
    if status is None:
        out["error"] = f"killed after {timeout:.0f} s (run timeout)"
    elif os.waitstatus_to_exitcode(status) != 0 or not result_path.is_file():
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
        out["error"] = f"exit code {os.waitstatus_to_exitcode(status)}: " + " | ".join(tail)
    else:
        out.update(json.loads(result_path.read_text()))
    if out.get("peak_rss_mb") is None and rusage is not None:
        out["peak_rss_mb"] = rusage.ru_maxrss / 1024.0  # fallback (not Linux): includes inherited memory
    (run_dir / "run.json").write_text(json.dumps(out, indent=1))
    return out


def _peak_rss_mb() -> float | None:
    """This process's peak resident set (MB): ``VmHWM`` on Linux, else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    except ImportError:
        return None


def worker(spec_path: Path) -> int:
    """The child process: load the case, run the method, write ``result.json`` beside the spec."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    spec = json.loads(Path(spec_path).read_text())
    budget = spec["budget"]
    import torch

    torch.set_num_threads(int(budget["threads"]))
    from benchmarks.methods import load_case, run_method

    if spec["method"].startswith("elastix"):
        import itk  # noqa: F401  (load ITK's elastix module now, so the baseline includes it)

        itk.ElastixRegistrationMethod  # noqa: B018
    baseline = _peak_rss_mb()
    t0 = time.perf_counter()
    item = load_case(spec["case"]["record"])
    t_load = time.perf_counter() - t0
    result = run_method(item, spec["method"], budget, spec["workdir"])
    result["seconds_load"] = t_load
    result["import_rss_mb"] = baseline
    result["peak_rss_mb"] = _peak_rss_mb()
    result["num_landmarks"] = 0 if item.get("fixed_landmarks") is None else int(len(item["fixed_landmarks"]))
    result["grid"] = "x".join(str(s) for s in item["fixed_image"].shape[1:])
    Path(spec_path).with_name("result.json").write_text(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------------------- reports
COLUMNS = [
    "case", "group", "method", "grid", "tre_before_mean", "tre_mean", "tre_sd", "tre_p95", "tre_max", "tre_snapped_mean",
    "dice_before", "dice", "folding", "seconds", "seconds_training", "iterations", "seconds_per_step",
    "stopped_by_time_limit", "seconds_per_alpha", "alpha", "alpha_oracle", "tre_oracle_mean", "tre_loss_dice_choice",
    "engine_dice", "engine_folding", "peak_rss_mb", "import_rss_mb", "process_seconds", "error",
]  # fmt: skip


def _f(v, digits=2) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and (v != v):
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    return str(v)


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked against the measured rows."""
    by = {(r["case"], r["method"]): r for r in rows if not r.get("error")}
    lines = []
    chest = sorted({r["case"] for r in rows if r["group"] == "chest"})
    for case in chest:
        c, e = by.get((case, "cidir")), by.get((case, "elastix_default"))
        if c and e:
            ok = c["tre_mean"] < e["tre_mean"] and c["seconds"] <= 600
            lines.append(
                f"- cIDIR TRE below elastix default within 10 min, {case}: cIDIR {c['tre_mean']:.2f} mm in "
                f"{c['seconds']:.0f} s vs elastix {e['tre_mean']:.2f} mm: **{'met' if ok else 'MISSED'}**"
            )
    realistic = sorted({r["case"] for r in rows if r["group"] == "realistic"})
    for case in realistic:
        lines += _realistic_targets(case, by)
    if not chest and not realistic:
        lines.append("- cIDIR vs elastix default on the real-CT cases: not measured (no chest or realistic case in this run)")
    for case in sorted({r["case"] for r in rows}):
        f, a = by.get((case, "idir")), by.get((case, "idir_autograd"))
        if f and a and f.get("iterations") != a.get("iterations"):
            lines.append(f"- per-step time vs nested autograd, {case}: not comparable, {f.get('iterations')} vs {a.get('iterations')} iterations")
        elif f and a and f.get("seconds_per_step") and a.get("seconds_per_step"):
            ratio = a["seconds_per_step"] / f["seconds_per_step"]
            same = abs(f["tre_mean"] - a["tre_mean"])
            ok = ratio >= 5 and same <= 0.1 * max(f["tre_mean"], 0.5)
            lines.append(
                f"- per-step time vs nested autograd, {case}: {f['seconds_per_step'] * 1e3:.0f} ms vs "
                f"{a['seconds_per_step'] * 1e3:.0f} ms per step = {ratio:.1f}x at TRE {f['tre_mean']:.2f} vs "
                f"{a['tre_mean']:.2f} mm: **{'met' if ok else 'MISSED'}** (target >= 5x, equal accuracy)"
            )
    for case in sorted({r["case"] for r in rows}):
        c = by.get((case, "cidir"))
        if c and c.get("seconds_per_alpha") is not None:
            n = len(c.get("alpha_grid") or [])
            if n == 21 and c.get("seconds_selection") is not None:
                # the whole selection: 21 alphas, the chosen alpha's folding on every lung point, Dice before
                sweep, how = float(c["seconds_selection"]), ", whole selection"
            else:
                sweep, how = c["seconds_per_alpha"] * 21, f", from the {n}-value sweep of this run"
            lines.append(
                f"- 21-value alpha sweep, {case}: {sweep:.1f} s ({c['seconds_per_alpha'] * 1e3:.0f} ms per alpha{how}): "
                f"**{'met' if sweep < 10 else 'MISSED'}** (target < 10 s)"
            )
    return lines


def _realistic_targets(case: str, by: dict) -> list[str]:
    """The realistic suite's targets for one case: beat elastix default in <= 2x its time, the alpha choice, the curve."""
    c, e, lung = by.get((case, "cidir")), by.get((case, "elastix_default")), by.get((case, "elastix_lung"))
    lines = []
    if c and e:
        ok = c["tre_mean"] < e["tre_mean"] and c["seconds"] <= 2 * e["seconds"]
        lines.append(
            f"- cIDIR below elastix default in at most 2x its wall time, {case}: {c['tre_mean']:.2f} mm in {c['seconds']:.0f} s vs "
            f"{e['tre_mean']:.2f} mm in {e['seconds']:.0f} s: **{'met' if ok else 'MISSED'}**"
        )
    if c and lung:
        ok = c["tre_mean"] < lung["tre_mean"]
        lines.append(
            f"- (aim) cIDIR below lung-tuned elastix, {case}: {c['tre_mean']:.2f} vs {lung['tre_mean']:.2f} mm "
            f"({lung['seconds']:.0f} s): **{'met' if ok else 'missed'}**"
        )
    if c and c.get("tre_loss_dice_choice") is not None:
        loss = float(c["tre_loss_dice_choice"])
        lines.append(
            f"- selected alpha within 0.05 mm of the oracle, {case}: alpha {_alpha(c['alpha'])} vs {_alpha(c['alpha_oracle'])}, "
            f"{loss:.3f} mm lost: **{'met' if loss <= 0.05 else 'MISSED'}**"
        )
    if c and c.get("tre_per_alpha"):
        curve = c["tre_per_alpha"]
        best = int(np.argmin(curve))
        inside = 0 < best < len(curve) - 1
        lines.append(
            f"- TRE-vs-alpha minimum inside (0, 1), {case}: minimum {curve[best]:.3f} mm at alpha {c['alpha_grid'][best]:.2f} "
            f"(alpha 0: {curve[0]:.3f}, alpha 1: {curve[-1]:.3f} mm): **{'met' if inside else 'MISSED'}**"
        )
    return lines


def _plot_curves(rows: list[dict], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for case in sorted({r["case"] for r in rows}):
        runs = [r for r in rows if r["case"] == case and r.get("curve") and not r.get("error")]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            t = [p[0] for p in r["curve"]]
            tre = [p[2] for p in r["curve"]]
            ax.plot(t, tre, marker=".", label=f"{LABELS.get(r['method'], r['method'])} (alpha {_alpha(r['alpha'])})")
        for r in rows:
            if r["case"] == case and r["method"] in ELASTIX_METHODS and not r.get("error"):
                ax.axhline(r["tre_mean"], ls="--", lw=1, color="gray" if r["method"] == "elastix_default" else "black")
                ax.annotate(f"{LABELS[r['method']]} ({r['seconds']:.0f} s)", (0, r["tre_mean"]), fontsize=7, va="bottom")
        before = next((r.get("tre_before_mean") for r in runs if r.get("tre_before_mean") is not None), None)
        # the scale that shows the methods: large rigid offsets would squash them against zero
        shown = [p[2] for r in runs for p in r["curve"][1:]] + [r["tre_mean"] for r in rows if r["case"] == case and r.get("tre_mean") is not None]
        top = 1.25 * max(shown) if shown else None
        title = f"{case}: TRE vs training time"
        if before is not None and (top is None or before <= top):
            ax.axhline(before, ls=":", lw=1, color="red")
        elif before is not None:
            title += f" (TRE before: {before:.1f} mm, off the scale)"
        ax.set_xlabel("training wall-clock (s, evaluation excluded)")
        ax.set_ylabel("mean TRE (mm)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0, top=top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = output / f"curves_{case}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _total_minutes(rows: list[dict], seconds: float) -> str:
    runs = sum(float(r.get("process_seconds") or 0.0) for r in rows)
    if runs > seconds + 60:  # --resume reused runs measured earlier
        return f"{runs / 60:.1f} min of runs (their processes' wall-clock; this invocation {seconds / 60:.1f} min, reusing them)"
    return f"{seconds / 60:.1f} min"


def write_reports(rows: list[dict], args, command: str, skipped: list[str], seconds: float) -> tuple[Path, Path]:
    """Write ``compare.csv``, ``compare.md`` and the curve PNGs; return the two table paths."""
    import torch

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "compare.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    pngs = _plot_curves(rows, out)
    md = [
        "# monai_cidir vs IDIR-style INR vs elastix",
        "",
        f"Produced by `{command}` (run from the repository root) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {args.threads} threads per method, "
        f"torch {torch.__version__}; total {_total_minutes(rows, seconds)}.",
        "",
        f"Budgets: INR {args.iterations} iterations x {args.num_points} points, at most {args.time_limit:.0f} s of "
        f"training per case; IDIR alpha {args.idir_alpha}; cIDIR sweep {args.num_alphas} alphas; elastix "
        + ("full parameter maps." if args.elastix_max_iterations is None else f"capped at {args.elastix_max_iterations} iterations per resolution."),
        "",
        "TRE: mean / SD / 95th percentile over the landmarks (mm, not snapped; `snap` = snapped to the moving voxel grid). "
        "Dice: moving lung mask pulled back through the field vs fixed lung mask. Folding: fraction of fixed-mask voxels "
        "with det(I + du/dp) <= 0 (finite differences, the same for every method). Time: the method's own wall-clock "
        "(INR: affine pre-alignment + training + alpha selection; elastix: registration). Memory: peak resident set of "
        "the method's process, with the import-only baseline of that process in brackets.",
        "",
        "| case | method | TRE before | TRE mean | SD | p95 | snap | Dice | folding | time (s) | s/step | peak MB (import) | alpha (oracle) | TRE lost by Dice choice |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            md.append(f"| {r['case']} | {r['method']} | failed: {r['error'][:120]} |" + " |" * 11)
            continue
        alpha = "-" if r.get("alpha") is None else _alpha(r["alpha"])
        if r.get("alpha_oracle") is not None:
            alpha += f" ({_alpha(r['alpha_oracle'])})"
        limit = " (time limit)" if r.get("stopped_by_time_limit") else ""
        md.append(
            f"| {r['case']} | {r['method']} | {_f(r.get('tre_before_mean'))} | {_f(r.get('tre_mean'))} | {_f(r.get('tre_sd'))} | "
            f"{_f(r.get('tre_p95'))} | {_f(r.get('tre_snapped_mean'))} | {_f(r.get('dice'), 3)} | {_f(r.get('folding'), 4)} | "
            f"{_f(r.get('seconds'), 1)}{limit} | {_f(r.get('seconds_per_step'), 3)} | {_f(r.get('peak_rss_mb'), 0)} "
            f"({_f(r.get('import_rss_mb'), 0)}) | {alpha} | {_f(r.get('tre_loss_dice_choice'))} |"
        )
    md += ["", "## Targets", ""] + _targets(rows)
    sweep = [r for r in rows if r["method"] == "cidir" and r.get("seconds_per_alpha") is not None and not r.get("error")]
    if sweep:
        md += ["", "## cIDIR alpha selection", "", "| case | s per alpha | chosen alpha | oracle alpha | TRE chosen | TRE oracle |", "|---|---|---|---|---|---|"]
        for r in sweep:
            md.append(
                f"| {r['case']} | {r['seconds_per_alpha']:.3f} | {_alpha(r['alpha'])} | {_alpha(r.get('alpha_oracle'))} | "
                f"{r['tre_mean']:.2f} | {_f(r.get('tre_oracle_mean'))} |"
            )
    inr = [r for r in rows if (r["method"] in INR_METHODS or r["method"].startswith("cidir_")) and not r.get("error")]
    if inr:
        md += [
            "",
            "## Where the INR time goes",
            "",
            "| case | method | affine pre-alignment (s) | training (s) | iterations | s/step | alpha selection (s) | stopped by time limit |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in inr:
            md.append(
                f"| {r['case']} | {r['method']} | {_f(r.get('seconds_affine'), 1)} | {_f(r.get('seconds_training'), 1)} | "
                f"{_f(r.get('iterations'))} | {_f(r.get('seconds_per_step'), 3)} | {_f(r.get('seconds_selection'), 1)} | "
                f"{_f(bool(r.get('stopped_by_time_limit')))} |"
            )
    if skipped:
        md += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    if pngs:
        md += ["", "## TRE versus training time", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    md_path = out / "compare.md"
    md_path.write_text("\n".join(md) + "\n")
    return md_path, csv_path


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    command = "python benchmarks/compare.py" + ("" if not argv and len(sys.argv) <= 1 else " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    methods, skipped_methods = _methods(args)
    engine_options = _engine_options(args.engine_option, partial=False)  # JSON for the workers
    variants = _variants(args.variant)
    cases, skipped = prepare_cases(args)
    skipped += [f"{m}: itk-elastix is not installed (pip install 'monai_cidir[bench]')" for m in skipped_methods]
    plan = _plan(cases, methods, args.autograd_cases)
    expected, bound = _estimate(plan, args)
    print(f"{len(plan)} runs ({len(cases)} cases x {methods}); estimated {expected / 60:.0f} min, at most {bound / 60:.0f} min")
    for s in skipped:
        print(f"skipped {s}")
    if args.estimate:
        for c, m in plan:
            print(f"  {c['name']:<14} {m}")
        return 0
    budget = {
        "iterations": args.iterations,
        "num_points": args.num_points,
        "time_limit": args.time_limit,
        "eval_every": args.eval_every,
        "idir_alpha": args.idir_alpha,
        "num_alphas": args.num_alphas,
        "seed": args.seed,
        "threads": args.threads,
        "elastix_threads": args.threads if args.elastix_threads is None else (args.elastix_threads or None),
        "elastix_max_iterations": args.elastix_max_iterations,
        "engine_options": engine_options,
        "variants": variants,
    }
    timeout = args.run_timeout or 3 * args.time_limit + 300
    rows = []
    start = time.perf_counter()
    for i, (case, method) in enumerate(plan, 1):
        run_dir = Path(args.output) / "runs" / f"{case['name']}__{method}"
        cached = run_dir / "run.json"
        if args.resume and cached.is_file() and not json.loads(cached.read_text()).get("error"):
            row = json.loads(cached.read_text())
        else:
            if method == "idir_autograd":  # the same iterations as IDIR, whatever they cost: no time limit
                row = run_case_method(case, method, {**budget, "time_limit": None}, run_dir, 3 * timeout)
            else:
                row = run_case_method(case, method, budget, run_dir, timeout)
        rows.append(row)
        msg = row.get("error") or (
            f"TRE {row.get('tre_before_mean', float('nan')):.2f} -> {row.get('tre_mean', float('nan')):.2f} mm, "
            f"Dice {row.get('dice', float('nan')):.3f}, {row.get('seconds', 0):.1f} s, {row.get('peak_rss_mb', 0):.0f} MB"
        )
        print(f"[{i}/{len(plan)}] {case['name']} {method}: {msg}", flush=True)
    md_path, csv_path = write_reports(rows, args, command, skipped, time.perf_counter() - start)
    print(f"wrote {md_path} and {csv_path}")
    return 0 if not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
