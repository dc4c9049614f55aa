"""A small pure-NumPy multi-layer perceptron with optional batch normalization.

Blocks are ``Affine -> BatchNorm -> ReLU`` (``Affine -> ReLU`` without batch norm),
followed by a final ``Affine`` and a softmax cross-entropy loss. Everything is
float64. By default batch norm and the ReLU after it are one layer,
``BatchNorm(..., activation="relu")``, which fastbn computes in the same passes
(``fuse_relu=False``: two layers, the ReLU in NumPy; the same losses). Batch norm is
``fastbn.BatchNorm``, or ``ReferenceBatchNorm`` (the same layer computed by the naive
``fastbn.reference`` formulas) for timing comparisons; the time spent inside batch-norm
calls is accumulated per network.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x, t = rng.standard_normal((64, 8)), rng.integers(0, 3, 64)
>>> net = MLP(8, [16, 16], 3, weight_scale="he", batch_norm="fastbn", seed=0)
>>> opt = SGD(net.parameters(), lr=0.1)
>>> loss = net.loss(x, t); _ = net.backward(); opt.step(net.gradients())
>>> 0.0 <= net.accuracy(x, t) <= 1.0
True
>>> bool(np.array_equal(net.folded().predict(x), net.predict(x)))  # batch norm folded away
True
"""

import time

import numpy as np

import fastbn
from fastbn import reference

__all__ = [
    "Affine",
    "ReLU",
    "SoftmaxCrossEntropy",
    "ReferenceBatchNorm",
    "TimedLayer",
    "MLP",
    "SGD",
    "Adam",
    "History",
    "fit",
]

DTYPE = np.float64


class Affine:
    """``y = x @ W + b``; ``W`` has shape ``(fan_in, fan_out)``."""

    def __init__(self, W, b):
        self.W, self.b = W, b
        self.dW = np.zeros_like(W)
        self.db = np.zeros_like(b)
        self._x = None

    def forward(self, x):
        self._x = x
        return x @ self.W + self.b

    def backward(self, dy):
        np.matmul(self._x.T, dy, out=self.dW)
        np.sum(dy, axis=0, out=self.db)
        return dy @ self.W.T

    @property
    def params(self):
        return {"W": self.W, "b": self.b}

    @property
    def grads(self):
        return {"W": self.dW, "b": self.db}


class ReLU:
    def __init__(self):
        self._mask = None

    def forward(self, x):
        self._mask = x > 0
        return np.maximum(x, 0.0)

    def backward(self, dy):
        return dy * self._mask

    params = grads = {}


class SoftmaxCrossEntropy:
    """Mean cross-entropy of ``softmax(logits)`` against integer labels."""

    def __init__(self):
        self._p = None
        self._t = None

    def forward(self, logits, labels):
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
        self._p, self._t = p, labels
        rows = np.arange(len(labels))
        return float(-np.mean(np.log(p[rows, labels] + 1e-12)))

    def backward(self):
        g = self._p.copy()
        g[np.arange(len(self._t)), self._t] -= 1.0
        g /= len(self._t)
        return g


class ReferenceBatchNorm(fastbn.BatchNorm):
    """``fastbn.BatchNorm`` computed with the naive ``fastbn.reference`` formulas.

    Same state, modes and semantics (it is a subclass); only the arithmetic differs.
    Used as the baseline when timing the batch-norm calls of a training run. With
    ``activation="relu"`` it applies NumPy's ReLU after the reference batch norm (and
    masks ``dy`` in backward), the composition that fastbn fuses.
    """

    def forward(self, x, *, out=None):
        use_batch_stats = self.training or not self.track_running_stats
        momentum = self.momentum
        update = self.training and self.track_running_stats
        if update:
            self.num_batches_tracked += 1
            if momentum is None:
                momentum = 1.0 / self.num_batches_tracked
        keep_stats = update or not use_batch_stats
        y, self._cache = reference.batch_norm(
            x,
            self.gamma,
            self.beta,
            training=use_batch_stats,
            running_mean=self.running_mean if keep_stats else None,
            running_var=self.running_var if keep_stats else None,
            momentum=momentum if momentum is not None else 0.0,
            eps=self.eps,
            axis=self.axis,
            out=out,
        )
        self._mask = None
        if self.activation == "relu":
            self._mask = y > 0
            y = np.maximum(y, 0.0, out=y)
        return y

    __call__ = forward

    def backward(self, dy, *, out=None):
        if self._cache is None:
            raise RuntimeError("BatchNorm.backward called before forward")
        if self._mask is not None:
            dy = dy * self._mask
        dx, self.dgamma, self.dbeta = reference.batch_norm_backward(dy, self._cache, out=out)
        return dx


class TimedLayer:
    """Wraps a layer and adds the seconds spent in its forward/backward to ``seconds``."""

    def __init__(self, layer):
        self.layer = layer
        self.seconds = 0.0
        self.calls = 0

    def forward(self, x):
        t0 = time.perf_counter()
        y = self.layer.forward(x)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return y

    def backward(self, dy):
        t0 = time.perf_counter()
        dx = self.layer.backward(dy)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return dx

    @property
    def params(self):
        return self.layer.params

    @property
    def grads(self):
        return self.layer.grads

    def train(self, mode=True):
        self.layer.train(mode)
        return self


_BATCH_NORMS = {"fastbn": fastbn.BatchNorm, "reference": ReferenceBatchNorm}


class MLP:
    """``n_in -> [Affine -> (BatchNorm) -> ReLU] * len(hidden) -> Affine -> n_out``.

    Parameters
    ----------
    n_in, hidden, n_out : int, list of int, int
        Layer widths.
    weight_scale : float or "he"
        Every weight matrix is ``weight_scale * standard_normal``; ``"he"`` uses
        ``sqrt(2 / fan_in)`` per layer. Biases start at 0.
    batch_norm : None, "fastbn" or "reference"
        Insert a batch-norm layer after each hidden ``Affine``: ``fastbn.BatchNorm`` or
        ``ReferenceBatchNorm``. Both are wrapped in ``TimedLayer``; ``bn_seconds`` is
        the total time spent inside them.
    fuse_relu : bool
        With batch norm, True (the default) makes batch norm and the ReLU after it one
        layer, ``BatchNorm(..., activation="relu")`` (fused in fastbn's passes; so
        ``bn_seconds`` includes the ReLU); False keeps a separate NumPy ``ReLU`` layer.
    seed : int
        Seeds the weights: the same seed gives the same initial weights whatever
        ``batch_norm`` is.
    """

    def __init__(
        self, n_in, hidden, n_out, *, weight_scale, batch_norm=None, seed=0, fuse_relu=True
    ):
        if batch_norm not in (None, *_BATCH_NORMS):
            raise ValueError(
                f"batch_norm must be None, 'fastbn' or 'reference', got {batch_norm!r}"
            )
        rng = np.random.default_rng(seed)
        sizes = [n_in, *hidden, n_out]
        self.layers = []
        self.bn_layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            scale = np.sqrt(2.0 / fan_in) if weight_scale == "he" else float(weight_scale)
            W = scale * rng.standard_normal((fan_in, fan_out))
            self.layers.append(Affine(W.astype(DTYPE), np.zeros(fan_out, DTYPE)))
            if i == len(sizes) - 2:
                break
            fused = batch_norm is not None and fuse_relu
            if batch_norm is not None:
                activation = "relu" if fused else None
                layer = _BATCH_NORMS[batch_norm](fan_out, dtype=DTYPE, activation=activation)
                bn = TimedLayer(layer)
                self.layers.append(bn)
                self.bn_layers.append(bn)
            if not fused:
                self.layers.append(ReLU())
        self.criterion = SoftmaxCrossEntropy()

    @property
    def bn_seconds(self):
        """Seconds spent inside the batch-norm layers' forward and backward so far."""
        return sum(bn.seconds for bn in self.bn_layers)

    @property
    def bn_calls(self):
        return sum(bn.calls for bn in self.bn_layers)

    def train(self, mode=True):
        for bn in self.bn_layers:
            bn.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def loss(self, x, labels):
        return self.criterion.forward(self.forward(x), labels)

    def backward(self):
        g = self.criterion.backward()
        for layer in reversed(self.layers):
            g = layer.backward(g)
        return g

    def parameters(self):
        """Every parameter array (updated in place by the optimizers)."""
        return [p for layer in self.layers for p in layer.params.values()]

    def gradients(self):
        """Gradients from the last ``backward``, in ``parameters()`` order."""
        return [g for layer in self.layers for g in layer.grads.values()]

    def predict(self, x, batch_size=2048):
        """Class predictions in eval mode (batch norm uses its running statistics)."""
        was_training = [bn.layer.training for bn in self.bn_layers]
        self.eval()
        try:
            out = [
                np.argmax(self.forward(x[i : i + batch_size]), axis=1)
                for i in range(0, len(x), batch_size)
            ]
        finally:
            for bn, mode in zip(self.bn_layers, was_training):
                bn.train(mode)
        return np.concatenate(out)

    def accuracy(self, x, labels):
        return float(np.mean(self.predict(x) == labels))

    def folded(self):
        """An inference-only copy with each batch norm folded into the ``Affine`` before it
        (``fastbn.fold``): the same predictions as ``predict``. See ``examples.folded``."""
        from .folded import fold_mlp  # folded imports this module

        return fold_mlp(self)


class SGD:
    def __init__(self, params, lr=0.1):
        self.params, self.lr = params, lr

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p -= self.lr * g


class Adam:
    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params, self.lr = params, lr
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        lr_t = self.lr * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m += (1 - b1) * (g - m)
            v += (1 - b2) * (g * g - v)
            p -= lr_t * m / (np.sqrt(v) + self.eps)


class History:
    """Per-epoch accuracies (index 0 is before training) and per-step losses.

    ``test_acc`` has one entry per epoch too, or only the final one when ``fit``
    ran with ``test_every_epoch=False``; ``test_acc[-1]`` is the final accuracy either way.
    """

    def __init__(self):
        self.train_acc = []
        self.test_acc = []
        self.loss = []
        self.seconds = 0.0
        self.bn_seconds = 0.0
        self.bn_calls = 0

    def first_epoch_reaching(self, level):
        """First epoch whose training accuracy is ``>= level``, or None."""
        for epoch, acc in enumerate(self.train_acc):
            if acc >= level:
                return epoch
        return None


def fit(
    model,
    optimizer,
    x_train,
    t_train,
    x_test,
    t_test,
    *,
    epochs,
    batch_size=100,
    seed=0,
    test_every_epoch=True,
):
    """Mini-batch training; each epoch is one pass over a fresh permutation.

    A last batch smaller than ``batch_size`` is dropped (batch norm needs a real
    batch). Accuracies are measured in eval mode before the first epoch and after
    every epoch (test accuracy only at the end when ``test_every_epoch`` is false).
    A diverging run (overflow, NaN) is not an error: its accuracy drops to chance,
    which is what the demo wants to show. Returns a ``History``.
    """
    rng = np.random.default_rng(seed)
    n = len(x_train)
    batch_size = min(batch_size, n)
    hist = History()
    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        hist.train_acc.append(model.accuracy(x_train, t_train))
        if test_every_epoch:
            hist.test_acc.append(model.accuracy(x_test, t_test))
        for _ in range(epochs):
            order = rng.permutation(n)
            model.train()
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                hist.loss.append(model.loss(x_train[idx], t_train[idx]))
                model.backward()
                optimizer.step(model.gradients())
            hist.train_acc.append(model.accuracy(x_train, t_train))
            if test_every_epoch:
                hist.test_acc.append(model.accuracy(x_test, t_test))
        if not test_every_epoch:
            hist.test_acc.append(model.accuracy(x_test, t_test))
    hist.seconds = time.perf_counter() - t0
    hist.bn_seconds = model.bn_seconds
    hist.bn_calls = model.bn_calls
    return hist
