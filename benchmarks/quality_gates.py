"""The numbers behind the quality gates (:mod:`monai_cidir.engines.quality`): good cases and sabotaged ones.

For each case this runs the pipeline with the bundle's training budget (``register_patient``, as
``python -m monai.bundle run training`` does) and records what the gates read: the lung Dice
before registration (``dice_before``), after the affine (``dice_affine``) and after cIDIR
(``dice``), the folding at the exported alpha, the two lung volumes, the share of each image's
field of view the mask covers, the range of the lung Dice over the scored alphas, the status and
the stopping error (if any). One JSON per case goes to ``--output`` (default
``benchmarks/results/quality_gates/``); the table of ``docs/quality_gates.md`` is made from them by hand.

Cases (``--cases``, comma separated):

* ``real_pair``: ``../shared/data/real_lung_pair`` (baseline -> follow-up; one lung in view);
* ``real_pair_mirrored_itk``: the same with the fixed scan's slice axis reversed in the affine and
  the origin kept, as ITK 5.4 reads a DICOM series with a negative SpacingBetweenSlices (the volume
  is mirrored superior-inferior *and* moved by its own length);
* ``real_pair_mirrored``: the fixed scan mirrored superior-inferior in place (the origin moved to
  the last slice: the same world box, the anatomy upside down);
* ``real_r0`` / ``real_r0_mirrored_itk``: the realistic suite's first case
  (:func:`monai_cidir.data.make_realistic_pair` on the shared chest CT, landmarks included), as is
  and with the fixed scan read as ITK 5.4 would.

Run from the repository root (about 90 s per case on 2 idle cores)::

    python benchmarks/quality_gates.py --cases real_pair_mirrored_itk,real_pair_mirrored
    python benchmarks/quality_gates.py --gates off     # the absolute gates never trip: what each case reports
    python benchmarks/quality_gates.py --masks-only --cases real_pair,real_r0,real_r1,real_r2,real_r3,real_pair_mirrored_itk

``--gates off`` sets the absolute thresholds to values that never trip, so a sabotaged case runs to
the end and its numbers can be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = json.loads((REPO / "bundles" / "cidir_lung_ct" / "configs" / "train.json").read_text())
OPTIONS = {k: BUNDLE[k] for k in ("max_iterations", "num_points", "regularization_points", "alpha_distribution")}
KEYS = (
    "dice_before", "dice_affine", "dice", "folding", "fixed_lung_ml", "moving_lung_ml", "fixed_mask_fov_fraction",
    "moving_mask_fov_fraction", "dice_range", "tre_before_mean", "tre_after_mean", "status", "warnings",
)  # fmt: skip


def mirror_z(image, keep_origin: bool):
    """The image with its third voxel axis reversed in the affine, voxels untouched.

    ``keep_origin=True``: the first slice stays where it was and the others run the other way (ITK
    5.4 on a DICOM series with a negative SpacingBetweenSlices); ``False``: the last slice takes the
    first one's place, so the world box is the same and the anatomy is upside down.
    """
    from monai.data import MetaTensor

    affine = torch.as_tensor(image.affine, dtype=torch.float64).clone()
    if not keep_origin:
        affine[:3, 3] += affine[:3, 2] * (image.shape[-1] - 1)
    affine[:3, 2] = -affine[:3, 2]
    return MetaTensor(image.as_tensor().clone(), affine=affine, meta={k: v for k, v in image.meta.items() if k != "affine"})


def load(name: str, shared: Path, work: Path) -> dict:
    from benchmarks.compare import REALISTIC_CASES
    from monai_cidir.data import load_pair_datalist, make_realistic_pair
    from monai_cidir.transforms import LoadRegistrationPaird

    base = name.replace("_mirrored_itk", "").replace("_mirrored", "")
    if base == "real_pair":
        pair = shared / "data" / "real_lung_pair"
        record = {"name": name, "fixed_image": str(pair / "baseline.mha"), "moving_image": str(pair / "followup.mha")}
    elif base in REALISTIC_CASES:
        source, kwargs = REALISTIC_CASES[base]
        src = shared / "data" / ("chest_ct.nii.gz" if source == "chest" else "real_lung_pair/baseline.mha")
        datalist = work / "data" / base / "datalist.json"
        if not datalist.is_file():
            make_realistic_pair(src, num_landmarks=300, output_dir=datalist.parent, name=base, **kwargs)
        record = dict(load_pair_datalist(datalist)[0], name=name)
    else:
        raise SystemExit(f"unknown case {name!r}")
    item = LoadRegistrationPaird()(record)
    if name.endswith("_mirrored_itk") or name.endswith("_mirrored"):
        item["fixed_image"] = mirror_z(item["fixed_image"], keep_origin=name.endswith("_itk"))
        item.pop("fixed_mask", None)  # recomputed on the mirrored image
    return item


def run_case(name: str, shared: Path, work: Path, threads: int) -> dict:
    from monai_cidir.engines import register_patient

    torch.set_num_threads(threads)
    item = load(name, shared, work)
    start = time.perf_counter()
    row = {"case": name}
    try:
        metrics = register_patient(item, work / "out", overwrite=True, **OPTIONS)
        row.update({k: metrics.get(k) for k in KEYS})
    except Exception as e:  # noqa: BLE001 (a gate that stops the patient is a result here)
        row.update(status="stopped", error=f"{type(e).__name__}: {e}")
    row["wall_s"] = time.perf_counter() - start
    return row


def masks_only(name: str, shared: Path, work: Path) -> dict:
    """The pre-training numbers alone (no training): lung volumes, mask shares of the field of view, Dice before."""
    from monai_cidir.engines.quality import check_mask_overlap, mask_overlap_dice, prepare_lung_masks

    item = load(name, shared, work)
    item, reports = prepare_lung_masks(item)
    row = {"case": name, "dice_before": mask_overlap_dice(item), **{f"{s}_lung_ml": reports[s]["volume_ml"] for s in ("fixed", "moving")}}
    try:
        row.update(check_mask_overlap(item, reports), status="would train")
    except ValueError as e:
        row.update(status="stopped", error=str(e))
    return row


def main(argv=None) -> int:
    from benchmarks.compare import DEFAULT_SHARED

    p = argparse.ArgumentParser(prog="python benchmarks/quality_gates.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="real_pair,real_pair_mirrored_itk,real_pair_mirrored")
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "quality_gates")
    p.add_argument("--work", type=Path, default=None, help="outputs and generated cases (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gates", choices=("on", "off"), default="on", help="off: the absolute gates never trip (measure a sabotaged case to the end)")
    p.add_argument("--masks-only", action="store_true", help="no training: the pre-training numbers of each case (seconds each)")
    args = p.parse_args(argv)
    if args.gates == "off":
        from monai_cidir.engines import quality

        quality.MAX_LUNG_FOLDING, quality.MIN_LUNG_DICE, quality.MIN_OVERLAP_DICE = 1.0, 0.0, 0.0
    work = args.work or Path(tempfile.mkdtemp(prefix="cidir_gates_"))
    args.output.mkdir(parents=True, exist_ok=True)
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if args.masks_only:
            row = masks_only(name, args.shared, work)
            print(json.dumps(row, default=repr), flush=True)
            (args.output / f"{name}_masks.json").write_text(json.dumps(row, indent=1, default=repr))
            continue
        row = run_case(name, args.shared, work, args.threads)
        row["gates"] = args.gates
        print(json.dumps(row, default=repr), flush=True)
        (args.output / f"{name}_gates_{args.gates}.json").write_text(json.dumps(row, indent=1, default=repr))
    print(f"outputs in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
