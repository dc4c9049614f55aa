"""Benchmarks: one table of cases drives ``python -m fastbn bench`` and ``bench/``.

Implementations compared on the same data, in one process:

``reference``   ``fastbn.reference``, the naive NumPy layer (the baseline);
``fastbn``      ``fastbn.batch_norm`` / ``batch_norm_backward`` allocating their outputs;
``fastbn_out``  the same writing into preallocated ``out=`` arrays;
``torch``       ``torch.nn.functional.batch_norm`` + autograd, when torch is importable,
                run with the same number of threads.

Operations: ``forward_train`` (batch statistics; running statistics updated),
``forward_eval``, ``backward`` (of one forward done beforehand) and ``forward_backward``.

This machine's memory bandwidth swings from minute to minute, so each case also times a
*probe* in the same process, interleaved with the implementations: a plain parallel kernel
that reads ``x`` once and writes an array of the same size once. ``units`` is a time
divided by the probe's. The probe's stores are write-allocate (three streams); with them
the floors would be 1.0 unit for forward_eval, 1.33 for forward_train (statistics pass +
normalize pass), 2.0 for backward and 3.33 for forward_backward. fastbn writes outputs of
half the last-level cache or more with streaming stores (two streams), whose floors are
0.67, 1.0, 1.67 and 2.67.
"""

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numba
import numpy as np

from . import _threading
from .functional import batch_norm, batch_norm_backward
from .reference import batch_norm as ref_batch_norm
from .reference import batch_norm_backward as ref_batch_norm_backward

OPS = ("forward_train", "forward_eval", "backward", "forward_backward")
IMPLS = ("reference", "fastbn", "fastbn_out", "torch")
# Bytes an operation must move at least, in units of the input's size: what GB/s counts.
MIN_TRAFFIC = {"forward_train": 3, "forward_eval": 2, "backward": 5, "forward_backward": 8}


@dataclass(frozen=True)
class Case:
    """A benchmark input: ``shape`` with channel ``axis``; ``channels_last`` stores an
    ``(N, C, H, W)`` array with NHWC memory (torch's ``channels_last``)."""

    name: str
    shape: tuple
    axis: int = 1
    channels_last: bool = False

    @property
    def C(self):
        return self.shape[self.axis]

    @property
    def size(self):
        return math.prod(self.shape)


CASES = (
    Case("64x256", (64, 256)),
    Case("256x1024", (256, 1024)),
    Case("4096x1024", (4096, 1024)),
    Case("65536x256", (65536, 256)),
    Case("1000000x64", (1_000_000, 64)),
    Case("1024x16384", (1024, 16384)),
    Case("NCHW 32x64x56x56", (32, 64, 56, 56)),
    Case("NCHW 32x64x56x56 channels_last", (32, 64, 56, 56), channels_last=True),
)
QUICK_CASES = (
    "64x256",
    "4096x1024",
    "1000000x64",
    "NCHW 32x64x56x56",
    "NCHW 32x64x56x56 channels_last",
)
# The DRAM-sized 2-D cases that the speed targets speak of.
DRAM_CASES = ("65536x256", "1000000x64", "1024x16384")


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


# -- data -------------------------------------------------------------------------------


def make_data(case, dtype, seed=0):
    """``x``, ``dy``, ``gamma``, ``beta``, ``running_mean``, ``running_var`` for a case."""
    rng = np.random.default_rng(seed)
    shape = case.shape
    if case.channels_last:  # NHWC memory, NCHW shape
        nhwc = (shape[0],) + shape[2:] + (shape[1],)

        def draw():
            return np.moveaxis(rng.standard_normal(nhwc, dtype=np.float32).astype(dtype), -1, 1)
    else:

        def draw():
            return rng.standard_normal(shape, dtype=np.float32).astype(dtype)

    x = draw() * 2 + 0.5
    dy = draw()
    C = case.C
    return {
        "x": x,
        "dy": dy,
        "gamma": (1 + 0.1 * rng.standard_normal(C)).astype(dtype),
        "beta": (0.1 * rng.standard_normal(C)).astype(dtype),
        "running_mean": np.zeros(C, dtype),
        "running_var": np.ones(C, dtype),
    }


# -- the probe ----------------------------------------------------------------------------


@numba.njit(parallel=True, cache=True, nogil=True)
def _probe_kernel(x, y):
    n = x.size
    block = 1 << 16
    for b in numba.prange((n + block - 1) // block):
        lo = b * block
        xs = x[lo : min(n, lo + block)]
        ys = y[lo : min(n, lo + block)]
        for i in range(xs.size):
            ys[i] = xs[i] * 1.5 + 0.5


def make_probe(data):
    """A callable streaming ``x``'s bytes once in and once out (flat, contiguous)."""
    x = np.ascontiguousarray(data["x"]).reshape(-1)
    y = np.empty_like(x)
    return lambda: _probe_kernel(x, y)


# -- runners ------------------------------------------------------------------------------


def make_runner(impl, op, case, data, *, threads=None):
    """A zero-argument callable that performs ``op`` with ``impl`` on ``data``, or None
    when ``impl`` is not available (torch not installed)."""
    if impl == "torch":
        return _torch_runner(op, case, data, threads)
    x, dy, gamma, beta = data["x"], data["dy"], data["gamma"], data["beta"]
    rm, rv = data["running_mean"], data["running_var"]
    axis = case.axis
    if impl == "reference":
        fwd, bwd = ref_batch_norm, ref_batch_norm_backward
    elif impl in ("fastbn", "fastbn_out"):
        fwd, bwd = batch_norm, batch_norm_backward
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    y_out = dx_out = None
    if impl == "fastbn_out":
        y_out, dx_out = np.empty_like(x), np.empty_like(x)
    kw = {"axis": axis, "out": y_out}

    if op == "forward_train":
        return lambda: fwd(x, gamma, beta, training=True, running_mean=rm, running_var=rv, **kw)
    if op == "forward_eval":
        return lambda: fwd(x, gamma, beta, training=False, running_mean=rm, running_var=rv, **kw)
    if op == "backward":
        _, cache = fwd(x, gamma, beta, training=True, **kw)
        return lambda: bwd(dy, cache, out=dx_out)
    if op == "forward_backward":

        def run():
            _, cache = fwd(x, gamma, beta, training=True, running_mean=rm, running_var=rv, **kw)
            return bwd(dy, cache, out=dx_out)

        return run
    raise ValueError(f"unknown operation {op!r}")


def _torch_runner(op, case, data, threads):
    torch = torch_or_none()
    if torch is None:
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    F = torch.nn.functional
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    # torch wants the channel axis at 1; every case here has it there.
    x = torch.from_numpy(np.ascontiguousarray(data["x"])).contiguous(memory_format=memory_format)
    dy = torch.from_numpy(np.ascontiguousarray(data["dy"])).contiguous(memory_format=memory_format)
    gamma = torch.from_numpy(data["gamma"].copy())
    beta = torch.from_numpy(data["beta"].copy())
    rm = torch.from_numpy(data["running_mean"].copy())
    rv = torch.from_numpy(data["running_var"].copy())

    if op in ("forward_train", "forward_eval"):
        training = op == "forward_train"

        def run():
            with torch.no_grad():
                return F.batch_norm(x, rm, rv, gamma, beta, training=training)

        return run
    xg = x.detach().requires_grad_(True)
    gg = gamma.detach().requires_grad_(True)
    bg = beta.detach().requires_grad_(True)
    if op == "backward":
        y = F.batch_norm(xg, None, None, gg, bg, training=True)
        return lambda: torch.autograd.grad(y, (xg, gg, bg), dy, retain_graph=True)
    if op == "forward_backward":

        def run():
            y = F.batch_norm(xg, rm, rv, gg, bg, training=True)
            return torch.autograd.grad(y, (xg, gg, bg), dy)

        return run
    raise ValueError(f"unknown operation {op!r}")


# -- timing -------------------------------------------------------------------------------


def interleaved_medians(fns, *, rounds, budget_s=None, settle_s=0.002, sample_s=0.002, short=()):
    """Median seconds per call of each callable, sampled round-robin so that bandwidth
    swings hit all alike.

    Each callable is called twice untimed first (JIT, caches, page faults; the second
    call's time sets the burst length). A sample times
    ``number`` back-to-back calls, ``number`` chosen so that a sample lasts about
    ``sample_s`` (tiny shapes are timed in bursts). ``settle_s`` of sleep precede each
    sample: an OpenMP runtime's threads spin for a while after a parallel region, and
    numba's and torch's would otherwise steal the cores from whoever runs next. The
    callables named in ``short`` (the slow reference) take part in the first three rounds
    only. With ``budget_s``, rounds stop after that many seconds (three at least).
    """
    number = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()  # a warm call: the first one may be far slower and would make bursts too short
        once = time.perf_counter() - t0
        number[name] = max(1, min(1000, int(sample_s / max(once, 1e-7))))
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            if name in short and r >= 3:
                continue
            time.sleep(settle_s)
            n = number[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: float(np.median(ts)) for name, ts in times.items()}


@dataclass
class Result:
    case: str
    shape: tuple
    layout: str
    dtype: str
    op: str
    threads: int
    probe_ms: float
    ms: dict  # impl -> median ms

    def units(self, impl):
        return self.ms[impl] / self.probe_ms

    def gbps(self, impl, nbytes):
        return MIN_TRAFFIC[self.op] * nbytes / (self.ms[impl] * 1e-3) / 1e9


def bench_case(case, dtype, ops, impls, *, threads, rounds, budget_s=None, progress=None):
    """Time ``ops`` x ``impls`` on one case; returns a list of Result."""
    data = make_data(case, dtype)
    probe = make_probe(data)
    results = []
    for op in ops:
        fns = {"probe": probe}
        for impl in impls:
            runner = make_runner(impl, op, case, data, threads=threads)
            if runner is not None:
                fns[impl] = runner
        med = interleaved_medians(fns, rounds=rounds, budget_s=budget_s, short=("reference",))
        layout = "channels_last" if case.channels_last else "contiguous"
        results.append(
            Result(
                case.name,
                case.shape,
                layout,
                np.dtype(dtype).name,
                op,
                threads,
                med.pop("probe") * 1e3,
                {k: v * 1e3 for k, v in med.items()},
            )
        )
        if progress:
            progress(f"  {case.name} {np.dtype(dtype).name} {op}: done")
    return results


# -- correctness check before timing --------------------------------------------------------


def check_against_reference(cases, dtypes):
    """Max relative error of fastbn vs the float64 reference on a small version of each
    case (same layout and axis). Returns rows (case, dtype, output, error, tolerance)."""
    rows = []
    for case in cases:
        small = Case(
            case.name,
            (8,) + case.shape[1:] if case.shape[0] > 8 else case.shape,
            case.axis,
            case.channels_last,
        )
        if len(small.shape) == 2:
            small = Case(case.name, (257, min(case.shape[1], 4100)), case.axis)
        for dtype in dtypes:
            data = make_data(small, dtype, seed=1)
            x, dy, g, b = data["x"], data["dy"], data["gamma"], data["beta"]
            y, cache = batch_norm(x, g, b, axis=case.axis)
            dx, dg, db = batch_norm_backward(dy, cache)
            f64 = {k: v.astype(np.float64) for k, v in (("x", x), ("dy", dy), ("g", g), ("b", b))}
            y_ref, ref_cache = ref_batch_norm(f64["x"], f64["g"], f64["b"], axis=case.axis)
            dx_ref, dg_ref, db_ref = ref_batch_norm_backward(f64["dy"], ref_cache)
            tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-10
            for name, got, want in (
                ("y", y, y_ref),
                ("dx", dx, dx_ref),
                ("dgamma", dg, dg_ref),
                ("dbeta", db, db_ref),
            ):
                err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                rows.append((case.name, np.dtype(dtype).name, name, err, tol))
    return rows


# -- the command ---------------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"threads for fastbn and torch (default: all, {numba.config.NUMBA_NUM_THREADS})",
    )
    parser.add_argument("--dtype", choices=("float32", "float64", "both"), default="float32")
    parser.add_argument(
        "--ops",
        default="all",
        help="comma-separated subset of " + ",".join(OPS) + " (default: all)",
    )
    parser.add_argument(
        "--cases", default=None, help="comma-separated case names (default: all; see --list)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds (about 20 s)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per case")
    parser.add_argument("--no-torch", action="store_true", help="leave torch out")
    parser.add_argument("--json", metavar="FILE", help="write all results as JSON")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the speedups (needs matplotlib: pip install 'fastbn[plot]')",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also time fastbn (out=) forward+backward on 1 thread against "
        "--threads, interleaved in this process, on the DRAM-sized cases",
    )


def _progress(msg):
    print(msg, file=sys.stderr, flush=True)


def run(args):
    if args.list:
        for case in CASES:
            print(f"{case.name:34s} shape={case.shape} axis={case.axis}")
        return 0
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    _threading.set_num_threads(threads)
    dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
    ops = OPS if args.ops == "all" else tuple(o.strip() for o in args.ops.split(","))
    for op in ops:
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    by_name = {c.name: c for c in CASES}
    if args.cases:
        names = [n.strip() for n in args.cases.split(",")]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; see --list")
        cases = [by_name[n] for n in names]
    elif args.quick:
        cases = [by_name[n] for n in QUICK_CASES]
    else:
        cases = list(CASES)
    rounds = args.rounds or (5 if args.quick else 7)
    impls = [i for i in IMPLS if not (i == "torch" and (args.no_torch or torch_or_none() is None))]

    print(_header(threads, "torch" in impls))
    _progress("checking fastbn against the float64 reference ...")
    checks = check_against_reference(cases, dtypes)
    worst = max(checks, key=lambda r: r[3] / r[4])
    bad = [r for r in checks if not r[3] <= r[4]]
    print(
        f"accuracy vs float64 reference: {len(checks)} outputs, worst relative error "
        f"{worst[3]:.1e} ({worst[0]} {worst[1]} {worst[2]}, tolerance {worst[4]:.0e})"
    )
    if bad:
        for row in bad:
            print(f"  FAILED {row}")
        return 1

    _progress("warming up the kernels ...")
    for dtype in dtypes:  # compile (or load) everything before any timing
        small = make_data(Case("warm", (64, 8)), dtype)
        y, cache = batch_norm(small["x"], small["gamma"], small["beta"])
        batch_norm_backward(small["dy"], cache)

    results = []
    started = time.perf_counter()
    for i, case in enumerate(cases):
        for dtype in dtypes:
            _progress(
                f"[{i + 1}/{len(cases)}] {case.name} {dtype} "
                f"({time.perf_counter() - started:.0f} s elapsed)"
            )
            res = bench_case(
                case,
                dtype,
                ops,
                impls,
                threads=threads,
                rounds=rounds,
                budget_s=1.0 if args.quick else 2.0,
            )
            results.extend(res)
            print(format_table(case, res, np.dtype(dtype).itemsize * case.size))
            sys.stdout.flush()
    if args.scaling:
        print(
            format_scaling(
                thread_scaling([by_name[n] for n in DRAM_CASES], dtypes, threads, rounds=rounds),
                threads,
            )
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"machine": machine_info(threads), "results": [asdict(r) for r in results]},
                fh,
                indent=1,
            )
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, machine_info(threads))
        print(f"wrote {args.plot}")
    return 0


def thread_scaling(cases, dtypes, threads, *, rounds):
    """Median seconds of fastbn (out=) forward+backward on 1 thread and on ``threads``,
    interleaved in this process: ``[(case, dtype, t1, tn)]``."""
    rows = []
    for case in cases:
        for dtype in dtypes:
            _progress(f"scaling: {case.name} {dtype}")
            data = make_data(case, dtype)
            run = make_runner("fastbn_out", "forward_backward", case, data)

            def on(n, run=run):
                def timed():
                    with _threading.num_threads(n):
                        run()

                return timed

            med = interleaved_medians({"1": on(1), "n": on(threads)}, rounds=rounds)
            rows.append((case.name, np.dtype(dtype).name, med["1"], med["n"]))
    return rows


def format_scaling(rows, threads):
    lines = [
        f"\nthread scaling, fastbn forward+backward with out=: 1 vs {threads} threads",
        f"{'case':20s}{'dtype':>9s}{'1 thread ms':>13s}{f'{threads} threads ms':>14s}"
        f"{'speedup':>9s}",
    ]
    for name, dtype, t1, tn in rows:
        lines.append(f"{name:20s}{dtype:>9s}{t1 * 1e3:13.2f}{tn * 1e3:14.2f}{t1 / tn:9.2f}")
    return "\n".join(lines)


def machine_info(threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = torch_or_none()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "threads": threads,
        "threading_layer": _threading.threading_layer_name(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": getattr(torch, "__version__", None),
    }


def _header(threads, with_torch):
    info = machine_info(threads)
    return (
        f"fastbn bench  {info['date']}  {info['cpu']}  threads={threads} "
        f"({info['threading_layer']})  numpy {info['numpy']}  numba {info['numba']}"
        + (f"  torch {info['torch']}" if with_torch else "")
        + "\n"
        "ms: median; x ref / x torch: speedup of fastbn (allocating) over them; "
        "GB/s: minimal traffic / time; units: time / same-process probe time"
    )


def format_table(case, results, nbytes):
    impls = [i for i in IMPLS if i in results[0].ms]
    head = (
        f"{'op':17s}"
        + "".join(f"{i:>11s}" for i in impls)
        + (f"{'x ref':>8s}{'x torch':>8s}{'GB/s':>7s}{'units':>7s}{'out=':>6s}")
    )
    lines = [
        f"\n{case.name}  shape={case.shape} axis={case.axis} {results[0].dtype}  "
        f"probe {results[0].probe_ms:.3f} ms",
        head,
    ]
    for r in results:
        row = f"{r.op:17s}" + "".join(f"{r.ms[i]:11.3f}" for i in impls)
        ref = r.ms.get("reference")
        tor = r.ms.get("torch")
        row += f"{ref / r.ms['fastbn']:8.1f}" if ref else f"{'-':>8s}"
        row += f"{tor / r.ms['fastbn']:8.2f}" if tor else f"{'-':>8s}"
        row += f"{r.gbps('fastbn_out', nbytes):7.1f}{r.units('fastbn'):7.2f}"
        row += f"{r.units('fastbn_out'):6.2f}"
        lines.append(row)
    return "\n".join(lines)


def plot(results, path, info):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fastbn[plot]'") from None
    ops = [op for op in OPS if any(r.op == op for r in results)]
    labels = sorted(
        {(r.case, r.dtype) for r in results},
        key=lambda k: ([c.name for c in CASES].index(k[0]), k[1]),
    )
    has_torch = any("torch" in r.ms for r in results)
    fig, axes = plt.subplots(
        1, 2 if has_torch else 1, figsize=(13 if has_torch else 7, 5.5), squeeze=False
    )
    width = 0.8 / len(ops)
    for ax, (other, title) in zip(
        axes[0], (("reference", "vs naive NumPy reference"), ("torch", "vs PyTorch CPU"))
    ):
        for k, op in enumerate(ops):
            vals = []
            for case, dtype in labels:
                r = next((r for r in results if (r.case, r.dtype, r.op) == (case, dtype, op)), None)
                vals.append(r.ms[other] / r.ms["fastbn"] if r and other in r.ms else 0)
            ax.bar(np.arange(len(labels)) + k * width, vals, width, label=op)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(labels)) + width * (len(ops) - 1) / 2)
        ax.set_xticklabels([f"{c}\n{d}" for c, d in labels], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup of fastbn (x)")
        ax.set_title(f"fastbn {title}")
        ax.set_yscale("log")  # speedups span orders of magnitude
        ax.legend(fontsize=7)
    fig.suptitle(f"{info['date']}  {info['cpu']}  {info['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
