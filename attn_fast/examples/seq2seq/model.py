"""An RNN encoder-decoder with additive attention (Bahdanau et al. 2014, "Neural Machine Translation by Jointly
Learning to Align and Translate"), built on the public `attn_fast.AdditiveAttention` layer only.

    Encoder          embedding + bidirectional GRU over the (packed) source: states h_1..h_S [B, S, 2H]
    BahdanauDecoder  the paper's decoder, one step at a time: the previous state s_{i-1} attends, giving c_i;
                     s_i = GRU([E y_{i-1}; c_i], s_{i-1});  logits from [s_i; c_i; E y_{i-1}]
    ParallelDecoder  the GRU runs first over the teacher-forced targets, then ONE attention call covers every
                     decoder step (query s_i): the shape where a fused all-steps kernel pays;
                     logits from [s_i; c_i]
    Seq2Seq          encoder + either decoder, the loss, greedy decoding and beam search (`decoding.py`)

Token conventions are the caller's: `pad_id`, `bos_id`, `eos_id` are given to `Seq2Seq`. Batches are
src [B, S] int64 (padded with pad_id) with src_lengths [B] int64 (each >= 1), tgt_in [B, T] (BOS first) and
tgt_out [B, T] (EOS last), PAD after the end.

Both decoders expose the same step interface, which is all that greedy and beam search use:

    hidden = decoder.initial_hidden(encoder_final)                       # [B, H]
    memory = decoder.precompute(encoder_states, src_lengths)             # AttentionMemory, once per batch
    logits, hidden, weights = decoder.step(prev_tokens, hidden, memory, index=..., need_weights=...)

Variants from the paper, documented: the readout is a tanh layer instead of a maxout layer, and it reads s_i (the
state after this step's update, as in most implementations) instead of s_{i-1}.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from attn_fast.examples import decoding
from attn_fast.nn.additive import AdditiveAttention, AttentionMemory


class Encoder(nn.Module):
    """Embedding + one-layer bidirectional GRU over packed sequences.

    forward(src [B, S], src_lengths [B]) -> states [B, S, 2H] (zeros at padded positions; forward and backward
    states concatenated), backward_final [B, H] (the backward GRU's state after reading the whole source,
    the paper's h_1-backward, from which the decoder's initial state is computed).
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, *, pad_id: int, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(embed_dim, hidden_dim, batch_first=True, bidirectional=True)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.dropout(self.embedding(src))  # [B, S, E]
        packed = nn.utils.rnn.pack_padded_sequence(embedded, src_lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        packed_states, final = self.rnn(packed)  # final [2, B, H]: (forward, backward), in the input order
        states, _ = nn.utils.rnn.pad_packed_sequence(packed_states, batch_first=True, total_length=src.shape[1])
        return states, final[1]


class DecoderBase(nn.Module):
    """What both decoders share: target embedding, the attention layer, the initial state, the memory."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, encoder_dim: int, attn_dim: int, *,
                 pad_id: int, dropout: float = 0.0, attention_backend: str = "auto"):
        super().__init__()
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.attention = AdditiveAttention(hidden_dim, encoder_dim, attn_dim, backend=attention_backend)
        self.init_state = nn.Linear(encoder_dim // 2, hidden_dim)  # s_0 = tanh(W_s h_1-backward), as the paper

    def initial_hidden(self, encoder_final: torch.Tensor) -> torch.Tensor:
        """encoder_final [B, H_enc] (backward final state) -> s_0 [B, H]."""
        return torch.tanh(self.init_state(encoder_final))

    def precompute(self, encoder_states: torch.Tensor, src_lengths: torch.Tensor) -> AttentionMemory:
        """Project the encoder states once per batch: memory for `step`. encoder_states [B, S, 2H_enc]."""
        return self.attention.precompute(encoder_states, key_lengths=src_lengths)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embedding(tokens))


class BahdanauDecoder(DecoderBase):
    """The paper's decoder, step by step: attend with s_{i-1}, update with [E y_{i-1}; c_i], read out.

        c_i, a_i = attention(s_{i-1}, h)            a_i [B, S]
        s_i      = GRUCell([E y_{i-1}; c_i], s_{i-1})
        logits_i = W_o tanh(W_t [s_i; c_i; E y_{i-1}])
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, encoder_dim: int, attn_dim: int, *,
                 pad_id: int, dropout: float = 0.0, attention_backend: str = "auto"):
        super().__init__(vocab_size, embed_dim, hidden_dim, encoder_dim, attn_dim, pad_id=pad_id,
                         dropout=dropout, attention_backend=attention_backend)
        self.cell = nn.GRUCell(embed_dim + encoder_dim, hidden_dim)
        self.readout = nn.Linear(hidden_dim + encoder_dim + embed_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def logits(self, hidden: torch.Tensor, context: torch.Tensor, prev_embedded: torch.Tensor) -> torch.Tensor:
        """[..., H], [..., D], [..., E] -> logits [..., V]."""
        readout = torch.tanh(self.readout(torch.cat([hidden, context, prev_embedded], dim=-1)))
        return self.output(self.dropout(readout))

    def recur(self, prev_embedded: torch.Tensor, hidden: torch.Tensor, memory: AttentionMemory, *,
              index: torch.Tensor | None = None, need_weights: bool = False):
        """One recurrence step without the readout: E y_{i-1} [B', E], s_{i-1} [B', H] ->
        s_i [B', H], c_i [B', D], a_i [B', S] or None."""
        context, weights = self.attention.step(hidden, memory, index=index, need_weights=need_weights)
        hidden = self.cell(torch.cat([prev_embedded, context], dim=-1), hidden)
        return hidden, context, weights

    def step(self, prev_tokens: torch.Tensor, hidden: torch.Tensor, memory: AttentionMemory, *,
             index: torch.Tensor | None = None, need_weights: bool = False):
        """y_{i-1} [B'] int64, s_{i-1} [B', H] -> logits [B', V], s_i [B', H], weights [B', S] or None.
        `index` [B'] maps each row to its memory row (beam search)."""
        prev_embedded = self.embed(prev_tokens)
        hidden, context, weights = self.recur(prev_embedded, hidden, memory, index=index, need_weights=need_weights)
        return self.logits(hidden, context, prev_embedded), hidden, weights

    def forward(self, tgt_in: torch.Tensor, encoder_states: torch.Tensor, src_lengths: torch.Tensor,
                initial_hidden: torch.Tensor, *, need_weights: bool = False):
        """Teacher forcing. tgt_in [B, T], encoder_states [B, S, D], src_lengths [B], initial_hidden [B, H] ->
        logits [B, T, V], weights [B, T, S] or None."""
        memory = self.precompute(encoder_states, src_lengths)
        embedded = self.embed(tgt_in)  # [B, T, E]
        hidden, states, contexts, all_weights = initial_hidden, [], [], []
        for i in range(tgt_in.shape[1]):
            hidden, context, weights = self.recur(embedded[:, i], hidden, memory, need_weights=need_weights)
            states.append(hidden)
            contexts.append(context)
            all_weights.append(weights)
        logits = self.logits(torch.stack(states, 1), torch.stack(contexts, 1), embedded)  # one readout call
        return logits, (torch.stack(all_weights, 1) if need_weights else None)


class ParallelDecoder(DecoderBase):
    """Attention after the recurrence (query s_i), so teacher forcing needs one attention call for all steps.

        s_1..s_T  = GRU(E y_0..E y_{T-1}, s_0)          one nn.GRU call
        c, a      = attention(s, h)                     one call: a [B, T, S]
        logits_i  = W_o tanh(W_t [s_i; c_i])

    Generation runs the same parameters one token at a time (nn.GRU over a length-1 sequence, attention.step).
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, encoder_dim: int, attn_dim: int, *,
                 pad_id: int, dropout: float = 0.0, attention_backend: str = "auto"):
        super().__init__(vocab_size, embed_dim, hidden_dim, encoder_dim, attn_dim, pad_id=pad_id,
                         dropout=dropout, attention_backend=attention_backend)
        self.rnn = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.readout = nn.Linear(hidden_dim + encoder_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def logits(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """[..., H], [..., D] -> logits [..., V]."""
        return self.output(self.dropout(torch.tanh(self.readout(torch.cat([hidden, context], dim=-1)))))

    def step(self, prev_tokens: torch.Tensor, hidden: torch.Tensor, memory: AttentionMemory, *,
             index: torch.Tensor | None = None, need_weights: bool = False):
        """y_{i-1} [B'] int64, s_{i-1} [B', H] -> logits [B', V], s_i [B', H], weights [B', S] or None."""
        prev_embedded = self.embed(prev_tokens)[:, None]  # [B', 1, E]
        _, hidden = self.rnn(prev_embedded, hidden[None].contiguous())
        hidden = hidden[0]
        context, weights = self.attention.step(hidden, memory, index=index, need_weights=need_weights)
        return self.logits(hidden, context), hidden, weights

    def forward(self, tgt_in: torch.Tensor, encoder_states: torch.Tensor, src_lengths: torch.Tensor,
                initial_hidden: torch.Tensor, *, need_weights: bool = False):
        """Teacher forcing. tgt_in [B, T], encoder_states [B, S, D], src_lengths [B], initial_hidden [B, H] ->
        logits [B, T, V], weights [B, T, S] or None."""
        states, _ = self.rnn(self.embed(tgt_in), initial_hidden[None].contiguous())  # [B, T, H]
        context, weights = self.attention(states, encoder_states, key_lengths=src_lengths,
                                          need_weights=need_weights)  # all T steps in one call
        return self.logits(states, context), weights


DECODERS = {"bahdanau": BahdanauDecoder, "parallel": ParallelDecoder}


class Seq2Seq(nn.Module):
    """Encoder-decoder with additive attention.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        embed_dim: E, size of the token embeddings (source and target).
        hidden_dim: H, size of each encoder direction and of the decoder state; encoder states are 2H.
        attn_dim: A, size of the attention's hidden layer.
        decoder: "bahdanau" (the paper's step-by-step decoder) or "parallel" (attention after the GRU).
        attention_backend: backend of the `AdditiveAttention` layer ("auto", "triton", "torch", "reference").
        dropout: on embeddings and the readout layer.
        pad_id, bos_id, eos_id: the caller's special tokens.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, *, embed_dim: int = 256, hidden_dim: int = 512,
                 attn_dim: int = 256, decoder: str = "bahdanau", attention_backend: str = "auto",
                 dropout: float = 0.0, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.encoder = Encoder(src_vocab_size, embed_dim, hidden_dim, pad_id=pad_id, dropout=dropout)
        self.decoder = DECODERS[decoder](tgt_vocab_size, embed_dim, hidden_dim, 2 * hidden_dim, attn_dim,
                                         pad_id=pad_id, dropout=dropout, attention_backend=attention_backend)

    def _check_source(self, src: torch.Tensor, src_lengths: torch.Tensor) -> None:
        if src.dim() != 2 or src_lengths.shape != (src.shape[0],):
            raise ValueError(f"src must be [B, S] and src_lengths [B], got {tuple(src.shape)} and "
                             f"{tuple(src_lengths.shape)}")
        if src.shape[0] > 0 and not (1 <= int(src_lengths.min()) and int(src_lengths.max()) <= src.shape[1]):
            raise ValueError(f"src_lengths must lie in [1, S={src.shape[1]}], got {src_lengths.tolist()}")

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B, S], src_lengths [B] -> encoder_states [B, S, 2H], initial decoder state s_0 [B, H]."""
        self._check_source(src, src_lengths)
        encoder_states, backward_final = self.encoder(src, src_lengths)
        return encoder_states, self.decoder.initial_hidden(backward_final)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor, *,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: src [B, S], src_lengths [B], tgt_in [B, T] -> logits [B, T, V] and, with
        `need_weights`, attention weights [B, T, S] (else None)."""
        encoder_states, initial_hidden = self.encode(src, src_lengths)
        return self.decoder(tgt_in, encoder_states, src_lengths, initial_hidden, need_weights=need_weights)

    def loss(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor, *,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy over the non-PAD target tokens of tgt_out [B, T]."""
        logits, _ = self(src, src_lengths, tgt_in)
        return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=self.pad_id,
                               label_smoothing=label_smoothing)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, src_lengths: torch.Tensor, max_len: int | None = None, *,
               need_attention: bool = True) -> decoding.Decoded:
        """Greedy decoding (call `.eval()` first to switch dropout off). max_len defaults to 2 * S + 10 tokens,
        EOS included. `need_attention=False` keeps no attention history (`Decoded.attention` is None), so memory
        grows linearly in S instead of with S². See `decoding.greedy`."""
        return decoding.greedy(self, src, src_lengths, max_len=_default_max_len(src, max_len),
                               need_attention=need_attention)

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int = 4,
                    max_len: int | None = None, length_penalty: float = 0.6, *, need_attention: bool = True,
                    _copy_memory: bool = False) -> decoding.Decoded:
        """Beam search, batched over B, sharing the encoder memory across beams (`AttentionMemory` + `index`).
        Scores are GNMT-normalized: log p / ((5 + len) / 6) ** length_penalty (0 = raw log-probability).
        `need_attention=False` keeps no attention history (memory linear in S, as `greedy`). `_copy_memory`
        (tests) copies the memory per beam instead. See `decoding.beam_search`."""
        return decoding.beam_search(self, src, src_lengths, beam_size=beam_size,
                                    max_len=_default_max_len(src, max_len), length_penalty=length_penalty,
                                    copy_memory=_copy_memory, need_attention=need_attention)


def _default_max_len(src: torch.Tensor, max_len: int | None) -> int:
    return 2 * src.shape[1] + 10 if max_len is None else max_len
