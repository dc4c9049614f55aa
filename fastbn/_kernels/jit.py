"""The Numba decorators of the kernels, and targets made from one Python body.

Numba's on-disk cache names a compiled function by its module, qualified name and line,
not by its ``parallel=`` flag: two dispatchers over one Python function would share (and
corrupt) one cache entry. ``drivers`` and ``operations`` therefore compile *copies* of a
body, each with a name of its own (``<name>_serial``, ``<name>_parallel``), so one source
gives several targets that are cached side by side.
"""

import types

import numba

# Never nnan/ninf: NaN and inf must propagate through every channel they touch. Not arcp
# or afn either: with them LLVM turns divisions by one divisor into multiplications by
# its reciprocal (and may approximate sqrt) where a vectorized loop repeats them but not
# in scalar code, so the same formula gave other bits on another path (fused planes
# against two-pass; a kernel compiled now against one loaded from the cache). Divisions
# and square roots are per channel, never per element: they cost nothing measurable.
FASTMATH = {"nsz", "contract", "reassoc"}
# _nrt and fastmath explicit everywhere: Numba compiles a callee with its caller's value
# of each of them that the callee leaves unset (``inherit_if_not_set``). An ``exact``
# function without ``fastmath=False`` got its first caller's flags: fastmath inside an
# operation, none when first called from Python, and the overload compiled first served
# every later call of that signature, in the process and from the cache. So a
# statistic's last bits depended on which call compiled it (float64 (1000, 100) m2: 55
# of 100 channels 1-2 ulp apart between a process that compiled the kernels and the next
# one, which loaded them).
_OPTIONS = dict(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy", _nrt=True)
_EXACT = dict(fastmath=False, cache=True, nogil=True, error_model="numpy", _nrt=True)

jit = numba.njit(**_OPTIONS)
# per-channel arithmetic (statistics, coefficients, running statistics): IEEE operations
# as written, so that a formula gives the same bits wherever it is inlined and however a
# loop around it is vectorized (fastmath flags are kept per instruction when LLVM
# inlines; reassociation would otherwise regroup products of three factors differently
# in a vectorized loop than in scalar code)
exact = numba.njit(**_EXACT)
# small per-channel helpers, inlined into their callers' Numba IR: no call, no reference
# counting of the array arguments per channel
inline = numba.njit(**_OPTIONS, inline="always")
# Functions that allocate nothing themselves (their callees may) and return no array:
# compiled without Numba's reference counting (NRT). A compiled function increments and
# decrements (atomically) the count of every array argument and of every view it makes:
# in the per-task and per-channel functions these were ~35% of the time of a small NCHW
# forward (perf, (32, 16, 8, 8) float32). The caller holds the references meanwhile.
borrowing = numba.njit(**dict(_OPTIONS, _nrt=False))
exact_borrowing = numba.njit(**dict(_EXACT, _nrt=False))


def _copy(body, name, replace):
    """``body`` as a new function called ``name`` whose globals are ``body``'s with
    ``replace`` applied (a snapshot: the module must define everything it uses first)."""
    namespace = dict(body.__globals__)
    namespace.update(replace)
    fn = types.FunctionType(body.__code__, namespace, name, body.__defaults__, body.__closure__)
    fn.__qualname__ = name
    fn.__module__ = body.__module__
    fn.__doc__ = body.__doc__
    return fn


def _name(body, target):
    return f"{body.__name__.lstrip('_')}_{target}"


def relu_pair(decorator, body, common=None, **relu_versions):
    """``(plain, relu)``: two functions made from ``body`` by ``decorator``, its global
    ``RELU`` False in ``plain`` (named as ``body`` without its leading ``_``) and True in
    ``relu`` (``<name>_relu``), where ``relu_versions`` also replace the globals they name
    (the ReLU versions of the callees); ``common`` replaces globals in both.

    A ReLU fused after batch norm is a runtime ``relu`` argument of the passes (0, 1 or 2,
    see ``affine``); its loops are guarded by ``RELU and ...``, and Numba drops a branch
    on a constant global before typing: a call without ReLU compiles none of them (they
    were 30% of the first float32 step's compile time)."""
    name = body.__name__.lstrip("_")
    common = common or {}
    plain = decorator(_copy(body, name, dict(common, RELU=False)))
    relu = decorator(_copy(body, name + "_relu", dict(common, **relu_versions, RELU=True)))
    return plain, relu


def planes_only(decorator, dispatcher):
    """A copy of ``dispatcher``'s function (``<name>_planes``) with its global ``ROWS``
    False: the rows family's loops, behind ``ROWS and ...``, are dropped before typing.
    For the fused-planes tasks, which only ever run planes: the task code linked into
    their targets (and re-optimized in each of them, three times more in a parallel
    driver's wrappers) shrinks by the rows loops."""
    fn = dispatcher.py_func
    return decorator(_copy(fn, fn.__name__ + "_planes", {"ROWS": False}))


def drivers(body, **relu_versions):
    """``{(parallel, relu): dispatcher}`` of a task loop ``for t in numba.prange(n): ...``:
    the serial one runs the loop in order, the parallel one with ``parallel=True``; the
    ``relu`` ones call the tasks named in ``relu_versions`` (see ``relu_pair``; without
    them the two are the same dispatchers).

    Write the body with explicit arguments, not ``*args``: a task called with a
    star-args tuple got every array of the tuple reference-counted (two atomic updates)
    per task, measured as ~13 of the ~50 per task of the small NCHW forward (each task
    function still counts every array argument on entry).

    The serial driver is inlined (Numba IR) into the operations that call it: each
    compiled library re-optimizes and re-emits the machine code of every library it
    links, so a library per level made the tasks' code go through LLVM once more per
    level (first float32 step 11.8 -> 10.2 s with the operations inlined too). The
    parallel one cannot be: its ``prange`` needs ``parallel=True``."""
    targets = {}
    for relu in (False, True):
        if relu and not relu_versions:
            targets[False, True], targets[True, True] = targets[False, False], targets[True, False]
            continue
        replace = relu_versions if relu else {}
        suffix = "_relu" if relu else ""
        serial = _copy(body, _name(body, "serial") + suffix, replace)
        parallel = _copy(body, _name(body, "parallel") + suffix, replace)
        targets[False, relu] = numba.njit(**_OPTIONS, inline="always")(serial)
        targets[True, relu] = numba.njit(**_OPTIONS, parallel=True)(parallel)
    return targets


def operations(body, **passes):
    """The targets of a whole operation ``body``: ``{(parallel, fused, relu): dispatcher}``.

    Each name in ``passes`` maps to a ``{(parallel, relu): dispatcher}`` dict (``drivers``):
    the body's global of that name is the serial one in serial targets and the parallel
    one in the others, so a small input compiles and runs only serial code. The body's
    globals ``FUSED`` and ``RELU`` are constants in each target, and Numba drops the
    branch they rule out: a target compiles either the fused-planes path or the two-pass
    one, never both, and ReLU code only in the ``relu`` targets (see ``relu_pair``).
    Targets are inlined (Numba IR) where another operation calls them, called as usual
    from Python: a call with ``*args`` cannot be inlined, so write the arguments out."""
    targets = {}
    for parallel in (False, True):
        for fused in (False, True):
            for relu in (False, True):
                replace = {k: v[parallel, relu] for k, v in passes.items()}
                replace["FUSED"], replace["RELU"] = fused, relu
                kind = ("parallel" if parallel else "serial") + ("_fused" if fused else "")
                fn = _copy(body, _name(body, kind) + ("_relu" if relu else ""), replace)
                targets[parallel, fused, relu] = numba.njit(**_OPTIONS, inline="always")(fn)
    return targets
