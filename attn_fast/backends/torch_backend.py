"""Memory-bounded additive attention in plain PyTorch: what CPU users get, and CUDA users without Triton.

The [B, T, S, A] tanh tensor is never held in full, in the forward or in the backward. Both walk the same blocks
of (query rows, decoder steps, keys), each at most `chunk_elements` elements of that tensor, through ONE scratch
buffer allocated per call (in-place ops and `out=`): a loop that allocates fresh chunk-sized temporaries makes
glibc keep every freed chunk, and RSS grows by gigabytes (measured, benchmarks/NOTES.md).

Forward (two passes over [B, T, S], which is A times smaller than the tanh tensor):
    scores E [B, T, S] block by block  ->  masked softmax P  ->  context = P @ value
Backward (one more pass over the tanh blocks, see DESIGN.md "Backward"):
    dValue = P^T dO;  dP = dO value^T (+ dWeights);  dE = P * (dP - rowsum(P * dP))
    t = tanh(qp + kp) recomputed per block:  d_v = sum_ij dE t,
    d_query_proj = v * sum_j dE (1 - t^2),  d_key_proj = v * sum_i dE (1 - t^2)
Only P [B, T, S] (in the compute dtype) is saved for the backward.

tanh(q + k) is computed in one of two forms (`_DirectTanh`, `_FactorizedTanh`); the factorized one replaces the
tanh of every element by one reciprocal and is 3-5x faster on CPU at equal accuracy, as long as e^{2q} and e^{2k}
stay finite, which is checked per call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from attn_fast.backends import common
from attn_fast.backends.common import (
    DEFAULT_CHUNK_ELEMENTS,
    compute_dtype,
    largest_operand,
    masked_softmax_,
    resolve_tanh_form,
    tanh_form_for,
)
from attn_fast.masking import visible_keys
from attn_fast.validation import AttentionCall, can_read_values


@dataclass(frozen=True)
class BlockSizes:
    """Block of the tanh tensor processed at once: `rows` query rows x `steps` decoder steps x `keys` keys."""

    rows: int
    steps: int
    keys: int

    @property
    def elements_per_attn_dim(self) -> int:
        return self.rows * self.steps * self.keys


def plan_blocks(query_rows: int, tgt_len: int, src_len: int, attn_dim: int, chunk_elements: int) -> BlockSizes:
    """Largest block of at most `chunk_elements` elements: whole key rows first, then decoder steps, then rows."""
    # An empty problem visits no block; sizes of at least 1 keep the loops' steps positive.
    query_rows, tgt_len, src_len = max(query_rows, 1), max(tgt_len, 1), max(src_len, 1)
    if src_len * attn_dim >= chunk_elements:
        return BlockSizes(1, 1, max(1, min(src_len, chunk_elements // attn_dim)))
    steps = max(1, min(tgt_len, chunk_elements // (src_len * attn_dim)))
    if steps < tgt_len:
        return BlockSizes(1, steps, src_len)
    rows = max(1, min(query_rows, chunk_elements // (tgt_len * src_len * attn_dim)))
    return BlockSizes(rows, tgt_len, src_len)


class _DirectTanh:
    """Block = t = tanh(q + k): one add and one tanh per element."""

    name = "direct"

    @staticmethod
    def prepare(projection: torch.Tensor) -> torch.Tensor:
        return projection

    @staticmethod
    def fill(block: torch.Tensor, query: torch.Tensor, keys: torch.Tensor) -> None:
        torch.add(query, keys, out=block)
        block.tanh_()

    @staticmethod
    def scores(block_rows: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """out[n] = sum_a v[a] t[n, a]."""
        torch.mv(block_rows, v, out=out)

    @staticmethod
    def weighted_tanh_sum(block_rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_n weights[n] t[n, :] -> [A]."""
        return torch.mv(block_rows.t(), weights)

    @staticmethod
    def derivative_(block: torch.Tensor) -> float:
        """Turn the block into c * (1 - t^2) in place and return c (here t^2 - 1, c = -1: two passes, not three)."""
        block.square_().sub_(1.0)
        return -1.0


class _FactorizedTanh:
    """Block = r = 1 / (1 + e^{2q} e^{2k}), so that tanh(q + k) = 1 - 2r.

    e^{2q} and e^{2k} are computed once per query row / key row (`prepare`), so each element costs a multiply, an
    add and a reciprocal instead of a tanh.
    """

    name = "factorized"

    @staticmethod
    def prepare(projection: torch.Tensor) -> torch.Tensor:
        return torch.mul(projection, 2.0).exp_()  # one allocation, not two

    @staticmethod
    def fill(block: torch.Tensor, query_exp: torch.Tensor, key_exp: torch.Tensor) -> None:
        # 1 + e^{2q} e^{2k} in one pass (addcmul), then the reciprocal in place: two passes over the block instead
        # of three (mul, add, reciprocal); measured 1.5x faster on a 1M-element block.
        torch.addcmul(block.new_ones(()), query_exp, key_exp, out=block)
        block.reciprocal_()

    @staticmethod
    def scores(block_rows: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """sum_a v[a] (1 - 2 r[n, a]) = sum(v) - 2 (r @ v)[n]."""
        torch.mv(block_rows, v, out=out)
        out.mul_(-2.0).add_(v.sum())

    @staticmethod
    def weighted_tanh_sum(block_rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_n w[n] (1 - 2 r[n, :]) = sum(w) - 2 (w @ r)."""
        return torch.mv(block_rows.t(), weights).mul_(-2.0).add_(weights.sum())

    @staticmethod
    def derivative_(block: torch.Tensor) -> float:
        """1 - t^2 = 1 - (1 - 2r)^2 = 4 (r - r^2): one pass, and the 4 is returned as the scale."""
        block.addcmul_(block, block, value=-1.0)
        return 4.0


def choose_tanh_form(form: str, dtype: torch.dtype, largest_magnitude):
    """The block class of `common.tanh_form_for(form, dtype, largest_magnitude)`: the factorized form when e^{2x}
    stays finite for every input (or when forced), else the direct one."""
    return {"direct": _DirectTanh, "factorized": _FactorizedTanh}[tanh_form_for(form, dtype, largest_magnitude)]


class _Operands:
    """The inputs in the compute dtype, and the blocks of the tanh tensor in the order both passes visit them."""

    def __init__(self, call: AttentionCall, tanh_form: str, chunk_elements: int):
        self.dtype = compute_dtype(call.dtype)
        self.key_exp = call.key_exp  # e^{2 key_proj} prepared with the memory, or None
        # Casts copy only fp16/bf16 inputs, which are [B, T, A]-, [B, S, A]- and [B, S, D]-sized, not 4-D.
        self.query = call.query_proj.to(self.dtype)
        self.keys = call.key_proj.to(self.dtype)
        self.value = call.value.to(self.dtype)
        self.v = call.v.to(self.dtype)
        self.extra = None if call.extra_key_term is None else call.extra_key_term.to(self.dtype)
        self.index = call.index
        self.key_lengths = call.key_lengths
        self.causal = call.causal
        self.query_rows, self.tgt_len, self.attn_dim = call.query_rows, call.tgt_len, call.attn_dim
        self.src_len = call.src_len
        self.value_dim = call.value_dim
        self.form = choose_tanh_form(tanh_form, self.dtype,
                                     lambda: largest_operand(self.query, self.keys, self.extra))
        self.blocks = plan_blocks(self.query_rows, self.tgt_len, self.src_len, self.attn_dim, chunk_elements)

    def without_nan(self) -> None:
        """NaN -> 0 and +-inf -> +-max in query, keys and extra key term (copies; the caller's tensors are not
        touched), and the direct tanh form. For the backward's tanh pass only, where it changes nothing but what a
        key hidden from a row contributes: there dE = 0, and 0 * tanh'(NaN) would be NaN. At a visible (i, j) with
        a non-finite input, row i's P and dE are NaN already, and they carry the NaN on (README "NaN and inf")."""
        self.query = torch.nan_to_num(self.query, nan=0.0)
        self.keys = torch.nan_to_num(self.keys, nan=0.0)
        self.extra = None if self.extra is None else torch.nan_to_num(self.extra, nan=0.0)
        self.key_exp = None
        self.form = _DirectTanh

    def gather(self, tensor: torch.Tensor, rows: slice) -> torch.Tensor:
        """`tensor` (memory-indexed) for query rows `rows`: a view without `index`, a bounded copy with it."""
        return tensor[rows] if self.index is None else tensor.index_select(0, self.index[rows])

    def row_keys(self, rows: slice) -> torch.Tensor:
        """Key projections [rows, S, A] as seen by query rows `rows` (memory row + extra key term)."""
        keys = self.gather(self.keys, rows)
        if self.extra is not None:
            keys = keys + self.extra[rows]
        return keys

    def prepared_keys(self, rows: slice) -> torch.Tensor:
        """The tanh form's key operand [rows, S, A]: e^{2k} of the row keys for the factorized form (gathered from
        the memory's prepared `key_exp` when there is one and no extra key term changes the keys), else the keys."""
        if self.form is _FactorizedTanh and self.key_exp is not None and self.extra is None:
            return self.gather(self.key_exp, rows)
        return self.form.prepare(self.row_keys(rows))

    def scratch(self) -> torch.Tensor:
        """The one buffer the tanh blocks are computed in, for a whole forward or backward call."""
        return common.empty_buffer(self.blocks.elements_per_attn_dim * self.attn_dim, self.dtype, self.query.device)

    def key_limits(self) -> list[int]:
        """Per query row, the number of keys its key length leaves visible (S without key_lengths): one host read
        per call."""
        if self.key_lengths is None:
            return [self.src_len] * self.query_rows
        lengths = self.key_lengths if self.index is None else self.key_lengths[self.index]
        return [min(max(int(length), 0), self.src_len) for length in lengths.tolist()]

    def walk(self, *, skip_padded_keys: bool = False):
        """Yield (rows, steps, keys, prepared query [r, t, A], prepared keys [r, s, A]) block by block.

        With `causal`, blocks whose keys all lie after the block's last decoder step are skipped: every score
        there is masked out, and in the backward its dE is zero. With `skip_padded_keys` (the backward, where dE is
        zero at keys beyond the key length) each block's keys stop at the longest key length of its rows; this
        reads the lengths on the host once, which is why the forward (decoding steps among its callers) does not.
        """
        prepared_query = self.form.prepare(self.query)
        blocks = self.blocks
        limits = self.key_limits() if skip_padded_keys and self.key_lengths is not None else None
        for row_start in range(0, self.query_rows, blocks.rows):
            rows = slice(row_start, min(row_start + blocks.rows, self.query_rows))
            key_end = self.src_len if limits is None else max(limits[rows], default=0)
            if key_end == 0:
                continue
            prepared_keys = self.prepared_keys(rows)[:, :key_end]
            for step_start in range(0, self.tgt_len, blocks.steps):
                steps = slice(step_start, min(step_start + blocks.steps, self.tgt_len))
                for key_start in range(0, key_end, blocks.keys):
                    if self.causal and key_start > steps.stop - 1:
                        break
                    keys = slice(key_start, min(key_start + blocks.keys, key_end))
                    yield rows, steps, keys, prepared_query[rows, steps], prepared_keys[:, keys]


def _block_view(scratch: torch.Tensor, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The scratch buffer's prefix as a [r, t, s, A] block for these query and key slices."""
    rows, steps, attn_dim = query.shape
    return scratch[: rows * steps * keys.shape[1] * attn_dim].view(rows, steps, keys.shape[1], attn_dim)


def _scores(ops: _Operands) -> torch.Tensor:
    """E [B, T, S] in the compute dtype, block by block; blocks skipped by `causal` stay 0 (they are masked)."""
    scores = torch.zeros(ops.query_rows, ops.tgt_len, ops.src_len, dtype=ops.dtype, device=ops.query.device)
    scratch = ops.scratch()
    score_buffer = common.empty_buffer(ops.blocks.elements_per_attn_dim, ops.dtype, ops.query.device)
    for rows, steps, keys, query, key_block in ops.walk():
        block = _block_view(scratch, query, key_block)
        ops.form.fill(block, query[:, :, None, :], key_block[:, None, :, :])
        block_scores = score_buffer[: block.shape[0] * block.shape[1] * block.shape[2]]
        ops.form.scores(block.view(-1, ops.attn_dim), ops.v, out=block_scores)
        scores[rows, steps, keys] = block_scores.view(block.shape[:3])
    return scores


def _forward(ops: _Operands, visible, chunk_elements):
    """-> (context [B, T, D], probabilities P [B, T, S]), both in the compute dtype."""
    probs = masked_softmax_(_scores(ops), visible)
    if ops.index is None:
        return torch.bmm(probs, ops.value), probs
    context = common.empty_buffer((ops.query_rows, ops.tgt_len, ops.value_dim), ops.dtype, probs.device)
    for rows in common.row_blocks(ops.query_rows, ops.src_len, ops.value_dim, chunk_elements):
        torch.bmm(probs[rows], ops.gather(ops.value, rows), out=context[rows])
    return context, probs


def _backward(ops: _Operands, probs, grad_context, grad_weights, chunk_elements, need_value_grad):
    """Gradients (query_proj, key_proj, value, v, extra_key_term), in the compute dtype."""
    memory_rows = ops.keys.shape[0]
    grad_scores, grad_value = common.grad_of_scores(probs, ops.value, ops.index, grad_context, grad_weights,
                                             need_value_grad=need_value_grad, chunk_elements=chunk_elements)

    grad_query = torch.zeros_like(ops.query)
    grad_row_keys = torch.zeros(ops.query_rows, ops.src_len, ops.attn_dim, dtype=ops.dtype, device=probs.device)
    grad_v = torch.zeros_like(ops.v)
    scratch = ops.scratch()
    # dE is zero at keys beyond the key length: each block stops at the longest length of its rows.
    for rows, steps, keys, query, key_block in ops.walk(skip_padded_keys=True):
        block = _block_view(scratch, query, key_block)
        ops.form.fill(block, query[:, :, None, :], key_block[:, None, :, :])
        weights = grad_scores[rows, steps, keys]
        grad_v += ops.form.weighted_tanh_sum(block.view(-1, ops.attn_dim), weights.reshape(-1))
        scale = ops.form.derivative_(block)  # block = (1 - t^2) / scale
        block.mul_((weights * scale)[..., None])  # dE (1 - t^2), without the factor v[a]
        grad_query[rows, steps] += block.sum(dim=2)
        # One decoder step per block (decoding, T = 1): nothing to sum over, and a sum over a size-1 axis would
        # still zero-fill and copy the block.
        grad_row_keys[rows, keys] += block[:, 0] if block.shape[1] == 1 else block.sum(dim=1)
    grad_query.mul_(ops.v)
    grad_row_keys.mul_(ops.v)

    grad_extra = None
    if ops.index is None:
        grad_keys = grad_row_keys
        if ops.extra is not None:  # the same values, but two leaves must never share one .grad tensor
            grad_extra = grad_row_keys.clone()
    else:
        grad_extra = grad_row_keys if ops.extra is not None else None
        grad_keys = torch.zeros(memory_rows, ops.src_len, ops.attn_dim, dtype=ops.dtype, device=probs.device)
        grad_keys.index_add_(0, ops.index, grad_row_keys)
    return grad_query, grad_keys, grad_value, grad_v, grad_extra


# The backend is registered as torch.library custom ops, so that torch.compile(fullgraph=True) keeps a model that
# uses it in one graph (the ops are opaque to the compiler, with shapes from their fake implementations) and
# autograd goes through `register_autograd`. The ops take the call flat (`AttentionCall.op_inputs`: a schema holds
# tensors, not records). The forward op returns P in the compute dtype as a second output: the backward needs it,
# and the returned weights are P cast to the input dtype.
@torch.library.custom_op("attn_fast::torch_forward", mutates_args=())
def _forward_op(query_proj: torch.Tensor, key_proj: torch.Tensor, value: torch.Tensor, v: torch.Tensor,
                extra_key_term: torch.Tensor | None, key_lengths: torch.Tensor | None,
                key_padding_mask: torch.Tensor | None, index: torch.Tensor | None, causal: bool, tanh_form: str,
                chunk_elements: int, key_exp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> context [B_q, T, D] in the input dtype, P [B_q, T, S] in the compute dtype. `key_exp`: the memory's
    prepared e^{2 key_proj} (no gradient flows to it: the backward recomputes from key_proj)."""
    call = AttentionCall.from_op_inputs(query_proj, key_proj, value, v, extra_key_term, key_lengths,
                                        key_padding_mask, index, causal).replace(key_exp=key_exp)
    ops = _Operands(call, tanh_form, chunk_elements)
    visible = visible_keys(
        ops.query_rows, ops.tgt_len, ops.src_len, key_lengths=key_lengths, key_padding_mask=key_padding_mask,
        causal=causal, index=index, device=query_proj.device,
    )
    context, probs = _forward(ops, visible, chunk_elements)
    return context.to(query_proj.dtype), probs


@_forward_op.register_fake
def _(query_proj, key_proj, value, v, *_options):
    query_rows, tgt_len, _ = query_proj.shape
    context = query_proj.new_empty(query_rows, tgt_len, value.shape[2])
    probs = query_proj.new_empty(query_rows, tgt_len, key_proj.shape[1], dtype=compute_dtype(query_proj.dtype))
    return context, probs


@torch.library.custom_op("attn_fast::torch_backward", mutates_args=())
def _backward_op(grad_context: torch.Tensor | None, grad_probs: torch.Tensor | None, query_proj: torch.Tensor,
                 key_proj: torch.Tensor, value: torch.Tensor, v: torch.Tensor, extra_key_term: torch.Tensor | None,
                 index: torch.Tensor | None, probs: torch.Tensor, causal: bool, tanh_form: str,
                 chunk_elements: int, key_lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """-> gradients of query_proj, key_proj, value, v and extra_key_term (an empty tensor when there is none).
    With `key_lengths`, the tanh pass skips the keys beyond the longest length of each block's rows."""
    call = AttentionCall(query_proj, key_proj, value, v, causal=causal, index=index, extra_key_term=extra_key_term,
                         key_lengths=key_lengths)
    ops = _Operands(call, tanh_form, chunk_elements)
    probs = probs.to(ops.dtype)
    may_read = can_read_values(probs)
    if not may_read:  # no host read allowed (CUDA-graph capture): take the NaN-proof pass at once
        ops.without_nan()
    grads = _backward(ops, probs, grad_context, grad_probs, chunk_elements, need_value_grad=True)
    # A NaN or inf among the inputs at a pair (i, j) whose dE is 0 (a key hidden from the row) makes d_v non-finite
    # (0 * tanh(NaN)), and so does a non-finite dE. Checking the [A] d_v costs nothing; the pass is then redone
    # NaN-proof, which leaves only the NaN that a row's own visible inputs put in its dE.
    if may_read and not bool(torch.isfinite(grads[3]).all()):
        ops.without_nan()
        grads = _backward(ops, probs, grad_context, grad_probs, chunk_elements, need_value_grad=True)
    return common.input_grads_out(grads, query_proj, key_proj, value, v, extra_key_term)


@_backward_op.register_fake
def _(grad_context, grad_probs, query_proj, key_proj, value, v, extra_key_term, *_options):
    return common.fake_input_grads(query_proj, key_proj, value, v, extra_key_term)


def _setup_context(ctx, inputs, output):
    query_proj, key_proj, value, v, extra_key_term, key_lengths, _, index, causal, tanh_form, chunk_elements, _ = inputs
    ctx.save_for_backward(query_proj, key_proj, value, v, extra_key_term, index, output[1], key_lengths)
    ctx.options = (causal, tanh_form, chunk_elements)


def _autograd_backward(ctx, grad_context, grad_probs):
    query_proj, key_proj, value, v, extra_key_term, index, probs, key_lengths = ctx.saved_tensors
    # backward() may be called inside the caller's torch.autocast: the gradients are computed in the dtypes the
    # forward saved, never re-cast (the forward ran with autocast off too, attn_fast.functional).
    # (Meta tensors have no autocast to turn off: torch.autocast("meta") is an error.)
    no_autocast = (contextlib.nullcontext() if query_proj.device.type == "meta"
                   else torch.autocast(query_proj.device.type, enabled=False))
    with no_autocast:
        grads = _backward_op(grad_context, grad_probs, query_proj, key_proj, value, v, extra_key_term, index, probs,
                             *ctx.options, key_lengths)
    if extra_key_term is None:
        grads = [*grads[:4], None]
    return (*grads, None, None, None, None, None, None, None)  # nothing for the masks, options and key_exp


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def key_exponentials(key_proj: torch.Tensor) -> torch.Tensor:
    """e^{2 key_proj} [B_m, S, A] in the compute dtype, exactly as the factorized form computes it per call: what a
    decoding memory keeps (`AttentionCall.key_exp`) so that a step's blocks need no exponential of the keys. Holds
    no graph (gradients reach key_proj through the backward, which recomputes)."""
    return _FactorizedTanh.prepare(key_proj.detach().to(compute_dtype(key_proj.dtype)))


def attend(call: AttentionCall, *, tanh_form: str = "auto", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive attention for a validated call, holding at most `chunk_elements` elements of the tanh tensor at a
    time. `tanh_form` ("auto", "direct", "factorized") and `chunk_elements` are tuning knobs for tests and
    benchmarks. Returns context [B_q, T, D] and, if `call.need_weights`, weights [B_q, T, S], in the input dtype.
    """
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be at least 1, got {chunk_elements}")
    # Compiling, a graph cannot branch on data (there each op decides); meta tensors have no values to read.
    if can_read_values(call.query_proj):
        tanh_form = resolve_tanh_form(tanh_form, call.query_proj, call.key_proj, call.extra_key_term)
    context, probs = _forward_op(*call.op_inputs(), tanh_form, chunk_elements, call.key_exp)
    if common.context_may_hold_hidden_values(call, context, lengths_skipped=False):
        # A NaN or inf value at a key hidden from a row reached its context as 0 * NaN: recompute the context from
        # P without the hidden keys (differentiable through P, the op's second output). Rare: only then is it paid.
        visible = visible_keys(call.query_rows, call.tgt_len, call.src_len, key_lengths=call.key_lengths,
                               key_padding_mask=call.key_padding_mask, causal=call.causal, index=call.index,
                               device=call.device)
        context = common.context_at_visible_keys(probs, call.value, visible, call.index, chunk_elements)
        context = context.to(call.dtype)
    # The weights are a copy of P, never P itself: autograd saved P for the backward, and the caller may edit the
    # weights in place. (An fp16/bf16 cast copies anyway; for fp32/fp64 it costs one [B, T, S] copy.)
    return context, (probs.to(call.dtype, copy=True) if call.need_weights else None)
