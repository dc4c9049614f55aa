"""Numba threading: a thread-safe layer, and the number of threads fastbn uses.

fastbn selects a thread-safe Numba threading layer before any parallel kernel
runs: ``omp`` (GNU OpenMP, present on most Linux systems), else ``tbb`` (when the
``tbb`` package is installed). If neither is available Numba's ``workqueue`` layer
is used, which aborts the process when parallel code is entered from two Python
threads at once, so fastbn then serializes its parallel calls with a lock.
A ``NUMBA_THREADING_LAYER`` set by the user is respected, and so is a layer that
Numba had already started before fastbn was imported; any layer that is not
known to be thread-safe (``workqueue``, ``forksafe``) is serialized the same way.

GNU OpenMP's idle threads spin for a while before they sleep (``GOMP_SPINCOUNT``,
300000 spins by default). Spinning threads take the cores from whatever runs next:
NumPy's BLAS between fastbn's calls, another process; and a thread that spins at a
barrier while its partner is descheduled wastes its time slice. So unless the user set
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``, fastbn sets ``GOMP_SPINCOUNT`` to
``SPIN_COUNT`` while libgomp loads (and restores the environment after): threads still
spin briefly between the passes of one call, then sleep.

A process started with ``fork`` after its parent ran parallel kernels cannot use GNU
OpenMP (its runtime terminates the child), so such a child runs fastbn's serial kernels:
the same bits, on one thread. With one thread set, the serial kernels run too (no
parallel region to enter).

The thread count is Numba's, which is per calling Python thread:
``set_num_threads``/``num_threads`` in one thread do not change another's.
Results never depend on the thread count: work is partitioned by data size.
"""

import contextlib
import operator
import os
import threading

import numba

__all__ = ["set_num_threads", "get_num_threads", "num_threads", "threading_layer_name"]

# Layers (and Numba's layer classes) that may be entered from several threads at once.
_THREAD_SAFE = {"omp", "tbb", "threadsafe", "safe"}


def _importable(module):
    try:
        __import__(module)
    except Exception:  # ImportError, or OSError for a missing shared library
        return False
    return True


def _running_layer():
    """The layer Numba has already started, or None."""
    try:
        return numba.threading_layer()
    except ValueError:  # "Threading layer is not initialized."
        return None


def _choose_layer():
    running = _running_layer()
    if running is not None:
        return running
    requested = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
    if requested and requested != "default":
        return requested
    if _importable("numba.np.ufunc.omppool"):
        return "omp"
    if _importable("numba.np.ufunc.tbbpool"):
        return "tbb"
    return "workqueue"


# Spins of an idle GNU OpenMP thread before it sleeps (see the module docstring and README).
SPIN_COUNT = 10000


def _quiet_omp_environment():
    """Environment changes to apply while libgomp loads: ``GOMP_SPINCOUNT`` unless the
    user chose a wait policy or spin count."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


_set = _quiet_omp_environment()
os.environ.update(_set)
try:
    _LAYER = _choose_layer()  # loads libgomp (numba's omppool), which reads the environment
finally:
    for _name in _set:
        os.environ.pop(_name, None)
if _running_layer() is None:
    numba.config.THREADING_LAYER = _LAYER
_SERIALIZE = _LAYER not in _THREAD_SAFE
_lock = threading.Lock()


def threading_layer_name():
    """The Numba threading layer fastbn asked for (``omp``, ``tbb`` or ``workqueue``),
    or the one Numba was already running when fastbn was imported."""
    return _LAYER


def serialized():
    """True when fastbn serializes its parallel calls (the layer is not thread-safe)."""
    return _SERIALIZE


try:  # Numba's pool state and per-thread count, read directly (``parallel_usable``)
    from numba.np.ufunc import parallel as _parallel_module

    if not hasattr(_parallel_module, "_is_initialized"):
        _parallel_module = None
except ImportError:  # another Numba layout: get_num_threads is used
    _parallel_module = None

_started = []
_forked = []  # non-empty in a child forked after the thread pool started


def _start():
    """Start Numba's thread pool (``get_num_threads`` does). A kernel loaded from the disk
    cache that contains parallel code does not start it, and would crash without it."""
    with _lock:
        if not _started:
            numba.get_num_threads()
            _started.append(True)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=lambda: _forked.append(True))


def parallel_usable():
    """Whether a parallel kernel may run here and now: not in a forked child of a process
    whose GNU OpenMP pool started (it would be terminated), and more than one thread."""
    if _forked and _LAYER == "omp":
        return False
    if _parallel_module is not None and _parallel_module._is_initialized:
        # once the pool is up, the per-thread count without get_num_threads' two locks
        # (0.08 us against 0.55 us: this runs before every call of a parallel-sized plan)
        return _parallel_module._get_num_threads() > 1
    return numba.get_num_threads() > 1


def parallel_call(fn, *args):
    """Call a kernel with parallel code, serialized when the layer is not thread-safe."""
    if not _started:
        _start()
    if _SERIALIZE:
        with _lock:
            return fn(*args)
    return fn(*args)


def _check_count(n):
    if isinstance(n, bool):
        raise TypeError("set_num_threads: n must be an int, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}") from None
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"set_num_threads: n must be in [1, {limit}] (NUMBA_NUM_THREADS), got {n}")
    return n


def set_num_threads(n):
    """Use ``n`` threads for fastbn's parallel kernels in the calling Python thread.

    ``n`` must be between 1 and ``numba.config.NUMBA_NUM_THREADS``. Like Numba's own
    setting, it is per calling thread. Results are bitwise the same for any ``n``.
    """
    numba.set_num_threads(_check_count(n))


def get_num_threads():
    """The number of threads fastbn's parallel kernels use in the calling thread."""
    return numba.get_num_threads()


@contextlib.contextmanager
def num_threads(n):
    """Context manager: ``with fastbn.num_threads(1): ...`` restores the old count."""
    n = _check_count(n)
    old = get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)
