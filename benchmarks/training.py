"""Training efficiency of cIDIR on CPU: TRE against wall-clock for training variants.

Reproduces the numbers of the engines section of README.md::

    python benchmarks/training.py                        # phantom + real CT pair, all variants
    python benchmarks/training.py --data phantom --budget 60 --variants paper,fast
    python benchmarks/training.py --export-size 512 512 136   # export time and peak memory only

For each data set (the embedded phantom at its default size; ``../shared/data/chest_ct.nii.gz``
with ``make_breathing_pair``, skipped when absent) and each training variant, the trainer runs
for ``--budget`` seconds of training wall-clock (evaluation time excluded). Every
``--eval-every`` seconds the landmark TRE is recorded at the best alpha of an 11-value grid
(an oracle used only to compare convergence speed). At the end: alpha selection by lung Dice
(seconds per alpha), TRE at the selected alpha, and TRE/folding at alpha = 0, 0.5, 1 (how well
the regularizer scale spans under- to over-regularisation). Prints markdown tables.

The variants (see ``VARIANTS``) differ only in the options of the trainer; the same affine
pre-alignment result is reused by all of them. The cosine schedule's horizon is
``--max-iterations`` (default 100000, so within a short budget it stays near its initial rate:
pass the number of iterations a budget reaches to compare a full decay). Timings on a shared
machine vary with its load: compare variants of one run only.
"""

from __future__ import annotations

import argparse
import tempfile
import resource
import sys
import time
from pathlib import Path

import torch
from ignite.engine import Events

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# name -> (trainer options, description)
VARIANTS: dict[str, tuple[dict, str]] = {
    "paper": (
        dict(num_points=10000, learning_rate=1e-4, lr_schedule="constant", alpha_per_point=False, init_output_scale=None, regularization_points=None),
        "paper-like: 10K points, Adam 1e-4 constant, one alpha per batch, regularizer on all points, SIREN init",
    ),
    "init": (
        dict(num_points=10000, learning_rate=1e-4, lr_schedule="constant", alpha_per_point=False, init_output_scale=0.01, regularization_points=None),
        "+ output layer x0.01 at initialisation",
    ),
    "cosine": (
        dict(num_points=10000, learning_rate=1e-4, lr_schedule="cosine", alpha_per_point=False, init_output_scale=0.01, regularization_points=None),
        "+ cosine learning-rate decay",
    ),
    "per_point": (
        dict(num_points=10000, learning_rate=1e-4, lr_schedule="cosine", alpha_per_point=True, init_output_scale=0.01, regularization_points=None),
        "+ one alpha per point",
    ),
    "reg_subset": (
        dict(num_points=10000, learning_rate=1e-4, lr_schedule="cosine", alpha_per_point=True, regularization_points=2000, init_output_scale=0.01),
        "+ regularizer on 2K of the 10K points",
    ),
    "fast": (
        dict(num_points=10000, learning_rate=1e-4, lr_schedule="cosine", alpha_per_point=True, regularization_points=2000, init_output_scale=0.01, harmonizer_lr_factor=30.0),
        "+ harmonizer learning rate x30 (the register_patient defaults)",
    ),
    "small_batch": (
        dict(num_points=4000, learning_rate=1e-4, lr_schedule="cosine", alpha_per_point=True, regularization_points=1000, init_output_scale=0.01, harmonizer_lr_factor=30.0),
        "'fast' with 4K points, regularizer on 1K",
    ),
    "autograd": (
        dict(num_points=10000, learning_rate=1e-4, lr_schedule="cosine", alpha_per_point=True, regularization_points=2000, init_output_scale=0.01, harmonizer_lr_factor=30.0, derivatives="autograd"),
        "'fast' with nested-autograd derivatives (baseline of the exact forward mode)",
    ),
}


def load_data(which: str, cache: Path) -> list[dict]:
    from monai_cidir.data import RegistrationPairDataset, make_breathing_pair, make_breathing_phantom

    items = []
    if which in ("phantom", "all"):
        items.append(RegistrationPairDataset(make_breathing_phantom(cache / "phantom", seed=0))[0])
    if which in ("ct", "all"):
        ct = SHARED / "chest_ct.nii.gz"
        if ct.is_file():
            items.append(make_breathing_pair(str(ct), seed=0))
        else:
            print(f"skipping the real CT pair: {ct} not found", file=sys.stderr)
    return items


def train_variant(item, affine, options: dict, budget: float, eval_every: float, seed: int, max_iterations: int):
    from monai.utils import set_determinism

    from monai_cidir.engines import AlphaPrior, CIDIRTrainer, build_optimizer, make_point_sampler, scale_initial_output
    from monai_cidir.engines.registration import landmark_tre
    from monai_cidir.networks import ConditionedINR

    opts = dict(options)
    init_scale = opts.pop("init_output_scale", None)
    lr = opts.pop("learning_rate")
    h_factor = opts.pop("harmonizer_lr_factor", 1.0)
    per_point = opts.pop("alpha_per_point")
    set_determinism(seed=seed)
    net = ConditionedINR()
    scale_initial_output(net, init_scale)
    trainer = CIDIRTrainer(
        net,
        build_optimizer(net, learning_rate=lr, harmonizer_lr_factor=h_factor),
        item["fixed_image"],
        item["moving_image"],
        make_point_sampler(item["fixed_mask"], seed=seed),
        max_iterations=max_iterations,
        alpha_prior=AlphaPrior(per_point=per_point),
        seed=seed,
        **opts,
    )
    trainer.model.set_affine(affine)
    grid = [i / 10 for i in range(11)]
    history: list[tuple[float, int, float]] = []
    clock = {"train": 0.0, "last": time.perf_counter(), "next_eval": 0.0}

    def oracle_tre() -> float:
        return min(landmark_tre(trainer.model, a, item)["mean"] for a in grid)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _tick(engine):
        now = time.perf_counter()
        clock["train"] += now - clock["last"]
        if clock["train"] >= clock["next_eval"] or clock["train"] >= budget:
            history.append((clock["train"], engine.state.iteration, oracle_tre()))
            clock["next_eval"] += eval_every
        if clock["train"] >= budget:
            engine.terminate()
        clock["last"] = time.perf_counter()

    history.append((0.0, 0, oracle_tre()))
    clock["last"] = time.perf_counter()
    trainer.run()
    return trainer, history


def summarize(item, trainer, history) -> dict:
    from monai_cidir.engines import AlphaSearch, AlphaSelectionEvaluator
    from monai_cidir.engines.registration import landmark_tre

    t = time.perf_counter()
    ev = AlphaSelectionEvaluator(trainer.model, item, search=AlphaSearch(11))
    curve = ev.run()
    sel_s = time.perf_counter() - t
    row = {
        "iterations": trainer.state.iteration,
        "s_per_it": history[-1][0] / max(1, trainer.state.iteration),
        "alpha": curve.alpha,
        "dice": curve.best["dice"],
        "tre_selected": landmark_tre(trainer.model, curve.alpha, item)["mean"],
        "s_per_alpha": sel_s / len(curve.rows),
        "history": history,
    }
    for r in curve.rows:
        for a in (0.0, 0.5, 1.0):
            if abs(r["alpha"] - a) < 1e-9:
                row[f"tre@{a:g}"] = landmark_tre(trainer.model, a, item)["mean"]
                row[f"fold@{a:g}"] = r["folding"]
                row[f"dice@{a:g}"] = r["dice"]
    return row


def export_benchmark(size, chunk_size=65536, hidden_features=256) -> dict:
    """Full-volume export of a (random) network on a size grid: seconds and peak RSS (whole process)."""
    import tempfile

    from monai_cidir.coordinates import CoordinateMapping, affine_from_spacing
    from monai_cidir.engines import RegistrationModel, write_displacement_field
    from monai_cidir.networks import ConditionedINR

    mapping = CoordinateMapping(affine_from_spacing((0.97, 0.97, 2.5)), size)
    model = RegistrationModel(ConditionedINR(hidden_features=hidden_features), mapping)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        write_displacement_field(model, 0.5, Path(d) / "displacement.nii.gz", chunk_size=chunk_size)
    return {
        "size": "x".join(map(str, size)),
        "seconds": time.perf_counter() - t,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss0,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="all", choices=["phantom", "ct", "all", "none"])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per variant")
    p.add_argument("--eval-every", type=float, default=15.0)
    p.add_argument("--max-iterations", type=int, default=100000, help="the schedule's length (cosine)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "monai_cidir_benchmark"))
    p.add_argument("--export-size", type=int, nargs=3, default=None, help="also time a full-volume export of this grid")
    p.add_argument("--export-hidden", type=int, default=256, help="hidden width of the exported network")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from monai_cidir.engines import fit_affine, make_point_sampler
    from monai_cidir.engines.registration import landmark_tre

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, budget {args.budget:.0f} s per variant\n")
    items = [] if args.data == "none" else load_data(args.data, Path(args.cache))
    for item in items:
        shape = tuple(item["fixed_image"].shape[1:])
        t = time.perf_counter()
        pre = fit_affine(
            item["fixed_image"], item["moving_image"], make_point_sampler(item["fixed_mask"], seed=args.seed),
            item["fixed_mask"], item["moving_mask"],
        )
        affine = pre.matrix if pre.kept else None
        from monai_cidir.coordinates import CoordinateMapping
        from monai_cidir.engines import RegistrationModel

        class _Zero(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))

            def forward(self, x, a):
                return x * self.w

        aff_model = RegistrationModel(_Zero(), CoordinateMapping.from_image(item["fixed_image"]), affine)
        print(f"## {item['name']} {shape}: TRE before {landmark_tre(None, None, item)['mean']:.2f} mm, "
              f"after affine {landmark_tre(aff_model, 0.0, item)['mean']:.2f} mm "
              f"(fit {time.perf_counter() - t:.1f} s, NCC {pre.ncc_identity:.3f} -> {pre.ncc_affine:.3f}, kept {pre.kept})\n")
        rows = {}
        for name in args.variants.split(","):
            options, _ = VARIANTS[name]
            trainer, history = train_variant(item, affine, options, args.budget, args.eval_every, args.seed, args.max_iterations)
            rows[name] = summarize(item, trainer, history)
            r = rows[name]
            print(f"  {name}: {r['iterations']} it, {r['s_per_it']:.3f} s/it, oracle TRE "
                  + " ".join(f"{h[2]:.2f}@{h[0]:.0f}s" for h in history), flush=True)
        checkpoints = sorted({int(round(h[0] / args.eval_every)) for r in rows.values() for h in r["history"]})
        print("\n| variant | s/iter | iterations | oracle TRE (mm) at " + ", ".join(f"{c * args.eval_every:.0f}" for c in checkpoints[1:]) + " s | alpha | Dice | TRE at selected alpha | s per alpha |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            marks = []
            for c in checkpoints[1:]:
                target = c * args.eval_every
                before = [h for h in r["history"] if h[0] <= target + 1e-6]
                marks.append(f"{before[-1][2]:.2f}" if before else "-")
            print(f"| {name} | {r['s_per_it']:.3f} | {r['iterations']} | {' / '.join(marks)} | {r['alpha']:.2f} | "
                  f"{r['dice']:.4f} | {r['tre_selected']:.2f} | {r['s_per_alpha']:.2f} |")
        print("\n| variant | TRE @ alpha 0 / 0.5 / 1 | folding % @ 0 / 0.5 / 1 | Dice @ 0 / 0.5 / 1 |")
        print("|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | " + " / ".join(f"{r.get(f'tre@{a}', float('nan')):.2f}" for a in ("0", "0.5", "1"))
                  + " | " + " / ".join(f"{100 * r.get(f'fold@{a}', float('nan')):.3f}" for a in ("0", "0.5", "1"))
                  + " | " + " / ".join(f"{r.get(f'dice@{a}', float('nan')):.4f}" for a in ("0", "0.5", "1")) + " |")
        print("\nvariants: " + "; ".join(f"{n} = {VARIANTS[n][1]}" for n in rows) + "\n", flush=True)
    if args.export_size:
        e = export_benchmark(tuple(args.export_size), hidden_features=args.export_hidden)
        print(f"| export grid | network width | seconds | peak RSS (MB), process | RSS before (MB) |\n|---|---|---|---|---|\n"
              f"| {e['size']} | {args.export_hidden} | {e['seconds']:.1f} | {e['peak_rss_mb']:.0f} | {e['rss_before_mb']:.0f} |")


if __name__ == "__main__":
    main()
