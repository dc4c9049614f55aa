"""``python -m fastbn demo``: what batch normalization does, shown with fastbn.

Trains the same MLP (64 -> 5 x [Affine -> BatchNorm -> ReLU] of width 100 -> 10,
float64, SGD) on scikit-learn's 8x8 digits with and without ``fastbn.BatchNorm``,
for a range of initial weight scales (every weight is ``scale * N(0, 1)``), and

* prints a line per scale on stderr while it trains;
* prints a summary on stdout: final train/test accuracy per scale with and without
  batch norm, the epoch each run first reached 90% training accuracy, and the time
  spent inside batch-norm calls, compared with the same runs (at 4 of the scales by
  default) using the naive ``fastbn.reference`` (``ReferenceBatchNorm``);
* runs an overfitting check: a small training subset (300 images) for many epochs,
  train vs test accuracy with and without batch norm (He initialization for both);
* writes a figure: one accuracy-vs-epoch panel per scale (both curves) and the
  overfitting panel.

Same seed, same initial weights and same batches for the runs with and without
batch norm at a given scale. The default run takes about a minute on 2 busy cores,
plus fastbn's one-time kernel compilation when Numba's cache is cold.
Use it as ``python -m fastbn demo [--out FILE.png] [--epochs N] [--scales K]``
(or ``python -m fastbn.examples.demo``).
"""

import argparse
import contextlib
import sys
import time

import numpy as np

import fastbn

from . import N_DIGITS, load_digits, require
from .demo_report import plot, summary
from .mlp import MLP, SGD, Adam, fit

__all__ = ["add_arguments", "run", "main", "sweep", "overfit", "plot", "DemoConfig"]


class DemoConfig:
    """Everything a demo run depends on (the command-line options, with their defaults)."""

    def __init__(
        self,
        *,
        epochs=20,
        scales=16,
        max_scale=1.0,
        min_scale=1e-4,
        train_size=1000,
        hidden=(100, 100, 100, 100, 100),
        batch_size=100,
        optimizer="sgd",
        lr=None,
        reference_runs=4,
        overfit_size=300,
        overfit_epochs=60,
        threads=None,
        seed=0,
    ):
        self.epochs = int(epochs)
        self.scales = int(scales)
        self.max_scale, self.min_scale = float(max_scale), float(min_scale)
        self.train_size = int(train_size)
        self.hidden = tuple(int(h) for h in hidden)
        self.batch_size = int(batch_size)
        self.optimizer = optimizer
        self.lr = float(lr) if lr is not None else (0.1 if optimizer == "sgd" else 1e-3)
        self.reference_runs = int(reference_runs)
        self.overfit_size = int(overfit_size)
        self.overfit_epochs = int(overfit_epochs)
        self.threads = None if threads is None else int(threads)
        self.seed = int(seed)
        if self.scales < 1 or self.epochs < 1 or self.batch_size < 2 or not self.hidden:
            raise ValueError(
                "need --scales >= 1, --epochs >= 1, --batch-size >= 2 and --depth >= 1"
            )
        if not 1 < self.train_size < N_DIGITS:
            raise ValueError(f"--train-size must be in [2, {N_DIGITS - 1}]")
        if self.overfit_epochs > 0 and not 1 < self.overfit_size <= self.train_size:
            raise ValueError("--overfit-size must be in [2, --train-size]")
        if not self.max_scale > 0 or not self.min_scale > 0:
            raise ValueError("weight scales must be > 0")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")

    def weight_scales(self):
        """``scales`` values log-spaced from ``max_scale`` down to ``min_scale``."""
        if self.scales == 1:
            return np.array([self.max_scale])
        return np.logspace(np.log10(self.max_scale), np.log10(self.min_scale), self.scales)

    def reference_indices(self):
        """Which scales are also trained with ``fastbn.reference``: ``reference_runs`` of
        them, spread evenly from the first to the last."""
        n = min(max(self.reference_runs, 0), self.scales)
        if n == 0:
            return set()
        return {int(i) for i in np.round(np.linspace(0, self.scales - 1, n))}

    def make_optimizer(self, params):
        if self.optimizer == "adam":
            return Adam(params, lr=self.lr)
        return SGD(params, lr=self.lr)

    def describe(self, n_train, n_test):
        arch = "-".join(str(n) for n in (64, *self.hidden, 10))
        return (
            f"8x8 digits ({n_train} train / {n_test} test images), MLP {arch}, float64, "
            f"{self.optimizer.upper()} lr={self.lr:g}, batch {self.batch_size}, "
            f"{self.epochs} epochs, "
            + ("default threads" if self.threads is None else f"{self.threads} thread(s)")
        )

    @classmethod
    def from_args(cls, args):
        return cls(
            epochs=args.epochs,
            scales=args.scales,
            max_scale=args.max_scale,
            min_scale=args.min_scale,
            train_size=args.train_size,
            hidden=[args.width] * args.depth,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            reference_runs=args.reference_runs,
            overfit_size=args.overfit_size,
            overfit_epochs=args.overfit_epochs,
            threads=args.threads,
            seed=args.seed,
        )


# --- command line ---------------------------------------------------------------------


def add_arguments(parser):
    """Add the demo's options to an argparse (sub)parser."""
    d = DemoConfig()
    parser.add_argument(
        "--out", default="fastbn-demo.png", metavar="FILE.png", help="figure (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs", type=int, default=d.epochs, metavar="N", help="default: %(default)s"
    )
    parser.add_argument(
        "--scales",
        type=int,
        default=d.scales,
        metavar="K",
        help="number of initial weight scales, log-spaced (default: %(default)s)",
    )
    parser.add_argument(
        "--max-scale", metavar="S", type=float, default=d.max_scale, help="default: 1"
    )
    parser.add_argument(
        "--min-scale", metavar="S", type=float, default=d.min_scale, help="default: 1e-4"
    )
    parser.add_argument(
        "--train-size",
        metavar="N",
        type=int,
        default=d.train_size,
        help="training images (default: 1000)",
    )
    parser.add_argument(
        "--depth", metavar="N", type=int, default=len(d.hidden), help="hidden layers (5)"
    )
    parser.add_argument(
        "--width", metavar="N", type=int, default=d.hidden[0], help="hidden width (100)"
    )
    parser.add_argument(
        "--batch-size", metavar="N", type=int, default=d.batch_size, help="default: 100"
    )
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer)
    parser.add_argument(
        "--lr", metavar="LR", type=float, default=None, help="default: 0.1 (SGD), 1e-3 (Adam)"
    )
    parser.add_argument(
        "--reference-runs",
        metavar="N",
        type=int,
        default=d.reference_runs,
        help="also train at N of the K scales with batch norm computed by fastbn.reference, "
        "to time the batch-norm calls both ways (default: %(default)s; 0 skips)",
    )
    parser.add_argument(
        "--overfit-size",
        metavar="N",
        type=int,
        default=d.overfit_size,
        help="overfitting check: images (300)",
    )
    parser.add_argument(
        "--overfit-epochs",
        metavar="N",
        type=int,
        default=d.overfit_epochs,
        help="overfitting check: epochs (default: %(default)s; 0 skips it)",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=int,
        default=d.threads,
        help="threads for fastbn and BLAS (default: their own defaults; fastbn runs serial "
        "kernels where threads would only wait, see README)",
    )
    parser.add_argument("--seed", metavar="N", type=int, default=d.seed)
    return parser


def run(args):
    """Run the demo for parsed ``args``; returns the exit code."""
    try:
        config = DemoConfig.from_args(args)
    except ValueError as exc:
        print(f"fastbn demo: {exc}", file=sys.stderr)
        return 2
    try:
        require("sklearn.datasets", "the demo's data (scikit-learn's digits)")
        require("matplotlib", "the demo's figure")
    except ImportError as exc:
        print(f"fastbn demo: {exc}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    log = _stderr_log
    with _limit_threads(config.threads):
        warm = warm_up(config)
        log(f"fastbn kernels ready in {warm:.1f} s (compiled once, then cached on disk)")
        results = sweep(config, log=log)
        over = overfit(config, log=log) if config.overfit_epochs > 0 else None
    print(summary(config, results, over))
    plot(config, results, over, args.out)
    print(f"\nfigure written to {args.out}; total time {time.perf_counter() - t_start:.0f} s")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastbn demo", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _stderr_log(message):
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _limit_threads(n):
    """fastbn's and, when threadpoolctl is there (it comes with scikit-learn), BLAS's threads."""
    with contextlib.ExitStack() as stack:
        if n is None:  # the libraries' defaults
            yield
            return
        n_fastbn = max(1, min(n, fastbn.get_num_threads()))
        stack.enter_context(fastbn.num_threads(n_fastbn))
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            stack.enter_context(threadpool_limits(n))
        yield


# --- experiments ----------------------------------------------------------------------


def warm_up(config):
    """Load (or compile) fastbn's kernels for the layers and shapes the runs use (the
    MLP's ``BatchNorm(activation="relu")``, see ``MLP``'s ``fuse_relu``), so that the
    time inside batch-norm calls does not include loading them; returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    width = config.hidden[0]
    bn = fastbn.BatchNorm(width, dtype=np.float64, activation="relu")
    for rows in (config.batch_size, N_DIGITS):  # a training batch; a whole evaluation set
        x = rng.standard_normal((rows, width))
        bn.train()
        bn.backward(bn(x))
        bn.eval()
        bn(x)
    return time.perf_counter() - t0


class ScaleResult:
    """The runs at one weight scale: ``bn``, ``plain`` and (optionally) ``reference`` Histories."""

    def __init__(self, scale, bn, plain, reference=None):
        self.scale, self.bn, self.plain, self.reference = scale, bn, plain, reference


def _train(config, data, scale, batch_norm, *, epochs, test_every_epoch):
    x_train, t_train, x_test, t_test = data
    net = MLP(
        x_train.shape[1],
        config.hidden,
        10,
        weight_scale=scale,
        batch_norm=batch_norm,
        seed=config.seed + 1,
    )
    return fit(
        net,
        config.make_optimizer(net.parameters()),
        x_train,
        t_train,
        x_test,
        t_test,
        epochs=epochs,
        batch_size=config.batch_size,
        seed=config.seed + 2,
        test_every_epoch=test_every_epoch,
    )


def sweep(config, log=None):
    """Train with fastbn and without batch norm at every scale (and with the reference at
    ``config.reference_indices()``); returns a list of ``ScaleResult``."""
    data = load_digits(config.train_size, seed=config.seed)
    if log:
        log(config.describe(len(data[0]), len(data[2])))
    results = []
    scales = config.weight_scales()
    with_reference = config.reference_indices()
    for i, scale in enumerate(scales, 1):
        kw = {"epochs": config.epochs, "test_every_epoch": False}
        bn = _train(config, data, scale, "fastbn", **kw)
        ref = None
        if i - 1 in with_reference:
            ref = _train(config, data, scale, "reference", **kw)
        plain = _train(config, data, scale, None, **kw)
        results.append(ScaleResult(scale, bn, plain, ref))
        if log:
            spent = bn.seconds + plain.seconds + (ref.seconds if ref else 0.0)
            log(
                f"[{i:2d}/{len(scales)}] weight scale {scale:.1e}: train accuracy "
                f"with BN {bn.train_acc[-1]:.3f}, without {plain.train_acc[-1]:.3f} "
                f"({spent:.1f} s)"
            )
    return results


class OverfitResult:
    def __init__(self, n_train, n_test, epochs, bn, plain):
        self.n_train, self.n_test, self.epochs = n_train, n_test, epochs
        self.bn, self.plain = bn, plain


def overfit(config, log=None):
    """A small training set for many epochs, He initialization, with and without batch norm.

    The first ``overfit_size`` training images of the sweep; the test images are the sweep's.
    """
    x_train, t_train, x_test, t_test = load_digits(config.train_size, seed=config.seed)
    n = config.overfit_size
    data = (x_train[:n], t_train[:n], x_test, t_test)
    kw = {"epochs": config.overfit_epochs, "test_every_epoch": True}
    t0 = time.perf_counter()
    bn = _train(config, data, "he", "fastbn", **kw)
    plain = _train(config, data, "he", None, **kw)
    if log:
        log(
            f"overfitting check ({len(data[0])} images, {config.overfit_epochs} epochs): "
            f"train/test with BN {bn.train_acc[-1]:.3f}/{bn.test_acc[-1]:.3f}, without "
            f"{plain.train_acc[-1]:.3f}/{plain.test_acc[-1]:.3f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return OverfitResult(len(data[0]), len(data[2]), config.overfit_epochs, bn, plain)


# --- report ---------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
