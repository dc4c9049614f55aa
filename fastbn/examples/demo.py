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
from .mlp import MLP, SGD, Adam, fit

__all__ = ["add_arguments", "run", "main", "sweep", "overfit", "plot", "DemoConfig"]

LEVEL = 0.9  # "learns": training accuracy at or above this


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
        threads=1,
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
        self.threads = int(threads)
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
            f"{self.epochs} epochs, {self.threads} thread(s)"
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
        help="threads for fastbn and BLAS (default: 1: the network is small, and more "
        "threads on a busy machine only wait for each other)",
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
    """Load (or compile) fastbn's kernels for the shapes the runs use; returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    width = config.hidden[0]
    bn = fastbn.BatchNorm(width, dtype=np.float64)
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


def _epoch(hist):
    e = hist.first_epoch_reaching(LEVEL)
    return "-" if e is None else str(e)


def summary(config, results, over=None):
    """The printed report: per-scale table, counts, batch-norm timing, overfitting."""
    n_train = config.train_size
    lines = [
        "",
        f"fastbn demo: {config.describe(n_train, N_DIGITS - n_train)}",
        "",
        "weight scale |  with batch norm (fastbn)  |  without batch norm",
        "             | train   test  epoch>=90%  | train   test  epoch>=90%",
    ]
    for r in results:
        bn, plain = r.bn, r.plain
        lines.append(
            f"{r.scale:12.1e} | {bn.train_acc[-1]:.3f}  {bn.test_acc[-1]:.3f}  {_epoch(bn):>7}"
            f"     | {plain.train_acc[-1]:.3f}  {plain.test_acc[-1]:.3f}  {_epoch(plain):>7}"
        )
    k = len(results)
    n_bn = sum(r.bn.train_acc[-1] >= LEVEL for r in results)
    n_plain = sum(r.plain.train_acc[-1] >= LEVEL for r in results)
    lines += [
        "",
        f"final training accuracy >= {LEVEL:.0%}: with batch norm at {n_bn}/{k} scales, "
        f"without at {n_plain}/{k}",
    ]
    timed = [r for r in results if r.reference is not None]
    fast_all = sum(r.bn.seconds for r in results)
    plain_all = sum(r.plain.seconds for r in results)
    lines.append(
        f"time inside batch-norm calls: fastbn {sum(r.bn.bn_seconds for r in results):.2f} s "
        f"of {fast_all:.1f} s training with batch norm; {plain_all:.1f} s training without"
    )
    if timed:
        fast_bn = sum(r.bn.bn_seconds for r in timed)
        ref_bn = sum(r.reference.bn_seconds for r in timed)
        fast_run = sum(r.bn.seconds for r in timed)
        ref_run = sum(r.reference.seconds for r in timed)
        diff = max(abs(r.bn.train_acc[-1] - r.reference.train_acc[-1]) for r in timed)
        calls = timed[0].bn.bn_calls
        lines += [
            f"the same {len(timed)} runs (scales "
            + ", ".join(f"{r.scale:.1e}" for r in timed)
            + f"; {calls} batch-norm calls each) with fastbn.reference:",
            f"  time inside batch-norm calls: fastbn {fast_bn:.2f} s, fastbn.reference "
            f"{ref_bn:.2f} s ({ref_bn / max(fast_bn, 1e-9):.1f}x)",
            f"  whole runs: fastbn {fast_run:.1f} s, fastbn.reference {ref_run:.1f} s",
            f"  largest difference in final training accuracy: {diff:.3f}",
        ]
    if over is not None:
        lines += [
            "",
            f"overfitting check: {over.n_train} training images, {over.epochs} epochs, "
            f"He initialization, tested on the same {over.n_test} test images",
            "                    train   test    gap",
        ]
        for name, h in (("with batch norm", over.bn), ("without", over.plain)):
            tr, te = h.train_acc[-1], h.test_acc[-1]
            lines.append(f"  {name:<17} {tr:.3f}  {te:.3f}  {tr - te:.3f}")
    return "\n".join(lines)


def plot(config, results, over, path):
    """Accuracy-vs-epoch panels per scale (and the overfitting panel) -> ``path`` (PNG)."""
    require("matplotlib", "the demo's figure")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    k = len(results)
    ncols = int(np.ceil(np.sqrt(k)))
    nrows = int(np.ceil(k / ncols))
    width = 2.3 * ncols + (4.2 if over is not None else 0.0)
    fig = plt.figure(figsize=(width, 2.0 * nrows + 0.9), dpi=80, layout="constrained")
    if over is not None:
        left, right = fig.subfigures(1, 2, width_ratios=[2.3 * ncols, 4.2])
    else:
        left, right = fig, None
    axes = np.atleast_1d(left.subplots(nrows, ncols, sharex=True, sharey=True)).ravel()
    epochs = np.arange(config.epochs + 1)
    for ax, r in zip(axes, results):
        ax.plot(epochs, r.bn.train_acc, color="C0", lw=2, label="with fastbn.BatchNorm")
        ax.plot(epochs, r.plain.train_acc, color="C1", lw=1.5, ls="--", label="without")
        ax.set_title(f"weight scale {r.scale:.1e}", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[k:]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols :]:
        ax.set_xlabel("epoch", fontsize=9)
    for ax in axes[::ncols]:
        ax.set_ylabel("train accuracy", fontsize=9)
    axes[0].legend(fontsize=7, loc="center right")
    n_bn = sum(r.bn.train_acc[-1] >= LEVEL for r in results)
    n_plain = sum(r.plain.train_acc[-1] >= LEVEL for r in results)
    left.suptitle(
        "Training accuracy per initial weight scale\n"
        f"8x8 digits, MLP 64-{config.hidden[0]}x{len(config.hidden)}-10, "
        f"{config.optimizer.upper()} lr={config.lr:g}, batch {config.batch_size}, "
        f"{len(results[0].bn.train_acc) - 1} epochs\n"
        f">= 90% at {n_bn}/{k} scales with batch norm, {n_plain}/{k} without",
        fontsize=10,
    )
    if right is not None:
        _plot_overfit(right, over)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _plot_overfit(fig, over):
    ax = fig.subplots()
    ep = np.arange(over.epochs + 1)
    ax.plot(ep, over.bn.train_acc, color="C0", lw=2, label="with BN, train")
    ax.plot(ep, over.bn.test_acc, color="C0", lw=1.5, ls=":", label="with BN, test")
    ax.plot(ep, over.plain.train_acc, color="C1", lw=2, ls="--", label="without, train")
    ax.plot(ep, over.plain.test_acc, color="C1", lw=1.5, ls="-.", label="without, test")
    low = min(over.bn.test_acc[-1], over.plain.test_acc[-1])
    ax.set_ylim(max(0.0, low - 0.15), 1.01)  # the plateau matters, not the first epochs
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylabel("accuracy", fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="lower right")
    gap_bn = over.bn.train_acc[-1] - over.bn.test_acc[-1]
    gap_plain = over.plain.train_acc[-1] - over.plain.test_acc[-1]
    ax.set_title(
        f"Overfitting check: {over.n_train} training images,\n"
        f"He init, {over.n_test} test images. Final train - test gap:\n"
        f"{gap_bn:.3f} with batch norm, {gap_plain:.3f} without",
        fontsize=10,
    )


if __name__ == "__main__":
    sys.exit(main())
