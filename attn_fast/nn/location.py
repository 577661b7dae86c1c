"""Location-sensitive attention (Chorowski et al. 2015) in Tacotron-2's formulation, on the public layer.

    f_t     = location_dense(location_conv([a_{t-1}; Σ_{t'<t} a_{t'}]))          [B', S, A]
    e_t[j]  = v · tanh(query_layer(s_t) + memory_layer(h_j) + f_t[j])
    a_t     = softmax over the visible keys;   context_t = Σ_j a_t[j] h_j

The location features f_t go to the fused kernel as `extra_key_term`, so the kernels know nothing about them and
every backend (torch, reference, Triton) runs this layer unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from attn_fast.nn.additive import AdditiveAttention, AttentionMemory, check_positive_int
from attn_fast.nn.stateful import check_step_query, prepare_memory, reordered_index, uniform_weights

INITIAL_WEIGHTS = ("uniform", "zeros")

#: Tacotron-2 state-dict names (NVIDIA's tacotron2/model.py) and the plain names, per parameter of this layer.
TACOTRON2_KEYS = {
    "query_layer": ("query_layer.linear_layer.weight", "query_layer.weight"),
    "memory_layer": ("memory_layer.linear_layer.weight", "memory_layer.weight"),
    "v": ("v.linear_layer.weight", "v.weight"),
    "location_conv": ("location_layer.location_conv.conv.weight", "location_conv.weight"),
    "location_dense": ("location_layer.location_dense.linear_layer.weight", "location_dense.weight"),
}


@dataclass(frozen=True)
class LocationState:
    """Decoder-side state of `LocationSensitiveAttention`, one row per decoder row (hypothesis).

    memory: the encoder memory (B memory rows: key_proj [B, S, A], value [B, S, D], key_lengths, key_padding_mask).
    prev_weights: [B', S] the weights of the previous step (uniform over the visible keys before the first step).
    cumulative_weights: [B', S] the sum of the weights of all past steps.
    index: [B'] memory row of each decoder row, or None (B' = B, row b reads memory row b).

    Immutable: `LocationSensitiveAttention.step` returns a new state and never writes into this one.
    """

    memory: AttentionMemory
    prev_weights: torch.Tensor
    cumulative_weights: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """B', the number of decoder rows."""
        return self.prev_weights.shape[0]

    def reorder(self, backpointers: torch.Tensor) -> LocationState:
        """Beam search: new decoder row r continues old row `backpointers[r]` ([B''] integer in [0, B')).

        Gathers the per-row weights; the encoder memory is not copied, only the `index` of memory rows is updated.
        From a state of B rows, `reorder(torch.arange(B).repeat_interleave(beam))` starts a beam.
        """
        index = reordered_index(self.index, backpointers, self.rows)
        rows = backpointers.long()
        return replace(self, prev_weights=self.prev_weights.index_select(0, rows),
                       cumulative_weights=self.cumulative_weights.index_select(0, rows), index=index)


class LocationSensitiveAttention(nn.Module):
    """Tacotron-2's location-sensitive attention, stepped one decoder step at a time.

    Args:
        query_dim: Dq, size of the decoder state that queries (Tacotron-2: the attention RNN's output).
        key_dim: Dk, size of the encoder states (the memory).
        attn_dim: A, size of the hidden layer of the score MLP.
        n_filters: channels of the location convolution (Tacotron-2: 32).
        kernel_size: odd width of the location convolution (Tacotron-2: 31), padded to keep S positions.
        bias: learn a bias inside the tanh (Tacotron-2 has none).
        backend: "auto", "triton", "torch" or "reference" (see `attn_fast.additive_attention`).

    Parameters: `attention` (an `AdditiveAttention`: `query_layer`, `key_layer` = Tacotron-2's memory_layer, `v`),
    `location_conv` (Conv1d 2 -> n_filters, no bias) and `location_dense` (Linear n_filters -> A, no bias).

    Usage:
        state = attn.precompute(memory, key_lengths=lengths)
        for t in ...: context, weights, state = attn.step(query_t, state)
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int, *, n_filters: int = 32, kernel_size: int = 31,
                 bias: bool = False, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        check_positive_int("n_filters", n_filters)
        # An even kernel cannot be centred: the convolution would shift the weights by half a position.
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.attention = AdditiveAttention(query_dim, key_dim, attn_dim, bias=bias, backend=backend, **factory)
        self.location_conv = nn.Conv1d(2, n_filters, kernel_size, padding=(kernel_size - 1) // 2, bias=False,
                                       **factory)
        self.location_dense = nn.Linear(n_filters, attn_dim, bias=False, **factory)
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.n_filters, self.kernel_size = n_filters, kernel_size

    def extra_repr(self) -> str:
        return f"n_filters={self.n_filters}, kernel_size={self.kernel_size}"

    @property
    def dtype(self) -> torch.dtype:
        return self.location_dense.weight.dtype

    def precompute(self, key: torch.Tensor, value: torch.Tensor | None = None, key_lengths=None,
                   key_padding_mask=None, *, index: torch.Tensor | None = None,
                   initial_weights: str = "uniform") -> LocationState:
        """Project the memory once and build the state before the first step.

        key [B, S, Dk]; value [B, S, D] or None (= key); key_lengths [B] integer; key_padding_mask [B, S] bool
        (True = padding); index [B'] integer: decoder row b reads memory row index[b] (beam search), None: B' = B.
        initial_weights: "uniform" — previous weights 1/len over the visible keys and 0 on padding, as SpeechBrain
        and ESPnet start — or "zeros", as NVIDIA's Tacotron-2 starts (its released checkpoints were trained so).
        The cumulative weights start at 0 either way: they sum the weights the attention has produced.
        """
        if initial_weights not in INITIAL_WEIGHTS:
            raise ValueError(f"initial_weights must be one of {INITIAL_WEIGHTS}, got {initial_weights!r}")
        memory, visible = prepare_memory(self.attention, key, value, key_lengths, key_padding_mask, index)
        prev = uniform_weights(visible, self.dtype)  # the state stays in the layer's dtype, also under autocast
        if initial_weights == "zeros":
            prev = torch.zeros_like(prev)
        return LocationState(memory, prev, torch.zeros_like(prev), index)

    def location_features(self, prev_weights: torch.Tensor, cumulative_weights: torch.Tensor) -> torch.Tensor:
        """[B', S] previous and cumulative weights -> the location term [B', S, A] added to the key projection."""
        stacked = torch.stack((prev_weights, cumulative_weights), dim=1)  # [B', 2, S], Tacotron-2's channel order
        if stacked.shape[-1] == 0:  # no key (S = 0): no feature, and Conv1d refuses an empty padded input
            return stacked.new_zeros(stacked.shape[0], 0, self.attn_dim)
        return self.location_dense(self.location_conv(stacked).transpose(1, 2))

    def step(self, query: torch.Tensor, state: LocationState):
        """One decoder step. query [B', Dq] -> context [B', D], weights [B', S], and the next state.

        The weights keep their graph (they feed the next step's location term), so a loss over a sequence of
        steps back-propagates through the whole recurrence. No value is read back to the host (see
        `AdditiveAttention.step`), nor in `LocationState.reorder`. Inside `torch.autocast` the context and weights
        come in the autocast dtype and the state stays in the layer's dtype.
        """
        if not isinstance(state, LocationState):
            raise TypeError(f"state must be a LocationState (from precompute), got {type(state).__name__}")
        check_step_query(query, state.rows, self.query_dim, self.dtype)
        location = self.location_features(state.prev_weights, state.cumulative_weights)
        context, weights = self.attention.step(query, state.memory, extra_key_term=location, index=state.index,
                                               need_weights=True)
        # Under autocast the weights come in the autocast dtype; the state keeps its own (the layer's) dtype.
        return context, weights, replace(state, prev_weights=weights.to(state.prev_weights.dtype),
                                         cumulative_weights=state.cumulative_weights + weights)

    def forward(self, query: torch.Tensor, state: LocationState):
        """Same as `step` (one decoder step), so that module hooks see the call."""
        return self.step(query, state)

    @torch.no_grad()
    def load_tacotron2_state_dict(self, state_dict, prefix: str = "") -> None:
        """Copy the weights of a Tacotron-2 attention layer.

        Accepts NVIDIA's names (`query_layer.linear_layer.weight`, `memory_layer.linear_layer.weight`,
        `v.linear_layer.weight`, `location_layer.location_conv.conv.weight`,
        `location_layer.location_dense.linear_layer.weight`) or the plain ones (`query_layer.weight`,
        `memory_layer.weight`, `v.weight`, `location_conv.weight`, `location_dense.weight`), each after `prefix`
        (e.g. "decoder.attention_layer." for a whole Tacotron-2 checkpoint). Raises ValueError on a missing key,
        a wrong shape, or a bias (Tacotron-2 has none; dropping one would silently change the scores).
        """
        tensors = _find_tacotron2_tensors(state_dict, prefix)
        expected = {
            "query_layer": (self.attn_dim, self.query_dim),
            "memory_layer": (self.attn_dim, self.key_dim),
            "v": (1, self.attn_dim),
            "location_conv": (self.n_filters, 2, self.kernel_size),
            "location_dense": (self.attn_dim, self.n_filters),
        }
        for name, (key, tensor) in tensors.items():
            shape = tuple(tensor.shape)
            if shape != expected[name] and not (name == "v" and shape == (self.attn_dim,)):
                raise ValueError(f"{key} must have shape {list(expected[name])}, got {shape}")
        self.attention.query_layer.weight.copy_(tensors["query_layer"][1])
        self.attention.key_layer.weight.copy_(tensors["memory_layer"][1])
        self.attention.v.copy_(tensors["v"][1].reshape(-1))
        self.location_conv.weight.copy_(tensors["location_conv"][1])
        self.location_dense.weight.copy_(tensors["location_dense"][1])
        if self.attention.query_layer.bias is not None:
            self.attention.query_layer.bias.zero_()

    @classmethod
    def from_tacotron2_state_dict(cls, state_dict, prefix: str = "", *, backend: str = "auto", device=None,
                                  dtype=None) -> LocationSensitiveAttention:
        """A layer sized from the shapes in a Tacotron-2 state dict (names as in `load_tacotron2_state_dict`)."""
        tensors = _find_tacotron2_tensors(state_dict, prefix)
        for name, dims in (("query_layer", 2), ("memory_layer", 2), ("location_conv", 3), ("location_dense", 2)):
            key, tensor = tensors[name]
            if tensor.dim() != dims:
                raise ValueError(f"{key} must be {dims}-D, got shape {tuple(tensor.shape)}")
        attn_dim, query_dim = tensors["query_layer"][1].shape
        n_filters, _, kernel_size = tensors["location_conv"][1].shape
        layer = cls(query_dim, tensors["memory_layer"][1].shape[1], attn_dim, n_filters=n_filters,
                    kernel_size=kernel_size, backend=backend, device=device,
                    dtype=tensors["query_layer"][1].dtype if dtype is None else dtype)
        layer.load_tacotron2_state_dict(state_dict, prefix)
        return layer


def _find_tacotron2_tensors(state_dict, prefix: str) -> dict[str, tuple[str, torch.Tensor]]:
    """{parameter: (the key found, its tensor)} for the five Tacotron-2 attention weights; ValueError otherwise."""
    found, missing = {}, []
    for name, candidates in TACOTRON2_KEYS.items():
        keys = [prefix + candidate for candidate in candidates]
        present = [key for key in keys if key in state_dict]
        if not present:
            missing.append(" or ".join(keys))
            continue
        found[name] = (present[0], state_dict[present[0]])
        bias = present[0][: -len("weight")] + "bias"
        if bias in state_dict:
            raise ValueError(f"unexpected {bias}: Tacotron-2's attention layers have no bias and this loader "
                             "would drop it")
    if missing:
        raise ValueError(f"state dict lacks {'; '.join(missing)}")
    for key, tensor in found.values():
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            raise TypeError(f"{key} must be a floating tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    return found
