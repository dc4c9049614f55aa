"""Streaming (non-temporal) stores of whole cache lines, for the elementwise pass.

An ordinary store first reads the destination line into the cache (write-allocate), so
a pass that reads ``x`` and writes ``y`` moves three streams of data; a non-temporal
store sends a whole line straight to memory, two streams. Numba cannot emit one, so the
intrinsics here build the LLVM IR of one 16-element step of the elementwise formula

    out[k:k+16] = (x[k:k+16] - m) * p + q                 (forward)
    out[k:k+16] = (dy[k:k+16] - d) * g + (x[k:k+16] - m) * p + q  (backward dx)

in the storage dtype of ``out`` (float32 or float64; the channel parameters
``m, p, q, g, d`` are arrays of that dtype, taken at ``j:j+16`` for rows, one channel per
element, or at ``j`` for planes, one channel), with ``llvm.fmuladd`` rounding exactly as
``fmuladd`` below, so that streamed and ordinary elements get the same bits, and a vector store
tagged ``!nontemporal``. ``&out[k]`` must be 64-byte aligned.
``store_fence`` orders the streaming stores before later ones (each task ends with it).
Elsewhere than x86-64 the stores are ordinary and the fence is nothing.

The ReLU-fused variants (``relu``, see ``fastbn._kernels.affine``) add
``relu(v) = np.maximum(v, 0)`` to the forward step and, for ``dx``, mask ``dy`` with the
forward pre-activation ``(x - rm) * rp + rq > 0`` (``rm, rp, rq``: the forward
coefficients). ``relu_max`` and ``masked`` below are the same IR for scalar code. Their
compares and products carry one fast-math flag that changes nothing here (``arcp``):
Numba's fastmath pass only flags instructions that have none, so these stay IEEE-exact
(``nsz`` could otherwise turn ``max(-0.0, 0)`` into ``-0.0``, which ``np.maximum`` does not).
"""

import platform

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

LINE = 16
_X86 = platform.machine().lower() in ("x86_64", "amd64")


# the one flag of the exact instructions (see the module docstring)
_EXACT = ("arcp",)


def relu_ir(builder, v):
    """``np.maximum(v, 0)``: ``v`` when ``v > 0`` or ``v`` is NaN (unordered), else +0.0."""
    zero = ir.Constant(v.type, None)
    keep = builder.fcmp_unordered(">", v, zero, flags=_EXACT)
    return builder.select(keep, v, zero)


def masked_ir(builder, pre, dy):
    """``dy * (pre > 0)``: ``dy`` times 1.0 or 0.0 (so a NaN or inf ``dy`` stays NaN)."""
    positive = builder.fcmp_ordered(">", pre, ir.Constant(pre.type, None), flags=_EXACT)
    return builder.fmul(dy, builder.uitofp(positive, dy.type), flags=_EXACT)


def _make_line(per_element, with_dy, relu=False):
    """The intrinsic of one 16-element step; ``relu``: forward ``relu_max`` of the
    result, ``dx`` with ``dy`` masked by the pre-activation."""

    @intrinsic
    def line(typingctx, out, x, dy, m, p, q, g, d, rm, rp, rq, k, j):
        arrays = (out, x, dy, m, p, q, g, d, rm, rp, rq)
        if not all(isinstance(a, types.Array) and a.dtype == out.dtype for a in arrays):
            return None
        if not (isinstance(k, types.Integer) and isinstance(j, types.Integer)):
            return None
        sig = types.void(out, x, dy, m, p, q, g, d, rm, rp, rq, k, j)

        def codegen(context, builder, signature, args):
            out_v, x_v, dy_v, m_v, p_v, q_v, g_v, d_v, rm_v, rp_v, rq_v, k_v, j_v = args
            tys = signature.args

            def data(i, val):
                return context.make_array(tys[i])(context, builder, val).data

            elem = context.get_data_type(tys[0].dtype)
            size = context.get_abi_sizeof(elem)
            vec_t = ir.VectorType(elem, LINE)

            def load_data(ptr):
                return builder.load(
                    builder.bitcast(builder.gep(ptr, [k_v]), vec_t.as_pointer()), align=size
                )

            def load_param(i, val):
                ptr = data(i, val)
                if per_element:
                    return builder.load(
                        builder.bitcast(builder.gep(ptr, [j_v]), vec_t.as_pointer()), align=size
                    )
                scalar = builder.load(builder.gep(ptr, [j_v]))
                one = builder.insert_element(
                    ir.Constant(vec_t, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0)
                )
                return builder.shuffle_vector(
                    one,
                    ir.Constant(vec_t, ir.Undefined),
                    ir.Constant(ir.VectorType(ir.IntType(32), LINE), [0] * LINE),
                )

            suffix = f"v{LINE}f{8 * size}"
            fmuladd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec_t, [vec_t] * 3), "llvm.fmuladd." + suffix
            )
            xv = load_data(data(1, x_v))
            xc = builder.fsub(xv, load_param(3, m_v))
            value = builder.call(fmuladd, [xc, load_param(4, p_v), load_param(5, q_v)])
            if with_dy:
                dyv = load_data(data(2, dy_v))
                if relu:
                    pre_c = builder.fsub(xv, load_param(8, rm_v))
                    pre = builder.call(fmuladd, [pre_c, load_param(9, rp_v), load_param(10, rq_v)])
                    dyv = masked_ir(builder, pre, dyv)
                dyv = builder.fsub(dyv, load_param(7, d_v))
                value = builder.call(fmuladd, [dyv, load_param(6, g_v), value])
            elif relu:
                value = relu_ir(builder, value)
            dest = builder.bitcast(builder.gep(data(0, out_v), [k_v]), vec_t.as_pointer())
            store = builder.store(value, dest, align=64)
            if _X86:
                store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
            return context.get_dummy_value()

        return sig, codegen

    return line


line_rows = _make_line(per_element=True, with_dy=False)
line_rows_dy = _make_line(per_element=True, with_dy=True)
line_planes = _make_line(per_element=False, with_dy=False)
line_planes_dy = _make_line(per_element=False, with_dy=True)
line_rows_relu = _make_line(per_element=True, with_dy=False, relu=True)
line_rows_relu_dy = _make_line(per_element=True, with_dy=True, relu=True)
line_planes_relu = _make_line(per_element=False, with_dy=False, relu=True)
line_planes_relu_dy = _make_line(per_element=False, with_dy=True, relu=True)


@intrinsic
def prefetch(typingctx, a, i):
    """A hint to read ``a[i]``'s cache line into all cache levels (``llvm.prefetch``)."""
    if not (isinstance(a, types.Array) and isinstance(i, types.Integer)):
        return None
    sig = types.void(a, i)

    def codegen(context, builder, signature, args):
        a_v, i_v = args
        data = context.make_array(signature.args[0])(context, builder, a_v).data
        byte = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        ptr = builder.bitcast(builder.gep(data, [i_v]), byte)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep everywhere, data
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            builder.call(
                cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.sfence"), []
            )
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fmuladd(typingctx, a, b, c):
    """``a * b + c`` as ``llvm.fmuladd`` in the type of ``a``, ``b`` and ``c`` (all float32
    or all float64): fused where the processor can, the same way in scalar and vector code
    (so the loops and the streaming lines round alike)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None
    sig = a(a, a, a)

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(signature.return_type)
        name = f"llvm.fmuladd.f{8 * context.get_abi_sizeof(ty)}"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3), name)
        return builder.call(fn, list(args))

    return sig, codegen


@intrinsic
def relu_max(typingctx, v):
    """``np.maximum(v, 0)`` for a float32/float64 ``v``, exactly (``relu_ir``)."""
    if not isinstance(v, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return relu_ir(builder, args[0])

    return v(v), codegen


@intrinsic
def masked(typingctx, pre, dy):
    """``dy * (pre > 0)`` in the type of ``dy`` and ``pre`` (``masked_ir``)."""
    if not (isinstance(pre, types.Float) and pre == dy):
        return None

    def codegen(context, builder, signature, args):
        return masked_ir(builder, args[0], args[1])

    return dy(pre, dy), codegen


@intrinsic
def add_in_order(typingctx, a, b):
    """``a + b`` that fastmath never reassociates (``_EXACT`` flags): sums written with it
    keep the order of the source."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=_EXACT)

    return a(a, b), codegen
