"""Benchmark: one cIDIR training step, closed-form (forward-mode) derivatives against nested autograd.

A step is: forward with order-2 derivatives at N points, bending energy
``(H**2).sum((1, 2, 3)).mean()``, backward to every parameter (harmonizer included). All methods run
on the same paper-size :class:`~monai_cidir.networks.ConditionedINR` (3-256-256-256-3), the same
points and per-point alphas, in one process, interleaved, after a warm-up; the median of the repeats
is reported. Methods:

* ``forward J + adjoint H``: ``forward_with_derivatives`` (the default): value and Jacobian
  propagated forward, Hessian by an adjoint sweep with one row per output component;
* ``forward J + forward H``: ``forward_with_derivatives(hessian_mode="forward")``: the six unique
  Hessian entries propagated forward too (10 slots per point);
* ``nested autograd``: :func:`~monai_cidir.networks.autograd_derivatives`, 3 + 9 nested
  ``torch.autograd.grad`` calls as in IDIR.

The FLOP count of each step is measured with the PyTorch profiler (``with_flops=True``; matrix
products only, the element-wise work is not counted) and compared with the throughput of a large
float32 matmul on this machine. Peak memory is the growth of the process's maximum resident set
size during each method's first step (methods run smallest first).

Run::

    python benchmarks/derivatives.py                    # 10,000 points, 2 threads
    python benchmarks/derivatives.py --markdown table.md
    python benchmarks/derivatives.py --device cuda --points 100000   # on a GPU: CUDA peak memory, synchronised timings

Timings need a quiet machine: other processes on the same cores slow every method, and the
printed load average tells whether there were any. On a shared, busy machine run it with
``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads that wait for a descheduled partner can
otherwise make each step ten times slower (the closed-form paths, with more but smaller parallel
regions, suffer most). The "CPU s/step" column (process CPU time) is the steadier number there,
in particular with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from monai_cidir.networks import ConditionedINR, autograd_derivatives

METHODS = ("forward J + adjoint H", "forward J + forward H", "nested autograd")
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(network, coords, alpha, method: str):
    """One training step's derivative work; returns (u, jacobian, hessian, energy, parameter gradient)."""
    network.zero_grad(set_to_none=True)
    if method == METHODS[0]:
        u, jacobian, hessian = network.forward_with_derivatives(coords, alpha, order=2, hessian_mode="adjoint")
    elif method == METHODS[1]:
        u, jacobian, hessian = network.forward_with_derivatives(coords, alpha, order=2, hessian_mode="forward")
    else:
        u, jacobian, hessian = autograd_derivatives(network, coords, alpha, order=2)
    energy = (hessian**2).sum((1, 2, 3)).mean()
    energy.backward()
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in network.parameters()])
    return u.detach(), jacobian.detach(), hessian.detach(), energy.detach(), grad


def _max_rss_mib() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return usage / (2**20 if sys.platform == "darwin" else 2**10)


def _matmul_gflops(repeats: int, device: torch.device) -> float:
    size = 8192 if device.type == "cuda" else 4096
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def _peak_mib(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _max_rss_mib()


def _count_flops(network, coords, alpha, method: str, sample: int = 500) -> float:
    """Matrix-product FLOPs of one step (forward and backward), as recorded by the PyTorch profiler.

    The profiler keeps a lot of memory alive, so it records a step on ``sample`` points and the
    count is scaled to all points: every matmul of these per-point networks has one dimension
    proportional to the number of points (the per-point harmonizer included).
    """
    n = coords.shape[0]
    sample = min(sample, n)
    sub_alpha = alpha[:sample] if isinstance(alpha, torch.Tensor) and alpha.ndim == 2 and alpha.shape[0] == n else alpha
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        _step(network, coords[:sample], sub_alpha, method)
    return sum(e.flops for e in prof.events() if e.name in _MATMULS and e.flops) * n / sample


def _table(names, rows) -> list[str]:
    widths = [max(len(n), *(len(r[i]) for r in rows)) for i, n in enumerate(names)]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in (names, *rows)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=10_000, help="points per step (default 10000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per method (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per method after the first (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modulation", default="shared", choices=("shared", "per_layer", "per_neuron"), help="ConditionedINR modulation (default shared, the paper)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the results as a markdown table")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    network = ConditionedINR(modulation=args.modulation).to(device)  # 3-256-256-256-3, omega_0 = 32
    # move the harmonizer away from its (a, b, c, d) = (1, 1, 0, 0) start, as after some training
    with torch.no_grad():
        torch.nn.init.normal_(network.harmonizer.head.weight, std=0.05)
        torch.nn.init.normal_(network.harmonizer.head.bias, std=0.05)
    coords = (torch.rand(args.points, 3) * 2 - 1).to(device)
    alpha = torch.rand(args.points, 1).to(device)  # one alpha per point, as in training
    reference = METHODS[-1]

    # first steps, smallest first: results, and each method's peak memory
    rss = [_peak_mib(device)]
    results = {}
    for m in METHODS:
        results[m] = _step(network, coords, alpha, m)
        _sync(device)
        rss.append(_peak_mib(device))
    peak_mib = {m: rss[i + 1] - rss[0] for i, m in enumerate(METHODS)}

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    quantities = ("u", "jacobian", "hessian", "bending energy", "parameter gradient")
    agree = {
        m: {k: rel(results[m][i], results[reference][i]) for i, k in enumerate(quantities)} for m in METHODS[:-1]
    }
    flops = {m: _count_flops(network, coords, alpha, m) for m in METHODS}

    load_before = os.getloadavg()[0]
    for _ in range(args.warmup):
        for m in METHODS:
            _step(network, coords, alpha, m)
    times = {m: [] for m in METHODS}
    cpu = {m: [] for m in METHODS}
    for _ in range(args.repeats):  # interleaved, so background load hits every method alike
        for m in METHODS:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            _step(network, coords, alpha, m)
            _sync(device)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    peak = _matmul_gflops(args.repeats, device)
    load_after = os.getloadavg()[0]
    wall = {m: statistics.median(times[m]) for m in METHODS}
    cpu_s = {m: statistics.median(cpu[m]) for m in METHODS}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (
        f"torch {torch.__version__}, {where}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, {args.points} points, ConditionedINR 3-256-256-256-3, per-point alpha, "
        f"float32, median of {args.repeats}, load average {load_before:.1f} -> {load_after:.1f}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, float32 matmul {peak:.0f} GFLOP/s"
    )
    names = (
        "method",
        "step (ms)",
        "speed-up",
        "CPU s/step",
        "CPU speed-up",
        "matmul GFLOP/step",
        "GFLOP/s",
        "of matmul peak",
        "peak CUDA memory (MiB)" if device.type == "cuda" else "peak memory (MiB)",
    )
    rows = [
        (
            m,
            f"{wall[m] * 1e3:.0f}",
            f"{wall[reference] / wall[m]:.1f}x",
            f"{cpu_s[m]:.2f}",
            f"{cpu_s[reference] / cpu_s[m]:.1f}x",
            f"{flops[m] / 1e9:.1f}",
            f"{flops[m] / wall[m] / 1e9:.0f}",
            f"{100 * flops[m] / wall[m] / 1e9 / peak:.0f}%",
            f"{peak_mib[m]:.0f}",
        )
        for m in METHODS
    ]
    agreement = [
        f"max relative difference, {m} vs {reference}: " + ", ".join(f"{k} {v:.1e}" for k, v in agree[m].items())
        for m in METHODS[:-1]
    ]
    print(header)
    print("\n".join(_table(names, rows)))
    print("\n".join(agreement))

    if args.markdown:
        lines = [
            f"{header}:",
            "",
            "| " + " | ".join(names) + " |",
            "|" + "|".join("---" for _ in names) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
            "",
            *(f"{line}." for line in agreement),
            "",
        ]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
