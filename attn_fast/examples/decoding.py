"""Greedy decoding and beam search for `Seq2Seq`, through the decoders' step interface:

    encoder_states, hidden = model.encode(src, src_lengths)
    memory = model.decoder.precompute(encoder_states, src_lengths)          # once per batch
    logits, hidden, weights = model.decoder.step(prev_tokens, hidden, memory, index=..., need_weights=True)

Beam search keeps B * beam decoder rows but only B memory rows: row r = b * beam + k reads memory row b through
`index` [B * beam] (constant for the whole search, since a beam never leaves its batch row), so key_proj and
value are never copied per beam. Only the decoder state, the tokens and the attention history are reordered.

The attention history (the weights of every step, [B, L, S] with L up to max_len) is the one part of decoding
whose size is the product of the output and source lengths: with Seq2Seq's default max_len = 2 S + 10 it grows
with the square of the source length (a 4000-character source: 128 MiB per row, and beam search copies its
history at every step). `need_attention=False` keeps none of it, so memory grows linearly in S; the decoder
steps still compute their weights (`need_weights=True`), so tokens and scores are bit-identical either way.

Generation never emits PAD or BOS: their log-probabilities are set to -inf after the log-softmax over the whole
vocabulary, so the log-probabilities reported are the model's, comparable with a teacher-forced forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attn_fast.nn.additive import AttentionMemory


@dataclass
class Decoded:
    """The decoded sequence of each batch row (the best hypothesis, for beam search).

    tokens     [B, L] int64: the generated tokens, EOS included when generated, pad_id after the end
    lengths    [B] int64: tokens per row, EOS included (== max_len for a row that did not finish)
    scores     [B]: the ranking score (beam search: length-normalized log-probability; greedy: log_probs)
    log_probs  [B]: sum of the log-probabilities of the tokens, EOS included
    attention  [B, L, S]: the attention weights of the step that produced each token (zeros after the end);
               None when decoded with need_attention=False
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor
    attention: torch.Tensor | None

    def to_lists(self, eos_id: int) -> list[list[int]]:
        """Token ids per row, without EOS and padding."""
        rows = []
        for tokens, length in zip(self.tokens.tolist(), self.lengths.tolist()):
            tokens = tokens[:length]
            rows.append(tokens[:-1] if tokens and tokens[-1] == eos_id else tokens)
        return rows


def length_normalized(log_prob: torch.Tensor | float, length: int, length_penalty: float):
    """GNMT (Wu et al. 2016): log p / ((5 + length) / 6) ** alpha. alpha = 0: raw log p; alpha = 1: close to a
    per-token average for long outputs."""
    return log_prob / ((5.0 + length) / 6.0) ** length_penalty


def next_token_log_probs(model, logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> log-probabilities [N, V] (float32 at least), with PAD and BOS forbidden."""
    log_probs = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                                  dim=-1)
    log_probs[:, [model.pad_id, model.bos_id]] = -math.inf
    return log_probs


def _check_max_len(max_len: int) -> None:
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")


def greedy(model, src: torch.Tensor, src_lengths: torch.Tensor, *, max_len: int,
           need_attention: bool = True) -> Decoded:
    """Pick the most likely token at every step until EOS or `max_len` tokens. src [B, S], src_lengths [B].
    `need_attention=False`: no attention history (`Decoded.attention` is None), memory linear in S."""
    _check_max_len(max_len)
    decoder = model.decoder
    encoder_states, hidden = model.encode(src, src_lengths)
    memory = decoder.precompute(encoder_states, src_lengths)
    batch = src.shape[0]
    prev_tokens = src.new_full((batch,), model.bos_id)
    finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=src.device)
    total_log_prob = None
    # One [B, max_len] buffer, not a list of a [B] tensor per step: thousands of small tensors kept alive between
    # each step's [B, S] temporaries fragment the heap, and RSS then grew by ~1.6 S bytes per step (51 MiB at
    # S = 4000 on glibc), quadratic in S again.
    tokens = src.new_full((batch, max_len), model.pad_id)
    attention = []
    for step in range(max_len):
        # need_weights=True even without a history: the step then takes the same path, so tokens are bit-identical.
        logits, hidden, weights = decoder.step(prev_tokens, hidden, memory, need_weights=True)
        best_log_prob, token = next_token_log_probs(model, logits).max(dim=-1)
        token = token.masked_fill(finished, model.pad_id)
        best_log_prob = best_log_prob.masked_fill(finished, 0.0)
        total_log_prob = best_log_prob if total_log_prob is None else total_log_prob + best_log_prob
        tokens[:, step] = token
        if need_attention:
            attention.append(weights.masked_fill(finished[:, None], 0.0))
        lengths += (~finished).long()
        finished |= token == model.eos_id
        prev_tokens = token
        if bool(finished.all()):
            break
    return Decoded(tokens[:, : step + 1].clone(), lengths, total_log_prob, total_log_prob,
                   torch.stack(attention, 1) if need_attention else None)


@dataclass
class _Hypothesis:
    score: float  # length-normalized
    log_prob: float
    tokens: torch.Tensor  # [L]
    attention: torch.Tensor | None  # [L, S], or None without an attention history


def beam_search(model, src: torch.Tensor, src_lengths: torch.Tensor, *, beam_size: int, max_len: int,
                length_penalty: float = 0.6, copy_memory: bool = False, need_attention: bool = True) -> Decoded:
    """Batched beam search; returns the best finished hypothesis of each batch row.

    Each step scores all beam_size * V extensions of the live beams and takes the best 2 * beam_size (as
    fairseq): an EOS extension ranked within the first beam_size is a finished hypothesis (scored with
    `length_normalized`), and the best beam_size non-EOS extensions live on, so a finished hypothesis never
    costs a live beam. A batch row is done once it holds beam_size finished hypotheses; at `max_len` the live
    beams are finished as they are (without EOS). At the start only one beam is live, so that the beams do not
    all repeat the same extension. beam_size 1 is greedy decoding.

    The decoder rows (B * beam_size) read the B encoder-memory rows through `index`; `copy_memory=True` copies
    the memory per beam instead (for tests comparing the two). `need_attention=False` keeps no attention history
    (`Decoded.attention` is None): with one, every step copies the [B * beam, t, S] history of the live beams.
    """
    _check_max_len(max_len)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    decoder = model.decoder
    device, batch, beam = src.device, src.shape[0], beam_size
    encoder_states, hidden = model.encode(src, src_lengths)
    memory = decoder.precompute(encoder_states, src_lengths)

    memory_row = torch.arange(batch, device=device).repeat_interleave(beam)  # [B*K]: row b*K + k reads b
    if copy_memory:
        memory = AttentionMemory(memory.key_proj[memory_row], memory.value[memory_row],
                                 memory.key_lengths[memory_row])
        index = None
    else:
        index = memory_row
    hidden = hidden[memory_row]  # the decoder state is per beam; the memory is not
    prev_tokens = src.new_full((batch * beam,), model.bos_id)
    score_dtype = torch.promote_types(encoder_states.dtype, torch.float32)  # as next_token_log_probs
    beam_log_probs = torch.full((batch, beam), -math.inf, dtype=score_dtype, device=device)
    beam_log_probs[:, 0] = 0.0  # one live beam at the start
    token_history = src.new_empty(batch * beam, 0)  # [B*K, t]
    # [B*K, t, S], or None: the only state whose size is steps x source length.
    attention_history = encoder_states.new_empty(batch * beam, 0, src.shape[1]) if need_attention else None
    finished: list[list[_Hypothesis]] = [[] for _ in range(batch)]
    done = [False] * batch
    rank = torch.arange(2 * beam, device=device)

    for step in range(max_len):
        # need_weights=True even without a history: the step then takes the same path, so tokens are bit-identical.
        logits, hidden, weights = decoder.step(prev_tokens, hidden, memory, index=index, need_weights=True)
        log_probs = next_token_log_probs(model, logits)  # [B*K, V]
        vocab = log_probs.shape[-1]
        candidates = (beam_log_probs[:, :, None] + log_probs.view(batch, beam, vocab)).view(batch, beam * vocab)
        top_scores, top_ids = candidates.topk(min(2 * beam, beam * vocab), dim=1)  # [B, 2K], best first
        top_tokens = top_ids % vocab
        source_rows = torch.arange(batch, device=device)[:, None] * beam + top_ids // vocab  # rows of B*K
        is_eos = top_tokens == model.eos_id
        alive = torch.isfinite(top_scores)

        # Finished hypotheses: EOS extensions ranked within the first K.
        ends = is_eos & alive & (rank[: top_ids.shape[1]] < beam)
        for b, c in ends.nonzero().tolist():
            if not done[b]:
                row = int(source_rows[b, c])
                log_prob = float(top_scores[b, c])
                finished[b].append(_Hypothesis(
                    length_normalized(log_prob, step + 1, length_penalty), log_prob,
                    torch.cat([token_history[row], top_tokens[b, c].view(1)]),
                    torch.cat([attention_history[row], weights[row][None]]) if need_attention else None))

        # Live beams: the best K non-EOS extensions (there are at least K among the top 2K).
        order = torch.argsort(rank[: top_ids.shape[1]] + is_eos.long() * 2 * beam, dim=1, stable=True)[:, :beam]
        beam_log_probs = top_scores.gather(1, order)
        next_tokens = top_tokens.gather(1, order)
        beam_log_probs = beam_log_probs.masked_fill(next_tokens == model.eos_id, -math.inf)  # only if V is tiny
        rows = source_rows.gather(1, order).view(-1)
        prev_tokens = next_tokens.view(-1)
        hidden = hidden[rows]
        token_history = torch.cat([token_history[rows], prev_tokens[:, None]], dim=1)
        if need_attention:
            attention_history = torch.cat([attention_history[rows], weights[rows][:, None]], dim=1)

        if step == max_len - 1:  # out of room: the live beams finish as they are
            for b in range(batch):
                for k in range(beam):
                    log_prob = float(beam_log_probs[b, k])
                    if not done[b] and math.isfinite(log_prob):
                        row = b * beam + k
                        finished[b].append(_Hypothesis(
                            length_normalized(log_prob, max_len, length_penalty), log_prob, token_history[row],
                            attention_history[row] if need_attention else None))
        done = [done[b] or len(finished[b]) >= beam for b in range(batch)]
        if all(done):
            break

    best = [max(hypotheses, key=lambda h: h.score) for hypotheses in finished]
    return _pack(best, model.pad_id, src.shape[1], encoder_states.dtype, device, need_attention)


def _pack(hypotheses: list[_Hypothesis], pad_id: int, src_len: int, dtype, device, need_attention: bool) -> Decoded:
    """One hypothesis per batch row -> padded tensors (attention [B, L, S] of `dtype` when `need_attention`)."""
    lengths = torch.tensor([len(h.tokens) for h in hypotheses], dtype=torch.long, device=device)
    width = int(lengths.max()) if hypotheses else 0
    tokens = torch.full((len(hypotheses), width), pad_id, dtype=torch.long, device=device)
    attention = (torch.zeros(len(hypotheses), width, src_len, dtype=dtype, device=device) if need_attention
                 else None)
    for b, h in enumerate(hypotheses):
        tokens[b, : len(h.tokens)] = h.tokens
        if need_attention:
            attention[b, : len(h.tokens)] = h.attention
    scores = torch.tensor([h.score for h in hypotheses], dtype=torch.float64, device=device)
    log_probs = torch.tensor([h.log_prob for h in hypotheses], dtype=torch.float64, device=device)
    return Decoded(tokens, lengths, scores, log_probs, attention)
