"""SpeechBrain's Bahdanau attentions (speechbrain.nnet.attention, 1.x) on attn-fast.

    ContentBasedAttention    e_j = scaling * w · tanh(mlp_enc(h_j) + mlp_dec(s))
    LocationAwareAttention   e_j = scaling * w · tanh(mlp_enc(h_j) + mlp_dec(s) + mlp_loc(conv_loc(a_prev))_j)

    a = softmax over the keys j < enc_len;   returns (mlp_out(Σ_j a_j h_j), a)

Both are stateful per sequence, as SpeechBrain's are: the first call after `reset()` projects the encoder states
once (`precomputed_enc_h`) and builds the length mask (`mask`); later calls reuse them and ignore the encoder
states' projection (only their values are averaged). LocationAwareAttention also keeps `prev_attn` (detached),
which SpeechBrain's beam search reorders by assigning the attribute. The replacements keep these attributes under
the same names and semantics, and adopt the original's submodules themselves (same Parameter objects, so an
optimizer built before the swap still updates them, and the state_dict keys are unchanged).

Where they differ: a row whose enc_len is 0 (no visible key) gets weights 0 and context mlp_out(0) here, NaN in
SpeechBrain (a softmax over -inf only); in LocationAwareAttention the NaN then also feeds SpeechBrain's next step.
The replacements are not instances of SpeechBrain's classes (`isinstance` checks against them fail).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from attn_fast.functional import (
    additive_attention_on_memory,
    call_dtype,
    check_memory,
    prepare_key_exp,
    step_tanh_form,
)
from attn_fast.integrations.registry import (
    adopt_submodules,
    linear_shape,
    qualified_name,
    recognize,
    register_adapter,
)
from attn_fast.nn.additive import ScoreWeightsSource, usable_score_weights
from attn_fast.validation import check_backend

FRAMEWORK = "speechbrain"
ATTENTION_MODULE = "speechbrain.nnet.attention"

#: The per-sequence attributes of each class (set to None by reset()), carried over when a sequence is in progress.
CONTENT_STATE = ("enc_len", "precomputed_enc_h", "mask")
LOCATION_STATE = (*CONTENT_STATE, "prev_attn")


def speechbrain_length_mask(enc_len: torch.Tensor, max_len: int) -> torch.Tensor:
    """SpeechBrain's `length_to_mask(enc_len, max_len)`: [B, max_len], 1 where position < enc_len, in enc_len's
    dtype (a float length l makes ceil(l) positions visible, as SpeechBrain's comparison does)."""
    positions = torch.arange(max_len, device=enc_len.device, dtype=enc_len.dtype)
    return (positions.expand(len(enc_len), max_len) < enc_len.unsqueeze(1)).to(enc_len.dtype)


@dataclass(frozen=True)
class CheckedMemory:
    """What attn-fast keeps per sequence next to SpeechBrain's own state, built once and validated once.

    key_proj and mask: the `precomputed_enc_h` and `mask` it was built from (identity, not value: assigning
    either attribute, as a caller may, rebuilds it). key_padding_mask [B, S] bool, True = ignored; tanh_form,
    key_exp, score_weights and score_weights_source as `AttentionMemory` holds them (see attn_fast.nn.additive):
    the score weights serve a step only while mlp_attn.weight and `scaling` are those they were made from.
    """

    key_proj: torch.Tensor
    mask: torch.Tensor
    key_padding_mask: torch.Tensor
    tanh_form: str
    key_exp: torch.Tensor | None
    score_weights: torch.Tensor | None = None
    score_weights_source: ScoreWeightsSource | None = None


class FusedContentBasedAttention(nn.Module):
    """SpeechBrain's ContentBasedAttention on the fused kernels: same parameters (`mlp_enc`, `mlp_dec`,
    `mlp_attn`, `mlp_out`, the original's own modules), `scaling`, `reset()`, per-sequence state and call.

    forward(enc_states [B, S, enc_dim], enc_len [B] (absolute lengths, any numeric dtype), dec_states
    [B, dec_dim]) -> context [B, output_dim], weights [B, S].
    """

    STATE = CONTENT_STATE

    def __init__(self, original: nn.Module, *, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        # mlp_enc, mlp_dec, mlp_attn, mlp_out (+ conv_loc, mlp_loc) in the original's order, and its `softmax`,
        # unused here (the kernels normalize) but kept so that the module tree and its printout match.
        adopt_submodules(self, original)
        self.scaling = original.scaling
        self.reset()
        for name in self.STATE:  # a sequence already in progress goes on where it was
            setattr(self, name, getattr(original, name, None))

    def reset(self) -> None:
        """Forget the sequence: the next call projects its encoder states (as SpeechBrain's reset)."""
        for name in self.STATE:
            setattr(self, name, None)
        self.checked_memory: CheckedMemory | None = None

    def score_vector(self) -> torch.Tensor:
        """v [A] = scaling * mlp_attn.weight: SpeechBrain scales the scores before the softmax."""
        v = self.mlp_attn.weight.reshape(-1)
        return v if self.scaling == 1 else v * self.scaling

    def start_sequence(self, enc_states: torch.Tensor, enc_len: torch.Tensor) -> None:
        """First call after reset(): what SpeechBrain computes once per sequence."""
        self.precomputed_enc_h = self.mlp_enc(enc_states)
        self.mask = speechbrain_length_mask(enc_len, enc_states.size(1))

    def memory_for(self, enc_states: torch.Tensor, v: torch.Tensor, *, prepare_keys: bool) -> CheckedMemory:
        """The checked memory of the current `precomputed_enc_h` and `mask`, validated once per sequence."""
        memory = self.checked_memory
        if memory is None or memory.key_proj is not self.precomputed_enc_h or memory.mask is not self.mask:
            key_padding_mask = self.mask == 0
            tanh_form = check_memory(self.precomputed_enc_h, enc_states, v.detach(),
                                     key_padding_mask=key_padding_mask)
            key_exp = prepare_key_exp(self.precomputed_enc_h, tanh_form, self.backend) if prepare_keys else None
            # The Triton backend's v pre-pass, once per sequence; valid while mlp_attn.weight and `scaling` are.
            score_weights, source = ScoreWeightsSource.prepare(v, (self.mlp_attn.weight,),
                                                               call_dtype(self.precomputed_enc_h), self.backend,
                                                               extra=(self.scaling,))
            memory = CheckedMemory(self.precomputed_enc_h, self.mask, key_padding_mask, tanh_form, key_exp,
                                   score_weights, source)
            self.checked_memory = memory
        return memory

    def attend(self, enc_states: torch.Tensor, dec_states: torch.Tensor,
               extra_key_term: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder step against the sequence's memory: context [B, output_dim], weights [B, S]."""
        v = self.score_vector()
        memory = self.memory_for(enc_states, v, prepare_keys=extra_key_term is None)
        # Steps with an extra key term: the form attn_fast.nn's layers take too (the cpu kernel checks the range
        # itself; "direct", unlimited, elsewhere).
        tanh_form = step_tanh_form(memory.tanh_form, has_extra_key_term=extra_key_term is not None,
                                   backend=self.backend, device=enc_states.device, dtype=memory.key_proj.dtype)
        query_proj = self.mlp_dec(dec_states.unsqueeze(1))
        context, weights = additive_attention_on_memory(
            query_proj, memory.key_proj, enc_states, v, key_padding_mask=memory.key_padding_mask,
            extra_key_term=extra_key_term, need_weights=True, tanh_form=tanh_form,
            key_exp=memory.key_exp if extra_key_term is None else None,
            score_weights=usable_score_weights(memory.score_weights, memory.score_weights_source,
                                               (self.mlp_attn.weight,), call_dtype(query_proj), (self.scaling,)),
            backend=self.backend)
        return self.mlp_out(context.squeeze(1)), weights.squeeze(1)

    def forward(self, enc_states: torch.Tensor, enc_len: torch.Tensor,
                dec_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precomputed_enc_h is None:
            self.start_sequence(enc_states, enc_len)
        return self.attend(enc_states, dec_states, None)

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}, backend={self.backend!r}"


class FusedLocationAwareAttention(FusedContentBasedAttention):
    """SpeechBrain's LocationAwareAttention on the fused kernels: `conv_loc` and `mlp_loc` on top of the content
    parameters, and `prev_attn` [B, S] (detached weights of the previous step, SpeechBrain's beam search assigns
    it) in the per-sequence state. The location features go to the kernels as the extra key term.
    """

    STATE = LOCATION_STATE

    def start_sequence(self, enc_states: torch.Tensor, enc_len: torch.Tensor) -> None:
        super().start_sequence(enc_states, enc_len)
        # SpeechBrain's start: 1/enc_len on the visible keys, with the reciprocal taken in float32 as SpeechBrain
        # takes it (`enc_len.float()`), so that float64 models start from the very same numbers.
        self.prev_attn = self.mask * (1 / enc_len.float()).unsqueeze(1)

    def forward(self, enc_states: torch.Tensor, enc_len: torch.Tensor,
                dec_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precomputed_enc_h is None:
            self.start_sequence(enc_states, enc_len)
        # SpeechBrain feeds prev_attn to the convolution as it is (a float32 start fails there in a float64
        # model); cast to the convolution's dtype, a no-op wherever SpeechBrain's own call succeeds.
        prev_attn = self.prev_attn.to(self.conv_loc.weight.dtype)
        location = self.mlp_loc(self.conv_loc(prev_attn.unsqueeze(1)).transpose(1, 2))  # [B, S, A]
        context, weights = self.attend(enc_states, dec_states, location)
        self.prev_attn = weights.detach()
        return context, weights


def unsupported_option(module: nn.Module, *, location: bool) -> str | None:
    """Why `module` cannot be replaced (its structure is not SpeechBrain's, or an option is unsupported), or None."""
    shapes = {"mlp_enc": linear_shape(module, "mlp_enc", bias=None),
              "mlp_dec": linear_shape(module, "mlp_dec", bias=None),
              "mlp_attn": linear_shape(module, "mlp_attn", bias=False),
              "mlp_out": linear_shape(module, "mlp_out", bias=None)}
    if location:
        shapes["mlp_loc"] = linear_shape(module, "mlp_loc", bias=None)
    for reason in shapes.values():
        if isinstance(reason, str):
            return reason
    attn_dim = shapes["mlp_enc"][1]
    if shapes["mlp_dec"][1] != attn_dim or shapes["mlp_attn"] != (attn_dim, 1):
        return "mlp_enc, mlp_dec and mlp_attn do not share one attention size"
    if shapes["mlp_out"][0] != shapes["mlp_enc"][0]:
        return "mlp_out does not take the encoder states' size"
    if location:
        conv = getattr(module, "conv_loc", None)
        if type(conv) is not nn.Conv1d:
            return f"conv_loc is {type(conv).__name__}, not nn.Conv1d"
        if conv.in_channels != 1 or conv.bias is not None or conv.stride != (1,) or conv.dilation != (1,) \
                or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str) \
                or conv.kernel_size[0] != 2 * conv.padding[0] + 1:
            return "conv_loc is not SpeechBrain's (1 channel in, no bias, odd kernel 2k+1 padded by k)"
        if shapes["mlp_loc"] != (conv.out_channels, attn_dim):
            return "mlp_loc does not map conv_loc's channels to the attention size"
    softmax = getattr(module, "softmax", None)
    if type(softmax) is not nn.Softmax or softmax.dim not in (-1, 2):
        return "softmax is not nn.Softmax(dim=-1)"
    scaling = getattr(module, "scaling", None)
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        return f"scaling must be a real number, got {type(scaling).__name__}"
    if not callable(getattr(module, "reset", None)):
        return "no reset() method"
    return None


def make_adapter(class_name: str, replacement: type[FusedContentBasedAttention], *, location: bool):
    """The adapter of one SpeechBrain class (see attn_fast.integrations.registry)."""

    def adapter(module: nn.Module, *, backend: str = "auto") -> nn.Module | str | None:
        relation = recognize(module, ATTENTION_MODULE, class_name)
        if relation is None or (relation == "structure" and not all(
                hasattr(module, name) for name in ("mlp_enc", "mlp_dec", "mlp_attn"))):
            return None  # a class of that name without SpeechBrain's layers is something else
        if relation == "subclass":
            return (f"{qualified_name(type(module))} subclasses SpeechBrain's {class_name}: its forward may differ, "
                    f"so it is not swapped")
        reason = unsupported_option(module, location=location)
        if reason is not None:
            prefix = "" if relation == "class" else f"a {class_name} that is not SpeechBrain's: "
            return prefix + reason
        return replacement(module, backend=backend)

    adapter.__name__ = adapter.__qualname__ = f"speechbrain_{class_name}"
    return adapter


swap_location_aware = make_adapter("LocationAwareAttention", FusedLocationAwareAttention, location=True)
swap_content_based = make_adapter("ContentBasedAttention", FusedContentBasedAttention, location=False)
register_adapter(FRAMEWORK, swap_location_aware)
register_adapter(FRAMEWORK, swap_content_based)
