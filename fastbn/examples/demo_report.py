"""The demo's report: the printed summary and the figure (``fastbn.examples.demo``)."""

import numpy as np

from . import N_DIGITS, require

LEVEL = 0.9  # "learns": training accuracy at or above this


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
