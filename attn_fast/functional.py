"""`additive_attention`: the public functional entry point — validation, then dispatch to a backend."""
from __future__ import annotations

import torch

from attn_fast.backends import reference, torch_backend
from attn_fast.cpu_warmup import warm_cpu_math
from attn_fast.validation import attention_call, check_backend

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


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run: "auto" means Triton on CUDA when it is importable and the GPU is sm_80 or newer,
    else the torch backend; and the torch backend for float64 inputs, which it computes in float64 (the Triton
    kernels compute in fp32)."""
    check_backend(backend)
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
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
        key_lengths: [B] integer; key j is visible when j < key_lengths[b].
        key_padding_mask: [B, S] or [B, T, S] bool; True marks keys to ignore (nn.MultiheadAttention convention).
        causal: key j is visible to query i only when j <= i.
        need_weights: also return the weights [B, T, S].
        index: [B_q] integer: query row b reads memory row index[b] (beam search without copying the memory).
            key_proj, value, key_lengths and a [B, S] mask are then memory rows [B_m, ...]; query_proj, a
            [B_q, T, S] mask and extra_key_term are query rows.
        extra_key_term: [B_q, S, A] added to the key projection of each query row (location-sensitive
            attention, coverage).
        backend: "auto" (Triton on CUDA, else "torch"), "triton", "torch" (memory-bounded chunks) or
            "reference" (naive, materializes [B, T, S, A]).

    Returns:
        context [B, T, D] and weights [B, T, S] (None unless `need_weights`), in the input dtype. A row with no
        visible key gets context 0 and weights 0 (never NaN). Inputs are never modified.
    """
    check_backend(backend)
    call = attention_call(
        query_proj, key_proj, value, v, key_lengths=key_lengths, key_padding_mask=key_padding_mask, causal=causal,
        need_weights=need_weights, index=index, extra_key_term=extra_key_term,
    )
    if call.device.type == "cpu" and not torch.compiler.is_compiling():
        warm_cpu_math()  # a compiled region cannot run it; the first eager call (or the tests) already did
    chosen = resolve_backend(backend, call.device, call.dtype)
    if chosen == "reference":
        return reference.attend(call)
    if chosen == "torch" or call.is_empty:  # an empty problem has a trivial answer; no kernel launch for it
        return torch_backend.attend(call)
    from attn_fast.backends import triton_backend

    return triton_backend.attend(call)


def additive_attention_reference(query_proj: torch.Tensor, key_proj: torch.Tensor, value: torch.Tensor,
                                 v: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive oracle: `additive_attention(..., backend="reference")`, the same arguments (validated) and
    results. It materializes the [B, T, S, A] tanh tensor in the inputs' dtype (tests call it in float64)."""
    return additive_attention(query_proj, key_proj, value, v, backend="reference", **options)
