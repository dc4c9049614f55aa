"""``mpiexec -n 2 python tests/mpi/cost.py``: SyncBatchNorm forward+backward against plain
BatchNorm forward+backward on the same ranks at the same time, (32768, 256) float32 per
rank, one thread per rank. Interleaved rounds, medians; rank 0 prints the ratio."""

import time

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
fastbn.set_num_threads(1)
rng = np.random.default_rng(comm.Get_rank())
x = rng.standard_normal((32768, 256)).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
plain, sync = fastbn.BatchNorm(256), SyncBatchNorm(256)
times = {"plain": [], "sync": []}
for _ in range(3):  # warm up
    for layer in (plain, sync):
        layer(x)
        layer.backward(dy)
for _ in range(40):
    for name, layer in (("plain", plain), ("sync", sync)):
        comm.Barrier()
        t0 = time.perf_counter()
        layer(x)
        layer.backward(dy)
        times[name].append(time.perf_counter() - t0)
med = {k: float(np.median(v)) for k, v in times.items()}
med = {k: comm.allreduce(v, op=MPI.MAX) for k, v in med.items()}
if comm.Get_rank() == 0:
    print(
        f"plain {med['plain'] * 1e3:.2f} ms  sync {med['sync'] * 1e3:.2f} ms  "
        f"ratio {med['sync'] / med['plain']:.3f}"
    )
