"""Vectorizable 1/x and e^x for the numba kernels (`forward`, `backward`): numba compiles `np.exp` / `math.exp` to a
scalar libm call per element (~2.7 ns) and `1.0 / x` to a true divide (~1.2 ns per fp32 element measured in a serial
njit loop, where it stays scalar); these two are plain arithmetic on the bits that LLVM vectorizes inside prange
loops (benchmarks/NOTES.md, "Fused CPU backward: tanh pass", measures both). Where numba vectorizes the divide
itself (the forward's score loop, a reduction in a prange body: vdivps), the divide measured faster than
`vector_reciprocal` (benchmarks/NOTES.md, "Fused CPU kernels: choosing the tool"); the forward uses `vector_exp`
only.

Call them from compiled code only; their Python bodies (`1.0 / x`, `np.exp`) are what plain Python calls get.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import literal_unroll
from numba.core import types
from numba.extending import intrinsic, overload

#: The reciprocal 1/x of the factorized form without a divide: this CPU's vdivps/vdivpd run at ~1.5 ns per element
#: whatever the vector width (measured, benchmarks/NOTES.md), 4x the rest of the element's work. Instead, a seed
#: from the exponent bits (relative error < 1/8) and Newton steps y += y (1 - x y), each squaring the error: 3 steps
#: reach fp32's rounding (measured <= 0.5 ulp), 4 fp64's. Inputs above RECIPROCAL_LARGEST (where the seed would be
#: subnormal) give r = 0, as 1/inf does; there 1/x < 1e-30 (1e-300), and t = 1 - 2r = 1 either way.
NEWTON_STEPS = {32: 3, 64: 4}
RECIPROCAL_LARGEST = {32: 1e30, 64: 1e300}
_RECIPROCAL_MAGIC = {32: 0x7EF311C7, 64: 0x7FDE623822FC16E6}


@intrinsic
def _reciprocal_seed(typingctx, x):
    """magic - bits(x), read back as a float of x's type: 1/x within 12.5% for positive normal x."""
    width = x.bitwidth

    def codegen(context, builder, signature, args):
        integer = ir.IntType(width)
        bits = builder.sub(ir.Constant(integer, _RECIPROCAL_MAGIC[width]), builder.bitcast(args[0], integer))
        return builder.bitcast(bits, args[0].type)

    return x(x), codegen


def vector_reciprocal(x):
    """1 / x for x >= 1, to be called from numba-compiled loops, which it lets vectorize
    (`_vector_reciprocal_compiled`; this Python body is what plain Python calls get)."""
    return 1.0 / x


# Not inline="always": numba's own inlining of these overloads made the prange loops that call them serial
# ("more than one entry to or exit from the loop"); LLVM inlines them anyway, and the loops still vectorize.
@overload(vector_reciprocal, jit_options={"fastmath": {"contract", "arcp"}})
def _vector_reciprocal_compiled(x):
    """1 / x for x >= 1 (or NaN, which propagates) by Newton steps from `_reciprocal_seed`; vectorizes."""
    if not isinstance(x, types.Float):
        return None
    width = x.bitwidth
    dtype = np.float32 if width == 32 else np.float64
    one, zero, largest = dtype(1.0), dtype(0.0), dtype(RECIPROCAL_LARGEST[width])
    if NEWTON_STEPS[width] == 3:
        def reciprocal(x):
            bounded = x if not (x > largest) else largest  # NaN stays NaN
            y = _reciprocal_seed(bounded)
            y = y + y * (one - bounded * y)
            y = y + y * (one - bounded * y)
            y = y + y * (one - bounded * y)
            return zero if x > largest else y
    else:
        def reciprocal(x):
            bounded = x if not (x > largest) else largest
            y = _reciprocal_seed(bounded)
            y = y + y * (one - bounded * y)
            y = y + y * (one - bounded * y)
            y = y + y * (one - bounded * y)
            y = y + y * (one - bounded * y)
            return zero if x > largest else y
    return reciprocal


#: e^x without a libm call (numba's np.exp is a scalar call per element, ~4x the rest of a decode step's element):
#: x = n ln2 + r with n = round(x log2 e) (the 1.5 * 2^m shifter trick), |r| <= ln2 / 2 (two-constant Cody-Waite),
#: e^r by its Taylor polynomial (degree 7 in fp32, 13 in fp64: truncation below half an ulp), then n added to the
#: exponent bits. Inputs above EXP_LARGEST give inf and below EXP_SMALLEST give 0 (where 2^n would leave the normal
#: range; true e^x is within a factor e of the float range's ends there), NaN stays NaN.
EXP_LARGEST = {32: 88.0, 64: 709.0}
EXP_SMALLEST = {32: -87.0, 64: -708.0}
_MANTISSA_BITS = {32: 23, 64: 52}
_EXP_DEGREE = {32: 7, 64: 13}


@intrinsic
def _times_power_of_two(typingctx, p, shifted, shifter):
    """p * 2^n where n = bits(shifted) - bits(shifter) is the integer the shifter trick left in shifted's low
    mantissa bits: n added to p's exponent field (p and the result normal)."""
    width = p.bitwidth

    def codegen(context, builder, signature, args):
        integer = ir.IntType(width)
        value, shifted_value, shifter_value = (builder.bitcast(arg, integer) for arg in args)
        power = builder.shl(builder.sub(shifted_value, shifter_value), ir.Constant(integer, _MANTISSA_BITS[width]))
        return builder.bitcast(builder.add(value, power), args[0].type)

    return p(p, shifted, shifter), codegen


def vector_exp(x):
    """e^x, to be called from numba-compiled loops, which it lets vectorize (`_vector_exp_compiled`; this Python body
    is what plain Python calls get)."""
    return np.exp(x)


@overload(vector_exp, jit_options={"fastmath": {"contract", "arcp"}})
def _vector_exp_compiled(x):
    """e^x by range reduction and a polynomial, written so that LLVM vectorizes it (see EXP_LARGEST)."""
    if not isinstance(x, types.Float):
        return None
    width = x.bitwidth
    dtype = np.float32 if width == 32 else np.float64
    largest, smallest = dtype(EXP_LARGEST[width]), dtype(EXP_SMALLEST[width])
    log2e = dtype(1.4426950408889634)
    # ln 2 = ln2_hi + ln2_lo with ln2_hi's low bits zero, so that n ln2_hi is exact for every n in range (fdlibm's
    # constants in fp64), fused multiply-adds or not.
    ln2_hi, ln2_lo = (dtype(0.693359375), dtype(-2.12194440e-4)) if width == 32 else (
        dtype(6.93147180369123816490e-01), dtype(1.90821492927058770002e-10))
    shifter = dtype(1.5 * 2.0 ** _MANTISSA_BITS[width])
    inf, zero = dtype(np.inf), dtype(0.0)
    # 1/k! from the highest degree down, for Horner's rule.
    coefficients = tuple(dtype(1.0 / math.factorial(k)) for k in range(_EXP_DEGREE[width], -1, -1))

    def exp(x):
        bounded = x if not (x > largest) else largest  # NaN stays NaN
        bounded = bounded if not (bounded < smallest) else smallest
        shifted = bounded * log2e + shifter  # round(x log2 e) in the low mantissa bits
        n = shifted - shifter
        r = (bounded - n * ln2_hi) - n * ln2_lo
        p = coefficients[0]
        for c in literal_unroll(coefficients[1:]):
            p = p * r + c
        result = _times_power_of_two(p, shifted, shifter)
        result = inf if x > largest else result
        return zero if x < smallest else result

    return exp
