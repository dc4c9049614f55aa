"""Data-parallel training of the examples MLP with SyncBatchNorm, and the same run on one
process with the full batches.

    mpiexec -n 2 python -m fastbn.examples.distributed     # each rank: its part of every batch
    python -m fastbn.examples.distributed                  # one process: the whole batches

The MLP (``fastbn.examples.mlp``: 16 -> 3 x [Affine -> batch norm -> ReLU] of width 32 -> 4,
float64, SGD) trains on a synthetic data set (a fixed random teacher labels Gaussian
inputs). On P ranks each global batch of 100 is split into P uneven contiguous parts; batch
norm is ``fastbn.distributed.SyncBatchNorm``, each rank's loss gradient is scaled by its
share of the batch, and every parameter gradient is summed over ranks with one
``Allreduce`` per array. Then every step equals the single-process step on the whole
batch, up to rounding: the printed losses agree to ~1e-15. Rank 0 prints one line per
epoch (the mean loss of the epoch's batches, over the whole batches) and, with
``--json``, a last line ``{"ranks": P, "loss": [...]}``.
"""

import argparse
import json

import numpy as np

import fastbn
from fastbn.examples.mlp import MLP, SGD


def make_data(n=1000, n_in=16, n_out=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_in)) * rng.uniform(0.5, 3.0, n_in) + rng.normal(0, 2, n_in)
    teacher = rng.standard_normal((n_in, n_out))
    labels = np.argmax(np.tanh(x @ teacher) + 0.3 * rng.standard_normal((n, n_out)), axis=1)
    return x, labels


def build(comm):
    """The MLP; its batch-norm layers replaced by SyncBatchNorm when ``comm`` is given."""
    # SyncBatchNorm does not fuse the ReLU: the blocks keep NumPy's ReLU apart
    net = MLP(16, [32, 32, 32], 4, weight_scale="he", batch_norm="fastbn", seed=1, fuse_relu=False)
    if comm is not None:
        from fastbn.distributed import SyncBatchNorm

        for timed in net.bn_layers:
            bn = timed.layer
            timed.layer = SyncBatchNorm(bn.num_features, comm=comm, dtype=bn.dtype)
    return net


def train(comm=None, epochs=5, batch=100, lr=0.2):
    """Per-epoch mean loss of the whole batches (identical on every rank)."""
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    x, labels = make_data()
    net = build(comm)
    opt = SGD(net.parameters(), lr=lr)
    order_rng = np.random.default_rng(2)
    losses = []
    for _ in range(epochs):
        order = order_rng.permutation(len(x))
        total = 0.0
        nbatches = 0
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            part = np.array_split(idx, size)[rank]  # uneven parts when batch % size != 0
            logits = net.forward(x[part])
            local_loss = net.criterion.forward(logits, labels[part]) * len(part)
            g = net.criterion.backward() * (len(part) / len(idx))  # share of the batch mean
            for layer in reversed(net.layers):
                g = layer.backward(g)
            grads = net.gradients()
            if comm is not None:
                from mpi4py import MPI

                for grad in grads:
                    comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
                local_loss = comm.allreduce(local_loss)
            opt.step(grads)
            total += local_loss / len(idx)
            nbatches += 1
        losses.append(total / nbatches)
        if rank == 0:
            print(f"epoch {len(losses)}: loss {losses[-1]!r}", flush=True)
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the losses as JSON last")
    args = parser.parse_args(argv)
    comm = None
    try:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            comm = MPI.COMM_WORLD
    except ImportError:
        pass
    fastbn.set_num_threads(1)
    losses = train(comm, epochs=args.epochs)
    if args.json and (comm is None or comm.Get_rank() == 0):
        print(json.dumps({"ranks": 1 if comm is None else comm.Get_size(), "loss": losses}))


if __name__ == "__main__":
    main()
