"""fastbn.fold: a layer with folded weights equals eval-mode batch norm after the layer.

Every layer is computed here with plain NumPy (matrix products and a naive convolution
written below); the unfolded output goes through eval-mode ``fastbn.BatchNorm`` and the
naive ``fastbn.reference``. Bad arguments raise with a message naming the argument, and
change nothing.
"""

import re

import numpy as np
import pytest

import fastbn

from _cases import f64, rel_err

# folded vs unfolded, relative to the largest output (float32: the weights are rounded)
TOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


def _bn(C, dtype, seed=0, eps=1e-3, **kw):
    """An eval-mode BatchNorm with running statistics and affine parameters away from
    the identity (a non-default eps: the layer's own must be used)."""
    rng = np.random.default_rng(seed)
    bn = fastbn.BatchNorm(C, eps=eps, dtype=dtype, **kw)
    bn.running_mean[:] = 2 * rng.standard_normal(C)
    bn.running_var[:] = rng.uniform(0.2, 3.0, C)
    if bn.affine:
        bn.gamma[:] = 1 + 0.5 * rng.standard_normal(C)
        bn.beta[:] = rng.standard_normal(C)
    return bn.eval()


# -- naive layers, written for the test -------------------------------------------------


def conv2d_nchw(x, w, b):
    """x (N, Ci, H, W), w OIHW (Co, Ci, kh, kw), stride 1, no padding -> (N, Co, H', W')."""
    n, _, h, wd = x.shape
    co, _, kh, kw = w.shape
    y = np.zeros((n, co, h - kh + 1, wd - kw + 1), x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + h - kh + 1, j : j + wd - kw + 1]  # (N, Ci, H', W')
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return y if b is None else y + b[:, None, None]


def conv2d_nhwc(x, w, b):
    """x (N, H, W, Ci), w HWIO (kh, kw, Ci, Co) -> (N, H', W', Co)."""
    n, h, wd, _ = x.shape
    kh, kw, _, co = w.shape
    y = np.zeros((n, h - kh + 1, wd - kw + 1, co), x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + h - kh + 1, j : j + wd - kw + 1, :]
            y += patch @ w[i, j]
    return y if b is None else y + b


def conv_transpose2d(x, w, b):
    """x (N, Ci, H, W), PyTorch's transposed weight (Ci, Co, kh, kw), groups=1, stride 1:
    every input pixel scatters ``x * w`` onto a kh x kw window -> (N, Co, H+kh-1, W+kw-1)."""
    n, _, h, wd = x.shape
    _, co, kh, kw = w.shape
    y = np.zeros((n, co, h + kh - 1, wd + kw - 1), x.dtype)
    for i in range(kh):
        for j in range(kw):
            y[:, :, i : i + h, j : j + wd] += np.einsum("nchw,co->nohw", x, w[:, :, i, j])
    return y if b is None else y + b[:, None, None]


# name: (x shape, weight shape, out_axis, layer(x, w, b), batch-norm axis of the output)
LAYERS = {
    "affine_in_out": ((16, 7), (7, 5), 1, lambda x, w, b: x @ w + (0 if b is None else b), 1),
    "affine_in_out_neg": ((16, 7), (7, 5), -1, lambda x, w, b: x @ w + (0 if b is None else b), 1),
    "linear_out_in": ((16, 7), (5, 7), 0, lambda x, w, b: x @ w.T + (0 if b is None else b), 1),
    "conv_oihw": ((3, 4, 9, 8), (6, 4, 3, 2), 0, conv2d_nchw, 1),
    "conv_hwio": ((3, 9, 8, 4), (3, 2, 4, 6), -1, conv2d_nhwc, -1),
    "conv_transpose_groups1": ((2, 4, 5, 6), (4, 6, 3, 3), 1, conv_transpose2d, 1),
}


def _layer_case(name, dtype, with_bias, seed=0):
    x_shape, w_shape, out_axis, layer, bn_axis = LAYERS[name]
    C = w_shape[out_axis]
    rng = np.random.default_rng(seed)
    x = (1 + rng.standard_normal(x_shape)).astype(dtype)
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape) / C)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype) if with_bias else None
    bn = _bn(C, dtype, seed=seed + 1, axis=bn_axis)
    return x, w, b, out_axis, layer, bn


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_folded_layer_equals_layer_then_eval_batch_norm(name, dtype, with_bias):
    x, w, b, out_axis, layer, bn = _layer_case(name, dtype, with_bias)
    w0, b0, state0 = w.copy(), None if b is None else b.copy(), bn.state_dict()
    w2, b2 = fastbn.fold(w, b, bn, out_axis=out_axis)
    assert w2.shape == w.shape and w2.dtype == dtype
    assert b2.shape == (w.shape[out_axis],) and b2.dtype == dtype
    z = layer(x, w, b)
    unfolded = bn(z)
    folded = layer(x, w2, b2)
    assert folded.dtype == dtype
    assert rel_err(folded, unfolded) < TOL[dtype]
    # and against the naive reference computed in float64 from the same layer output
    y_ref, _ = fastbn.reference.batch_norm(
        f64(z), f64(bn.gamma), f64(bn.beta), training=False, running_mean=f64(bn.running_mean),
        running_var=f64(bn.running_var), eps=bn.eps, axis=bn.axis,
    )  # fmt: skip
    assert rel_err(folded, y_ref) < TOL[dtype]
    # nothing was modified
    assert w.tobytes() == w0.tobytes()
    assert b is None or b.tobytes() == b0.tobytes()
    for key, value in bn.state_dict().items():
        assert np.array_equal(value, state0[key])


def test_folded_values_are_the_exact_formula():
    """s = gamma / sqrt(running_var + eps) = [4/2, 3/3]; W' = W * s (columns);
    b' = (b - running_mean) * s + beta. Every value is exact in binary."""
    bn = fastbn.BatchNorm(2, eps=1.0, dtype=np.float64)
    bn.gamma[:], bn.beta[:] = [4.0, 3.0], [0.5, 0.0]
    bn.running_mean[:], bn.running_var[:] = [1.0, -1.0], [3.0, 8.0]
    w, b = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, 1.0])
    w2, b2 = fastbn.fold(w, b, bn, out_axis=1)
    np.testing.assert_array_equal(w2, [[2.0, 2.0], [6.0, 4.0]])
    np.testing.assert_array_equal(b2, [0.5, 2.0])
    w2, b2 = fastbn.fold(w, None, bn, out_axis=0)  # rows are the output channels
    np.testing.assert_array_equal(w2, [[2.0, 4.0], [3.0, 4.0]])
    np.testing.assert_array_equal(b2, [-2.0 + 0.5, 1.0])
    # eps overrides the layer's: sqrt(3 + 13) = 4, sqrt(8 + 13) = sqrt(21)
    w2, b2 = fastbn.fold(w, None, bn, out_axis=1, eps=13.0)
    np.testing.assert_allclose(w2[:, 0], [1.0, 3.0], rtol=1e-15)
    np.testing.assert_allclose(w2[:, 1], np.array([2.0, 4.0]) * 3 / np.sqrt(21), rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_gives_the_layers_bits(dtype):
    bn = _bn(5, dtype, eps=1e-5)  # the mapping's default eps is 1e-5 too
    w = np.random.default_rng(3).standard_normal((7, 5)).astype(dtype)
    b = np.linspace(-1, 1, 5).astype(dtype)
    want = fastbn.fold(w, b, bn, out_axis=1)
    state = bn.state_dict()
    torch_names = {
        "weight": state["gamma"], "bias": state["beta"], "running_mean": state["running_mean"],
        "running_var": state["running_var"], "num_batches_tracked": 0,
    }  # fmt: skip
    for d in (state, torch_names):
        got = fastbn.fold(w, b, d, out_axis=1)
        for g, e in zip(got, want):
            assert g.dtype == e.dtype and g.tobytes() == e.tobytes()
    bn3 = _bn(5, dtype, eps=1e-3)
    got = fastbn.fold(w, b, bn3.state_dict(), out_axis=1, eps=1e-3)
    for g, e in zip(got, fastbn.fold(w, b, bn3, out_axis=1)):
        assert g.tobytes() == e.tobytes()


def test_no_affine_layer_and_mapping_without_gamma_beta():
    bn = _bn(4, np.float64, affine=False)
    x = np.random.default_rng(4).standard_normal((10, 3))
    w = np.random.default_rng(5).standard_normal((3, 4))
    for source in (bn, bn.state_dict()):
        w2, b2 = fastbn.fold(w, None, source, out_axis=1, eps=bn.eps)
        assert rel_err(x @ w2 + b2, bn(x @ w)) < 1e-12
    scale = 1 / np.sqrt(bn.running_var + bn.eps)
    np.testing.assert_allclose(b2, -bn.running_mean * scale, rtol=1e-15)


def test_output_dtypes_follow_weight_and_bias():
    bn = _bn(3, np.float32)
    w16 = np.ones((2, 3), np.float16)
    w2, b2 = fastbn.fold(w16, None, bn, out_axis=1)
    assert w2.dtype == np.float16 and b2.dtype == np.float16
    w2, b2 = fastbn.fold(np.ones((2, 3), np.float32), np.zeros(3), bn, out_axis=1)
    assert w2.dtype == np.float32 and b2.dtype == np.float64
    # computed in float64, rounded once: float64 bias of a float32 weight keeps its digits
    scale = f64(bn.gamma) / np.sqrt(f64(bn.running_var) + bn.eps)
    np.testing.assert_allclose(b2, -f64(bn.running_mean) * scale + f64(bn.beta), rtol=1e-15)
    big = np.ones((2, 3), ">f8")  # byte-swapped: native dtype out, same values
    w2, _ = fastbn.fold(big, None, bn, out_axis=1)
    assert w2.dtype == np.float64
    np.testing.assert_array_equal(w2, fastbn.fold(np.ones((2, 3)), None, bn, out_axis=1)[0])


def test_results_are_new_arrays_and_read_only_inputs_work():
    bn = _bn(3, np.float64)
    w, b = np.ones((4, 3)), np.zeros(3)
    w.flags.writeable = b.flags.writeable = False
    w2, b2 = fastbn.fold(w, b, bn, out_axis=1)
    assert w2.flags.writeable and b2.flags.writeable
    for out in (w2, b2):
        for a in (w, b, bn.gamma, bn.beta, bn.running_mean, bn.running_var):
            assert not np.shares_memory(out, a)
    # identity batch norm: the copies equal the inputs
    ident = fastbn.BatchNorm(3, eps=1e-300, dtype=np.float64).eval()
    w3, b3 = fastbn.fold(w, b, ident, out_axis=1)
    np.testing.assert_array_equal(w3, w)
    np.testing.assert_array_equal(b3, b)
    assert not np.shares_memory(w3, w) and not np.shares_memory(b3, b)


def test_nan_in_running_var_reaches_only_its_channel():
    bn = _bn(4, np.float64)
    w, b = np.random.default_rng(6).standard_normal((3, 4)), np.ones(4)
    clean = fastbn.fold(w, b, bn, out_axis=1)
    bn.running_var[2] = np.nan
    w2, b2 = fastbn.fold(w, b, bn, out_axis=1)
    assert np.isnan(w2[:, 2]).all() and np.isnan(b2[2])
    keep = [0, 1, 3]
    np.testing.assert_array_equal(w2[:, keep], clean[0][:, keep])
    np.testing.assert_array_equal(b2[keep], clean[1][keep])
    # as without folding: eval batch norm gives NaN in that channel only
    y = bn(np.ones((2, 3)) @ w + b)
    assert np.isnan(y[:, 2]).all() and np.isfinite(y[:, keep]).all()


def test_training_mode_layer_is_folded_as_in_eval_mode():
    bn = _bn(3, np.float64).train()
    w = np.random.default_rng(7).standard_normal((5, 3))
    got = fastbn.fold(w, None, bn, out_axis=1)
    want = fastbn.fold(w, None, bn.eval(), out_axis=1)
    assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()


# -- bad arguments: type, message, and nothing modified ---------------------------------


def _state(C=3, **changes):
    state = _bn(C, np.float64).state_dict()
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def _grouped_transpose_weight():
    # ConvTranspose2d(in=4, out=6, groups=2): weight (4, 6 / 2, 3, 3); the layer has 6 channels
    return np.ones((4, 3, 3, 3)), None, _bn(6, np.float64), {"out_axis": 1}


ERRORS = [
    ("out_axis_too_big", lambda: (np.ones((2, 3)), None, _bn(3, np.float64), {"out_axis": 2}),
     ValueError, "out_axis 2 is out of range for a weight with 2 dimensions "
     "(expected -2 <= out_axis < 2)"),
    ("out_axis_too_negative", lambda: (np.ones((2, 3)), None, _bn(3, np.float64),
     {"out_axis": -3}), ValueError, "out_axis -3 is out of range"),
    ("out_axis_float", lambda: (np.ones((2, 3)), None, _bn(3, np.float64), {"out_axis": 1.0}),
     TypeError, "out_axis must be an int, got float"),
    ("out_axis_bool", lambda: (np.ones((2, 3)), None, _bn(3, np.float64), {"out_axis": True}),
     TypeError, "out_axis must be an int, got bool"),
    ("wrong_channels", lambda: (np.ones((2, 3)), None, _bn(3, np.float64), {"out_axis": 0}),
     ValueError, "weight has 2 output channels on out_axis=0 (array of shape (2, 3) and dtype "
     "float64), but bn has 3 channels"),
    ("grouped_transposed_conv", _grouped_transpose_weight, ValueError,
     "A grouped transposed convolution cannot be folded this way"),
    ("weight_list", lambda: ([[1.0, 2.0, 3.0]], None, _bn(3, np.float64), {"out_axis": 1}),
     TypeError, "weight must be a numpy.ndarray, got list"),
    ("weight_int", lambda: (np.ones((2, 3), int), None, _bn(3, np.float64), {"out_axis": 1}),
     TypeError, "weight must have dtype float16, float32 or float64, got array of shape (2, 3) "
     "and dtype int64"),
    ("weight_complex", lambda: (np.ones((2, 3), complex), None, _bn(3, np.float64),
     {"out_axis": 1}), TypeError, "dtype complex128"),
    ("weight_masked", lambda: (np.ma.masked_greater(np.ones((2, 3)), 0), None,
     _bn(3, np.float64), {"out_axis": 1}), TypeError, "weight is a masked array"),
    ("bias_wrong_length", lambda: (np.ones((2, 3)), np.ones(2), _bn(3, np.float64),
     {"out_axis": 1}), ValueError, "bias must have shape (3,) to match the 3 channels of bn, "
     "got array of shape (2,)"),
    ("bias_2d", lambda: (np.ones((2, 3)), np.ones((1, 3)), _bn(3, np.float64),
     {"out_axis": 1}), ValueError, "bias must have shape (3,)"),
    ("bias_int", lambda: (np.ones((2, 3)), np.ones(3, np.int32), _bn(3, np.float64),
     {"out_axis": 1}), TypeError, "bias must have dtype float16, float32 or float64"),
    ("bn_none", lambda: (np.ones((2, 3)), None, None, {"out_axis": 1}), TypeError,
     "bn must be a fastbn.BatchNorm or a mapping like BatchNorm.state_dict(), got NoneType"),
    ("bn_untracked", lambda: (np.ones((2, 3)), None,
     fastbn.BatchNorm(3, track_running_stats=False), {"out_axis": 1}), ValueError,
     "was built with track_running_stats=False: it has no running statistics"),
    ("dict_no_running_var", lambda: (np.ones((2, 3)), None,
     _state(running_var=None), {"out_axis": 1}), ValueError, "bn has no 'running_var'"),
    ("dict_unknown_key", lambda: (np.ones((2, 3)), None, _state(running_variance=np.ones(3)),
     {"out_axis": 1}), ValueError, "bn has unknown keys ['running_variance']"),
    ("dict_gamma_and_weight", lambda: (np.ones((2, 3)), None, _state(weight=np.ones(3)),
     {"out_axis": 1}), ValueError, "bn has both 'gamma' and 'weight'"),
    ("dict_beta_wrong_length", lambda: (np.ones((2, 3)), None, _state(beta=np.ones(4)),
     {"out_axis": 1}), ValueError, "bn's beta must be shape (3,) like running_mean, got array "
     "of shape (4,)"),
    ("dict_running_mean_2d", lambda: (np.ones((2, 3)), None,
     _state(running_mean=np.ones((1, 3))), {"out_axis": 1}), ValueError,
     "bn's running_mean must be a 1-d array, got array of shape (1, 3)"),
    ("dict_running_var_int", lambda: (np.ones((2, 3)), None,
     _state(running_var=np.ones(3, int)), {"out_axis": 1}), TypeError,
     "bn's running_var must have dtype float16, float32 or float64"),
    ("negative_running_var", lambda: (np.ones((2, 3)), None,
     _state(running_var=np.array([1.0, -0.5, 1.0])), {"out_axis": 1}), ValueError,
     "bn's running_var must be >= 0, got negative values at channels [1]"),
    ("eps_negative", lambda: (np.ones((2, 3)), None, _bn(3, np.float64),
     {"out_axis": 1, "eps": -1.0}), ValueError, "eps must be a positive finite float"),
    ("eps_string", lambda: (np.ones((2, 3)), None, _bn(3, np.float64),
     {"out_axis": 1, "eps": "1e-5"}), TypeError, "eps must be a positive float, got str"),
]  # fmt: skip


def _arrays_of(*things):
    arrays = []
    for t in things:
        if isinstance(t, np.ndarray):
            arrays.append(t)
        elif isinstance(t, dict):
            arrays += [v for v in t.values() if isinstance(v, np.ndarray)]
        elif isinstance(t, fastbn.BatchNorm):
            arrays += [a for a in (t.gamma, t.beta, t.running_mean, t.running_var) if a is not None]
    return arrays


@pytest.mark.parametrize("make, exc, fragment", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_argument(make, exc, fragment):
    weight, bias, bn, kw = make()
    watched = _arrays_of(weight, bias, bn)
    before = [a.copy() for a in watched]
    with pytest.raises(exc, match=re.escape(fragment)):
        fastbn.fold(weight, bias, bn, **kw)
    for a, b in zip(watched, before):
        assert a.tobytes() == b.tobytes()


def test_out_axis_is_keyword_only_and_required():
    with pytest.raises(TypeError, match="out_axis"):
        fastbn.fold(np.ones((2, 3)), None, _bn(3, np.float64))
    with pytest.raises(TypeError):
        fastbn.fold(np.ones((2, 3)), None, _bn(3, np.float64), 1)
