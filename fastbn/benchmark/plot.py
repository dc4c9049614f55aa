"""``--plot``: fastbn's speedups over the reference and torch, per case and op."""

import numpy as np

from .cases import OPS
from .report import case_order


def plot(results, path, info):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fastbn[plot]'") from None
    ops = [op for op in OPS if any(r.op == op for r in results)]
    labels = sorted({(r.case, r.dtype) for r in results}, key=lambda k: (case_order(k[0]), k[1]))
    has_torch = any("torch" in r.ms for r in results)
    fig, axes = plt.subplots(
        1, 2 if has_torch else 1, figsize=(13 if has_torch else 7, 5.5), squeeze=False
    )
    width = 0.8 / len(ops)
    for ax, (other, title) in zip(
        axes[0], (("reference", "vs naive NumPy reference"), ("torch", "vs PyTorch CPU"))
    ):
        for k, op in enumerate(ops):
            vals = []
            for case, dtype in labels:
                r = next((r for r in results if (r.case, r.dtype, r.op) == (case, dtype, op)), None)
                vals.append(r.ms[other] / r.ms["fastbn"] if r and other in r.ms else 0)
            ax.bar(np.arange(len(labels)) + k * width, vals, width, label=op)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(labels)) + width * (len(ops) - 1) / 2)
        ax.set_xticklabels([f"{c}\n{d}" for c, d in labels], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup of fastbn (x)")
        ax.set_title(f"fastbn {title}")
        ax.set_yscale("log")  # speedups span orders of magnitude
        ax.legend(fontsize=7)
    fig.suptitle(f"{info['date']}  {info['cpu']}  {info['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
