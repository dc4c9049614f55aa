"""Time the "Deep Learning from Scratch" drop-in in the book's own training loop.

The network of the book's ch06 batch-norm experiment: 5 hidden layers of 100,
``Affine -> BatchNormalization -> ReLU``, batches of 100 drawn with replacement from
1000 training samples, SGD (lr 0.01) on a params dict, accuracy on the training and
test sets after every epoch, float64 throughout. Two layers are timed in turn, in one
process, alternating run by run:

- ``textbook``: the naive layer (the book's formulas, staged, via ``fastbn.reference``
  with the book's eps, momentum and biased running variance);
- ``fastbn``: ``fastbn.compat.dlfs.BatchNormalization``.

For each it prints the whole run's time and the time spent inside the batch-norm
calls (training forward, backward, and the test-mode forwards of the accuracy
evaluations, timed separately), medians over the repeats. Data: scikit-learn's digits
(64 pixels) when installed, else a synthetic 64-dimensional 10-class set.

    python bench/compat_timing.py                       # default thread counts
    python bench/compat_timing.py --fastbn-threads 1    # fastbn on one thread

NumPy's BLAS threads (``OPENBLAS_NUM_THREADS`` etc.) are set from the environment
before NumPy is imported, as usual.
"""

import argparse
import time
from collections import OrderedDict

import numpy as np

import fastbn
from fastbn import reference
from fastbn.compat.dlfs import EPS, BatchNormalization
from fastbn.examples.mlp import Affine, ReLU, SoftmaxCrossEntropy


class TextbookBatchNormalization:
    """The naive layer: the book's interface over ``fastbn.reference`` (staged formulas,
    ``xc``/``xn``/``std`` kept for backward), with the book's conventions."""

    def __init__(self, gamma, beta, momentum=0.9):
        self.gamma, self.beta, self.momentum = gamma, beta, momentum
        self.running_mean = self.running_var = None

    def forward(self, x, train_flg=True):
        if self.running_mean is None:
            self.running_mean, self.running_var = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        if not train_flg:
            y, _ = reference.batch_norm(
                x,
                self.gamma,
                self.beta,
                training=False,
                running_mean=self.running_mean,
                running_var=self.running_var,
                eps=EPS,
            )
            return y
        rm, rv = self.running_mean.copy(), self.running_var.copy()
        y, self._cache = reference.batch_norm(
            x,
            self.gamma,
            self.beta,
            running_mean=rm,
            running_var=rv,
            momentum=1.0 - self.momentum,
            eps=EPS,
            running_var_ddof=0,
        )
        self.running_mean, self.running_var = rm, rv
        return y

    def backward(self, dout):
        dx, self.dgamma, self.dbeta = reference.batch_norm_backward(dout, self._cache)
        return dx


class Clock:
    """Seconds spent in the batch-norm layers, by kind of call."""

    def __init__(self):
        self.seconds = {"train": 0.0, "backward": 0.0, "eval": 0.0}
        self.calls = dict.fromkeys(self.seconds, 0)

    def wrap(self, layer):
        clock = self

        class Timed:
            def __init__(self):
                self.layer = layer

            def forward(self, x, train_flg=True):
                t0 = time.perf_counter()
                y = layer.forward(x, train_flg)
                clock.add("train" if train_flg else "eval", time.perf_counter() - t0)
                return y

            def backward(self, dout):
                t0 = time.perf_counter()
                dx = layer.backward(dout)
                clock.add("backward", time.perf_counter() - t0)
                return dx

        return Timed()

    def add(self, kind, seconds):
        self.seconds[kind] += seconds
        self.calls[kind] += 1


def data_set(seed=0):
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        centres = rng.uniform(0, 1, (10, 64))
        t = rng.integers(0, 10, 1797)
        x = np.clip(centres[t] + 0.35 * rng.standard_normal((1797, 64)), 0, 1)
        name = "synthetic"
    else:
        digits = load_digits()
        x, t, name = digits.data / 16.0, digits.target, "digits"
    order = rng.permutation(len(t))
    x, t = x[order], t[order]
    return name, (x[:1000], t[:1000], x[1000:], t[1000:])


def train(bn_class, data, epochs, seed, weight_scale):
    """One run of the book's loop; returns (seconds, Clock, accuracies)."""
    x_train, t_train, x_test, t_test = data
    rng = np.random.default_rng(seed)
    sizes = [x_train.shape[1]] + [100] * 5 + [10]
    clock, params, layers = Clock(), {}, OrderedDict()
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        params[f"W{i}"] = weight_scale * rng.standard_normal((fan_in, fan_out))
        params[f"b{i}"] = np.zeros(fan_out)
        layers[f"W{i}"] = Affine(params[f"W{i}"], params[f"b{i}"])
        if i < len(sizes) - 1:
            params[f"gamma{i}"], params[f"beta{i}"] = np.ones(fan_out), np.zeros(fan_out)
            bn = bn_class(params[f"gamma{i}"], params[f"beta{i}"])
            layers[f"gamma{i}"] = clock.wrap(bn)
            layers[f"relu{i}"] = ReLU()
    head = SoftmaxCrossEntropy()

    def predict(x, train_flg):
        for name, layer in layers.items():
            x = layer.forward(x, train_flg) if name.startswith("gamma") else layer.forward(x)
        return x

    accuracies = []
    t0 = time.perf_counter()
    for step in range(epochs * 10):
        batch = rng.choice(len(x_train), 100)
        head.forward(predict(x_train[batch], True), t_train[batch])
        d = head.backward()
        for layer in reversed(layers.values()):
            d = layer.backward(d)
        for name, layer in layers.items():
            i = name[-1]
            if name.startswith("W"):
                params[f"W{i}"] -= 0.01 * layer.dW
                params[f"b{i}"] -= 0.01 * layer.db
            elif name.startswith("gamma"):
                params[f"gamma{i}"] -= 0.01 * layer.layer.dgamma
                params[f"beta{i}"] -= 0.01 * layer.layer.dbeta
        if step % 10 == 0:
            accuracies.append(
                tuple(
                    round(float(np.mean(predict(x, False).argmax(axis=1) == t)), 3)
                    for x, t in ((x_train, t_train), (x_test, t_test))
                )
            )
    return time.perf_counter() - t0, clock, accuracies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weight-scale", type=float, default=0.1)
    parser.add_argument("--fastbn-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.fastbn_threads:
        fastbn.set_num_threads(args.fastbn_threads)
    name, data = data_set()
    layers = {"textbook": TextbookBatchNormalization, "fastbn": BatchNormalization}
    train(BatchNormalization, data, 1, 0, args.weight_scale)  # warm up (kernels loaded)
    runs = {k: [] for k in layers}
    for _ in range(args.repeats):
        for key, cls in layers.items():
            runs[key].append(train(cls, data, args.epochs, 1, args.weight_scale))
    same = runs["textbook"][0][2] == runs["fastbn"][0][2]
    print(
        f"data={name} epochs={args.epochs} repeats={args.repeats} fastbn threads="
        f"{fastbn.get_num_threads()} ({fastbn.threading_layer_name()}); accuracies "
        f"identical to 3 decimals at every epoch: {same}"
    )
    print(f"{'layer':9} {'run s':>7} {'in BN s':>8} {'train us':>9} {'bwd us':>7} {'eval us':>8}")
    medians = {}
    for key, results in runs.items():
        total = float(np.median([r[0] for r in results]))
        inside = float(np.median([sum(r[1].seconds.values()) for r in results]))
        per = {
            kind: float(np.median([r[1].seconds[kind] / r[1].calls[kind] for r in results]))
            for kind in ("train", "backward", "eval")
        }
        medians[key] = (total, inside)
        print(
            f"{key:9} {total:7.3f} {inside:8.3f} {per['train'] * 1e6:9.1f} "
            f"{per['backward'] * 1e6:7.1f} {per['eval'] * 1e6:8.1f}"
        )
    (t_run, t_bn), (f_run, f_bn) = medians["textbook"], medians["fastbn"]
    print(
        f"textbook / fastbn: whole run {t_run / f_run:.2f}x, inside batch norm {t_bn / f_bn:.2f}x"
    )


if __name__ == "__main__":
    main()
