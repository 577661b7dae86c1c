"""The one place for the tanh variants of the score loop.

The forward's hot loop evaluates tanh(query_proj[i, a] + key_proj[j, a]) B*T*S*A times, so it is bound by the
GPU's special-function unit (MUFU: 16 ops/clock/SM on Hopper): the number of MUFU ops per element *is* the speed,
and every other instruction per element eats into the 8 issue slots one MUFU op leaves. Each form below is chosen
by a `tl.constexpr` string, so a kernel compiles exactly one of them:

  "exp"         tanh(x) = 1 - 2 / (1 + e^{2x}). Portable, fp32-accurate (absolute error ~1e-7), saturates cleanly
                (e^{2x} = inf -> 1, e^{2x} = 0 -> -1, never NaN). 2 MUFU ops per element (EX2 + RCP).
  "factorized"  the same formula with e^{2(q+k)} = e^{2q} * e^{2k}: the exponentials are taken once per query row
                and once per key row of an A-chunk, so an element costs one FFMA, one MUFU.RCP and one FADD into
                the score. fp32-accurate. Needs |q|, |k| <= FACTORIZED_LIMIT and |v| <= FACTORIZED_V_LIMIT (see
                below); the kernel checks that per tile and takes the "exp" form where it does not hold
                (saturated inputs).
  "approx"      inline PTX `tanh.approx.f32`: 1 MUFU.TANH, max relative error 2^-11 (~1e-5 typical). Good for
                fp16/bf16, too coarse for fp32's 1e-5 tolerance.
  "libdevice"   libdevice's tanh (2 MUFU + ~6 FFMA). Kept for comparison.

Under the interpreter (INTERPRET=True) inline asm cannot run and libdevice returns None, so "approx" and
"libdevice" evaluate the "exp" formula instead; "exp" and "factorized" run the same formulas as on the GPU, with
correctly rounded exp2 and division in place of the MUFU approximations (1-2 ulp apart).

Score algebra of the rcp-based forms. With e = e^{2x} and c = -1 / (2 v[a]):
    v * tanh(x) = v - 2v / (1 + e) = v + 1 / (c + c * e)
so sum_a v[a] tanh(x_a) = sum_a v[a] + sum_a 1 / (c_a + (c_a e^{2q}) e^{2k}): the per-element work is one FFMA (the
c_a e^{2q} factor is per row), one reciprocal and one add; the sum of v is added once per tile (`score_bias`).
v[a] = 0 (and the zero-padded tail of A) gets c = -3e38 instead of -inf: d = c (1 + e) is then huge or -inf and
1/d = 0 for every e in [0, inf], with no inf * 0 = NaN. |v| > 1e18 could underflow c * e^{2q}, hence its bound.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

#: Largest |query_proj| and |key_proj (+ extra_key_term)| for the factorized form: e^{+-40} and their products
#: (e^{+-80}) stay finite and normal in fp32.
FACTORIZED_LIMIT = tl.constexpr(20.0)
#: Largest |v| for the factorized form (c * e^{2q} must not underflow).
FACTORIZED_V_LIMIT = tl.constexpr(1e18)

TANH_FORMS = ("exp", "factorized", "approx", "libdevice")

_TWO_LOG2E = tl.constexpr(2.8853900817779268)  # 2 log2(e), rounded to fp32 inside the kernel
_TWO_LOG2E_LOW = tl.constexpr(3.851925978e-08)  # 2 log2(e) - fp32(2 log2(e))
_LN2 = tl.constexpr(0.6931471805599453)
_NEGLIGIBLE_V = tl.constexpr(1e-30)
# Beyond |x| = 15, tanh(x) is +-1 in fp32; clamping there changes no result and keeps numpy quiet about
# overflow under the interpreter.
_INTERPRETER_CLAMP = tl.constexpr(15.0)


@triton.jit
def reciprocal(x, INTERPRET: tl.constexpr):
    """1 / x in fp32 as one MUFU.RCP on the GPU (rcp.approx.ftz, max error 1 ulp; 1/+-inf = 0). Triton's `1.0 / x`
    would compile to a full-range division with extra instructions, which the hot loop cannot afford."""
    if INTERPRET:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def exp2_fast(x, INTERPRET: tl.constexpr):
    """2^x in fp32 as one MUFU.EX2 on the GPU (ex2.approx.ftz; tl.exp2 adds a denormal-range fix-up per element).
    2^(+large) = inf, 2^(-large) = 0."""
    if INTERPRET:
        return tl.exp2(tl.minimum(tl.maximum(x, -_INTERPRETER_CLAMP * _TWO_LOG2E), _INTERPRETER_CLAMP * _TWO_LOG2E))
    else:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def exp2x_accurate(x):
    """e^{2x} for the per-row factors, with a compensated argument: 2x*log2(e) is split into its fp32 rounding and
    the rounding error, so the result stays accurate to a few ulp up to |x| = FACTORIZED_LIMIT (a plain
    exp2(2x*log2(e)) is off by |2x*log2(e)| * 2^-24 relative, ~2e-6 at |x| = 20). Per row, so the FMAs are cheap."""
    high = x * _TWO_LOG2E
    low = tl.fma(x, _TWO_LOG2E, -high) + x * _TWO_LOG2E_LOW
    return tl.exp2(high) * (1.0 + low * _LN2)


@triton.jit
def tanh_pointwise(x, FORM: tl.constexpr, INTERPRET: tl.constexpr):
    """tanh of an fp32 tensor in a pointwise form: "approx" or "libdevice" on the GPU, else the exp formula."""
    if FORM == "approx" and not INTERPRET:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    elif FORM == "libdevice" and not INTERPRET:
        return libdevice.tanh(x)
    else:
        return 1.0 - 2.0 * reciprocal(1.0 + exp2_fast(x * _TWO_LOG2E, INTERPRET), INTERPRET)


@triton.constexpr_function
def uses_reciprocal_form(form: str, interpret: bool) -> bool:
    """True for the forms computed as sum_a v + sum_a 1 / (c + c e): "exp", "factorized", anything interpreted."""
    return interpret or form in ("exp", "factorized")


@triton.jit
def score_weights(v_chunk, FORM: tl.constexpr, INTERPRET: tl.constexpr):
    """The per-a weights `chunk_scores` expects, computed once per call (not in the hot loop): c = -1 / (2 v) for
    the reciprocal forms, v itself for the others. |v| < 1e-30 contributes nothing visible: c = -3e38 then makes
    1 / (c + c e) ~ 0 for every e in [0, inf] without the inf * 0 = NaN that c = -inf would give at e = 0."""
    if uses_reciprocal_form(FORM, INTERPRET):
        negligible = tl.abs(v_chunk) < _NEGLIGIBLE_V
        return tl.where(negligible, -3.0e38, -0.5 / tl.where(negligible, 1.0, v_chunk))
    else:
        return v_chunk


@triton.jit
def score_bias(v_sum, FORM: tl.constexpr, INTERPRET: tl.constexpr):
    """What `chunk_scores` leaves out of every score: sum_a v[a] for the reciprocal forms, 0 for the others."""
    if uses_reciprocal_form(FORM, INTERPRET):
        return v_sum
    else:
        return v_sum * 0.0


@triton.jit
def chunk_scores(query_chunk, key_chunk, weight_chunk, FORM: tl.constexpr, INTERPRET: tl.constexpr):
    """The contribution of one A-chunk to the scores of a (query tile, key tile) pair, less `score_bias`.

    query_chunk [BLOCK_A, BLOCK_T], key_chunk [BLOCK_A, BLOCK_S] and weight_chunk [BLOCK_A] (from `score_weights`),
    fp32, A-major: the sum over A (axis 0) stays inside each thread's registers. Returns [BLOCK_T, BLOCK_S] fp32 with
        score[i, j] = score_bias + sum over A-chunks of chunk_scores[i, j] = sum_a v[a] tanh(q[a, i] + k[a, j]).
    For FORM == "factorized" the caller must have checked the input ranges (FACTORIZED_LIMIT, FACTORIZED_V_LIMIT).
    """
    if FORM == "factorized":
        scale = weight_chunk  # c = -1 / (2 v)
        scaled_query_exp = scale[:, None] * exp2x_accurate(query_chunk)  # [BA, BT]: c e^{2q}, per row
        key_exp = exp2x_accurate(key_chunk)  # [BA, BS]: e^{2k}, per row
        denominator = scaled_query_exp[:, :, None] * key_exp[:, None, :] + scale[:, None, None]  # one FFMA
        return tl.sum(reciprocal(denominator, INTERPRET), axis=0)
    elif uses_reciprocal_form(FORM, INTERPRET):
        # One exponential per element ("exp", and every form under the interpreter): valid for any input. q + k
        # first: the fp32 sum is exact enough even for |q|, |k| ~ 1e4, while q*2log2(e) + k*2log2(e) would lose
        # |q| * 2^-23 to rounding before the cancellation.
        scale = weight_chunk
        summed = query_chunk[:, :, None] + key_chunk[:, None, :]  # [BA, BT, BS]
        denominator = scale[:, None, None] * exp2_fast(summed * _TWO_LOG2E, INTERPRET) + scale[:, None, None]
        return tl.sum(reciprocal(denominator, INTERPRET), axis=0)
    else:
        hidden = tanh_pointwise(query_chunk[:, :, None] + key_chunk[:, None, :], FORM, INTERPRET)
        return tl.sum(weight_chunk[:, None, None] * hidden, axis=0)
