"""Run under ``mpiexec -n P``: SyncBatchNorm on local parts vs BatchNorm on the whole batch.

Every rank builds the same global batches (same seed), takes its rows, and compares its
``y``, ``dx``, the rank-sums of ``dgamma``/``dbeta`` and the running statistics (after two
steps) with ``fastbn.BatchNorm`` on the concatenated batch; then ``collect_stats`` with a
different number of batches per rank against ``np.mean``/``np.var(ddof=1)``. Rank 0 prints
one JSON line per case: the worst relative errors and whether the running statistics have
the same bits on every rank. Usage: ``check_sync.py SPLIT [SPLIT ...]``, a split being
rows per rank joined by ``+`` (e.g. ``7+3``).
"""

import json
import sys

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
# name -> (shape of one row of the batch axis, axis, transform of the global batch)
LAYOUTS = {"ND": ((6,), 1), "NCHW": ((5, 3, 4), 1), "NHWC": ((3, 4, 5), -1)}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if b.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def same_on_all_ranks(a):
    bufs = comm.allgather(np.ascontiguousarray(a).tobytes())
    return all(b == bufs[0] for b in bufs)


def run_case(split, layout, dtype):
    rest, axis = LAYOUTS[layout]
    rng = np.random.default_rng(7)
    N = sum(split)
    lo = sum(split[:rank])
    ref = fastbn.BatchNorm(rest[axis - 1] if axis > 0 else rest[-1], axis=axis, dtype=dtype)
    C = ref.num_features
    sync = SyncBatchNorm(C, axis=axis, dtype=dtype, timeout=120)
    for layer in (ref, sync):
        layer.gamma[...] = 1.0 + 0.3 * np.arange(C)
        layer.beta[...] = np.linspace(-1, 1, C)
    err = {}
    for _step in range(2):
        x = (3.0 + 2.0 * rng.standard_normal((N, *rest))).astype(dtype)
        dy = rng.standard_normal((N, *rest)).astype(dtype)
        y_ref = ref.forward(x)
        dx_ref = ref.backward(dy)
        y = sync.forward(x[lo : lo + split[rank]])
        dx = sync.backward(dy[lo : lo + split[rank]])
        dgamma = comm.allreduce(sync.dgamma.astype(np.float64))
        dbeta = comm.allreduce(sync.dbeta.astype(np.float64))
        for name, a, b in (
            ("y", y, y_ref[lo : lo + split[rank]]),
            ("dx", dx, dx_ref[lo : lo + split[rank]]),
            ("dgamma", dgamma, ref.dgamma),
            ("dbeta", dbeta, ref.dbeta),
            ("running_mean", sync.running_mean, ref.running_mean),
            ("running_var", sync.running_var, ref.running_var),
        ):
            err[name] = max(err.get(name, 0.0), comm.allreduce(rel(a, b), op=MPI.MAX))
    identical = same_on_all_ranks(sync.running_mean) and same_on_all_ranks(sync.running_var)
    return {
        "split": split,
        "layout": layout,
        "dtype": np.dtype(dtype).name,
        "err": err,
        "identical": identical,
    }


def collect_case(layout):
    """Rank r sees r + 1 batches of sizes 5, 6, ...; the exact statistics of all of them."""
    rest, axis = LAYOUTS[layout]
    rng = np.random.default_rng(11)
    batches = [
        [(1e3 + rng.standard_normal((5 + b, *rest))) for b in range(r + 1)] for r in range(size)
    ]
    sync = SyncBatchNorm(
        rest[axis - 1] if axis > 0 else rest[-1], axis=axis, dtype=np.float64, timeout=120
    )
    with sync.collect_stats():
        for xb in batches[rank]:
            sync.forward(xb)
    every = np.concatenate([xb for part in batches for xb in part])
    red = tuple(i for i in range(every.ndim) if i != axis % every.ndim)
    err = {
        "mean": rel(sync.running_mean, np.mean(every, axis=red)),
        "var": rel(sync.running_var, np.var(every, axis=red, ddof=1)),
    }
    return {"collect": layout, "err": err, "identical": same_on_all_ranks(sync.running_var)}


results = []
for spec in sys.argv[1:]:
    split = [int(s) for s in spec.split("+")]
    assert len(split) == size, (split, size)
    for layout in LAYOUTS:
        for dtype in (np.float32, np.float64):
            results.append(run_case(split, layout, dtype))
for layout in LAYOUTS:
    results.append(collect_case(layout))
if rank == 0:
    for r in results:
        print(json.dumps(r), flush=True)
