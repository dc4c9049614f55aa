"""fastbn: fast, accurate batch normalization for NumPy with fused Numba kernels.

>>> import numpy as np, fastbn
>>> x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
>>> y, cache = fastbn.batch_norm(x, np.ones(16, np.float32), np.zeros(16, np.float32))
>>> dx, dgamma, dbeta = fastbn.batch_norm_backward(np.ones_like(y), cache)

See ``fastbn.batch_norm``, ``fastbn.batch_norm_backward``, ``fastbn.BatchNorm``,
``fastbn.fold`` (batch norm absorbed into the preceding layer), ``fastbn.reference``
(the naive NumPy implementation with the same signatures), ``fastbn.moments`` /
``fastbn.Moments`` / ``fastbn.grad_sums`` (statistics that merge) and
``fastbn.distributed.SyncBatchNorm`` (MPI, optional).
"""

from . import _cache_dir  # noqa: F401  # isort: skip  (first: Numba's cache dir, then kernels)
from . import reference
from ._compile_notice import set_compile_notice

# _threading first among the kernels' users: it picks the threading layer before any kernel.
from ._memory import pool_held, pool_limit, set_pool_limit
from ._threading import get_num_threads, num_threads, set_num_threads, threading_layer_name
from .functional import BatchNormCache, batch_norm, batch_norm_backward
from .layer import BatchNorm
from .moments import Moments, grad_sums, moments

from ._fold import fold  # isort: skip  (imports .layer, hence the kernels: after _threading)
from ._warmup import warmup  # isort: skip

__version__ = "0.1.0"

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "BatchNorm",
    "BatchNormCache",
    "fold",
    "Moments",
    "moments",
    "grad_sums",
    "reference",
    "set_num_threads",
    "get_num_threads",
    "num_threads",
    "threading_layer_name",
    "set_pool_limit",
    "pool_limit",
    "pool_held",
    "warmup",
    "set_compile_notice",
    "__version__",
]
