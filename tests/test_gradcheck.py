"""Finite-difference gradient check of batch_norm_backward, float64."""

import numpy as np
import pytest

import fastbn


def _loss(x, gamma, beta, w, axis, training, rm, rv):
    y, _ = fastbn.batch_norm(
        x,
        gamma,
        beta,
        axis=axis,
        training=training,
        running_mean=None if training else rm,
        running_var=None if training else rv,
    )
    return float(np.sum(w * y))


@pytest.mark.parametrize(
    "shape,axis", [((7, 3), 1), ((4, 3, 5), 1), ((3, 2, 2, 4), -1), ((2, 3, 3, 2), 1)]
)
@pytest.mark.parametrize("training", [True, False])
def test_central_differences(shape, axis, training):
    rng = np.random.default_rng(42)
    x = rng.standard_normal(shape) * 2 + 1
    C = shape[axis]
    gamma = rng.standard_normal(C)
    beta = rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    w = rng.standard_normal(shape)  # loss = sum(w * y), so dL/dy = w
    _, cache = fastbn.batch_norm(
        x,
        gamma,
        beta,
        axis=axis,
        training=training,
        running_mean=None if training else rm,
        running_var=None if training else rv,
    )
    dx, dgamma, dbeta = fastbn.batch_norm_backward(w, cache)

    h = 1e-6

    def numeric(arr):
        grad = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = _loss(x, gamma, beta, w, axis, training, rm, rv)
            arr[i] = old - h
            down = _loss(x, gamma, beta, w, axis, training, rm, rv)
            arr[i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    for analytic, arr in [(dx, x), (dgamma, gamma), (dbeta, beta)]:
        num = numeric(arr)
        err = np.max(np.abs(analytic - num)) / max(np.max(np.abs(num)), 1e-12)
        assert err < 1e-6, err
