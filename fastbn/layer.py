"""``BatchNorm``: a batch-normalization layer for NumPy networks.

Mirrors ``torch.nn.BatchNorm1d/2d/3d`` (one class: the channel axis is a
parameter), with explicit ``forward``/``backward`` in place of autograd.
"""

import contextlib
import operator

import numpy as np

from . import _activation, _checks
from .functional import batch_norm, batch_norm_backward, call_again
from .moments import Moments, moments

__all__ = ["BatchNorm"]

# Forms (mode, shape of x) whose validation a layer remembers (``_prepare``): a training
# loop alternates its batches with evaluation passes over other shapes (a validation
# set, a last partial batch); with one form remembered, every switch took the checked path.
_MAX_FORMS = 4


class BatchNorm:
    """Batch normalization over channel ``axis`` of inputs with ``num_features`` channels.

    Parameters
    ----------
    num_features : int
        C, the size of the channel axis.
    eps : float
        Added to the variance for stability.
    momentum : float in [0, 1] or None
        Running statistics update factor; None means a cumulative moving average
        (factor ``1 / num_batches_tracked``).
    affine : bool
        Learn ``gamma`` (init 1) and ``beta`` (init 0). False: no scale/shift.
    track_running_stats : bool
        Keep ``running_mean`` (init 0) and ``running_var`` (init 1) for eval mode.
        False: eval mode normalizes with batch statistics too.
    axis : int
        Channel axis of the inputs (1 for ``(N, C, ...)``, -1 for channels-last).
    dtype : float32 or float64
        dtype of the parameters and running statistics.
    activation : None or "relu"
        ``"relu"``: the layer is batch norm followed by a ReLU, fused in its passes
        (``fastbn.batch_norm(..., activation="relu")``); ``backward`` takes the gradient
        of the ReLU's output.

    Usage: ``y = bn(x)`` (or ``bn.forward(x)``), then ``dx = bn.backward(dy)``,
    which sets ``bn.dgamma``/``bn.dbeta`` (also in ``bn.grads``). ``bn.train()`` and
    ``bn.eval()`` switch mode; ``bn.params`` maps names to the parameter arrays
    that an optimizer updates in place. ``with bn.collect_stats(): ...`` sets the
    running statistics to the exact statistics of the inputs seen inside.
    """

    def __init__(
        self,
        num_features,
        *,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        axis=1,
        dtype=np.float32,
        activation=None,
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        eps = _checks.check_eps(eps)
        momentum = _checks.check_momentum(momentum, required=False)
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.activation = _activation.check_activation(activation)
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dtype
        self.training = True
        C = self.num_features
        self.gamma = np.ones(C, dtype) if self.affine else None
        self.beta = np.zeros(C, dtype) if self.affine else None
        self.dgamma = None
        self.dbeta = None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dtype)
            self.running_var = np.ones(C, dtype)
        else:
            self.running_mean = None
            self.running_var = None
        self.num_batches_tracked = 0
        self._cache = None
        self._own_cache = None  # the cache call_again made, which it may refill
        self._collected = None  # the moments seen inside collect_stats()
        self._prepared = {}  # (training, x.shape) -> what a call of that form validated

    # -- mode -------------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (batch statistics, running stats updated). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (running statistics). Returns self."""
        return self.train(False)

    # -- compute ----------------------------------------------------------------
    def forward(self, x, *, out=None):
        """Normalize ``x`` (shape ``(N, C, ...)`` or channels-last per ``axis``) -> ``y``."""
        view = self._repeats(x, out)
        if view is not None:
            momentum = self.momentum
            if momentum is None:
                momentum = 1.0 / (self.num_batches_tracked + 1)
            if not self.training:  # the one check that values can fail, before any change
                _checks.check_native_running_var(self.running_var)
            # the call refills the cache of this path's last call of the same view (only
            # the layer refers to it)
            own = self._cache
            if own is None or not (own is self._own_cache and own.view is view):
                own = None
            try:
                y, cache = call_again(
                    view, x, self.gamma, self.beta, self.running_mean,
                    self.running_var, momentum, self.eps, self.activation, self.training,
                    out, own,
                )  # fmt: skip
            except BaseException:  # (a MemoryError, an interrupt): own may be half rewritten
                if own is not None:
                    self._cache = self._own_cache = None
                raise
            self._cache = self._own_cache = cache
            if self.training:
                self.num_batches_tracked += 1
            return y
        self._own_cache = None
        self._check_channels(x)
        if self._collected is not None:
            return self._collect_forward(x, out)
        use_batch_stats = self.training or not self.track_running_stats
        momentum = self.momentum
        update = self.training and self.track_running_stats
        if update and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        y, cache = batch_norm(
            x,
            self.gamma,
            self.beta,
            training=use_batch_stats,
            running_mean=self.running_mean if (update or not use_batch_stats) else None,
            running_var=self.running_var if (update or not use_batch_stats) else None,
            momentum=momentum if momentum is not None else 0.0,
            eps=self.eps,
            axis=self.axis,
            out=out,
            activation=self.activation,
        )
        # Only a call that succeeded changes the state.
        self._cache = cache
        if update:
            self.num_batches_tracked += 1
        if update or not use_batch_stats:
            self._prepare(x, cache)
        return y

    __call__ = forward

    def _state(self):
        """The attributes a call of the form ``_prepare`` recorded depends on."""
        return (self.eps, self.momentum, self.axis, self.activation, self.training,
                self.track_running_stats)  # fmt: skip

    def _prepare(self, x, cache):
        """After a successful call that used the running statistics (training with them,
        or eval): remember what it validated, so that the next call of the same form
        (same shape, dtype and mode, this layer's own arrays) can skip the checks
        (``_repeats``). Whether ``out`` was given does not matter: ``_repeats`` checks
        each call's ``out``. Up to ``_MAX_FORMS`` forms are remembered (then all are
        forgotten and relearned)."""
        direct = (self.gamma, self.beta, self.running_mean, self.running_var)
        dtype = cache.view.compute
        plain = all(
            a is None or (a.dtype is dtype and a.flags.c_contiguous and a.flags.writeable)
            for a in direct
        )
        ok = plain and type(x) is np.ndarray and x.dtype is dtype and cache.view.matches(x)
        # the owners of the arrays' memory: an x or an out= whose owner is none of them
        # cannot overlap them (None: some array's owner is unknown, no quick path then)
        owners = tuple(_checks.memory_owner(a) for a in direct if a is not None)
        if not all(o is not None for o in owners):
            owners = None
        forms, key = self._prepared, (self.training, x.shape)
        if not ok:
            forms.pop(key, None)
            return
        if key not in forms and len(forms) >= _MAX_FORMS:
            forms.clear()
        forms[key] = (dtype, cache.view, direct, self._state(), owners)

    def _repeats(self, x, out=None):
        """The canonical view of ``x`` when ``x``, ``out`` and the layer's state are what
        ``_prepare`` recorded for this mode and shape (then every check of ``batch_norm``
        would pass again, except eval mode's check of ``running_var``, which ``forward``
        repeats), else None. ``x`` may be a view; the owner of its memory
        (``_checks.memory_owner``) must be known and not own the memory of the layer's
        arrays. ``out`` must be None or an array the kernels write directly
        (``_checks.plain_out``) that holds neither ``x``'s memory nor the layer's arrays'."""
        if type(x) is not np.ndarray:
            return None
        prepared = self._prepared.get((self.training, x.shape))
        if prepared is None:
            return None
        dtype, view, direct, state, owners = prepared
        if x.dtype is not dtype or not view.matches(x):
            return None
        # x (or its owner, for a view) and out must not hold the memory of the layer's arrays
        x_owner = _checks.memory_owner(x)
        if x_owner is None or owners is None:
            return None
        if out is not None and (
            view.channels_last or out is x_owner or not _checks.plain_out(out, x)
        ):
            return None
        for owner in owners:
            if owner is x_owner or owner is out:
                return None
        rm, rv = self.running_mean, self.running_var
        repeats = (
            self.gamma is direct[0]
            and self.beta is direct[1]
            and rm is direct[2]
            and rv is direct[3]
            and self._state() == state
            and self._collected is None
            and rm.flags.writeable
            and rv.flags.writeable
        )
        return view if repeats else None

    # -- exact statistics of many batches ----------------------------------------
    @contextlib.contextmanager
    def collect_stats(self):
        """Recalibrate the running statistics on the inputs of the forward calls inside.

        Inside the ``with`` block, ``forward`` normalizes with each batch's statistics
        (as in training, whatever the mode) and records the batch's moments, without
        touching the running statistics or ``num_batches_tracked``; ``backward`` works
        as after a training forward. On a normal exit, ``running_mean`` and
        ``running_var`` become the exact mean and unbiased variance of every value seen
        (Chan's merge of the batches' moments, not an average of batch variances), in
        place. An exception inside the block leaves them unchanged. Needs
        ``track_running_stats=True`` and, on exit, more than one value per channel seen.
        """
        if not self.track_running_stats:
            raise ValueError("collect_stats needs a layer with track_running_stats=True")
        if self._collected is not None:
            raise RuntimeError("collect_stats is already active on this layer")
        self._collected = parts = []
        ok = False
        try:
            yield self
            ok = True
        finally:
            self._collected = None
            total = self._total_moments(parts, ok)
        if total.count < 2:
            raise ValueError(
                f"collect_stats saw {total.count} value(s) per channel; the unbiased "
                f"variance needs at least 2 (the running statistics are unchanged)"
            )
        self.running_mean[...] = total.mean
        self.running_var[...] = total.var(ddof=1)

    def _collect_forward(self, x, out):
        m = moments(x, self.axis)
        y, cache = batch_norm(
            x,
            self.gamma,
            self.beta,
            training=True,
            eps=self.eps,
            axis=self.axis,
            out=out,
            # the batch's own moments: the same bits as without them (which ReLU needs)
            stats=m if m.count > 1 and self.activation is None else None,
            activation=self.activation,
        )
        self._cache = cache
        self._collected.append(m)
        return y

    def _total_moments(self, parts, ok):
        """The merged moments of ``parts`` (None when ``ok`` is False: the block raised)."""
        if not ok:
            return None
        return Moments.merge(parts) if parts else Moments.empty(self.num_features)

    def _check_channels(self, x):
        """A message in the layer's terms when x has the wrong number of channels."""
        if not (isinstance(x, np.ndarray) and x.ndim >= 2 and -x.ndim <= self.axis < x.ndim):
            return  # batch_norm explains what is wrong with x
        if x.shape[self.axis] != self.num_features:
            raise ValueError(
                f"{self!r} expects {self.num_features} channels on axis {self.axis}, "
                f"got x of shape {x.shape} and dtype {x.dtype}"
            )

    def backward(self, dy, *, out=None):
        """Gradient w.r.t. the last forward's input; sets ``dgamma``/``dbeta``."""
        if self._cache is None:
            raise RuntimeError("BatchNorm.backward called before forward")
        dx, self.dgamma, self.dbeta = batch_norm_backward(dy, self._cache, out=out)
        return dx

    # -- parameters and state ----------------------------------------------------
    @property
    def params(self):
        """``{"gamma": gamma, "beta": beta}`` (empty when not affine)."""
        return {"gamma": self.gamma, "beta": self.beta} if self.affine else {}

    @property
    def grads(self):
        """``{"gamma": dgamma, "beta": dbeta}`` from the last backward (empty when not affine)."""
        return {"gamma": self.dgamma, "beta": self.dbeta} if self.affine else {}

    def state_dict(self):
        """Copies of the parameters and running statistics (PyTorch's names too)."""
        state = {}
        if self.affine:
            state["gamma"] = self.gamma.copy()
            state["beta"] = self.beta.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = self.num_batches_tracked
        return state

    def load_state_dict(self, state):
        """Load what ``state_dict`` returned; shapes must match. PyTorch's ``weight``
        and ``bias`` keys are accepted for ``gamma`` and ``beta``."""
        state = dict(state)
        if "weight" in state and "gamma" not in state:
            state["gamma"] = state.pop("weight")
        if "bias" in state and "beta" not in state:
            state["beta"] = state.pop("bias")
        expected = set(self.state_dict())
        missing = expected - set(state)
        unexpected = set(state) - expected
        if missing or unexpected:
            raise KeyError(
                f"state_dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        # Validate everything before changing anything: a bad state loads nothing.
        values = {}
        for name in ("gamma", "beta", "running_mean", "running_var"):
            if name in state:
                value = np.asarray(state[name])
                target = getattr(self, name)
                if value.shape != target.shape:
                    raise ValueError(f"{name} must have shape {target.shape}, got {value.shape}")
                if value.dtype.kind not in "fiu":
                    raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
                values[name] = value
        if "num_batches_tracked" in state:
            count = operator.index(np.asarray(state["num_batches_tracked"])[()])
            if count < 0:
                raise ValueError(f"num_batches_tracked must be >= 0, got {count}")
        for name, value in values.items():
            getattr(self, name)[...] = value  # in place: optimizers keep their references
        if "num_batches_tracked" in state:
            self.num_batches_tracked = int(count)

    def __repr__(self):
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"axis={self.axis}, dtype={self.dtype.name}"
            + ("" if self.activation is None else f", activation={self.activation!r}")
            + ")"
        )
