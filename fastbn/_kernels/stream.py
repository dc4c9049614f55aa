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
"""

import platform

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

LINE = 16
_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _make_line(per_element, with_dy):
    @intrinsic
    def line(typingctx, out, x, dy, m, p, q, g, d, k, j):
        arrays = (out, x, dy, m, p, q, g, d)
        if not all(isinstance(a, types.Array) and a.dtype == out.dtype for a in arrays):
            return None
        if not (isinstance(k, types.Integer) and isinstance(j, types.Integer)):
            return None
        sig = types.void(out, x, dy, m, p, q, g, d, k, j)

        def codegen(context, builder, signature, args):
            out_v, x_v, dy_v, m_v, p_v, q_v, g_v, d_v, k_v, j_v = args
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

            def load_param(ptr):
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
            xc = builder.fsub(load_data(data(1, x_v)), load_param(data(3, m_v)))
            value = builder.call(fmuladd, [xc, load_param(data(4, p_v)), load_param(data(5, q_v))])
            if with_dy:
                dyv = builder.fsub(load_data(data(2, dy_v)), load_param(data(7, d_v)))
                value = builder.call(fmuladd, [dyv, load_param(data(6, g_v)), value])
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
