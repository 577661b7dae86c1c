"""`additive_attention`: the public functional entry point — validation, then dispatch to a backend."""
from __future__ import annotations

import functools
import warnings

import torch

from attn_fast.backends import common, cpu_kernels, reference, torch_backend
from attn_fast.cpu_warmup import warm_cpu_math
from attn_fast.masking import hidden_memory_keys
from attn_fast.validation import AttentionCall, attention_call, can_read_values, check_backend

#: Oldest CUDA compute capability the Triton kernels are used on. fp16/bf16 evaluate tanh with the inline PTX
#: `tanh.approx.f32` (sm_75+; ptxas rejects it on sm_70) and take bf16 tensor-core dots (sm_80+); the static report
#: compiles every planned launch for sm_90 and sm_80 only (benchmarks/static_report.py). Older GPUs take the torch
#: backend under "auto".
MIN_TRITON_CAPABILITY = (8, 0)


def triton_unusable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` (one line), or None when they can: they run on CUDA tensors of
    a GPU of compute capability >= MIN_TRITON_CAPABILITY, and on CPU tensors only under the interpreter
    (TRITON_INTERPRET=1). The one place that decides it; `attn-fast verify` and the benchmark ask here."""
    if device.type not in ("cpu", "cuda"):
        return f"the Triton kernels take CUDA tensors, not {device.type}"
    try:
        # `attn_fast.kernels` is the repository's top-level kernels/ folder (setup.py maps it there). Importing it
        # imports triton, which is why the Triton backend is imported lazily.
        from attn_fast.kernels import launch
    except ImportError as error:
        return f"triton is not importable ({error})"
    if device.type == "cpu":
        if launch.is_interpreter():
            return None
        return ("the Triton kernels run on CUDA tensors, and on CPU tensors only with TRITON_INTERPRET=1 set before "
                "triton is imported (slow, for testing)")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < MIN_TRITON_CAPABILITY:
        need = ".".join(map(str, MIN_TRITON_CAPABILITY))
        return (f"{device} has compute capability {capability[0]}.{capability[1]} (sm_{capability[0]}{capability[1]}); "
                f"the Triton kernels need {need} or newer (fp16/bf16 tanh.approx.f32 fails in ptxas before sm_75, "
                f"and only sm_80+ is compiled and checked)")
    return None


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on `device` (see `triton_unusable_reason`)."""
    return triton_unusable_reason(device) is None


def cpu_unusable_reason(device: torch.device) -> str | None:
    """Why the fused CPU kernels (backend "cpu") cannot run on `device` (one line), or None when they can: CPU
    tensors (meta tensors too: they only propagate shapes) with numba importable."""
    if device.type not in ("cpu", "meta"):
        return f"the 'cpu' backend takes CPU tensors, not {device.type}"
    return cpu_kernels.unavailable_reason()


@functools.cache
def _notice_cpu_fallback(reason: str) -> None:
    """One warning per process (cached): "auto" runs the torch backend on CPU tensors because the fused kernels
    cannot run."""
    warnings.warn(f"attn_fast: the fused CPU kernels are unavailable ({reason}); backend 'auto' uses the slower "
                  "'torch' backend on CPU. pip install numba to get them.", RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run: "auto" means Triton on CUDA when it is importable and the GPU is sm_80 or newer
    (the torch backend for float64 inputs there, which it computes in float64; the Triton kernels compute in fp32),
    the fused "cpu" kernels on CPU tensors when numba imports (they compute float64 in float64), else the torch
    backend (on CPU with a one-time notice)."""
    check_backend(backend)
    if backend == "auto":
        if device.type == "cpu":
            reason = cpu_unusable_reason(device)
            if reason is None:
                return "cpu"
            _notice_cpu_fallback(reason)
            return "torch"
        if dtype == torch.float64:
            return "torch"
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    if backend == "cpu":
        reason = cpu_unusable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='cpu' is not available for tensors on {device}: {reason}; "
                             "use backend='torch' or 'auto'")
        return backend
    if backend == "triton":
        reason = triton_unusable_reason(device)
        if reason is None:
            return backend
        if device.type == "cpu":
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, for "
                "testing on CPU); use backend='torch' or 'auto' for CPU tensors"
            )
        raise ValueError(f"backend='triton' is not available for tensors on {device}: {reason}; "
                         "use backend='torch' or 'auto'")
    return backend


def additive_attention(
    query_proj: torch.Tensor,
    key_proj: torch.Tensor,
    value: torch.Tensor,
    v: torch.Tensor,
    *,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    need_weights: bool = False,
    index: torch.Tensor | None = None,
    extra_key_term: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive (Bahdanau) attention over pre-projected queries and keys, for all decoder steps at once.

        E[b, i, j] = sum_a v[a] * tanh(query_proj[b, i, a] + key_proj[b, j, a])
        weights    = softmax_j(E) over visible keys;   context = weights @ value

    Args:
        query_proj: [B, T, A] projected decoder states, one row per decoder step.
        key_proj: [B, S, A] projected encoder states (compute once per source, reuse across steps).
        value: [B, S, D] what is averaged, often the encoder states themselves.
        v: [A] score vector.
        key_lengths: [B] integer; key j is visible when j < key_lengths[b]. (int8, int16 and uint8 lengths and
            indices are cast to int64; any other dtype is a TypeError naming the argument.)
        key_padding_mask: [B, S] or [B, T, S] bool; True marks keys to ignore (nn.MultiheadAttention convention).
        causal: key j is visible to query i only when j <= i.
        need_weights: also return the weights [B, T, S].
        index: [B_q] integer: query row b reads memory row index[b] (beam search without copying the memory).
            key_proj, value, key_lengths and a [B, S] mask are then memory rows [B_m, ...]; query_proj, a
            [B_q, T, S] mask and extra_key_term are query rows.
        extra_key_term: [B_q, S, A] added to the key projection of each query row (location-sensitive
            attention, coverage).
        backend: "auto" (Triton on CUDA, "cpu" on CPU when numba imports, else "torch"), "triton", "cpu" (fused
            compiled CPU loops), "torch" (memory-bounded chunks) or "reference" (naive, materializes [B, T, S, A]).

    Returns:
        context [B, T, D] and weights [B, T, S] (None unless `need_weights`), in the input dtype. A row with no
        visible key gets context 0 and weights 0 (never NaN). Inputs are never modified; the weights are a copy,
        safe to edit in place. NaN/inf: keys hidden from a row never influence it, a NaN it sees makes it NaN
        (README, "NaN and inf"). Meta tensors give meta outputs of the right shapes on every backend.

    Autocast: inside `torch.autocast` enabled for the inputs' device type, every fp16/bf16/fp32 input (query_proj,
    key_proj, value, v, extra_key_term) is first cast, differentiably, to the autocast dtype
    (`torch.get_autocast_dtype`), as `F.scaled_dot_product_attention` does; float64 inputs are left alone, as
    autocast leaves them. The op then runs with autocast disabled inside (accumulating in fp32 as for any fp16/bf16
    call), outputs come in the autocast dtype, and gradients flow back through the casts to fp32 parameters.
    Outside autocast, inputs of different dtypes are a TypeError.
    """
    return _attention(
        query_proj, key_proj, value, v, key_lengths=key_lengths, key_padding_mask=key_padding_mask, causal=causal,
        need_weights=need_weights, index=index, extra_key_term=extra_key_term, backend=backend, check_values=True,
        tanh_form="auto",
    )


def additive_attention_on_memory(
    query_proj: torch.Tensor, key_proj: torch.Tensor, value: torch.Tensor, v: torch.Tensor, *,
    backend: str = "auto", tanh_form: str = "auto", **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`additive_attention` for a decode step against a memory already checked by `check_memory`: the same
    arguments (`options`: key_lengths, key_padding_mask, need_weights, index, extra_key_term, the memory's
    `key_exp` from `prepare_key_exp` and `score_weights` from `prepare_score_weights`; no `causal`) and results,
    but only metadata is validated (types, shapes, dtypes, devices), never a value: nothing here reads a tensor
    back to the host, so a step can be captured in a CUDA graph (eagerly too).

    The caller vouches for the values: key_lengths in [0, S] (checked once by `check_memory`), `index` in
    [0, B_m) (an out-of-range index fails in the backends' gathers: IndexError on CPU, a device-side assert on
    CUDA), and finite key_proj and value at the keys key_lengths and a [B, S] key_padding_mask hide
    (`hide_masked_keys` makes them so, once per memory; the layers' `precompute` calls it): the backends then skip
    their check for a NaN or inf leaked from a hidden key (README "NaN and inf"), which reads a value back. Also
    its word: `score_weights` made from this very v (in the call's compute dtype) and v unchanged since (the
    layers' steps check that, `nn.additive.ScoreWeightsSource`).
    `tanh_form` is the torch backend's block tanh form ("auto", "direct", "factorized"), as `check_memory` chose it:
    anything but "auto" spares the torch backend its per-call magnitude scan (a host read); the other backends
    ignore it. Autocast as in `additive_attention`.
    """
    if tanh_form not in common.TANH_FORMS:
        raise ValueError(f"tanh_form must be one of {common.TANH_FORMS}, got {tanh_form!r}")
    if "causal" in options:
        raise TypeError("a decode step has no causal option (one query step per call)")
    options.setdefault("extra_key_term", None)
    return _attention(query_proj, key_proj, value, v, backend=backend, check_values=False, tanh_form=tanh_form,
                      **options)


def check_memory(key_proj: torch.Tensor, value: torch.Tensor, v: torch.Tensor, *,
                 key_lengths: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                 index: torch.Tensor | None = None) -> str:
    """Validate a decoding memory once, values included (key_lengths in [0, S], `index` in [0, B_m)), as every
    later step against it would be validated (autocast casts included), and choose the torch backend's tanh form
    for steps without an extra key term. Returns "factorized" when max |key_proj| is within the factorized
    form's range (then e^{2k} is finite and nonzero, and the form is exact for *any* query: e^{2q} = inf or 0
    still gives tanh = +-1), else "direct"; "auto" where values cannot be read (compiling, meta tensors, CUDA
    graph capture). Reads values back to the host: call it once per memory, not per step.
    """
    rows = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 1 else None
    if rows is None:
        rows = key_proj.shape[0] if isinstance(key_proj, torch.Tensor) and key_proj.dim() == 3 else 0
    attn_dim = key_proj.shape[-1] if isinstance(key_proj, torch.Tensor) and key_proj.dim() == 3 else 0
    empty_query = key_proj.new_empty(rows, 0, attn_dim) if isinstance(key_proj, torch.Tensor) else key_proj
    call = _validated_call(empty_query, key_proj, value, v, key_lengths=key_lengths,
                           key_padding_mask=key_padding_mask, causal=False, need_weights=False, index=index,
                           extra_key_term=None, check_values=True)[0]
    if not can_read_values(call.key_proj):
        return "auto"
    return common.resolve_tanh_form("auto", call.key_proj[:0], call.key_proj, None)  # the keys alone


def hide_masked_keys(key_proj: torch.Tensor, value: torch.Tensor, *, key_lengths: torch.Tensor | None = None,
                     key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """key_proj [B, S, A] and value [B, S, D] of a decoding memory, with every key that key_lengths [B] or a
    [B, S] key_padding_mask hides set to 0 when a NaN or inf sits there, else the tensors themselves.

    Hidden keys never influence any result (README "NaN and inf"); a zero there changes nothing (and the gradients
    at hidden keys stay 0, through the masked_fill). Steps against the memory can then skip the per-call check for
    a non-finite value leaked from a hidden key, which reads a value back to the host. Validate first
    (`check_memory`): this reads the values (one sum over each tensor: about 1 ms of tts_step's 16 ms precompute on one
    CPU thread), once per memory."""
    hidden = hidden_memory_keys(key_proj.shape[1], key_lengths=key_lengths, key_padding_mask=key_padding_mask,
                                device=key_proj.device)
    if hidden is None or not can_read_values(key_proj):
        return key_proj, value
    hidden = hidden[:, :, None]

    def zeroed(tensor: torch.Tensor) -> torch.Tensor:
        # One sum, no bool temporaries (a NaN or inf anywhere makes it non-finite): the usual all-finite memory costs
        # one read pass. A non-finite sum (a visible NaN too, or an overflow) zeroes the hidden keys, which is exact
        # in every case.
        total = tensor.detach().sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
        return tensor if bool(torch.isfinite(total)) else tensor.masked_fill(hidden, 0.0)

    return zeroed(key_proj), zeroed(value)


def step_tanh_form(memory_tanh_form: str, *, has_extra_key_term: bool, backend: str, device: torch.device,
                   dtype: torch.dtype) -> str:
    """The tanh form of one step against a memory `check_memory` checked (`memory_tanh_form`, as it chose it).

    Without an extra key term, the memory's form. With one (location, coverage attention), whose magnitude is only
    known per step: "auto" where the step runs the cpu backend, whose kernel checks |key + term| as it computes
    e^{2k} (no host read) and falls back to tanh by itself, so the factorized form runs whenever it may (3x faster
    per step at tts sizes, benchmarks/NOTES.md); elsewhere "direct", whose range is unlimited, which keeps the step
    free of host reads."""
    if not has_extra_key_term or memory_tanh_form == "auto":
        return memory_tanh_form
    return "auto" if resolve_backend(backend, device, dtype) == "cpu" else "direct"


def prepare_key_exp(key_proj: torch.Tensor, tanh_form: str, backend: str = "auto") -> torch.Tensor | None:
    """e^{2 key_proj} [B_m, S, A] (compute dtype) for a decoding memory, passed to every step as `key_exp`:
    - torch backend: when its steps run in the factorized form (`tanh_form` as `check_memory` chose it); it spares
      each step one exponential per key element (at T = 1 as many exponentials as tanh elements);
    - Triton backend: for fp32 keys all within the kernels' factorized range (|key_proj| <= FACTORIZED_LIMIT = 20 of
      kernels/tanh.py, tighter than the torch backend's 40; checked here, once, with a host read): fp32 decode
      steps then take the factorized tanh with e^{2k} loaded, 1 MUFU op per element instead of the exp form's 2,
      and need no range check of the keys (the query's is still made per program).
    None otherwise: another backend, the direct form, keys out of the kernels' range, fp16/bf16 keys for the
    Triton backend (its tanh.approx form has no key operand), or a form not yet known ("auto")."""
    if tanh_form != "factorized":
        return None
    chosen = resolve_backend(backend, key_proj.device, key_proj.dtype)
    if chosen in ("torch", "cpu"):
        return torch_backend.key_exponentials(key_proj)
    if chosen != "triton" or key_proj.dtype != torch.float32 or key_proj.numel() == 0:
        return None
    if not can_read_values(key_proj):  # "factorized" means check_memory read the values; be safe all the same
        return None
    from attn_fast.kernels.tanh import FACTORIZED_LIMIT  # imports triton, importable since "triton" resolved

    if not float(key_proj.detach().abs().amax()) <= float(FACTORIZED_LIMIT.value):  # False for NaN too
        return None
    return torch_backend.key_exponentials(key_proj)


def prepare_score_weights(v: torch.Tensor, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor | None:
    """The Triton forward's v pre-pass done once for a decoding memory, passed to every step as `score_weights`:
    fp32 [cdiv(A, 64) * 64 + 2] (`kernels.forward.prepare_score_weights`) when `backend` resolves to "triton" for
    v's device and `dtype`, the dtype the steps compute in (their inputs' dtype, or the autocast dtype they are
    cast to: v is read in that dtype, so prepare from v cast to it for results equal to an unprepared step's).
    Each step then launches one kernel less. None otherwise: the torch and cpu backends have no pre-pass launch to
    save, float64 calls run the kernels on a cast copy (their v is another tensor), and meta tensors have no values.

    The weights are valid while v keeps the values they were made from: the caller must not pass them once v has
    changed (the layers' memories record v's `_version` to know). Launches one kernel; reads nothing back.
    v [A] in any floating dtype; no gradient flows through the result (the steps' backward uses v itself)."""
    if v.device.type == "meta" or dtype == torch.float64:
        return None
    # While torch.compile traces (a compiled precompute), None: `kernels.forward.prepare_score_weights` launches a
    # raw, unwrapped kernel, which would either be baked into the graph as a launch on fake tensors or fail on
    # them (the interpreter); the steps then launch the pre-pass themselves, correct and one launch dearer. Outside
    # tracing a CUDA-graph capture is fine: the launch is captured like any other and reads nothing back.
    if torch.compiler.is_compiling():
        return None
    if backend == "triton" and not triton_usable(v.device):
        return None  # the step itself reports why the kernels cannot run there
    if resolve_backend(backend, v.device, dtype) != "triton":
        return None
    from attn_fast.kernels.forward import prepare_score_weights as prepare_kernel_score_weights

    with torch.no_grad():
        return prepare_kernel_score_weights(v.detach(), dtype)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype `torch.autocast` computes in on this device's type, or None when autocast is off there (or the
    device type has no autocast)."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
    except RuntimeError:  # e.g. "meta": no autocast for this device type
        return None
    return torch.get_autocast_dtype(device.type)


def call_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a call computes in whose query_proj is `tensor`: the autocast dtype when autocast is on for its
    device and casts it (fp16/bf16/fp32), else its own dtype (see `additive_attention`, "Autocast")."""
    cast_to = autocast_dtype(tensor.device)
    return cast_to if cast_to is not None and tensor.dtype in _AUTOCAST_ELIGIBLE else tensor.dtype


def _autocast_cast(tensor, dtype: torch.dtype):
    """As autocast casts an op's inputs: fp16/bf16/fp32 tensors to `dtype` (differentiably); anything else (float64,
    integers, non-tensors, left to validation) unchanged."""
    if isinstance(tensor, torch.Tensor) and tensor.dtype in _AUTOCAST_ELIGIBLE and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _validated_call(query_proj, key_proj, value, v, *, check_values: bool, **options):
    """Autocast casts (when autocast is on for query_proj's device), then validation: (call, autocast dtype)."""
    cast_to = autocast_dtype(query_proj.device) if isinstance(query_proj, torch.Tensor) else None
    extra_key_term = options.pop("extra_key_term")
    if cast_to is not None:
        query_proj, key_proj, value, v, extra_key_term = (
            _autocast_cast(tensor, cast_to) for tensor in (query_proj, key_proj, value, v, extra_key_term))
    call = attention_call(query_proj, key_proj, value, v, extra_key_term=extra_key_term, check_values=check_values,
                          **options)
    return call, cast_to


def _attention(query_proj, key_proj, value, v, *, backend: str, tanh_form: str, check_values: bool, **options):
    check_backend(backend)
    call, cast_to = _validated_call(query_proj, key_proj, value, v, check_values=check_values, **options)
    if call.device.type == "cpu" and not torch.compiler.is_compiling():
        warm_cpu_math()  # a compiled region cannot run it; the first eager call (or the tests) already did
    if cast_to is None:
        return _dispatch(call, backend, tanh_form)
    # The inputs are cast already; nothing inside the op is re-cast (its fp32 accumulation stays fp32).
    with torch.autocast(call.device.type, enabled=False):
        return _dispatch(call, backend, tanh_form)


def _dispatch(call: AttentionCall, backend: str, tanh_form: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if call.device.type == "meta" and backend != "reference":
        # Meta tensors have shapes and no values: every backend's answer is the torch op's fake (meta outputs with
        # autograd); the reference computes on meta tensors as it is.
        return torch_backend.attend(call, tanh_form=tanh_form)
    chosen = resolve_backend(backend, call.device, call.dtype)
    if chosen == "reference":
        return reference.attend(call)
    if chosen == "torch" or call.is_empty:  # an empty problem has a trivial answer; no kernel launch for it
        return torch_backend.attend(call, tanh_form=tanh_form)
    if chosen == "cpu":
        from attn_fast.backends import cpu_backend  # imports numba's kernels on first use

        return cpu_backend.attend(call, tanh_form=tanh_form)
    from attn_fast.backends import triton_backend

    return triton_backend.attend(call)


def additive_attention_reference(query_proj: torch.Tensor, key_proj: torch.Tensor, value: torch.Tensor,
                                 v: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive oracle: `additive_attention(..., backend="reference")`, the same arguments (validated) and
    results. It materializes the [B, T, S, A] tanh tensor in the inputs' dtype (tests call it in float64)."""
    return additive_attention(query_proj, key_proj, value, v, backend="reference", **options)
