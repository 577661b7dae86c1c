"""The tanh-free half of every backward that keeps the probabilities P, shared by the torch and Triton backends,
the pieces every CPU backend shares (compute dtype, the exp-form range check, the masked softmax), and the one
allocation seam of the torch backend's buffers.

    dValue = P^T dO;  dP = dO value^T + dWeights;  dE = P * (dP - rowsum(P * dP))

(docs/DESIGN.md, "Backward"). What remains of the backward — the pass through tanh — is each backend's own.
"""
from __future__ import annotations

import torch

from attn_fast.validation import AttentionCall, can_read_values

#: Elements of a [B, T, S, A]- or [rows, S, D]-sized block held at once (4 MiB in fp32). Measured on 2 cores:
#: blocks of about 1M elements stay in cache across the 3-4 passes each block takes; 4M-element blocks were 2x
#: slower per element (benchmarks/NOTES.md).
DEFAULT_CHUNK_ELEMENTS = 1 << 20

#: Largest |query_proj|, |key_proj + extra_key_term| for which e^{2x} cannot overflow (e^80 < 3.4e38 in fp32,
#: e^600 < 1.8e308 in fp64). Beyond it a backend uses the direct tanh. A product e^{2q} e^{2k} that overflows to inf
#: or underflows to 0 still gives tanh = +-1 exactly, as it should at |q + k| > 44. (The Triton kernels have a
#: tighter limit of their own, kernels/tanh.py FACTORIZED_LIMIT, for their fp32-only arithmetic.)
EXP_SAFE_MAGNITUDE = {torch.float32: 40.0, torch.float64: 300.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 inputs are computed in fp32 (accumulation in fp32, as on the GPU); fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def largest_magnitude(tensor: torch.Tensor | None) -> float:
    """max |tensor| in one pass, without an |tensor| temporary."""
    if tensor is None or tensor.numel() == 0:
        return 0.0
    smallest, largest = torch.aminmax(tensor.detach())
    return max(-float(smallest), float(largest))


def largest_operand(query_proj, key_proj, extra_key_term) -> float:
    """Bound on |query_proj| and |key| where a key is key_proj + extra_key_term (sum of their largest magnitudes)."""
    return max(largest_magnitude(query_proj), largest_magnitude(key_proj) + largest_magnitude(extra_key_term))


#: The tanh forms the torch and cpu backends' ops take (`tanh_form=`): "auto" chooses per call from the inputs'
#: magnitudes (`tanh_form_for`). The Triton kernels have forms of their own (kernels/tanh.py TANH_FORMS).
TANH_FORMS = ("auto", "direct", "factorized")


def tanh_form_for(tanh_form: str, dtype: torch.dtype, largest_magnitude) -> str:
    """"direct" or "factorized" for a call computed in `dtype`: the form asked for, or for "auto" the factorized
    one when e^{2x} stays finite for every input (`largest_magnitude()` <= EXP_SAFE_MAGNITUDE; it bounds
    |query_proj| and |key_proj (+ extra_key_term)|, and is only called for "auto"; NaN gives "direct")."""
    if tanh_form not in TANH_FORMS:
        raise ValueError(f"tanh_form must be one of {TANH_FORMS}, got {tanh_form!r}")
    if tanh_form != "auto":
        return tanh_form
    return "factorized" if largest_magnitude() <= EXP_SAFE_MAGNITUDE[dtype] else "direct"


def resolve_tanh_form(tanh_form: str, query_proj, key_proj, extra_key_term) -> str:
    """`tanh_form_for` these inputs: "auto" scans max |query_proj| and max |key (+ extra)| once (a host read), so
    that a backward can reuse the forward's choice instead of scanning again."""
    return tanh_form_for(tanh_form, compute_dtype(query_proj.dtype),
                         lambda: largest_operand(query_proj, key_proj, extra_key_term))


def masked_softmax_(scores: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis in place, over visible keys only; rows with no visible key become all 0."""
    if scores.shape[-1] == 0:
        return scores
    if visible is not None:
        scores.masked_fill_(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max.masked_fill_(~torch.isfinite(row_max), 0.0)  # empty row: exp(-inf - 0) = 0
    scores.sub_(row_max).exp_()
    row_sum = scores.sum(dim=-1, keepdim=True)
    row_sum.masked_fill_(row_sum == 0, 1.0)
    return scores.div_(row_sum)


def empty_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every uninitialized buffer of the torch backend (and of `grad_of_scores`) comes from here; the loops write
    each element they later read. Tests replace it with one that fills NaN, to prove that claim."""
    return torch.empty(shape, dtype=dtype, device=device)


def row_blocks(query_rows: int, src_len: int, width: int, chunk_elements: int):
    """Slices of query rows such that a [rows, S, width] gather of memory stays within `chunk_elements`."""
    rows_per_block = max(1, chunk_elements // max(1, src_len * width))
    for start in range(0, query_rows, rows_per_block):
        yield slice(start, min(start + rows_per_block, query_rows))


#: What one more matrix product call costs, in multiply-adds (Python, dispatch, the wake-up of torch's thread pool,
#: and a smaller product's lower efficiency). Chosen from paired measurements on 2 threads (benchmarks/NOTES.md,
#: "Issue 13, second pass"): per-row context products were 5% faster at caption and 11% at long, 9% slower at
#: nmt_train, where they saved 22.6 M multiply-adds over 32 rows.
PRODUCT_CALL_COST = 1_000_000


def worth_skipping_hidden_keys(limits, tgt_len: int, src_len: int, width: int) -> bool:
    """Whether the context P @ value should run row by row over each row's visible keys [0, limits[b])
    (`context_over_visible_prefix`) instead of as one batched product over all S keys: when the multiply-adds it
    saves (keys beyond the limits x T x width, width = D) outweigh one product call per row (PRODUCT_CALL_COST).
    limits: int64 numpy [B_q], each in [0, S]. (The backward's two products, dO value^T and P^T dO, stay batched:
    row by row they measured 7% slower at caption and 26% at nmt_train, on 2 threads: their cost there is the
    memory traffic of [B, S, D] tensors, not the multiply-adds.)"""
    hidden_keys_total = len(limits) * src_len - int(limits.sum())
    return hidden_keys_total * tgt_len * width > len(limits) * PRODUCT_CALL_COST


def context_over_visible_prefix(probs: torch.Tensor, values: torch.Tensor, value_row_of, limits) -> torch.Tensor:
    """context [B_q, T, D] = P[b, :, :L_b] @ value[value_row_of[b], :L_b] for every query row b, L_b = limits[b]:
    P @ value without the keys beyond each row's length, where P is 0 (at caption, 43% of a padded batch's keys;
    the batched product multiplies them all). A key beyond the length is never read, so a NaN or inf value there
    cannot reach the context. probs [B_q, T, S], values [B_m, S, D] (one dtype); value_row_of, limits: int64 numpy
    [B_q]."""
    query_rows, tgt_len, _ = probs.shape
    context = empty_buffer((query_rows, tgt_len, values.shape[2]), probs.dtype, probs.device)
    for row in range(query_rows):
        visible = int(limits[row])
        if visible == 0:
            context[row].zero_()
        else:
            torch.mm(probs[row, :, :visible], values[int(value_row_of[row]), :visible], out=context[row])
    return context


def transposed_product(probs: torch.Tensor, grad_context: torch.Tensor) -> torch.Tensor:
    """P^T dO: [B, S, T] x [B, T, D] -> [B, S, D]. A single decoder step (T = 1) makes it an outer product, which a
    broadcast multiply does in one pass (bmm with an inner size of 1 is several times slower on CPU)."""
    if probs.shape[1] == 1:
        return probs.transpose(1, 2) * grad_context
    return torch.bmm(probs.transpose(1, 2), grad_context)


def grad_of_scores(probs, value, index, grad_context, grad_weights, *, need_value_grad,
                   chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    """The tanh-free first half of the backward, shared by every backend that keeps P.

    probs P [B_q, T, S] (fp32/fp64), value [B_m, S, D], index [B_q] or None, grad_context [B_q, T, D] or None,
    grad_weights [B_q, T, S] or None. Returns (dE [B_q, T, S] in P's dtype, dValue [B_m, S, D] or None):
        dValue = P^T dO;  dP = dO value^T + dWeights;  dE = P * (dP - rowsum(P * dP))
    Masked keys and empty rows have P = 0, hence dE = 0. With `index`, memory rows are gathered per block of
    query rows (at most `chunk_elements` elements of [rows, S, D]) and value gradients are scattered back.
    """
    dtype = probs.dtype
    value = value.to(dtype)
    grad_probs, grad_value = None, None
    if grad_context is not None:
        grad_context = grad_context.to(dtype)
        if index is None:  # one batched product each, no gather
            grad_probs = torch.bmm(grad_context, value.transpose(1, 2))
            if need_value_grad:
                grad_value = transposed_product(probs, grad_context)
        else:
            grad_probs = empty_buffer(probs.shape, dtype, probs.device)
            grad_value = torch.zeros_like(value) if need_value_grad else None
            for rows in row_blocks(probs.shape[0], probs.shape[2], value.shape[2], chunk_elements):
                values = value.index_select(0, index[rows])  # [r, S, D]
                torch.bmm(grad_context[rows], values.transpose(1, 2), out=grad_probs[rows])
                if grad_value is not None:
                    grad_value.index_add_(0, index[rows], transposed_product(probs[rows], grad_context[rows]))
    if grad_weights is not None:
        grad_weights = grad_weights.to(dtype)
        grad_probs = grad_weights.clone() if grad_probs is None else grad_probs.add_(grad_weights)
    if grad_probs is None:
        grad_probs = torch.zeros_like(probs)
    elif grad_context is not None:
        # dP at a key hidden from the row (P = 0 there) is dO . value_j, NaN when value_j is: it would reach every
        # key of the row through rowsum(P * dP) as 0 * NaN. Where P = 0, dE = 0 whatever a finite dP is, so zeroing
        # dP there changes nothing else (README "NaN and inf": hidden keys never influence anything).
        grad_probs.masked_fill_(probs == 0, 0.0)
    row_dot = torch.linalg.vecdot(probs, grad_probs).unsqueeze(-1)
    return grad_probs.sub_(row_dot).mul_(probs), grad_value




def context_may_hold_hidden_values(call: AttentionCall, context: torch.Tensor, *, lengths_skipped: bool) -> bool:
    """Whether `context` [B_q, T, D] must be recomputed by `context_at_visible_keys`: True when some key is hidden
    from some row and the context holds a NaN or inf, which a non-finite value at a hidden key leaves there through
    P @ value (P = 0 there, and 0 * NaN = NaN). A row that sees a non-finite value is non-finite either way; the
    recomputation then gives the same. False without a hidden key, when `lengths_skipped` and only key_lengths hide
    keys (the kernel never reads them), and when the caller vouched for the values (`call.check_values`: a memory
    whose hidden keys `precompute` zeroed) or none may be read (CUDA-graph capture, meta tensors).

    Cost when it checks: one sum over the context and one host read (0.08 ms of a 20 ms nmt_train forward on one
    CPU thread)."""
    if call.key_padding_mask is None and not call.causal and (call.key_lengths is None or lengths_skipped):
        return False
    if not call.check_values or not can_read_values(context):
        return False
    # One reduction, no [B_q, T, D] bool temporary: a NaN or inf anywhere makes the sum non-finite (33x cheaper than
    # isfinite().all() on nmt_train's context, measured). A finite sum that overflows (|context| ~ 1e32) only sends
    # the call down the slow path, which is exact too. fp32 accumulation: an fp16 sum would overflow at 65504.
    total = context.sum(dtype=torch.float64 if context.dtype == torch.float64 else torch.float32)
    return not bool(torch.isfinite(total))


def context_at_visible_keys(probs: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                            index: torch.Tensor | None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """context [B_q, T, D] = sum over the keys j visible to each row of probs[b, i, j] * value[b, j], in probs'
    dtype: what P @ value is, except that a key hidden from a row is left out instead of multiplied by P = 0 (which
    makes a NaN or inf value NaN). probs P [B_q, T, S]; value [B_m, S, D]; visible [B_q, T, S] bool; index [B_q]
    or None. Differentiable (to probs and value), and bounded: blocks of at most `chunk_elements` elements of
    [rows, steps, S, D]. The slow path, taken only when `context_may_hold_hidden_values` says so."""
    query_rows, tgt_len, src_len = probs.shape
    value_dim = value.shape[2]
    value = value.to(probs.dtype)
    per_step = max(1, src_len * value_dim)
    steps = max(1, min(tgt_len, chunk_elements // per_step))
    rows_per_block = max(1, chunk_elements // (per_step * steps))
    blocks = []
    for row_start in range(0, query_rows, rows_per_block):
        rows = slice(row_start, min(row_start + rows_per_block, query_rows))
        values = value[rows] if index is None else value.index_select(0, index[rows])  # [r, S, D]
        step_blocks = []
        for step_start in range(0, tgt_len, steps):
            step_slice = slice(step_start, min(step_start + steps, tgt_len))
            terms = probs[rows, step_slice, :, None] * values[:, None]  # [r, t, S, D]
            terms = terms.masked_fill(~visible[rows, step_slice, :, None], 0.0)
            step_blocks.append(terms.sum(dim=2))
        blocks.append(torch.cat(step_blocks, dim=1) if step_blocks else values.new_zeros(values.shape[0], 0, value_dim))
    if not blocks:
        return probs.new_zeros(0, tgt_len, value_dim)
    return torch.cat(blocks, dim=0)


def input_grads_out(grads, query_proj, key_proj, value, v, extra_key_term) -> list[torch.Tensor]:
    """A backward op's return: the gradients (query_proj, key_proj, value, v, extra_key_term) each cast to its
    input's dtype, an empty tensor for one that is None (an op schema returns tensors, not None)."""
    inputs = (query_proj, key_proj, value, v, extra_key_term)
    return [query_proj.new_empty(0) if grad is None else grad.to(tensor.dtype) for grad, tensor in zip(grads, inputs)]


def fake_input_grads(query_proj, key_proj, value, v, extra_key_term) -> list[torch.Tensor]:
    """The backward ops' fake implementation: gradients shaped like the inputs (empty for no extra key term)."""
    extra = query_proj.new_empty(0) if extra_key_term is None else torch.empty_like(extra_key_term)
    return [torch.empty_like(query_proj), torch.empty_like(key_proj), torch.empty_like(value), torch.empty_like(v),
            extra]
