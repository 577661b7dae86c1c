"""The "cpu" backend: fused compiled loops (numba, attn_fast/backends/cpu_kernels) for CPU tensors.

Forward: one kernel (`cpu_kernels.forward.attention_forward`) computes, per (query row, decoder step), every
visible key's score with the sum over A in registers, the masked softmax and the context; nothing of the
[B, T, S, A] tanh tensor is ever stored, not even a block of it. A decode step (T = 1) is the same kernel; against
a prepared memory (`AttentionCall.key_exp`, e^{2 key_proj} computed once by `precompute`) it computes no
exponential of the keys.
Backward: dE from `common.grad_of_scores` (batched products), then one compiled pass through the tanh
(`cpu_kernels.backward.tanh_pass_grads`) for d_query_proj, d_key_proj (+ d_extra_key_term) and d_v.
Only P [B_q, T, S] (in the compute dtype) is saved for the backward, as in the torch backend.

What the op does in torch around the kernels, all on [B, T, A]-, [B, S, A]- or [B, S, D]-sized tensors (A times
smaller than the tanh tensor): casts to the compute dtype (fp32 for fp16/bf16, fp64 stays fp64), contiguous
copies, the key rows of `index` + `extra_key_term`, the per-row key limits and padding mask, and the context
P @ value (torch.bmm) for T > 1. e^{2q} and e^{2k} are the kernel's (`vector_math.vector_exp`, per work item).

The tanh form is chosen per call as in the torch backend (common.EXP_SAFE_MAGNITUDE): "factorized" while every
e^{2x} stays finite, else "direct". For "auto" without an extra key term the kernel checks the range itself as it
computes the exponentials and says when the direct form must run instead (no separate scan of the inputs; the
backward, if any, scans once); with an extra key term the op scans (the backward's bound, max |k| + max |extra|),
and a decoding memory passes the form `check_memory` chose.
"""
from __future__ import annotations

import math

import torch

from attn_fast.backends import common
from attn_fast.backends.common import EXP_SAFE_MAGNITUDE, compute_dtype, resolve_tanh_form
from attn_fast.backends.cpu_kernels import launching, threads_for, unavailable_reason
from attn_fast.validation import AttentionCall, can_read_values


def _kernels():
    """The compiled kernel modules, imported on first use (importing numba takes a few hundred ms)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the 'cpu' backend cannot run: {reason}")
    from attn_fast.backends.cpu_kernels import backward, forward

    return forward, backward


def key_limits(key_lengths: torch.Tensor | None, index: torch.Tensor | None, query_rows: int, src_len: int,
               device: torch.device) -> torch.Tensor:
    """int64 [B_q]: the number of keys each query row's key length leaves visible (S without key_lengths)."""
    if key_lengths is None:
        return torch.full((query_rows,), src_len, dtype=torch.int64, device=device)
    lengths = key_lengths.to(torch.int64)
    if index is not None:
        lengths = lengths.index_select(0, index)
    return lengths.clamp(0, src_len).contiguous()


def hidden_keys(key_padding_mask: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
    """bool [B_q, 1, S] (one mask per query row) or [B_q, T, S] (per step), True = hidden; an empty [0, 1, 1] for no
    padding mask."""
    if key_padding_mask is None:
        return torch.zeros(0, 1, 1, dtype=torch.bool)
    if key_padding_mask.dim() == 3:
        return key_padding_mask.contiguous()
    mask = key_padding_mask if index is None else key_padding_mask.index_select(0, index)
    return mask[:, None, :].contiguous()


def step_block(query_rows: int, tgt_len: int, src_len: int, threads: int) -> int:
    """Decoder steps per work item of the forward kernel: all of a row's steps when there are rows enough for
    8 items per thread, else blocks of at least 8 steps (e^{2k} of a row's keys is computed once per item: 1/8 or
    less of the item's tanh elements)."""
    blocks = min(-(-8 * threads // max(query_rows, 1)), max(tgt_len // 8, 1))
    return max(1, -(-tgt_len // blocks))


def _forward(query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index, causal,
             tanh_form, key_exp):
    """-> (context [B_q, T, D], P [B_q, T, S]), both in the compute dtype, from the kernel."""
    forward, _ = _kernels()
    dtype = compute_dtype(query_proj.dtype)
    query_rows, tgt_len, _ = query_proj.shape
    src_len, value_dim = key_proj.shape[1], value.shape[2]
    index = None if index is None else index.to(torch.int64)
    query = query_proj.to(dtype)
    keys = key_proj.to(dtype)
    extra = None if extra_key_term is None else extra_key_term.to(dtype)
    all_rows = torch.arange(query_rows, dtype=torch.int64)
    key_row_of = all_rows if index is None else index
    if extra is not None:  # keys of each query row: its memory row plus its extra term
        # "auto" stays with the kernel, which checks |key + extra| itself as it computes e^{2k} (a separate scan
        # took 0.5 ms beside the kernel's 1.7 ms at B=32, S=200, A=128, one thread); both forms are exact to the
        # tolerance, so the backward's own scan (a looser bound) may choose differently without changing a result.
        keys = (keys if index is None else keys.index_select(0, index)) + extra
        key_row_of = all_rows
    # "auto" is left to the kernel (FACTORIZED_IF_IN_RANGE): it checks the range while it computes e^{2k}, with no
    # separate scan, and says when the direct form must run instead.
    form = {"auto": forward.FACTORIZED_IF_IN_RANGE, "factorized": forward.FACTORIZED, "direct": forward.DIRECT}[
        tanh_form]
    keys_are_exp = form == forward.FACTORIZED and key_exp is not None and extra is None
    values = value.to(dtype).contiguous()
    probs = common.empty_buffer((query_rows, tgt_len, src_len), dtype, query_proj.device)
    row_of_value = all_rows if index is None else index.contiguous()
    elements = query_rows * tgt_len * src_len * query_proj.shape[2]
    value_row_of = row_of_value.numpy()
    limits = key_limits(key_lengths, index, query_rows, src_len, query_proj.device).numpy()
    arrays = [query.contiguous().numpy(), (key_exp if keys_are_exp else keys).contiguous().numpy(), keys_are_exp,
              key_row_of.contiguous().numpy(), v.to(dtype).contiguous().numpy(), values.numpy(), value_row_of,
              limits, hidden_keys(key_padding_mask, index).numpy(), causal, form, EXP_SAFE_MAGNITUDE[dtype],
              step_block(query_rows, tgt_len, src_len, threads_for(elements))]

    def run(fuse_context, probs, context):
        with launching(elements) as threads:
            # One thread: the serial build, which does not wake numba's pool (0.13 vs 0.42 ms at nmt_train's step).
            kernel = forward.attention_forward_serial if threads == 1 else forward.attention_forward
            out_of_range = kernel(*arrays, fuse_context, probs.numpy(), context.numpy(), threads)
            if arrays[10] == forward.FACTORIZED_IF_IN_RANGE and out_of_range != 0:
                arrays[10] = forward.DIRECT  # an operand beyond the factorized range (or NaN): redone, exactly
                kernel(*arrays, fuse_context, probs.numpy(), context.numpy(), threads)

    def fused(probs):
        """P and the context by the kernel, which skips hidden keys in the context too."""
        context = common.empty_buffer((query_rows, tgt_len, value_dim), dtype, query_proj.device)
        run(True, probs, context)
        return context

    # The context: in the kernel for a decode step (T = 1), else P @ value by torch.bmm, several times faster for
    # many steps (forward.attention_forward).
    if tgt_len == 1:
        return fused(probs), probs
    run(False, probs, torch.empty(0, 0, 0, dtype=dtype))
    lengths_skipped = common.worth_skipping_hidden_keys(limits, tgt_len, src_len, value_dim)
    if lengths_skipped:
        context = common.context_over_visible_prefix(probs, values, value_row_of, limits)
    elif index is None:
        context = torch.bmm(probs, values)
    else:
        context = common.empty_buffer((query_rows, tgt_len, value_dim), dtype, query_proj.device)
        for rows in common.row_blocks(query_rows, src_len, value_dim, common.DEFAULT_CHUNK_ELEMENTS):
            torch.bmm(probs[rows], values.index_select(0, index[rows]), out=context[rows])  # memory rows, bounded
    # A product multiplies a hidden key's value by its weight 0, which turns a NaN or inf value there into NaN. Where
    # keys can be hidden and the context is not all finite, the kernel's loop redoes it, skipping hidden keys (P
    # comes out the same). The check is one sum over [B_q, T, D]: NaN or inf when any element is (a finite sum
    # that overflows only sends a finite context through the exact loop): 0.2 ms at [32, 50, 512] on one thread,
    # where isfinite().all() took 3.4 ms.
    # Keys beyond key_lengths never reach a prefix product (`lengths_skipped`): then only a padding mask or causal
    # can hide a key that the product multiplied by 0.
    has_hidden = (key_lengths is not None and not lengths_skipped) or key_padding_mask is not None or causal
    if has_hidden and not math.isfinite(float(context.sum())):
        context = fused(probs)
    return context, probs


# Registered as torch.library custom ops, like the torch backend's, so that torch.compile(fullgraph=True) keeps a
# model that uses this backend in one graph (the ops are opaque to the compiler, with shapes from their fake
# implementations) and autograd goes through `register_autograd`. The forward op returns P in the compute dtype
# as its second output: the backward needs it.
@torch.library.custom_op("attn_fast::cpu_forward", mutates_args=(), device_types="cpu")
def _forward_op(query_proj: torch.Tensor, key_proj: torch.Tensor, value: torch.Tensor, v: torch.Tensor,
                extra_key_term: torch.Tensor | None, key_lengths: torch.Tensor | None,
                key_padding_mask: torch.Tensor | None, index: torch.Tensor | None, causal: bool, tanh_form: str,
                key_exp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> context [B_q, T, D] in the input dtype, P [B_q, T, S] in the compute dtype. `key_exp`: the memory's
    prepared e^{2 key_proj} (no gradient flows to it: the backward recomputes from key_proj)."""
    context, probs = _forward(query_proj, key_proj, value, v, extra_key_term, key_lengths, key_padding_mask, index,
                              causal, tanh_form, key_exp)
    return context.to(query_proj.dtype), probs


@_forward_op.register_fake
def _(query_proj, key_proj, value, v, *_options):
    query_rows, tgt_len, _ = query_proj.shape
    context = query_proj.new_empty(query_rows, tgt_len, value.shape[2])
    probs = query_proj.new_empty(query_rows, tgt_len, key_proj.shape[1], dtype=compute_dtype(query_proj.dtype))
    return context, probs


def _backward(grad_context, grad_probs, query_proj, key_proj, value, v, extra_key_term, index, probs, causal,
              tanh_form, key_lengths):
    """Gradients (query_proj, key_proj, value, v, extra_key_term or None), in the compute dtype."""
    _, backward = _kernels()
    dtype = probs.dtype
    query_rows, _, attn_dim = query_proj.shape
    memory_rows, src_len, _ = key_proj.shape
    index = None if index is None else index.to(torch.int64)
    query = query_proj.to(dtype)
    keys = key_proj.to(dtype)
    extra = None if extra_key_term is None else extra_key_term.to(dtype)
    factorized = resolve_tanh_form(tanh_form, query, keys, extra) == "factorized"
    grad_scores, grad_value = common.grad_of_scores(probs, value, index, grad_context, grad_probs,
                                                    need_value_grad=True)
    limits = key_limits(key_lengths, index, query_rows, src_len, query_proj.device)

    def tanh_pass(query, keys, extra, factorized):
        arrays = (query.contiguous().numpy(), keys.contiguous().numpy(),
                  None if extra is None else extra.contiguous().numpy(),
                  None if index is None else index.contiguous().numpy(), v.to(dtype).contiguous().numpy(),
                  grad_scores.contiguous().numpy(), limits.numpy(), causal, factorized)
        with launching(grad_scores.numel() * attn_dim) as threads:
            grads = backward.tanh_pass_grads(*arrays, threads)
        return tuple(torch.from_numpy(grad) for grad in grads)

    grad_query, grad_row_keys, grad_v = tanh_pass(query, keys, extra, factorized)
    # A NaN or inf input at a pair (i, j) whose dE is 0 (a key the padding mask hides: the pass skips only keys
    # beyond key_lengths and, with causal, after the step) makes d_v non-finite through 0 * tanh'(NaN), and so does
    # a non-finite dE. Checking the [A] d_v costs nothing; the pass is then redone with NaN -> 0 and inf -> max in
    # copies of the inputs (direct form), which leaves only the NaN a row's own visible inputs put in its dE (as the
    # torch backend does, README "NaN and inf").
    if not bool(torch.isfinite(grad_v).all()):
        grad_query, grad_row_keys, grad_v = tanh_pass(
            torch.nan_to_num(query, nan=0.0), torch.nan_to_num(keys, nan=0.0),
            None if extra is None else torch.nan_to_num(extra, nan=0.0), False)
    grad_extra = None
    if index is None:
        grad_keys = grad_row_keys
        if extra is not None:  # the same values, but two leaves must never share one .grad tensor
            grad_extra = grad_row_keys.clone()
    else:
        grad_extra = grad_row_keys if extra is not None else None
        grad_keys = torch.zeros(memory_rows, src_len, attn_dim, dtype=dtype)
        grad_keys.index_add_(0, index, grad_row_keys)
    return grad_query, grad_keys, grad_value, grad_v, grad_extra


@torch.library.custom_op("attn_fast::cpu_backward", mutates_args=(), device_types="cpu")
def _backward_op(grad_context: torch.Tensor | None, grad_probs: torch.Tensor | None, query_proj: torch.Tensor,
                 key_proj: torch.Tensor, value: torch.Tensor, v: torch.Tensor, extra_key_term: torch.Tensor | None,
                 index: torch.Tensor | None, probs: torch.Tensor, causal: bool, tanh_form: str,
                 key_lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """-> gradients of query_proj, key_proj, value, v and extra_key_term (an empty tensor when there is none)."""
    grads = _backward(grad_context, grad_probs, query_proj, key_proj, value, v, extra_key_term, index,
                      probs.to(compute_dtype(query_proj.dtype)), causal, tanh_form, key_lengths)
    return common.input_grads_out(grads, query_proj, key_proj, value, v, extra_key_term)


@_backward_op.register_fake
def _(grad_context, grad_probs, query_proj, key_proj, value, v, extra_key_term, *_options):
    return common.fake_input_grads(query_proj, key_proj, value, v, extra_key_term)


def _setup_context(ctx, inputs, output):
    query_proj, key_proj, value, v, extra_key_term, key_lengths, _, index, causal, tanh_form, _ = inputs
    ctx.save_for_backward(query_proj, key_proj, value, v, extra_key_term, index, output[1], key_lengths)
    ctx.options = (causal, tanh_form)


def _autograd_backward(ctx, grad_context, grad_probs):
    query_proj, key_proj, value, v, extra_key_term, index, probs, key_lengths = ctx.saved_tensors
    # backward() may run inside the caller's torch.autocast: gradients are computed in the dtypes the forward saw.
    with torch.autocast("cpu", enabled=False):
        grads = _backward_op(grad_context, grad_probs, query_proj, key_proj, value, v, extra_key_term, index, probs,
                             *ctx.options, key_lengths)
    if extra_key_term is None:
        grads = [*grads[:4], None]
    return (*grads, None, None, None, None, None, None)  # nothing for the masks, index, options and key_exp


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def attend(call: AttentionCall, *, tanh_form: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive attention for a validated call on CPU tensors. `tanh_form`: "auto" (scan the inputs once per call),
    or the form a decoding memory's `check_memory` chose. Returns context [B_q, T, D] and, if `call.need_weights`,
    weights [B_q, T, S], in the input dtype (the weights a fresh tensor, never the P saved for the backward)."""
    # "auto" goes to the kernel, which checks the range as it computes e^{2k} (no scan: a forward without backward
    # reads its inputs once; the backward then scans once). Decided here instead, once, with a prepared e^{2k} (it
    # is used only in the factorized form) and with an extra key term when a backward will follow (it reuses the
    # choice instead of scanning again).
    needs_backward = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in call.float_inputs())
    if (tanh_form == "auto" and (call.key_exp is not None or (call.extra_key_term is not None and needs_backward))
            and not torch.compiler.is_compiling() and can_read_values(call.query_proj)):
        tanh_form = resolve_tanh_form("auto", call.query_proj, call.key_proj, call.extra_key_term)
    key_exp = call.key_exp if tanh_form == "factorized" else None
    context, probs = _forward_op(*call.op_inputs(), tanh_form, key_exp)
    if not call.need_weights:
        return context, None
    return context, (probs.clone() if probs.dtype == call.dtype else probs.to(call.dtype))
