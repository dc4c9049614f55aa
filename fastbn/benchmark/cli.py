"""``python -m fastbn bench``: options, and the order of a run.

A run checks fastbn against the float64 reference first (and stops if it is wrong), warms
the kernels, then times each case and prints its table as it goes, with a warning line
under any result that the noise checks flag, the bars the run measured and a summary of
the noise at the end.
"""

import sys
import time
from dataclasses import dataclass

import numba
import numpy as np

from .. import _choice, set_num_threads
from . import noise, report
from .cases import (
    BUSY_CASES,
    CASES,
    DRAM_CASES,
    FUSION_CASES,
    IMPLS,
    OPS,
    select_cases,
    torch_or_none,
)
from .runners import FUSION_IMPLS, fusion_available
from .suite import bench_case, busy_case, check_against_reference, thread_scaling, warm_up


def add_arguments(parser):
    add = parser.add_argument
    add(
        "--threads",
        type=int,
        default=None,
        help=f"threads for fastbn and torch (default: all, {numba.config.NUMBA_NUM_THREADS})",
    )
    add("--dtype", choices=("float32", "float64", "both"), default="float32")
    add("--ops", default=None, help="comma-separated subset of " + ",".join(OPS) + " (or all)")
    add("--cases", default=None, help="comma-separated case names (default: all; see --list)")
    add("--quick", action="store_true", help="fewer cases and rounds (about 20 s)")
    add("--rounds", type=int, default=None, help="timing rounds per case")
    add("--no-torch", action="store_true", help="leave torch out")
    add("--no-fusion", action="store_true", help="leave out batch norm + ReLU (when available)")
    add("--json", metavar="FILE", help="write all results as JSON")
    add(
        "--plot",
        metavar="FILE.png",
        help="draw the speedups (needs matplotlib: pip install 'fastbn[plot]')",
    )
    add("--list", action="store_true", help="list the cases and exit")
    add(
        "--scaling",
        action="store_true",
        help="also time fastbn (out=) forward+backward on 1 thread against "
        "--threads, interleaved in this process, on the DRAM-sized cases",
    )
    add(
        "--busy",
        action="store_true",
        help="instead of the tables: fastbn on 1 thread and on --threads side by side while "
        "one spinning process per core runs (each stops by itself); default cases "
        + ", ".join(BUSY_CASES)
        + "; default op forward_backward",
    )
    add("--busy-procs", type=int, default=None, help="spinning processes (default: one per core)")


@dataclass
class Settings:
    threads: int
    dtypes: tuple
    ops: tuple
    cases: list
    rounds: int
    budget_s: float
    impls: tuple
    fusion: bool
    fusion_cases: list


def settings(args):
    """What ``args`` ask for, checked: unknown ops or cases raise SystemExit."""
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
    if args.ops in (None, "all"):
        ops = ("forward_backward",) if args.busy and args.ops is None else OPS
    else:
        ops = tuple(o.strip() for o in args.ops.split(","))
    for op in ops:
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    cases = select_cases(args.cases, quick=args.quick, default=BUSY_CASES if args.busy else None)
    with_torch = not args.no_torch and torch_or_none() is not None
    impls = tuple(i for i in IMPLS if i != "torch" or with_torch)
    fusion = fusion_available() and not args.no_fusion and not args.busy
    fusion_cases = cases if args.cases else [c for c in cases if c.name in FUSION_CASES]
    return Settings(
        threads,
        dtypes,
        ops,
        cases,
        args.rounds or (5 if args.quick else 7),
        1.0 if args.quick else 2.0,
        impls,
        fusion,
        fusion_cases if fusion else [],
    )


def _progress(msg):
    print(msg, file=sys.stderr, flush=True)


def _list_cases():
    for case in CASES:
        extra = [f"dtype={case.dtype}"] * bool(case.dtype) + ["BatchNorm"] * case.layer
        extra += ["channels_last"] * case.channels_last + ["small"] * case.small
        print(f"{case.name:34s} shape={case.shape} axis={case.axis} {' '.join(extra)}".rstrip())


def check_accuracy(cfg):
    """Print the accuracy line; False (after printing the failures) when any is wrong."""
    _progress("checking fastbn against the float64 reference ...")
    checks = []
    for case in cfg.cases:
        checks += check_against_reference([case], case.dtypes(cfg.dtypes))
    worst = max(checks, key=lambda r: r[3] / r[4])
    bad = [r for r in checks if not r[3] <= r[4]]
    print(
        f"accuracy vs float64 reference: {len(checks)} outputs, worst relative error "
        f"{worst[3]:.1e} ({worst[0]} {worst[1]} {worst[2]}, tolerance {worst[4]:.0e})"
    )
    for row in bad:
        print(f"  FAILED {row}")
    return not bad


def run_tables(cfg):
    """The main tables (and the fusion tables), printed case by case."""
    results, fusion = [], []
    with_torch = "torch" in cfg.impls
    fusion_impls = [i for i in ("fastbn_out", *FUSION_IMPLS) if i != "torch_relu" or with_torch]
    started = time.perf_counter()
    for i, case in enumerate(cfg.cases):
        for dtype in case.dtypes(cfg.dtypes):
            _progress(
                f"[{i + 1}/{len(cfg.cases)}] {case.name} {dtype} "
                f"({time.perf_counter() - started:.0f} s elapsed)"
            )
            kw = dict(threads=cfg.threads, rounds=cfg.rounds, budget_s=cfg.budget_s)
            res = bench_case(case, dtype, cfg.ops, cfg.impls, **kw)
            results.extend(res)
            print(report.format_table(case, res, np.dtype(dtype).itemsize * case.size))
            if case in cfg.fusion_cases:
                res = bench_case(case, dtype, cfg.ops, fusion_impls, **kw)
                fusion.extend(res)
                print(report.format_fusion(case, res))
            sys.stdout.flush()
    return results, fusion


def run_busy(cfg, procs):
    rows = []
    for case in cfg.cases:
        for dtype in case.dtypes(cfg.dtypes):
            _progress(f"busy: {case.name} {dtype} under {procs} spinning processes")
            rows += busy_case(
                case,
                dtype,
                cfg.ops,
                threads=cfg.threads,
                rounds=cfg.rounds,
                procs=procs,
                budget_s=cfg.budget_s,
            )
    print(report.format_busy(rows, procs))
    return rows


def run(args):
    if args.list:
        _list_cases()
        return 0
    # steady state: each plan times both modes from its first calls (fastbn._choice)
    with _choice.delay(0):
        return _run(args)


def _run(args):
    cfg = settings(args)
    set_num_threads(cfg.threads)
    load_start = noise.load_average()
    print(report.header(cfg.threads, "torch" in cfg.impls))
    if not check_accuracy(cfg):
        return 1
    _progress("warming up the kernels ...")
    warm_up({d for c in cfg.cases for d in c.dtypes(cfg.dtypes)})
    started = time.perf_counter()
    results, fusion, busy, scaling = [], [], [], []
    if args.busy:
        busy = run_busy(cfg, args.busy_procs or noise.cores())
    else:
        results, fusion = run_tables(cfg)
    if args.scaling:
        dram = select_cases(",".join(DRAM_CASES))
        scaling = thread_scaling(
            dram, cfg.dtypes, cfg.threads, rounds=cfg.rounds, progress=_progress
        )
        print(report.format_scaling(scaling, cfg.threads))
    bars = report.evaluate_bars(results, busy, fusion)
    if bars:
        print(report.format_bars(bars))
    summary = noise.summarize(
        [r.noise for r in (*results, *fusion, *busy)],
        load_start=load_start,
        expected=("load",) if args.busy else (),
    )
    print(report.format_noise_summary(summary))
    print(f"total {time.perf_counter() - started:.0f} s")
    info = report.machine_info(cfg.threads)
    if args.json:
        report.write_json(args.json, info=info, summary=summary, results=results, fusion=fusion,
                          busy=busy, scaling=scaling, bars=bars)  # fmt: skip
        print(f"wrote {args.json}")
    if args.plot:
        from .plot import plot

        plot(results, args.plot, info)
        print(f"wrote {args.plot}")
    return 0
