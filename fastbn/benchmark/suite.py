"""What one run times: the accuracy check first, then per case the implementations with
the probe, the fusion, thread scaling and the busy-machine comparison."""

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import functional, layer, num_threads
from .. import reference as ref
from . import noise
from .busy import BusyLoad
from .cases import MIN_TRAFFIC, Case, make_data
from .runners import make_runner
from .timing import interleaved_samples, make_probe, medians


@dataclass
class Result:
    """Median times of ``op`` on one case and dtype, in ms, by implementation."""

    case: str
    shape: tuple
    layout: str
    dtype: str
    op: str
    threads: int
    probe_ms: float
    ms: dict  # impl -> median ms
    copyto_ms: float = None  # np.copyto of x's bytes, small cases only
    api: str = "batch_norm"  # or "BatchNorm": how fastbn was called
    noise: dict = None  # noise.assess's record

    def units(self, impl):
        return self.ms[impl] / self.probe_ms

    def gbps(self, impl, nbytes):
        return MIN_TRAFFIC[self.op] * nbytes / (self.ms[impl] * 1e-3) / 1e9


@dataclass
class BusyResult:
    """fastbn's median ms on 1 and on ``threads`` threads under ``procs`` spinners."""

    case: str
    dtype: str
    op: str
    threads: int
    procs: int
    ms_1: float
    ms_n: float
    out_ms_1: float
    out_ms_n: float
    noise: dict = None


def bench_case(case, dtype, ops, impls, *, threads, rounds, budget_s=None, progress=None):
    """Time ``ops`` x ``impls`` on one case (with the probe, and ``np.copyto`` on a small
    case), interleaved; returns a list of Result, one per op."""
    data = make_data(case, dtype)
    probe = make_probe(data)
    results = []
    for op in ops:
        fns = {"probe": probe}
        if case.small:
            fns["copyto"] = make_runner("copyto", op, case, data)
        for impl in impls:
            runner = make_runner(impl, op, case, data, threads=threads)
            if runner is not None:
                fns[impl] = runner
        samples = interleaved_samples(fns, rounds=rounds, budget_s=budget_s, short=("reference",))
        med = {k: v * 1e3 for k, v in medians(samples).items()}
        copyto = med.pop("copyto", None)
        results.append(
            Result(
                case.name,
                case.shape,
                case.layout,
                np.dtype(dtype).name,
                op,
                threads,
                med.pop("probe"),
                med,
                copyto_ms=copyto,
                api="BatchNorm" if case.layer else "batch_norm",
                noise=noise.assess(samples, load=noise.load_average()),
            )
        )
        if progress:
            progress(f"  {case.name} {np.dtype(dtype).name} {op}: done")
    return results


def busy_case(case, dtype, ops, *, threads, rounds, procs, budget_s=None):
    """fastbn (allocating and ``out=``) on 1 thread and on ``threads``, interleaved,
    while ``procs`` background processes spin; returns a list of BusyResult."""
    data = make_data(case, dtype)
    runners = {op: [make_runner(i, op, case, data) for i in ("fastbn", "fastbn_out")] for op in ops}
    seconds = 30.0 + 6.0 * len(ops) * (budget_s or 2.0)
    rows = []
    with BusyLoad(procs, seconds) as load:
        for op, (alloc, out) in runners.items():
            fns = {"1": alloc, "n": alloc, "out 1": out, "out n": out}
            one, many = (lambda: num_threads(1)), (lambda: num_threads(threads))
            wrap = {"1": one, "n": many, "out 1": one, "out n": many}
            samples = interleaved_samples(fns, rounds=rounds, budget_s=budget_s, wrap=wrap)
            record = noise.assess(samples, load=noise.load_average())
            if not load.alive():
                record["noisy"] = True
                record["kinds"].append("busy")
                record["reasons"].append("the background load stopped before the timing did")
            ms = {k: v * 1e3 for k, v in medians(samples).items()}
            rows.append(
                BusyResult(
                    case.name, np.dtype(dtype).name, op, threads, procs,
                    ms["1"], ms["n"], ms["out 1"], ms["out n"], record,
                )
            )  # fmt: skip
    return rows


def thread_scaling(cases, dtypes, threads, *, rounds, progress=None):
    """Median seconds of fastbn (out=) forward+backward on 1 thread and on ``threads``,
    interleaved in this process: ``[(case, dtype, t1, tn)]``."""
    rows = []
    for case in cases:
        for dtype in case.dtypes(dtypes):
            if progress:
                progress(f"scaling: {case.name} {dtype}")
            run = make_runner("fastbn_out", "forward_backward", case, make_data(case, dtype))
            wrap = {"1": lambda: num_threads(1), "n": lambda: num_threads(threads)}
            med = medians(interleaved_samples({"1": run, "n": run}, rounds=rounds, wrap=wrap))
            rows.append((case.name, np.dtype(dtype).name, med["1"], med["n"]))
    return rows


def warm_up(dtypes):
    """Compile (or load) every kernel before any timing."""
    for dtype in dtypes:
        small = make_data(Case("warm", (64, 8)), dtype)
        y, cache = functional.batch_norm(small["x"], small["gamma"], small["beta"])
        functional.batch_norm_backward(small["dy"], cache)


def _small_version(case):
    """The case's layout and axis at a size the reference checks in a moment."""
    if len(case.shape) == 2:
        return dataclasses.replace(case, shape=(257, min(case.shape[1], 4100)))
    if case.shape[0] > 8:
        return dataclasses.replace(case, shape=(8,) + case.shape[1:])
    return case


def _fastbn_outputs(case, data):
    """``y, dx, dgamma, dbeta`` from fastbn, called as the case calls it."""
    x, dy, g, b = data["x"], data["dy"], data["gamma"], data["beta"]
    if case.layer:
        bn = layer.BatchNorm(case.C, axis=case.axis, dtype=x.dtype)
        bn.gamma[...], bn.beta[...] = g, b
        y = bn.forward(x)
        return y, bn.backward(dy), bn.dgamma, bn.dbeta
    y, cache = functional.batch_norm(x, g, b, axis=case.axis)
    return (y, *functional.batch_norm_backward(dy, cache))


def check_against_reference(cases, dtypes):
    """Max relative error of fastbn vs the float64 reference on a small version of each
    case (same layout, axis and API) in each of ``dtypes``. Returns rows (case, dtype,
    output, error, tolerance)."""
    rows = []
    for case in cases:
        small = _small_version(case)
        for dtype in dtypes:
            data = make_data(small, dtype, seed=1)
            got = _fastbn_outputs(small, data)
            f64 = {k: data[k].astype(np.float64) for k in ("x", "dy", "gamma", "beta")}
            y_ref, ref_cache = ref.batch_norm(f64["x"], f64["gamma"], f64["beta"], axis=case.axis)
            want = (y_ref, *ref.batch_norm_backward(f64["dy"], ref_cache))
            tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-10
            for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), got, want):
                err = float(np.max(np.abs(g - w)) / np.max(np.abs(w)))
                rows.append((case.name, np.dtype(dtype).name, name, err, tol))
    return rows
