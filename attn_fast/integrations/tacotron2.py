"""NVIDIA Tacotron-2 (github.com/NVIDIA/tacotron2, model.py): its location-sensitive `Attention` on attn-fast.

That repository is not a package, so its module is recognized by its layout, not by its class:

    Attention                        forward(attention_hidden_state, memory, processed_memory,
      query_layer   (LinearNorm)             attention_weights_cat, mask) -> (context [B, D], weights [B, S])
      memory_layer  (LinearNorm)     the decoder calls memory_layer(memory) once per utterance
      v             (LinearNorm A -> 1; linear_layer: nn.Linear)
      location_layer (LocationLayer)
        location_conv  (ConvNorm: conv, Conv1d 2 -> F)
        location_dense (LinearNorm F -> A)

    e[j] = v . tanh(query_layer(s) + location_layer([a_prev; a_cum])[j] + processed_memory[j]);  a = softmax(e)

The replacement holds the original's own submodules, so parameter names, shapes and tensors are the original's
(state_dict keys unchanged, an optimizer built before the swap keeps training the same tensors), and calls them
for the projections and the location features; only the score MLP, masked softmax and weighted sum run on the
fused kernels, with the location features as the kernels' extra key term. The per-utterance state (the previous
and cumulative weights, `attention_weights` / `attention_weights_cum`) lives in NVIDIA's Decoder, which keeps
building `attention_weights_cat` and summing the returned weights as before.

Padding: NVIDIA fills padded energies with -inf before the softmax, so a row whose keys are all padding gets NaN
weights and context; the replacement returns zeros there (attn-fast's rule). Every other row is the same.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from attn_fast import additive_attention
from attn_fast.integrations.registry import register_adapter
from attn_fast.validation import check_backend

__all__ = ["FORWARD_PARAMETERS", "Tacotron2Attention", "is_nvidia_tacotron2_attention",
           "nvidia_tacotron2_adapter"]

#: The parameter names of NVIDIA's Attention.forward, in order: a module with this layout but another signature
#: (a fork that, say, forces alignments through an extra argument) is left as it is.
FORWARD_PARAMETERS = ("attention_hidden_state", "memory", "processed_memory", "attention_weights_cat", "mask")
#: The children of NVIDIA's Attention, in registration order (the order of its state_dict keys).
CHILDREN = ("query_layer", "memory_layer", "v", "location_layer")


def is_nvidia_tacotron2_attention(module: nn.Module) -> bool:
    """True for a module laid out as NVIDIA Tacotron-2's Attention: children query_layer, memory_layer, v and
    location_layer, the last with location_conv and location_dense (whether or not it can be swapped)."""
    children = dict(module.named_children())
    if not all(name in children for name in CHILDREN):
        return False
    location = dict(children["location_layer"].named_children())
    return "location_conv" in location and "location_dense" in location


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module recognized by `is_nvidia_tacotron2_attention` cannot be replaced exactly, or None."""
    extra_children = [name for name, _ in module.named_children() if name not in CHILDREN]
    if extra_children:
        return f"has submodules NVIDIA's Attention does not ({', '.join(extra_children)}), which the swap would drop"
    own = [name for name, _ in module.named_parameters(recurse=False)]
    own += [name for name, _ in module.named_buffers(recurse=False)]
    if own:
        return f"has parameters or buffers of its own ({', '.join(own)}) that NVIDIA's Attention does not"
    score = getattr(module.v, "linear_layer", None)
    if not isinstance(score, nn.Linear) or score.out_features != 1:
        return "v is not NVIDIA's LinearNorm(attention_dim, 1) (an nn.Linear with one output in v.linear_layer)"
    try:
        parameters = tuple(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        parameters = ()
    if parameters != FORWARD_PARAMETERS:
        return (f"forward({', '.join(parameters)}) is not NVIDIA's forward({', '.join(FORWARD_PARAMETERS)}): a "
                "variant whose semantics the replacement cannot know")
    mask_value = getattr(module, "score_mask_value", None)
    if not (isinstance(mask_value, float) and mask_value == float("-inf")):
        return f"score_mask_value is {mask_value!r}, not -inf: padded keys would keep some weight"
    return None


class Tacotron2Attention(nn.Module):
    """NVIDIA Tacotron-2's `Attention`, with the same submodules, call and results, on attn-fast's fused kernels.

    Built from the original by `swap_attention` (or `Tacotron2Attention(original)`): it holds the original's
    `query_layer`, `memory_layer`, `v` and `location_layer` themselves (shared, not copied). `v`'s bias, if a
    variant has one, adds the same constant to every score, which the softmax removes: it is not used, and
    receives no gradient (its true gradient is zero).

    backend: "auto", "triton", "torch", "cpu" or "reference" (see `attn_fast.additive_attention`).
    """

    def __init__(self, original: nn.Module, *, backend: str = "auto"):
        super().__init__()
        reason = unsupported_reason(original) if is_nvidia_tacotron2_attention(original) else (
            "not laid out as NVIDIA Tacotron-2's Attention")
        if reason is not None:
            raise ValueError(f"cannot replace {type(original).__name__}: {reason}")
        self.backend = check_backend(backend)
        # Registered in the original's order, so that state_dict() lists the same keys in the same order.
        self.query_layer = original.query_layer
        self.memory_layer = original.memory_layer
        self.v = original.v
        self.location_layer = original.location_layer
        self.score_mask_value = original.score_mask_value

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def get_alignment_energies(self, query: torch.Tensor, processed_memory: torch.Tensor,
                               attention_weights_cat: torch.Tensor) -> torch.Tensor:
        """The energies e [B, S] before masking, computed eagerly as NVIDIA's method does (it holds the [B, S, A]
        tanh tensor of one step): query [B, Dq], processed_memory [B, S, A], attention_weights_cat [B, 2, S]. The
        forward does not use it."""
        processed_query = self.query_layer(query.unsqueeze(1))
        location = self.location_layer(attention_weights_cat)
        return self.v(torch.tanh(processed_query + location + processed_memory)).squeeze(-1)

    def forward(self, attention_hidden_state: torch.Tensor, memory: torch.Tensor, processed_memory: torch.Tensor,
                attention_weights_cat: torch.Tensor, mask: torch.Tensor | None):
        """One decoder step, as NVIDIA's Attention.forward.

        attention_hidden_state [B, Dq] (the attention RNN's output); memory [B, S, D] (encoder outputs);
        processed_memory [B, S, A] (memory_layer(memory)); attention_weights_cat [B, 2, S] (previous and cumulative
        weights); mask [B, S] bool, True on padding, or None. Returns context [B, D] and weights [B, S], whose graph
        is kept (the decoder feeds them back into the next step's location features).
        """
        query_proj = self.query_layer(attention_hidden_state.unsqueeze(1))  # [B, 1, A]
        location = self.location_layer(attention_weights_cat)               # [B, S, A]
        context, weights = additive_attention(
            query_proj, processed_memory, memory, self.v.linear_layer.weight.reshape(-1),
            key_padding_mask=mask, extra_key_term=location, need_weights=True, backend=self.backend)
        return context.squeeze(1), weights.squeeze(1)


def nvidia_tacotron2_adapter(module: nn.Module, *, backend: str = "auto") -> nn.Module | str | None:
    """The registry's adapter: a `Tacotron2Attention` for NVIDIA's Attention, the reason a recognized variant is
    left, or None for any other module."""
    if not is_nvidia_tacotron2_attention(module):
        return None
    reason = unsupported_reason(module)
    if reason is not None:
        return reason
    return Tacotron2Attention(module, backend=backend)


register_adapter("tacotron2", nvidia_tacotron2_adapter)
