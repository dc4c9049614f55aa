"""fastbn against PyTorch (F.batch_norm + autograd, nn.BatchNorm*d) when installed."""

import numpy as np
import pytest

import fastbn

from _cases import LAYOUTS, random_case, rel_err

torch = pytest.importorskip("torch")
F = torch.nn.functional

TORCH_TOL = {np.float32: 1e-5, np.float64: 1e-10}
CASES = [
    (layout, dtype, seed)
    for seed in range(2)
    for layout in sorted(LAYOUTS)
    for dtype in (np.float32, np.float64)
]


def torch_batch_norm(x, dy, gamma, beta, axis, *, training, rm, rv, momentum, eps):
    """Torch's answer, with the channel axis moved to 1 (torch's convention)."""
    xt = torch.tensor(np.moveaxis(x, axis, 1).copy(), requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    rmt = None if rm is None else torch.tensor(rm)
    rvt = None if rv is None else torch.tensor(rv)
    yt = F.batch_norm(xt, rmt, rvt, gt, bt, training=training, momentum=momentum, eps=eps)
    yt.backward(torch.tensor(np.moveaxis(dy, axis, 1).copy()))

    def back(t):
        return np.moveaxis(t.detach().numpy(), 1, axis)

    return (
        back(yt),
        back(xt.grad),
        gt.grad.numpy(),
        bt.grad.numpy(),
        None if rmt is None else rmt.numpy(),
        None if rvt is None else rvt.numpy(),
    )


@pytest.mark.parametrize("layout,dtype,seed", CASES)
def test_training_matches_torch(layout, dtype, seed):
    rng = np.random.default_rng(100 + seed)
    x, dy, gamma, beta, axis = random_case(rng, layout, dtype, scale=2.0, offset=0.5)
    C = gamma.shape[0]
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    momentum, eps = [0.1, 0.37][seed], [1e-5, 1e-3][seed]
    want = torch_batch_norm(
        x,
        dy,
        gamma,
        beta,
        axis,
        training=True,
        rm=rm.copy(),
        rv=rv.copy(),
        momentum=momentum,
        eps=eps,
    )
    y, cache = fastbn.batch_norm(
        x, gamma, beta, running_mean=rm, running_var=rv, momentum=momentum, eps=eps, axis=axis
    )
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    for got, exp in zip((y, dx, dgamma, dbeta, rm, rv), want):
        assert rel_err(got, exp) <= TORCH_TOL[dtype]


@pytest.mark.parametrize("layout", ["ND", "NCHW", "NHWC", "negative_strides"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_matches_torch(layout, dtype):
    rng = np.random.default_rng(5)
    x, dy, gamma, beta, axis = random_case(rng, layout, dtype)
    C = gamma.shape[0]
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    want = torch_batch_norm(
        x, dy, gamma, beta, axis, training=False, rm=rm, rv=rv, momentum=0.1, eps=1e-5
    )
    y, cache = fastbn.batch_norm(
        x, gamma, beta, training=False, running_mean=rm, running_var=rv, axis=axis
    )
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, cache)
    for got, exp in zip((y, dx, dgamma, dbeta), want):
        assert rel_err(got, exp) <= TORCH_TOL[dtype]


@pytest.mark.parametrize(
    "shape,module",
    [((40, 12), "BatchNorm1d"), ((6, 5, 9), "BatchNorm1d"), ((4, 3, 5, 7), "BatchNorm2d")],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_matches_torch_module(shape, module, momentum):
    """Several train steps then eval, parameters updated alike: same outputs and state."""
    rng = np.random.default_rng(21)
    C = shape[1]
    ours = fastbn.BatchNorm(C, momentum=momentum, dtype=np.float64)
    theirs = getattr(torch.nn, module)(C, momentum=momentum, dtype=torch.float64)
    for step in range(4):
        x = rng.standard_normal(shape) * (1 + step) + step
        dy = rng.standard_normal(shape)
        y = ours.forward(x)
        dx = ours.backward(dy)
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(dy))
        assert rel_err(y, yt.detach().numpy()) < 1e-12
        assert rel_err(dx, xt.grad.numpy()) < 1e-12
        assert rel_err(ours.dgamma, theirs.weight.grad.numpy()) < 1e-12
        assert rel_err(ours.dbeta, theirs.bias.grad.numpy()) < 1e-12
        with torch.no_grad():  # one SGD step on both
            ours.gamma -= 0.1 * ours.dgamma
            ours.beta -= 0.1 * ours.dbeta
            theirs.weight -= 0.1 * theirs.weight.grad
            theirs.bias -= 0.1 * theirs.bias.grad
            theirs.weight.grad = None
            theirs.bias.grad = None
    assert rel_err(ours.running_mean, theirs.running_mean.numpy()) < 1e-12
    assert rel_err(ours.running_var, theirs.running_var.numpy()) < 1e-12
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
    ours.eval()
    theirs.eval()
    x = rng.standard_normal(shape)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(torch.tensor(x)).numpy()) < 1e-12


def test_large_offset_float32_beats_or_matches_torch():
    """x = 1e4 + randn in float32: fastbn stays within 1e-6 of the float64 variance."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((65536, 8))).astype(np.float32)
    exact_var = x.astype(np.float64).var(axis=0)
    rv_ours = np.zeros(8, np.float32)
    fastbn.batch_norm(
        x, None, None, running_mean=np.zeros(8, np.float32), running_var=rv_ours, momentum=1.0
    )
    n = x.shape[0]
    assert rel_err(rv_ours, exact_var * n / (n - 1)) < 1e-6
