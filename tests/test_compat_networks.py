"""The drop-ins inside the networks they are made for: finite-difference gradient checks
through a network built the book's way (Affine -> BatchNormalization -> ReLU, a params
dict that SGD updates in place) and the CS231n way (layer functions and caches), and
20 epochs of the book's training loop with the drop-in and with a naive layer written
here from the formulas: the same accuracies to 3 decimals at every epoch."""

from collections import OrderedDict

import numpy as np
import pytest

import fastbn
from fastbn.compat import cs231n
from fastbn.compat.dlfs import BatchNormalization


class NaiveBatchNormalization:
    """The book's layer as plain formulas (batch statistics, eps 1e-6, old-weight
    momentum, biased running variance; the closed-form gradient)."""

    def __init__(self, gamma, beta, momentum=0.9):
        self.gamma, self.beta, self.momentum = gamma, beta, momentum
        self.running_mean = self.running_var = None

    def forward(self, x, train_flg=True):
        if self.running_mean is None:
            self.running_mean, self.running_var = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        if train_flg:
            mu = x.mean(axis=0)
            var = ((x - mu) ** 2).mean(axis=0)
            self.std = np.sqrt(var + 1e-6)
            self.xn = (x - mu) / self.std
            m = self.momentum
            self.running_mean = m * self.running_mean + (1 - m) * mu
            self.running_var = m * self.running_var + (1 - m) * var
            xn = self.xn
        else:
            xn = (x - self.running_mean) / np.sqrt(self.running_var + 1e-6)
        return self.gamma * xn + self.beta

    def backward(self, dout):
        n = dout.shape[0]
        self.dbeta = dout.sum(axis=0)
        self.dgamma = (dout * self.xn).sum(axis=0)
        return self.gamma / self.std * (dout - self.dbeta / n - self.xn * self.dgamma / n)


class Affine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x):
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout):
        self.dW, self.db = self.x.T @ dout, dout.sum(axis=0)
        return dout @ self.W.T


class Relu:
    def forward(self, x):
        self.mask = x <= 0
        return np.where(self.mask, 0.0, x)

    def backward(self, dout):
        return np.where(self.mask, 0.0, dout)


def softmax_loss(scores, t):
    """Mean cross-entropy and its gradient w.r.t. the scores."""
    z = scores - scores.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(t)
    loss = -np.log(p[np.arange(n), t]).mean()
    p[np.arange(n), t] -= 1.0
    return loss, p / n


class BookNet:
    """``[Affine -> BN -> ReLU] * len(hidden) -> Affine``, the book's structure: the layers
    hold references to the arrays of ``self.params``."""

    def __init__(self, sizes, bn_class, weight_scale, rng):
        self.params, self.layers = {}, OrderedDict()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            self.params[f"W{i}"] = weight_scale * rng.standard_normal((fan_in, fan_out))
            self.params[f"b{i}"] = np.zeros(fan_out)
            self.layers[f"Affine{i}"] = Affine(self.params[f"W{i}"], self.params[f"b{i}"])
            if i < len(sizes) - 1:
                self.params[f"gamma{i}"] = np.ones(fan_out)
                self.params[f"beta{i}"] = np.zeros(fan_out)
                gamma, beta = self.params[f"gamma{i}"], self.params[f"beta{i}"]
                self.layers[f"BatchNorm{i}"] = bn_class(gamma, beta)
                self.layers[f"Relu{i}"] = Relu()

    def predict(self, x, train_flg):
        for name, layer in self.layers.items():
            x = layer.forward(x, train_flg) if name.startswith("BatchNorm") else layer.forward(x)
        return x

    def loss(self, x, t, train_flg=True):
        self.scores = self.predict(x, train_flg)
        loss, self.dscores = softmax_loss(self.scores, t)
        return loss

    def gradient(self, x, t):
        self.loss(x, t)
        d = self.dscores
        for layer in reversed(self.layers.values()):
            d = layer.backward(d)
        grads = {}
        for name, layer in self.layers.items():
            i = name[-1]
            if name.startswith("Affine"):
                grads[f"W{i}"], grads[f"b{i}"] = layer.dW, layer.db
            elif name.startswith("BatchNorm"):
                grads[f"gamma{i}"], grads[f"beta{i}"] = layer.dgamma, layer.dbeta
        return grads

    def accuracy(self, x, t):
        return float(np.mean(self.predict(x, False).argmax(axis=1) == t))


def numerical_gradient(f, a, h=1e-5):
    """Central differences of ``f()`` w.r.t. every entry of ``a``, perturbed in place."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


def grad_error(a, b):
    """Relative error; gradients below 1e-3 (the hidden biases in front of batch norm,
    whose gradient is 0) are compared absolutely."""
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-3)


def test_book_network_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    net = BookNet([6, 5, 4, 3], BatchNormalization, 1.0, rng)
    x, t = rng.standard_normal((8, 6)), rng.integers(0, 3, 8)
    grads = net.gradient(x, t)
    assert set(grads) == set(net.params)
    for name, param in net.params.items():
        numeric = numerical_gradient(lambda: net.loss(x, t), param)
        assert grad_error(grads[name], numeric) < 1e-7, name
        hidden_bias = name.startswith("b") and name != "b4"  # batch norm cancels it: 0
        assert hidden_bias or np.max(np.abs(numeric)) > 1e-3, name  # a gradient that can be wrong


def _cs231n_loss(x, p, param, spatial):
    """affine (or spatial bn first) -> bn -> relu -> affine -> softmax, CS231n style."""
    if spatial:
        h, bn_cache = cs231n.spatial_batchnorm_forward(x, p["gamma"], p["beta"], param)
        h = h.reshape(x.shape[0], -1)
    else:
        h = x @ p["W1"] + p["b1"]
        h, bn_cache = cs231n.batchnorm_forward(h, p["gamma"], p["beta"], param)
    r = np.maximum(h, 0.0)
    loss, dscores = softmax_loss(r @ p["W2"] + p["b2"], param["labels"])
    return loss, (h, bn_cache, r, dscores)


@pytest.mark.parametrize("spatial", [False, True])
def test_cs231n_network_gradients_match_finite_differences(spatial):
    rng = np.random.default_rng(1)
    t = rng.integers(0, 3, 6)
    if spatial:
        x = rng.standard_normal((6, 2, 3, 3))
        p = {"gamma": rng.uniform(0.5, 2, 2), "beta": rng.standard_normal(2)}
        hidden = 18
    else:
        x = rng.standard_normal((6, 5))
        p = {"W1": rng.standard_normal((5, 4)), "b1": rng.standard_normal(4)}
        p.update(gamma=rng.uniform(0.5, 2, 4), beta=rng.standard_normal(4))
        hidden = 4
    p.update(W2=rng.standard_normal((hidden, 3)), b2=rng.standard_normal(3))
    param = {"mode": "train", "labels": t}
    _, (h, bn_cache, r, dscores) = _cs231n_loss(x, p, param, spatial)
    grads = {"W2": r.T @ dscores, "b2": dscores.sum(axis=0)}
    dh = (dscores @ p["W2"].T) * (r > 0)
    if spatial:
        dx, grads["gamma"], grads["beta"] = cs231n.spatial_batchnorm_backward(
            dh.reshape(x.shape), bn_cache
        )
    else:
        da, grads["gamma"], grads["beta"] = cs231n.batchnorm_backward(dh, bn_cache)
        grads["W1"], grads["b1"], dx = x.T @ da, da.sum(axis=0), da @ p["W1"].T
    for name, value in list(p.items()) + [("x", x)]:
        numeric = numerical_gradient(lambda: _cs231n_loss(x, p, param, spatial)[0], value)
        got = dx if name == "x" else grads[name]
        assert grad_error(got, numeric) < 1e-7, name
        assert name == "b1" or np.max(np.abs(numeric)) > 1e-3, name


def _synthetic(rng):
    """1000 + 300 samples of 10 Gaussian classes in 64 dimensions, pixels in [0, 1]."""
    centres = rng.uniform(0, 1, (10, 64))
    t = rng.integers(0, 10, 1300)
    x = np.clip(centres[t] + 0.35 * rng.standard_normal((1300, 64)), 0, 1)
    return x[:1000], t[:1000], x[1000:], t[1000:]


def _digits(rng):
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    order = rng.permutation(len(digits.target))
    x, t = digits.data[order] / 16.0, digits.target[order]
    return x[:1000], t[:1000], x[1000:], t[1000:]


def train_book_style(bn_class, data, weight_scale, seed, epochs=20):
    """The book's ch06 loop: 5 x 100 hidden, batches of 100 drawn with replacement,
    SGD lr 0.01 in place, train and test accuracy at every epoch."""
    x_train, t_train, x_test, t_test = data
    rng = np.random.default_rng(seed)
    net = BookNet([x_train.shape[1]] + [100] * 5 + [10], bn_class, weight_scale, rng)
    history = []
    for i in range(epochs * 10):
        batch = rng.choice(len(x_train), 100)
        grads = net.gradient(x_train[batch], t_train[batch])
        for key, g in grads.items():
            net.params[key] -= 0.01 * g
        if i % 10 == 0:
            history.append((net.accuracy(x_train, t_train), net.accuracy(x_test, t_test)))
    return history, net


@pytest.mark.parametrize("data,weight_scale", [("synthetic", 1.0), ("digits", 0.01)])
def test_twenty_epochs_give_the_naive_layers_accuracies(data, weight_scale):
    load = {"synthetic": _synthetic, "digits": _digits}[data]
    dataset = load(np.random.default_rng(3))
    with fastbn.num_threads(1):  # same bits on any thread count; quicker on a busy machine
        ours, net = train_book_style(BatchNormalization, dataset, weight_scale, seed=4)
    naive, naive_net = train_book_style(NaiveBatchNormalization, dataset, weight_scale, seed=4)
    assert len(ours) == 20
    assert [(round(a, 3), round(b, 3)) for a, b in ours] == [
        (round(a, 3), round(b, 3)) for a, b in naive
    ]
    assert ours[-1][0] > ours[0][0] + 0.2  # it learned: the comparison means something
    # the hidden biases in front of batch norm get a zero gradient: they hold rounding noise
    learned = [k for k in net.params if not (k[0] == "b" and f"gamma{k[1:]}" in net.params)]
    drift = max(
        np.max(np.abs(net.params[k] - naive_net.params[k])) / np.max(np.abs(naive_net.params[k]))
        for k in learned
    )
    assert drift < 1e-10  # after 200 steps: ~2e-15 relative (measured)
