"""BatchNorm layer: state, modes, parameters, and that it helps a NumPy MLP train."""

import numpy as np
import pytest

import fastbn
from fastbn.examples import mlp

from _cases import oracle, rel_err


def test_train_steps_then_eval_match_functional_reference():
    rng = np.random.default_rng(0)
    bn = fastbn.BatchNorm(6, momentum=0.2, dtype=np.float64)
    rm, rv = np.zeros(6), np.ones(6)
    for _ in range(3):
        x = rng.standard_normal((32, 6)) * 3 + 1
        dy = rng.standard_normal((32, 6))
        y = bn(x)
        dx = bn.backward(dy)
        y_ref, dx_ref, dg_ref, db_ref = oracle(
            x, dy, bn.gamma, bn.beta, 1, running_mean=rm, running_var=rv, momentum=0.2
        )
        assert rel_err(y, y_ref) < 1e-12 and rel_err(dx, dx_ref) < 1e-12
        assert rel_err(bn.grads["gamma"], dg_ref) < 1e-12
        assert rel_err(bn.grads["beta"], db_ref) < 1e-12
        bn.gamma -= 0.5 * bn.dgamma  # the optimizer updates params in place
        bn.beta -= 0.5 * bn.dbeta
    assert rel_err(bn.running_mean, rm) < 1e-12 and rel_err(bn.running_var, rv) < 1e-12
    assert bn.num_batches_tracked == 3
    bn.eval()
    x = rng.standard_normal((5, 6))
    y_eval = bn(x)
    expected = (x - bn.running_mean) / np.sqrt(bn.running_var + bn.eps) * bn.gamma + bn.beta
    assert rel_err(y_eval, expected) < 1e-12
    assert bn.num_batches_tracked == 3  # eval does not count


def test_single_sample_eval_works_but_training_raises():
    bn = fastbn.BatchNorm(4)
    x = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x)
    bn.eval()
    np.testing.assert_allclose(bn(x), np.ones((1, 4)) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_momentum_none_is_cumulative_average():
    rng = np.random.default_rng(1)
    bn = fastbn.BatchNorm(3, momentum=None, dtype=np.float64)
    batches = [rng.standard_normal((10, 3)) + i for i in range(4)]
    for b in batches:
        bn(b)
    np.testing.assert_allclose(
        bn.running_mean, np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-12
    )
    np.testing.assert_allclose(
        bn.running_var, np.mean([b.var(0, ddof=1) for b in batches], axis=0), rtol=1e-12
    )


def test_no_affine_no_running_stats():
    bn = fastbn.BatchNorm(5, affine=False, track_running_stats=False, axis=-1, dtype=np.float64)
    assert bn.params == {} and bn.gamma is None and bn.running_mean is None
    x = np.random.default_rng(2).standard_normal((4, 3, 5))
    bn.eval()  # no running stats: eval uses batch statistics, like torch
    y = bn(x)
    np.testing.assert_allclose(y.mean(axis=(0, 1)), 0, atol=1e-12)
    bn.backward(np.ones_like(x))
    assert bn.dgamma is None and bn.dbeta is None
    assert bn.state_dict() == {}


def test_state_dict_roundtrip_and_errors():
    rng = np.random.default_rng(3)
    bn = fastbn.BatchNorm(4)
    bn(rng.standard_normal((8, 4)).astype(np.float32))
    bn.gamma[...] = 2.0
    state = bn.state_dict()
    other = fastbn.BatchNorm(4)
    gamma_ref = other.gamma
    other.load_state_dict(state)
    assert other.gamma is gamma_ref  # loaded in place
    for key in ("gamma", "beta", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(other, key), state[key])
    assert other.num_batches_tracked == 1
    state["gamma"][...] = 7  # state_dict holds copies
    assert bn.gamma[0] == 2.0
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"gamma": np.ones(4)})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({**bn.state_dict(), "beta": np.zeros(5)})


def test_backward_before_forward_raises():
    with pytest.raises(RuntimeError, match="before forward"):
        fastbn.BatchNorm(3).backward(np.ones((2, 3)))


# --- the examples MLP: the layer must make training faster on a synthetic task ---------


def _make_data(rng, n=512, d=20, k=4):
    centers = rng.standard_normal((k, d)) * 2.0
    labels = rng.integers(0, k, n)
    x = centers[labels] + rng.standard_normal((n, d))
    x = x * rng.uniform(0.1, 20, d) + rng.uniform(-50, 50, d)  # badly scaled features
    return x, labels


def _train(use_bn, steps=150, seed=0):
    """Mean loss of the last 20 SGD steps of the examples MLP (20 -> 64 -> 64 -> 4,
    ``Affine -> BatchNorm -> ReLU`` blocks or ``Affine -> ReLU`` without batch norm)."""
    rng = np.random.default_rng(seed)
    x, labels = _make_data(np.random.default_rng(123))
    batch_norm = "fastbn" if use_bn else None
    net = mlp.MLP(x.shape[1], [64, 64], 4, weight_scale="he", batch_norm=batch_norm, seed=seed)
    assert len(net.bn_layers) == (2 if use_bn else 0)
    opt = mlp.SGD(net.parameters(), lr=0.05)  # batch norm's gamma and beta too
    losses = []
    for _step in range(steps):
        idx = rng.choice(len(x), 64, replace=False)
        losses.append(net.loss(x[idx], labels[idx]))
        net.backward()
        opt.step(net.gradients())
    return float(np.mean(losses[-20:]))


def test_batchnorm_makes_the_mlp_train_faster():
    loss_bn = _train(True)
    loss_plain = _train(False)
    assert np.isfinite(loss_bn)
    assert loss_bn < 0.5 * min(loss_plain, 10.0), (loss_bn, loss_plain)
