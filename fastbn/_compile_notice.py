"""One line on stderr when fastbn is about to compile a kernel, so a cold first call does
not look like a hang.

Numba compiles each of fastbn's operations the first time it is called with a new
signature (dtype, serial or parallel target) on a machine, then keeps the machine code in
its on-disk cache (``__pycache__`` beside the sources, or ``NUMBA_CACHE_DIR``, see
``fastbn._cache_dir``): a later process loads it in milliseconds. This module listens to
Numba's ``"numba:compile"`` event (``numba.core.event``, a public API). Numba broadcasts it
inside ``Dispatcher.compile`` only after its own cache lookup failed, just before it
compiles, so the test of "not in the disk cache" is Numba's own and a warm cache prints
nothing. The listener costs nothing per call: Numba only reaches it on a compile.

When the compile being started is a fastbn operation (a dispatcher of a ``fastbn.*``
module, not one compiled inside another one's compile), it prints::

    fastbn: compiling backward (float32, parallel target) for this machine, about 3 s; ...

once per (operation, dtype, target) and process, the first line of a process with what
it is and how to avoid it: that it happens once per machine and Numba version, where the
cache is, how to silence it (``FASTBN_QUIET_COMPILE=1`` in the environment, or
``fastbn.set_compile_notice(False)``) and how to compile ahead (``python -m fastbn
warmup``). If Numba lacks the event API, fastbn stays silent.
"""

import os
import sys
import threading

__all__ = ["set_compile_notice", "compile_notice_enabled"]

_ENV = "FASTBN_QUIET_COMPILE"
# Seconds one operation's cold compile took (2-core Xeon VM, idle, numba 0.68.1,
# 2026-12-01, float32 (256, 1024), empty cache): forward_train 4.9, backward 2.3 and
# forward_eval 0.6 after them, parallel forward_train 3.1 and backward 1.8 after the serial
# ones. A guide for the user, not a promise; update it when the kernels change.
_ESTIMATE_SECONDS = {"forward_train": 5, "backward": 3, "forward_eval": 2}
_DEFAULT_ESTIMATE = 5
# Helpers that Python calls directly and that compile in a fraction of a second: a line
# for them would only add noise before the operation's own.
_UNANNOUNCED = frozenset({"any_negative"})


def _quiet_from_environment():
    return os.environ.get(_ENV, "").strip().lower() not in ("", "0", "false", "no")


_state = {"enabled": not _quiet_from_environment(), "first": True}
_printed = set()
_local = threading.local()  # per thread: depth of fastbn compiles in progress


def set_compile_notice(enabled):
    """Print (True, the default) or not (False) fastbn's one-line notice on stderr when a
    kernel is about to be compiled. ``FASTBN_QUIET_COMPILE=1`` in the environment at import
    sets False."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_compile_notice: enabled must be a bool, got {type(enabled).__name__}")
    _state["enabled"] = enabled


def compile_notice_enabled():
    """Whether fastbn prints its compile notice (``set_compile_notice``)."""
    return _state["enabled"]


def _describe(dispatcher, argtypes):
    """``(operation, dtype, target)`` of a compile: ``forward_train_parallel`` over a float32
    array gives ``("forward_train", "float32", "parallel")``, ``backward_serial_fused_relu``
    ``(..., "serial, fused planes, with ReLU")``."""
    name = dispatcher.py_func.__name__
    relu = name.endswith("_relu")
    name = name[: -len("_relu")] if relu else name
    fused = name.endswith("_fused")
    name = name[: -len("_fused")] if fused else name
    operation, target = name, ""
    for suffix in ("_serial", "_parallel"):
        if name.endswith(suffix):
            operation, target = name[: -len(suffix)], suffix[1:]
    if fused:
        target += ", fused planes"
    if relu:
        target += ", with ReLU"
    dtypes = set()
    stack = list(argtypes)
    while stack:
        t = stack.pop()
        if hasattr(t, "types") and isinstance(t.types, tuple):  # a tuple of arguments
            stack.extend(t.types)
        elif hasattr(t, "ndim") and hasattr(t, "dtype"):
            dtypes.add(str(t.dtype))
    dtype = "float32" if "float32" in dtypes else "float64" if "float64" in dtypes else "?"
    return operation, dtype, target


def _cache_dir(dispatcher):
    cache = getattr(dispatcher, "_cache", None)
    return getattr(cache, "cache_path", None)


def message(operation, dtype, target, cache_dir=None, first=True):
    """The notice's text (one line, no newline)."""
    seconds = _ESTIMATE_SECONDS.get(operation, _DEFAULT_ESTIMATE)
    what = f"{operation} ({dtype}, {target} target)" if target else f"{operation} ({dtype})"
    text = f"fastbn: compiling {what} for this machine, about {seconds} s"
    if not first:
        return text + " (once; cached)"
    where = f" in {cache_dir}" if cache_dir else ""
    return (
        f"{text}; this happens once per machine and Numba version (cached{where}). "
        f"Silence: {_ENV}=1 or fastbn.set_compile_notice(False); "
        "compile ahead: python -m fastbn warmup"
    )


def _is_fastbn(dispatcher):
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
    return module == "fastbn" or module.startswith("fastbn.")


def _on_start(data):
    depth = getattr(_local, "depth", 0)
    if depth:  # a callee compiled inside a fastbn compile: part of that one
        _local.depth = depth + 1
        return
    dispatcher = data.get("dispatcher")
    if not _is_fastbn(dispatcher):
        return
    _local.depth = 1
    if not _state["enabled"] or dispatcher.py_func.__name__ in _UNANNOUNCED:
        return
    key = _describe(dispatcher, data.get("args") or ())
    if key in _printed:
        return
    _printed.add(key)
    first = _state["first"]
    _state["first"] = False
    print(message(*key, _cache_dir(dispatcher), first), file=sys.stderr, flush=True)


def _on_end():
    depth = getattr(_local, "depth", 0)
    if depth:
        _local.depth = depth - 1


def _install():
    """Register the listener with Numba's event API; False when that API is missing."""
    try:
        from numba.core import event
    except ImportError:
        return False

    class _Listener(event.Listener):
        def on_start(self, ev):
            try:
                _on_start(ev.data or {})
            except Exception:  # never let the notice break a compile
                pass

        def on_end(self, ev):
            _on_end()

    try:
        event.register("numba:compile", _Listener())
    except Exception:
        return False
    return True


INSTALLED = _install()
