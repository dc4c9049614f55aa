"""Run under ``mpiexec -n P``: one rank disagrees or fails; every rank prints what it raised.

Usage: ``check_errors.py CASE``. Each rank prints ``rank R: <exception type>: <message>``
(or ``rank R: ok``) and exits 0, except in the ``raise`` case, where rank 1 raises outside
SyncBatchNorm and exits non-zero, and rank 0 must then time out instead of hanging.
"""

import os
import sys

import numpy as np
from mpi4py import MPI

from fastbn.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
case = sys.argv[1]


def report(text):
    os.write(1, f"rank {rank}: {text}\n".encode())  # one write: lines of ranks never mix


C = 4
x = np.random.default_rng(rank).standard_normal((6, C))
if case == "raise":
    if rank == 1:
        raise RuntimeError("rank 1 fails before its forward")
    SyncBatchNorm(C, dtype=np.float64, timeout=5).forward(x)
    raise AssertionError("rank 0 should have timed out")
try:
    if case == "channels":
        bn = SyncBatchNorm(C + rank, dtype=np.float64, timeout=60)
        bn.forward(np.zeros((6, C + rank)))
    elif case == "dtype":
        bn = SyncBatchNorm(C, dtype=np.float64, timeout=60)
        bn.forward(x.astype(np.float32 if rank == 1 else np.float64))
    elif case == "single":  # one value per channel in the whole batch
        bn = SyncBatchNorm(C, dtype=np.float64, timeout=60)
        bn.forward(x[: 1 if rank == 0 else 0])
    elif case == "bad_x":  # rank 1's x is not valid: the others learn it
        bn = SyncBatchNorm(C, dtype=np.float64, timeout=60)
        bn.forward(x[:, :3] if rank == 1 else x)
    elif case == "mode":  # rank 1 in eval mode does not communicate: rank 0 times out
        bn = SyncBatchNorm(C, dtype=np.float64, timeout=5)
        bn.train(rank != 1)
        bn.forward(x)
    elif case == "skip_backward":  # rank 1 skips backward: the next collective disagrees
        bn = SyncBatchNorm(C, dtype=np.float64, timeout=60)
        bn.forward(x)
        if rank != 1:
            bn.backward(np.ones_like(x))
        bn.forward(x)
    elif case == "comm":
        SyncBatchNorm(C, comm="world")
    report("ok")
except Exception as e:
    report(f"{type(e).__name__}: {e}")
