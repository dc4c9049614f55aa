"""Examples: fastbn in a real training loop.

``fastbn.examples.mlp`` is a small pure-NumPy MLP (``Affine -> BatchNorm -> ReLU``
blocks, softmax cross-entropy, SGD or Adam); ``fastbn.examples.demo`` trains it on
scikit-learn's 8x8 digits with and without batch norm (``python -m fastbn demo``).

The data and the figure need the ``examples`` extra (``pip install 'fastbn[examples]'``:
scikit-learn, matplotlib); they are imported only when used, never by ``import fastbn``.
"""

import numpy as np

__all__ = ["load_digits", "require", "N_DIGITS"]

N_DIGITS = 1797  # images in scikit-learn's digits data
INSTALL_HINT = "pip install 'fastbn[examples]'"
_PACKAGES = {"sklearn": "scikit-learn"}  # import name -> distribution name


def require(module, purpose):
    """Import ``module`` or raise ImportError saying how to install the examples extra."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        top = module.split(".")[0]
        package = _PACKAGES.get(top, top)
        raise ImportError(
            f"{purpose} needs {package}, which is not installed: {INSTALL_HINT}"
        ) from exc


def load_digits(n_train=1000, seed=0):
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with scikit-learn).

    Pixels are scaled to [0, 1] (float64). The images are shuffled with ``seed``;
    the first ``n_train`` are the training set and the rest (up to 797 more) the
    test set. Returns ``x_train, t_train, x_test, t_test``.
    """
    datasets = require("sklearn.datasets", "the digits data")
    digits = datasets.load_digits()
    x = digits.data.astype(np.float64) / 16.0
    t = digits.target.astype(np.intp)
    if not 1 < n_train < len(x):
        raise ValueError(f"n_train must be in [2, {len(x) - 1}], got {n_train}")
    order = np.random.default_rng(seed).permutation(len(x))
    x, t = x[order], t[order]
    return x[:n_train], t[:n_train], x[n_train:], t[n_train:]
