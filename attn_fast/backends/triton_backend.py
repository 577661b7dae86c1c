"""The Triton backend as torch.library ops. Neither pass ever holds the [B, T, S, A] tanh tensor.

Forward (`attn_fast::triton_forward`): the fused kernel (`kernels.forward`); it keeps P [B, T, S] in fp32 for the
backward (P is A times smaller than the tanh tensor, and `need_weights` returns it anyway).
Backward (docs/DESIGN.md, "Backward"):
  1. no tanh — batched matmuls (`common.grad_of_scores`, shared with the torch backend): dValue = P^T dO,
     dP = dO value^T (+ dWeights), dE = P (dP - rowsum(P dP));
  2. one fused tanh pass (`attn_fast::triton_tanh_pass`, `kernels.backward`) for d_query_proj, d_key_proj per
     query row and d_v; rows of d_key_proj are summed into memory rows through `index`, and they are
     d_extra_key_term. It gets `key_lengths` (saved from the forward): key tiles lying entirely beyond a row's
     length, where dE is 0, do no tanh work.
The forward's P is normalized by the row sum itself (exp(E - max) / sum), so rows sum to 1 at any score magnitude.
Both ops are `torch.library.triton_op`s whose kernels launch through `wrap_triton`, and autograd goes through
`register_autograd`: torch.compile can trace the launches (no graph break), and nothing in either pass syncs with
the host or allocates data-dependent shapes, so a compiled CUDA step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from attn_fast.backends import common
from attn_fast.backends.common import grad_of_scores

# `attn_fast.kernels` is the repository's top-level kernels/ folder, installed under this name by setup.py's
# package_dir mapping (a top-level `kernels` would collide with an unrelated PyPI package). Importing it imports
# triton, which is why `attn_fast.functional` imports this module lazily.
from attn_fast.kernels.backward import attention_backward_tanh_pass, grad_scores_buffer
from attn_fast.kernels.forward import attention_forward
from attn_fast.masking import visible_keys
from attn_fast.validation import AttentionCall


@triton_op("attn_fast::triton_forward", mutates_args=())
def _forward_op(query_proj: torch.Tensor, key_proj: torch.Tensor, value: torch.Tensor, v: torch.Tensor,
                extra_key_term: torch.Tensor | None, key_lengths: torch.Tensor | None,
                key_padding_mask: torch.Tensor | None, index: torch.Tensor | None, causal: bool,
                keep_probs: bool, key_exp: torch.Tensor | None = None,
                score_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> context [B_q, T, D] in the input dtype, and P [B_q, T, S] fp32 (an empty tensor unless `keep_probs`).
    `key_exp`: the decoding memory's e^{2 key_proj} (fp32, keys within the kernels' factorized range), which fp32
    decode then loads instead of computing. `score_weights`: the memory's prepared v pre-pass (fp32
    [cdiv(A, 64) * 64 + 2], `kernels.forward.prepare_score_weights` of this v), which spares the call the pre-pass
    launch. Neither is saved for the backward (which uses v itself); no gradient."""
    call = AttentionCall.from_op_inputs(query_proj, key_proj, value, v, extra_key_term, key_lengths,
                                        key_padding_mask, index, causal, need_weights=keep_probs)
    call = call.replace(key_exp=key_exp, score_weights=score_weights)
    context, _, probs = attention_forward(call, weights_dtype=torch.float32, wrap=wrap_triton)
    if probs is None:
        probs = context.new_empty(0, dtype=torch.float32)
    return context, probs


@triton_op("attn_fast::triton_tanh_pass", mutates_args=())
def _tanh_pass_op(query_proj: torch.Tensor, key_proj: torch.Tensor, v: torch.Tensor, grad_scores: torch.Tensor,
                  index: torch.Tensor | None, extra_key_term: torch.Tensor | None, causal: bool,
                  deterministic: bool, key_lengths: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_query_proj [B_q, T, A], grad_row_keys [B_q, S, A], grad_v [A], all fp32. With `key_lengths`, key tiles
    at or beyond a row's length (where dE is 0) are skipped."""
    grad_query, grad_row_keys, grad_v = attention_backward_tanh_pass(
        query_proj, key_proj, v, grad_scores, index=index, extra_key_term=extra_key_term, key_lengths=key_lengths,
        causal=causal, deterministic=deterministic, wrap=wrap_triton,
    )
    return _own_storage(grad_query), _own_storage(grad_row_keys), grad_v


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A custom op's outputs must not be views: the launcher hands back partials[0] when there is one partial."""
    return tensor if tensor._base is None else tensor.clone()


def _setup_context(ctx, inputs, output):
    # Not key_exp nor score_weights: both are forward-only shortcuts.
    query_proj, key_proj, value, v, extra_key_term, key_lengths, _, index, causal = inputs[:9]
    ctx.save_for_backward(query_proj, key_proj, value, v, extra_key_term, index, output[1], key_lengths)
    ctx.causal = causal
    ctx.has_hidden_keys = causal or key_lengths is not None or inputs[6] is not None  # inputs[6]: key_padding_mask


def _backward(ctx, grad_context, grad_probs):
    # backward() may be called inside the caller's torch.autocast: the gradients are computed in the dtypes the
    # forward saved, never re-cast (the forward ran with autocast off too, attn_fast.functional).
    with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
        return _backward_in_saved_dtypes(ctx, grad_context, grad_probs)


def _backward_in_saved_dtypes(ctx, grad_context, grad_probs):
    query_proj, key_proj, value, v, extra_key_term, index, probs, key_lengths = ctx.saved_tensors
    need_query, need_key, need_value, need_v, need_extra = ctx.needs_input_grad[:5]
    grad_scores, grad_value = grad_of_scores(probs, value, index, grad_context, grad_probs,
                                             need_value_grad=need_value)
    grad_query = grad_key = grad_v = grad_extra = None
    if need_query or need_key or need_v or need_extra:
        # dE in the kernel's preferred layout (rows padded to 16 floats: vectorized loads of dE).
        aligned_grad_scores = grad_scores_buffer(*grad_scores.shape, grad_scores.device).copy_(grad_scores)
        if ctx.has_hidden_keys:
            # A key hidden from a row has dE = 0 there, but the tanh pass still computes 0 * tanh'(q + k), NaN for a
            # NaN input. NaN -> 0 (and +-inf -> +-max) in its inputs changes nothing else: a row whose visible
            # inputs are not finite has NaN dE already (README "NaN and inf"). Copies of [B_q, T, A], [B_m, S, A]
            # and [B_q, S, A], T or S times smaller than the tanh work, and no host read.
            query_proj, key_proj = torch.nan_to_num(query_proj, nan=0.0), torch.nan_to_num(key_proj, nan=0.0)
            if extra_key_term is not None:
                extra_key_term = torch.nan_to_num(extra_key_term, nan=0.0)
        grad_query, grad_row_keys, grad_v = _tanh_pass_op(
            query_proj, key_proj, v, aligned_grad_scores, index, extra_key_term, ctx.causal,
            torch.are_deterministic_algorithms_enabled(), key_lengths,
        )
        if need_extra:
            grad_extra = grad_row_keys.to(extra_key_term.dtype, copy=True)  # never shared with grad_key
        if index is None:
            grad_key = grad_row_keys
        else:
            grad_key = grad_row_keys.new_zeros(key_proj.shape).index_add_(0, index, grad_row_keys)
    grads = (grad_query, grad_key, grad_value, grad_v, grad_extra)
    inputs = (query_proj, key_proj, value, v, extra_key_term)
    results = tuple(None if grad is None or not needed else grad.to(tensor.dtype)
                    for grad, tensor, needed in zip(grads, inputs, ctx.needs_input_grad[:5]))
    # key_lengths, key_padding_mask, index, causal, keep_probs, key_exp, score_weights
    return (*results, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attend(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive attention for a validated, non-empty call: context [B_q, T, D] and, if `call.need_weights`, weights
    [B_q, T, S], in the input dtype.

    float64 inputs run the fp32 kernels: they are cast at this boundary (differentiably, so gradients come back in
    float64) and the results are cast back, with fp32 accuracy. `backend="auto"` sends float64 to the torch backend.
    `call.key_exp` (the memory's prepared e^{2 key_proj}) goes to the kernels unless an extra key term changes the
    keys; float64 calls drop it (it was prepared in float64 for the torch backend's range, not the kernels').
    `call.score_weights` (the memory's prepared v pre-pass) goes to the kernels with or without an extra key term
    (v does not depend on the keys); float64 calls drop it too (their v is the fp32 copy made here, and
    `functional.prepare_score_weights` makes none for them).
    """
    if call.dtype == torch.float64:
        def single(tensor):
            return None if tensor is None else tensor.float()

        context, weights = attend(call.replace(
            query_proj=single(call.query_proj), key_proj=single(call.key_proj), value=single(call.value),
            v=single(call.v), extra_key_term=single(call.extra_key_term), key_exp=None, score_weights=None))
        return context.double(), (None if weights is None else weights.double())
    keep_probs = call.need_weights or (torch.is_grad_enabled() and any(t.requires_grad for t in call.float_inputs()))
    key_exp = call.key_exp if call.extra_key_term is None else None
    context, probs = _forward_op(*call.op_inputs(), keep_probs, key_exp, call.score_weights)
    # The kernel never loads a value beyond key_lengths, but keys hidden by key_padding_mask or causal inside a
    # visited tile go through P @ value with P = 0, and 0 * NaN = NaN: recompute such a context from P without the
    # hidden keys (README "NaN and inf"). Checked (one host read) only where the caller did not vouch for the values.
    if common.context_may_hold_hidden_values(call, context, lengths_skipped=True):
        if not keep_probs:
            _, probs = _forward_op(*call.op_inputs(), True, key_exp, call.score_weights)
        visible = visible_keys(call.query_rows, call.tgt_len, call.src_len, key_lengths=call.key_lengths,
                               key_padding_mask=call.key_padding_mask, causal=call.causal, index=call.index,
                               device=call.device)
        context = common.context_at_visible_keys(probs, call.value, visible, call.index).to(call.dtype)
    # A copy of P, never P itself (saved for the backward; the caller may edit the weights in place).
    return context, (probs.to(call.dtype, copy=True) if call.need_weights else None)
