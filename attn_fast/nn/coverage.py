"""Coverage attention (Tu et al. 2016; See et al. 2017's pointer-generator formulation) and its coverage loss.

    c_t     = Σ_{t'<t} a_{t'}                                   coverage, [B', S] (0 before the first step)
    e_t[i]  = v · tanh(W_h h_i + W_s s_t + b_attn + w_c c_t[i])
    a_t     = softmax over the visible keys;   context_t = Σ_i a_t[i] h_i
    covloss_t = Σ_i min(a_t[i], c_t[i])

The coverage term w_c c_t[i] goes to the fused kernel as `extra_key_term` [B', S, A]; the kernels know nothing
about it. This is a separate module rather than an option of `AdditiveAttention`: coverage needs a state carried
across steps (as location-sensitive attention does), while `AdditiveAttention` stays stateless, with the same
parameters and state dict for its existing users.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from attn_fast.nn.additive import AdditiveAttention, AttentionMemory
from attn_fast.nn.stateful import check_step_query, prepare_memory, reordered_index

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class CoverageState:
    """Decoder-side state of `CoverageAttention`, one row per decoder row (hypothesis).

    memory: the encoder memory (B memory rows: key_proj [B, S, A], value [B, S, D], key_lengths, key_padding_mask).
    coverage: [B', S] the sum of the weights of all past steps (c_t of the next step).
    index: [B'] memory row of each decoder row, or None (B' = B).
    """

    memory: AttentionMemory
    coverage: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """B', the number of decoder rows."""
        return self.coverage.shape[0]

    def reorder(self, backpointers: torch.Tensor) -> CoverageState:
        """Beam search: new decoder row r continues old row `backpointers[r]` ([B''] integer in [0, B')).
        Gathers the coverage; the encoder memory is not copied, only the `index` of memory rows is updated."""
        index = reordered_index(self.index, backpointers, self.rows)
        return replace(self, coverage=self.coverage.index_select(0, backpointers.long()), index=index)


class CoverageAttention(nn.Module):
    """Bahdanau attention with a coverage vector in the score (See et al. 2017), stepped one decoder step at a time.

    Args:
        query_dim: Dq, size of the decoder state s_t.
        key_dim: Dk, size of the encoder states h_i.
        attn_dim: A, size of the hidden layer of the score MLP.
        bias: learn b_attn (kept in `attention.query_layer.bias`).
        backend: "auto", "triton", "torch" or "reference" (see `attn_fast.additive_attention`).

    Parameters: `attention` (an `AdditiveAttention`: `query_layer` = W_s and b_attn, `key_layer` = W_h, `v`) and
    `coverage_weight` [A] = w_c.

    Usage (the loss of step t pairs its weights with the coverage *before* the step):
        state = attn.precompute(encoder_states, key_lengths=lengths)
        for t in ...:
            context, weights, next_state = attn.step(s_t, state)
            loss = loss + coverage_loss(weights, state.coverage)
            state = next_state
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int, *, bias: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.attention = AdditiveAttention(query_dim, key_dim, attn_dim, bias=bias, backend=backend, device=device,
                                           dtype=dtype)
        self.coverage_weight = nn.Parameter(torch.empty(attn_dim, device=device, dtype=dtype))
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attention.reset_parameters()
        # As nn.Linear(1, A) would initialize w_c (fan-in 1), the layer See et al.'s PyTorch ports use.
        nn.init.uniform_(self.coverage_weight, -1.0, 1.0)

    @property
    def dtype(self) -> torch.dtype:
        return self.coverage_weight.dtype

    @torch.no_grad()
    def load_eager_weights(self, *, query_weight: torch.Tensor, key_weight: torch.Tensor, v: torch.Tensor,
                           coverage_weight: torch.Tensor, query_bias: torch.Tensor | None = None,
                           key_bias: torch.Tensor | None = None) -> None:
        """Copy an eager See et al. module: W_s [A, Dq], W_h [A, Dk], v [A] (or [1, A]), w_c [A] (or [A, 1], as
        an nn.Linear(1, A) holds it), b_attn [A]. Biases as in `AdditiveAttention.load_eager_weights`."""
        if not isinstance(coverage_weight, torch.Tensor) or not coverage_weight.dtype.is_floating_point:
            raise TypeError(f"coverage_weight must be a floating tensor, got "
                            f"{getattr(coverage_weight, 'dtype', type(coverage_weight).__name__)}")
        if tuple(coverage_weight.shape) not in ((self.attn_dim,), (self.attn_dim, 1)):
            raise ValueError(f"coverage_weight must have shape [{self.attn_dim}] or [{self.attn_dim}, 1], "
                             f"got {list(coverage_weight.shape)}")
        coverage_weight = coverage_weight.reshape(-1)
        self.attention.load_eager_weights(query_weight=query_weight, key_weight=key_weight, v=v,
                                          query_bias=query_bias, key_bias=key_bias)
        self.coverage_weight.copy_(coverage_weight)

    def precompute(self, key: torch.Tensor, value: torch.Tensor | None = None, key_lengths=None,
                   key_padding_mask=None, *, index: torch.Tensor | None = None) -> CoverageState:
        """Project the memory once; the coverage starts at 0.

        key [B, S, Dk]; value [B, S, D] or None (= key); key_lengths [B] integer; key_padding_mask [B, S] bool
        (True = padding); index [B'] integer: decoder row b reads memory row index[b] (beam search), None: B' = B.
        """
        memory, visible = prepare_memory(self.attention, key, value, key_lengths, key_padding_mask, index)
        return CoverageState(memory, torch.zeros(visible.shape, dtype=self.dtype, device=key.device), index)

    def coverage_features(self, coverage: torch.Tensor) -> torch.Tensor:
        """coverage [B', S] -> w_c c[i], the term [B', S, A] added to the key projection."""
        return coverage[..., None] * self.coverage_weight

    def step(self, query: torch.Tensor, state: CoverageState):
        """One decoder step. query [B', Dq] -> context [B', D], weights [B', S], and the next state (coverage +
        weights). The weights keep their graph, so losses over several steps reach every parameter. No value is
        read back to the host (see `AdditiveAttention.step`), nor in `CoverageState.reorder`. Inside
        `torch.autocast` the context and weights come in the autocast dtype and the coverage stays in the layer's
        dtype (the sum promotes)."""
        if not isinstance(state, CoverageState):
            raise TypeError(f"state must be a CoverageState (from precompute), got {type(state).__name__}")
        check_step_query(query, state.rows, self.query_dim, self.dtype)
        context, weights = self.attention.step(query, state.memory,
                                               extra_key_term=self.coverage_features(state.coverage),
                                               index=state.index, need_weights=True)
        return context, weights, replace(state, coverage=state.coverage + weights)

    def forward(self, query: torch.Tensor, state: CoverageState):
        """Same as `step` (one decoder step), so that module hooks see the call."""
        return self.step(query, state)


def coverage_loss(weights: torch.Tensor, coverage: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                  query_padding_mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """See et al.'s coverage loss Σ_i min(a_i, c_i) per decoder row, reduced over rows.

    weights [..., S]: the attention weights of a step (or of all steps [B, T, S]); coverage: the coverage *before*
    those weights were added, same shape. key_padding_mask [..., S] bool (or broadcastable), True = key to ignore
    (weights from this library are already 0 there; this is for weights from elsewhere).
    query_padding_mask [...] bool, True = decoder row to leave out (padded target steps, as See et al. mask them).
    reduction: "mean" over the rows kept (See et al.; 0 when no row is kept), "sum", or "none" (the per-row losses
    [...], 0 on left-out rows).
    """
    for name, tensor in (("weights", weights), ("coverage", coverage)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
    if weights.dim() < 1 or coverage.shape != weights.shape:
        raise ValueError(f"coverage must have the shape of weights [..., S] = {tuple(weights.shape)}, "
                         f"got {tuple(coverage.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    overlap = torch.minimum(weights, coverage)
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask)
        try:
            broadcast = torch.broadcast_shapes(key_padding_mask.shape, weights.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != weights.shape:
            raise ValueError(f"key_padding_mask must broadcast to weights {tuple(weights.shape)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        overlap = overlap.masked_fill(key_padding_mask, 0.0)
    per_row = overlap.sum(dim=-1)
    if query_padding_mask is not None:
        _check_mask("query_padding_mask", query_padding_mask)
        if query_padding_mask.shape != per_row.shape:
            raise ValueError(f"query_padding_mask must be [...] = {tuple(per_row.shape)} (weights without the key "
                             f"dim), got {tuple(query_padding_mask.shape)}")
        per_row = per_row.masked_fill(query_padding_mask, 0.0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if query_padding_mask is None:  # over no row at all (an empty batch) the mean is 0, not 0 / 0
        return per_row.sum() / max(per_row.numel(), 1)
    # A tensor count (no host sync); all rows left out gives 0, not NaN.
    return per_row.sum() / (~query_padding_mask).sum().clamp(min=1)


def _check_mask(name: str, mask) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = ignore), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
