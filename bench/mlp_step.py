"""The whole training run of the examples MLP with fastbn, with the reference layer, and
with fastbn on one thread, interleaved in one process (issue 11's network bar).

    python bench/mlp_step.py [--rounds 11]

The network is ``fastbn.examples.mlp.MLP(64, [100] * 5, 10, weight_scale="he")`` (five
ReLU-fused batch-norm layers, float64) on scikit-learn's 8x8 digits (all 1797 images,
scaled to [0, 1]), batches of 100, SGD with lr 0.1, 4 epochs with a training-set accuracy
pass (eval mode, one (1797, 100) batch per layer) after each. One round trains a fresh
network once with each of ``fastbn``, ``reference`` (``batch_norm="reference"``) and
``fastbn`` under ``fastbn.num_threads(1)``, in that order; the figures are medians over the
rounds of the whole run's seconds, of the seconds inside batch-norm calls, and of the
per-round ratios. This is done twice: with BLAS at its default thread count and limited to
one thread by threadpoolctl. Needs scikit-learn (which brings threadpoolctl).
"""

import argparse
import time

import numpy as np

import fastbn
from fastbn.benchmark.report import machine_info
from fastbn.examples.mlp import MLP, SGD

KINDS = ("fastbn", "reference", "fastbn 1 thread")


def train_once(x, labels, kind, epochs=4, batch=100):
    """Seconds of the whole run, seconds inside batch norm, final training accuracy."""
    net = MLP(64, [100] * 5, 10, weight_scale="he", batch_norm=kind.split()[0], seed=0)
    opt = SGD(net.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        net.train()
        for first in range(0, len(x) - batch + 1, batch):
            idx = order[first : first + batch]
            net.loss(x[idx], labels[idx])
            net.backward()
            opt.step(net.gradients())
        accuracy = net.accuracy(x, labels)
    return time.perf_counter() - start, net.bn_seconds, accuracy


def run(x, labels, kind):
    if kind == "fastbn 1 thread":
        with fastbn.num_threads(1):
            return train_once(x, labels, kind)
    return train_once(x, labels, kind)


def measure(x, labels, rounds):
    for kind in KINDS:  # compile, fill caches and pools
        run(x, labels, kind)
    results = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind in KINDS:
            results[kind].append(run(x, labels, kind))
    return results


def report(blas, results):
    fast, ref, one = (results[k] for k in KINDS)
    total = {k: np.median([r[0] for r in v]) for k, v in results.items()}
    inside = {k: np.median([r[1] for r in v]) * 1e3 for k, v in results.items()}
    vs_ref = np.median([a[0] / b[0] for a, b in zip(fast, ref)])
    vs_one = np.median([a[0] / b[0] for a, b in zip(fast, one)])
    print(
        f"BLAS {blas}: whole run fastbn {total['fastbn']:.4f} s, reference "
        f"{total['reference']:.4f} s, fastbn 1 thread {total['fastbn 1 thread']:.4f} s; "
        f"inside batch norm {inside['fastbn']:.1f} / {inside['reference']:.1f} / "
        f"{inside['fastbn 1 thread']:.1f} ms; fastbn / reference {vs_ref:.3f} (bar <= 0.6), "
        f"fastbn / 1 thread {vs_one:.3f} (bar <= 1.1); training accuracy "
        f"{fast[-1][2]:.3f} / {ref[-1][2]:.3f}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    args = parser.parse_args(argv)
    from sklearn.datasets import load_digits
    from threadpoolctl import threadpool_limits

    digits = load_digits()
    x, labels = digits.data / 16.0, digits.target
    info = machine_info(fastbn.get_num_threads())
    print(f"{info['date']}  {info['cpu']}  fastbn threads {info['threads']} "
          f"({info['threading_layer']})  numpy {info['numpy']}  rounds {args.rounds}")  # fmt: skip
    report("default", measure(x, labels, args.rounds))
    with threadpool_limits(1, user_api="blas"):
        report("1 thread", measure(x, labels, args.rounds))


if __name__ == "__main__":
    main()
