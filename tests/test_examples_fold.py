"""Folding the examples MLP for inference: ``MLP.folded()`` predicts what the trained
network predicts in eval mode, and leaves it unchanged."""

import doctest
import importlib

import numpy as np
import pytest

import fastbn
from fastbn.examples import mlp
from fastbn.examples.folded import FoldedMLP, fold_mlp

from _cases import rel_err


def _trained(batch_norm, steps=25, seed=0):
    """A net trained a few SGD steps on a synthetic task (badly scaled features), so that
    gamma, beta and the running statistics are far from their initial values."""
    rng = np.random.default_rng(seed)
    centers = 2 * rng.standard_normal((4, 10))
    labels = rng.integers(0, 4, 400)
    x = (centers[labels] + rng.standard_normal((400, 10))) * rng.uniform(0.5, 5, 10) + 3
    net = mlp.MLP(10, [32, 16], 4, weight_scale="he", batch_norm=batch_norm, seed=seed)
    opt = mlp.SGD(net.parameters(), lr=0.05)
    for step in range(steps):
        idx = np.random.default_rng(step).choice(len(x), 50, replace=False)
        net.loss(x[idx], labels[idx])
        net.backward()
        opt.step(net.gradients())
    return net, x, labels


@pytest.mark.parametrize("batch_norm", ["fastbn", "reference"])
def test_folded_net_predicts_what_the_eval_net_predicts(batch_norm):
    net, x, labels = _trained(batch_norm)
    bn = net.bn_layers[0].layer
    assert np.abs(bn.running_mean).max() > 0.1 and np.abs(bn.gamma - 1).max() > 1e-3
    before = [p.copy() for p in net.parameters()]
    stats = [(b.layer.running_mean.copy(), b.layer.running_var.copy()) for b in net.bn_layers]
    fast = net.folded()
    assert isinstance(fast, FoldedMLP)
    assert [type(layer) for layer in fast.layers] == [mlp.Affine, mlp.ReLU] * 2 + [mlp.Affine]
    net.eval()
    logits = net.forward(x)
    assert rel_err(fast.forward(x), logits) < 1e-12
    np.testing.assert_array_equal(fast.predict(x), np.argmax(logits, axis=1))
    assert fast.accuracy(x, labels) == net.accuracy(x, labels) > 0.5
    # folding changed nothing in the trained net
    for p, b in zip(net.parameters(), before):
        assert p.tobytes() == b.tobytes()
    for b, (rm, rv) in zip(net.bn_layers, stats):
        assert b.layer.running_mean.tobytes() == rm.tobytes()
        assert b.layer.running_var.tobytes() == rv.tobytes()


def test_folded_net_is_a_copy():
    """Training the original further does not move the folded net."""
    net, x, _ = _trained("fastbn")
    fast = fold_mlp(net)
    logits = fast.forward(x)
    for p in net.parameters():
        p += 1.0
    for b in net.bn_layers:
        b.layer.running_mean += 1.0
    np.testing.assert_array_equal(fast.forward(x), logits)
    for layer in fast.layers:
        for p in layer.params.values():
            assert not any(np.shares_memory(p, q) for q in net.parameters())


def test_folded_weights_are_the_formula():
    """The first folded Affine: W * s by columns, (b - running_mean) * s + beta."""
    net, _, _ = _trained("fastbn", steps=5)
    affine, bn = net.layers[0], net.bn_layers[0].layer
    s = bn.gamma / np.sqrt(bn.running_var + bn.eps)
    first = net.folded().layers[0]
    np.testing.assert_allclose(first.W, affine.W * s, rtol=1e-15)
    np.testing.assert_allclose(first.b, (affine.b - bn.running_mean) * s + bn.beta, rtol=1e-14)


def test_net_without_batch_norm_folds_to_the_same_layers():
    net, x, _ = _trained(None, steps=5)
    fast = net.folded()
    assert len(fast.layers) == len(net.layers)
    np.testing.assert_array_equal(fast.forward(x), net.forward(x))


def test_batch_norm_without_an_affine_before_is_refused():
    net = mlp.MLP(3, [4], 2, weight_scale=1.0, batch_norm="fastbn")
    net.layers.insert(0, mlp.TimedLayer(fastbn.BatchNorm(3, dtype=np.float64)))
    with pytest.raises(ValueError, match="does not follow an Affine layer"):
        net.folded()


@pytest.mark.parametrize("module", ["fastbn.examples.folded", "fastbn.examples.mlp"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0, result
