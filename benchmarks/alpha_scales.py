"""How the regularizer scale maps alpha in [0, 1] onto under- to over-regularised fields.

lambda(alpha) = alpha * scale (monai_cidir.engines.trainer.REGULARIZER_SCALES). For each scale
given, one cIDIR training (the default 'fast' recipe of benchmarks/training.py, ``--budget``
seconds) and then TRE, lung Dice and folding at alpha = 0, 0.25, 0.5, 0.75, 1::

    python benchmarks/alpha_scales.py --data ct --regularizer bending --scales 100 1000 10000 100000

A good scale shows TRE/Dice at their best inside (0, 1) and a visibly smoother, worse field at 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ct", choices=["phantom", "ct", "all"])
    p.add_argument("--regularizer", default="bending")
    p.add_argument("--scales", type=float, nargs="+", default=[1e2, 1e3, 1e4, 1e5])
    p.add_argument("--budget", type=float, default=60.0)
    p.add_argument("--harmonizer-lr-factors", type=float, nargs="+", default=[30.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "monai_cidir_benchmark"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from monai_cidir.engines import AlphaSearch, AlphaSelectionEvaluator, fit_affine, make_point_sampler
    from monai_cidir.engines.registration import landmark_tre
    from monai_cidir.losses import RegistrationLoss

    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    for item in training.load_data(args.data, Path(args.cache)):
        pre = fit_affine(
            item["fixed_image"], item["moving_image"], make_point_sampler(item["fixed_mask"], seed=args.seed),
            item["fixed_mask"], item["moving_mask"],
        )
        affine = pre.matrix if pre.kept else None
        print(f"\n## {item['name']}, regularizer {args.regularizer}, {args.budget:.0f} s training per scale, "
              f"TRE before {landmark_tre(None, None, item)['mean']:.2f} mm\n")
        print("| scale | harmonizer lr x | TRE (mm) at alpha " + " / ".join(f"{a:g}" for a in alphas) + " | Dice | folding % | selected alpha |")
        print("|---|---|---|---|---|---|")
        for scale, factor in [(s, f) for s in args.scales for f in args.harmonizer_lr_factors]:
            options = dict(
                training.VARIANTS["fast"][0], loss=RegistrationLoss(args.regularizer, scales={args.regularizer: scale}),
                harmonizer_lr_factor=factor,
            )
            trainer, _ = training.train_variant(item, affine, options, args.budget, 1e9, args.seed, 100000)
            ev = AlphaSelectionEvaluator(trainer.model, item, search=AlphaSearch(alphas=alphas))
            curve = ev.run()
            tre = [landmark_tre(trainer.model, a, item)["mean"] for a in alphas]
            print(f"| {scale:g} | {factor:g} | " + " / ".join(f"{t:.2f}" for t in tre)
                  + " | " + " / ".join(f"{r['dice']:.4f}" for r in curve.rows)
                  + " | " + " / ".join(f"{100 * r['folding']:.3f}" for r in curve.rows)
                  + f" | {curve.alpha:g} |", flush=True)


if __name__ == "__main__":
    main()
