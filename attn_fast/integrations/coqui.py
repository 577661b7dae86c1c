"""Coqui TTS (coqui-tts, TTS/tts/layers/tacotron/attentions.py): `OriginalAttention` on attn-fast.

Coqui's Tacotron and Tacotron-2 decoders attend with `OriginalAttention`, Bahdanau attention with optional
location features (Tacotron-2's location-sensitive attention):

    OriginalAttention                  init_states(inputs); preprocess_inputs(inputs) -> inputs_layer(inputs)
      query_layer   (Linear: linear_layer)   forward(query [B, Dq], inputs [B, S, D], processed_inputs [B, S, A],
      inputs_layer  (Linear: linear_layer)           mask [B, S] bool, True on valid keys, or None) -> context [B, D]
      v             (Linear A -> 1, with a bias)
      location_layer (LocationLayer: location_conv1d, location_dense), with location_attention

    e[j] = v . tanh(query_layer(q) + location_layer([a_prev; a_cum])[j] + processed_inputs[j]) + b_v
    a = softmax(e);  attention_weights = a;  attention_weights_cum += a (with location attention)

The module keeps its per-utterance state itself (`attention_weights`, `attention_weights_cum`, set by
`init_states` and each forward); the replacement keeps it the same way, under the same names, and holds the
original's own submodules (same state_dict keys, same tensors). Scores, masked softmax and context run on the
fused kernels, the location features as their extra key term.

Options the replacement does not reproduce leave the module as it is, reported by `swap_attention` with the reason:
forward attention (`forward_attn`, and its `trans_agent`), inference-time windowing (`windowing`) and the
"sigmoid" normalization. Coqui's other attentions (GravesAttention, MonotonicDynamicConvolutionAttention) are not
additive attention and are reported as left too.

Differences, both documented for users:
- Padding: Coqui fills masked energies with -inf, so a row with no valid key gets NaN; the replacement returns 0.
- v's bias adds the same constant to every energy, which the softmax removes: the replacement does not use it,
  and it receives no gradient (its true gradient is zero; an optimizer then skips it, weight decay included).
- `init_states` builds the zero state in the inputs' dtype (Coqui's uses the default dtype, which breaks a
  float64 model under the default float32): the same values wherever Coqui's runs.
"""
from __future__ import annotations

import torch
from torch import nn

from attn_fast import additive_attention
from attn_fast.integrations.registry import register_adapter
from attn_fast.validation import check_backend

__all__ = ["COQUI_ATTENTION_MODULE", "CoquiOriginalAttention", "coqui_adapter", "is_coqui_attention"]

#: Where Coqui defines its Tacotron attentions.
COQUI_ATTENTION_MODULE = "TTS.tts.layers.tacotron.attentions"
#: Coqui attentions that are not additive attention: recognized, and reported as left.
NOT_ADDITIVE = {
    "GravesAttention": "Graves' GMM attention is not additive (Bahdanau) attention",
    "MonotonicDynamicConvolutionAttention": "dynamic convolution attention is not additive (Bahdanau) attention",
}


def is_coqui_attention(module: nn.Module) -> bool:
    """True for an instance of a class defined in Coqui's Tacotron attention module (subclasses included: a
    subclass defined elsewhere is recognized and then checked like the original)."""
    return any(cls.__module__ == COQUI_ATTENTION_MODULE for cls in type(module).__mro__)


def _linear_of(module: nn.Module | None) -> nn.Linear | None:
    """The nn.Linear inside Coqui's `Linear` wrapper (its `linear_layer`), or None."""
    linear = getattr(module, "linear_layer", None)
    return linear if isinstance(linear, nn.Linear) else None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a Coqui attention cannot be replaced exactly, or None when it can."""
    name = next((cls.__name__ for cls in type(module).__mro__ if cls.__module__ == COQUI_ATTENTION_MODULE), None)
    if name in NOT_ADDITIVE:
        return NOT_ADDITIVE[name]
    if name != "OriginalAttention":
        return f"{name} is not OriginalAttention, the one Coqui attention attn-fast replaces"
    if type(module).forward is not _coqui_forward(module):
        return f"{type(module).__name__} overrides OriginalAttention.forward, whose semantics the swap cannot know"
    if getattr(module, "forward_attn", False):
        return "forward attention (forward_attn=True) is not supported"
    if getattr(module, "trans_agent", False):
        return "the transition agent (trans_agent=True) is not supported"
    if getattr(module, "windowing", False):
        return "attention windowing (windowing=True) is not supported"
    if getattr(module, "norm", None) != "softmax":
        return f"norm={getattr(module, 'norm', None)!r} is not supported (only 'softmax')"
    expected = ["query_layer", "inputs_layer", "v"] + (["location_layer"] if module.location_attention else [])
    children = [child for child, _ in module.named_children()]
    if children != expected:
        return f"submodules {children} are not OriginalAttention's {expected}"
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        return "has parameters or buffers of its own that OriginalAttention does not"
    score = _linear_of(module.v)
    if score is None or score.out_features != 1:
        return "v is not Coqui's Linear(attention_dim, 1)"
    return None


def _coqui_forward(module: nn.Module):
    """OriginalAttention.forward as Coqui defines it (the class in Coqui's module among the module's bases)."""
    for cls in type(module).__mro__:
        if cls.__module__ == COQUI_ATTENTION_MODULE and cls.__name__ == "OriginalAttention":
            return cls.forward
    return None


class CoquiOriginalAttention(nn.Module):
    """Coqui's `OriginalAttention` (softmax, with or without location features), on attn-fast's fused kernels.

    The same submodules (the original's own), methods the decoders call (`init_states`, `preprocess_inputs`,
    `forward`), state attributes (`attention_weights` [B, S], `attention_weights_cum` [B, S] with location
    attention) and option attributes as the original. backend: see `attn_fast.additive_attention`.
    """

    def __init__(self, original: nn.Module, *, backend: str = "auto"):
        super().__init__()
        reason = unsupported_reason(original) if is_coqui_attention(original) else "not a Coqui attention"
        if reason is not None:
            raise ValueError(f"cannot replace {type(original).__name__}: {reason}")
        self.backend = check_backend(backend)
        # Registered in the original's order, so that state_dict() lists the same keys in the same order.
        self.query_layer = original.query_layer
        self.inputs_layer = original.inputs_layer
        self.v = original.v
        self.location_attention = original.location_attention
        if self.location_attention:
            self.location_layer = original.location_layer
        # The original's options (all off but norm, checked by unsupported_reason), for code that reads them.
        for option in ("_mask_value", "windowing", "win_idx", "norm", "forward_attn", "trans_agent",
                       "forward_attn_mask"):
            setattr(self, option, getattr(original, option))
        # A swap in the middle of an utterance carries the state on.
        for state in ("attention_weights", "attention_weights_cum"):
            if hasattr(original, state):
                setattr(self, state, getattr(original, state))

    def extra_repr(self) -> str:
        return f"location_attention={self.location_attention}, backend={self.backend!r}"

    def init_location_attention(self, inputs: torch.Tensor) -> None:
        self.attention_weights_cum = inputs.new_zeros(inputs.shape[0], inputs.shape[1])

    def init_states(self, inputs: torch.Tensor) -> None:
        """Zero state for a new batch of utterances: inputs [B, S, D] (the encoder outputs)."""
        self.attention_weights = inputs.new_zeros(inputs.shape[0], inputs.shape[1])
        if self.location_attention:
            self.init_location_attention(inputs)

    def preprocess_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, S, D] -> processed_inputs [B, S, A], once per utterance."""
        return self.inputs_layer(inputs)

    def update_location_attention(self, alignments: torch.Tensor) -> None:
        self.attention_weights_cum += alignments  # in place, as Coqui does

    def location_features(self) -> torch.Tensor:
        """The location term [B, S, A] from the previous and cumulative weights (Coqui's channel order)."""
        attention_cat = torch.cat((self.attention_weights.unsqueeze(1), self.attention_weights_cum.unsqueeze(1)),
                                  dim=1)
        return self.location_layer(attention_cat)

    def get_location_attention(self, query: torch.Tensor, processed_inputs: torch.Tensor):
        """Energies [B, S] and the processed query, computed eagerly as Coqui's method does (holds [B, S, A]);
        the forward does not use it."""
        processed_query = self.query_layer(query.unsqueeze(1))
        energies = self.v(torch.tanh(processed_query + self.location_features() + processed_inputs))
        return energies.squeeze(-1), processed_query

    def get_attention(self, query: torch.Tensor, processed_inputs: torch.Tensor):
        """As `get_location_attention`, without location features."""
        processed_query = self.query_layer(query.unsqueeze(1))
        return self.v(torch.tanh(processed_query + processed_inputs)).squeeze(-1), processed_query

    def forward(self, query: torch.Tensor, inputs: torch.Tensor, processed_inputs: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """One decoder step: query [B, Dq], inputs [B, S, D], processed_inputs [B, S, A], mask [B, S] bool (True
        on valid keys, Coqui's convention) or None -> context [B, D]. Sets `attention_weights` [B, S] (graph kept)
        and adds them to `attention_weights_cum`."""
        location = self.location_features() if self.location_attention else None
        query_proj = self.query_layer(query.unsqueeze(1))  # [B, 1, A]
        context, weights = additive_attention(
            query_proj, processed_inputs, inputs, self.v.linear_layer.weight.reshape(-1),
            key_padding_mask=None if mask is None else ~mask, extra_key_term=location, need_weights=True,
            backend=self.backend)
        alignment = weights.squeeze(1)
        if self.location_attention:
            self.update_location_attention(alignment)
        self.attention_weights = alignment
        return context.squeeze(1)


def coqui_adapter(module: nn.Module, *, backend: str = "auto") -> nn.Module | str | None:
    """The registry's adapter: a `CoquiOriginalAttention`, the reason a Coqui attention is left, or None for any
    module that is not one of Coqui's Tacotron attentions."""
    if not is_coqui_attention(module):
        return None
    reason = unsupported_reason(module)
    if reason is not None:
        return reason
    return CoquiOriginalAttention(module, backend=backend)


register_adapter("coqui", coqui_adapter)
