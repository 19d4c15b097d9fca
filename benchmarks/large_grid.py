"""Alpha selection and export time on a 256 x 256 x 100 fixed image, through the bundle as users run it.

The case: the shared real chest CT (``../shared/data/chest_ct.nii.gz``, 256 x 256 x 64 at
1.68 x 1.68 x 5 mm) resampled to 3.18 mm slices (256 x 256 x 100) is the fixed image; the moving
image is made by :func:`monai_cidir.data.make_realistic_pair` (sliding breathing motion of 20 mm,
an offset of 25 + 20 mm, the moving scan on its own 1.68 x 1.68 x 5 mm grid). The script

1. writes the pair (skipped when ``DATA/datalist.json`` exists),
2. trains once with the bundle's defaults (``python -m monai.bundle run training ...``; skipped
   when ``OUTPUT/<case>/model.pt`` exists),
3. reruns alpha selection and export ``--repeats`` times (``python -m monai.bundle run inference
   ...``) and reads ``seconds_selection`` and ``seconds_export`` from ``metrics.json``,

and writes a markdown table. Run from the repository root (about 4 minutes on 2 cores, 1 without
training)::

    python benchmarks/large_grid.py                       # benchmarks/results/large_grid.md
    python benchmarks/large_grid.py --data /tmp/large --output /tmp/large_out --repeats 3
    # one alpha per regularizer (bending + Jacobian): the K = 2 search
    python benchmarks/large_grid.py --output /tmp/large_two --markdown benchmarks/results/large_grid_two_weights.md \
        --train-arg=--regularizer --train-arg="{'bending': 1.0, 'jacobian': 1.0}" --train-arg=--conditioning --train-arg=per_regularizer

Without the shared chest CT it says so and exits with status 0 (nothing measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
CASE = "real_256x256x100"
CONFIGS = REPO / "bundles" / "cidir_lung_ct" / "configs"


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.compare import DEFAULT_SHARED

    p = argparse.ArgumentParser(prog="python benchmarks/large_grid.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chest-ct", type=Path, default=DEFAULT_SHARED / "data" / "chest_ct.nii.gz")
    p.add_argument("--data", type=Path, default=Path("/tmp/cidir_large_grid/data"), help="where the pair is written")
    p.add_argument("--output", type=Path, default=Path("/tmp/cidir_large_grid/out"), help="the bundle's output_dir")
    p.add_argument("--repeats", type=int, default=2, help="inference runs (selection + export) to time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", type=Path, default=REPO / "benchmarks" / "results" / "large_grid.md")
    p.add_argument("--train-arg", action="append", default=[], help="extra command-line words of the training run (repeatable)")
    return p


def make_case(chest_ct: Path, data: Path) -> None:
    """Write the 256 x 256 x 100 realistic pair and its datalist into ``data``."""
    from monai.transforms import LoadImage, Spacing

    from monai_cidir.data import make_realistic_pair

    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True)(str(chest_ct))
    image = Spacing(pixdim=(1.6836, 1.6836, 315.0 / 99.0), mode="bilinear")(image)[..., :100]
    pair = make_realistic_pair(
        image,
        seed=4,
        amplitude_mm=20.0,
        translation_mm=(0.0, 25.0, 20.0),
        moving_spacing=(1.6836, 1.6836, 5.0),
        output_dir=data,
        name=CASE,
        overwrite=True,
    )
    print(f"wrote {CASE}: fixed {tuple(pair['fixed_image'].shape[1:])}, moving {tuple(pair['moving_image'].shape[1:])}", flush=True)


def run_bundle(workflow: str, data: Path, output: Path, threads: int, extra: list[str] = ()) -> float:
    """Run one bundle workflow; returns its wall time (s)."""
    config = CONFIGS / ("train.json" if workflow == "training" else "inference.json")
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", str(config), "--dataset_dir", str(data), "--output_dir", str(output), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _alpha(value) -> str:
    from monai_cidir.engines.alpha_selection import format_alpha

    return format_alpha(value, ".3g" if isinstance(value, list) else ".2f")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.chest_ct.is_file():
        print(f"skipped: the shared chest CT is not at {args.chest_ct} (give --chest-ct)")
        return 0
    if not (args.data / "datalist.json").is_file():
        make_case(args.chest_ct, args.data)
    metrics_path = args.output / CASE / "metrics.json"
    if not (args.output / CASE / "model.pt").is_file():
        seconds = run_bundle("training", args.data, args.output, args.threads, args.train_arg)
        print(f"training workflow: {seconds:.0f} s", flush=True)
    rows = []
    for i in range(args.repeats):
        wall = run_bundle("inference", args.data, args.output, args.threads)
        m = json.loads(metrics_path.read_text())
        rows.append({"wall": wall, **m})
        print(
            f"run {i + 1}: selection {m['seconds_selection']:.1f} s, export {m['seconds_export']:.1f} s "
            f"(exact at {100 * m.get('export_exact_fraction', 1.0):.0f}% of voxels, interpolation error <= "
            f"{m.get('export_interpolation_max_mm', 0.0):.3f} mm), workflow {wall:.0f} s",
            flush=True,
        )
    lines = [
        "# Alpha selection and export on a 256 x 256 x 100 fixed image",
        "",
        f"`python benchmarks/large_grid.py`, {args.threads} threads; one training with the bundle's defaults,"
        f"{' (training options: ' + ' '.join(args.train_arg) + ')' if args.train_arg else ''}"
        f" then `python -m monai.bundle run inference` {args.repeats} times on its `model.pt`.",
        "",
        "| run | alpha | lung Dice | TRE after (mm) | alphas scored | alpha selection (s) | export (s) | voxels mapped exactly | interpolation error max / p99 (mm) | workflow wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        lines.append(
            f"| {i + 1} | {_alpha(r['alpha'])} | {r['dice']:.4f} | {r.get('tre_after_mean', float('nan')):.2f} | {r.get('num_alphas_evaluated')} | {r['seconds_selection']:.1f} |"
            f" {r['seconds_export']:.1f} | {100 * r.get('export_exact_fraction', 1.0):.0f}% |"
            f" {r.get('export_interpolation_max_mm', 0.0):.3f} / {r.get('export_interpolation_p99_mm', 0.0):.3f} | {r['wall']:.0f} |"
        )
    if rows:
        lines += ["", f"Training (once): {rows[0].get('seconds_training', float('nan')):.0f} s."]
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
