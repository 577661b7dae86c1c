"""Seq2Seq on the public attention layer: shapes and masking, the Bahdanau decoder against a naive loop over the
reference attention, teacher forcing against the step path, greedy against beam search, beam search with `index`
against copied memory and against exhaustive search, and a short training sanity check."""
import copy
import itertools
import math

import pytest
import torch

import attn_fast
from attn_fast.examples.decoding import length_normalized
from attn_fast.examples.seq2seq.model import Seq2Seq

PAD, BOS, EOS = 0, 1, 2
DECODERS = ["bahdanau", "parallel"]


def tiny_model(decoder, *, src_vocab=13, tgt_vocab=11, dtype=torch.float64, backend="torch", **kwargs):
    options = dict(embed_dim=8, hidden_dim=10, attn_dim=7, decoder=decoder, attention_backend=backend,
                   pad_id=PAD, bos_id=BOS, eos_id=EOS)
    options.update(kwargs)
    model = Seq2Seq(src_vocab, tgt_vocab, **options).to(dtype)
    return model.eval()


def source_batch(lengths, vocab=13, extra_padding=2):
    """src [B, S] padded with PAD (S = max length + extra_padding), src_lengths [B]."""
    lengths = torch.tensor(lengths)
    src_len = int(lengths.max()) + extra_padding
    src = torch.randint(3, vocab, (len(lengths), src_len))
    src[torch.arange(src_len)[None, :] >= lengths[:, None]] = PAD
    return src, lengths


def target_batch(batch, tgt_len, vocab=11):
    """tgt_in [B, T] starting with BOS."""
    tgt_in = torch.randint(3, vocab, (batch, tgt_len))
    tgt_in[:, 0] = BOS
    return tgt_in


def valid_source(src_lengths, src_len):
    return torch.arange(src_len)[None, :] < src_lengths[:, None]  # [B, S]


@pytest.mark.parametrize("decoder", DECODERS)
def test_shapes_and_source_masking(decoder):
    model = tiny_model(decoder)
    src, src_lengths = source_batch([6, 2, 4, 1])
    tgt_in = target_batch(4, 5)
    logits, weights = model(src, src_lengths, tgt_in, need_weights=True)
    assert logits.shape == (4, 5, 11) and weights.shape == (4, 5, src.shape[1])
    assert model(src, src_lengths, tgt_in)[1] is None

    valid = valid_source(src_lengths, src.shape[1])[:, None, :].expand_as(weights)
    assert torch.all(weights[~valid] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 5, dtype=weights.dtype))

    # Tokens behind src_lengths are never read: replace them, and nothing changes.
    other_src = src.clone()
    other_src[~valid_source(src_lengths, src.shape[1])] = 7
    other_logits, other_weights = model(other_src, src_lengths, tgt_in, need_weights=True)
    assert torch.equal(other_logits, logits) and torch.equal(other_weights, weights)
    assert torch.equal(model.greedy(other_src, src_lengths, 6).tokens, model.greedy(src, src_lengths, 6).tokens)


def test_encoder_packs_by_length():
    """Forward states stop at the last real token; the backward final state (for s_0) has read the whole
    source; padded positions are zero."""
    model = tiny_model("bahdanau")
    src, src_lengths = source_batch([5, 2, 3])
    states, backward_final = model.encoder(src, src_lengths)
    hidden = model.encoder.rnn.hidden_size
    assert states.shape == (3, src.shape[1], 2 * hidden)
    torch.testing.assert_close(backward_final, states[:, 0, hidden:])
    assert torch.all(states[~valid_source(src_lengths, src.shape[1])] == 0)
    for b, length in enumerate(src_lengths.tolist()):  # each row alone, unpadded, gives the same states
        alone, alone_final = model.encoder(src[b:b + 1, :length], src_lengths[b:b + 1])
        torch.testing.assert_close(alone[0], states[b, :length])
        torch.testing.assert_close(alone_final[0], backward_final[b])


def naive_bahdanau_logits(model, src, src_lengths, tgt_in):
    """The paper's decoder written out by hand over `attn_fast.additive_attention_reference`, reading the
    model's weights: query s_{i-1}, GRU input [E y_{i-1}; c_i], readout from [s_i; c_i; E y_{i-1}]."""
    dec = model.decoder
    encoder_states, backward_final = model.encoder(src, src_lengths)
    hidden = torch.tanh(backward_final @ dec.init_state.weight.T + dec.init_state.bias)
    attention = dec.attention
    key_proj = encoder_states @ attention.key_layer.weight.T
    w_ih, w_hh, b_ih, b_hh = dec.cell.weight_ih, dec.cell.weight_hh, dec.cell.bias_ih, dec.cell.bias_hh
    logits = []
    for i in range(tgt_in.shape[1]):
        query_proj = hidden @ attention.query_layer.weight.T + attention.query_layer.bias
        context, _ = attn_fast.additive_attention_reference(query_proj[:, None], key_proj, encoder_states,
                                                            attention.v, key_lengths=src_lengths)
        context = context[:, 0]
        embedded = dec.embedding.weight[tgt_in[:, i]]
        x = torch.cat([embedded, context], dim=-1)
        gates_x = (x @ w_ih.T + b_ih).chunk(3, dim=-1)
        gates_h = (hidden @ w_hh.T + b_hh).chunk(3, dim=-1)
        reset = torch.sigmoid(gates_x[0] + gates_h[0])
        update = torch.sigmoid(gates_x[1] + gates_h[1])
        candidate = torch.tanh(gates_x[2] + reset * gates_h[2])
        hidden = (1 - update) * candidate + update * hidden
        readout = torch.tanh(torch.cat([hidden, context, embedded], -1) @ dec.readout.weight.T + dec.readout.bias)
        logits.append(readout @ dec.output.weight.T + dec.output.bias)
    return torch.stack(logits, 1)


def test_bahdanau_decoder_matches_naive_reference_loop():
    model = tiny_model("bahdanau", dtype=torch.float64, backend="torch")
    src, src_lengths = source_batch([4, 7, 1])
    tgt_in = target_batch(3, 6)
    logits, _ = model(src, src_lengths, tgt_in)
    expected = naive_bahdanau_logits(model, src, src_lengths, tgt_in)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decoder", DECODERS)
def test_teacher_forcing_equals_step_path(decoder):
    """forward (for "parallel": one nn.GRU call, one attention call over all steps) == decoder.step per token."""
    model = tiny_model(decoder, dtype=torch.float64)
    src, src_lengths = source_batch([5, 3, 2])
    tgt_in = target_batch(3, 7)
    logits, weights = model(src, src_lengths, tgt_in, need_weights=True)

    encoder_states, hidden = model.encode(src, src_lengths)
    memory = model.decoder.precompute(encoder_states, src_lengths)
    for i in range(tgt_in.shape[1]):
        step_logits, hidden, step_weights = model.decoder.step(tgt_in[:, i], hidden, memory, need_weights=True)
        torch.testing.assert_close(step_logits, logits[:, i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step_weights, weights[:, i], rtol=1e-10, atol=1e-10)


def sharpen(model):
    """Peakier output distributions, so that decoded rows end (EOS) at different steps."""
    with torch.no_grad():
        model.decoder.output.weight.mul_(4.0)
        model.decoder.readout.weight.mul_(2.0)
    return model


def assert_matches_teacher_forcing(model, src, src_lengths, decoded):
    """Feeding the decoded tokens back with teacher forcing gives the same log-probabilities and attention."""
    batch, width = decoded.tokens.shape
    tgt_in = torch.cat([torch.full((batch, 1), BOS), decoded.tokens[:, :-1]], dim=1)
    logits, weights = model(src, src_lengths, tgt_in, need_weights=True)
    token_log_probs = torch.log_softmax(logits, -1).gather(-1, decoded.tokens[..., None])[..., 0]
    generated = torch.arange(width)[None, :] < decoded.lengths[:, None]  # [B, L]
    torch.testing.assert_close(decoded.log_probs, (token_log_probs * generated).sum(1).to(decoded.log_probs.dtype))
    torch.testing.assert_close(decoded.attention, weights * generated[..., None])
    assert torch.all(decoded.tokens[~generated] == PAD)
    return logits, generated


@pytest.mark.parametrize("decoder", DECODERS)
def test_greedy_scores_and_attention_match_teacher_forcing(decoder):
    model = sharpen(tiny_model(decoder))
    src, src_lengths = source_batch([5, 3, 6, 1, 4])
    max_len = 8
    decoded = model.greedy(src, src_lengths, max_len=max_len)
    assert len(set(decoded.lengths.tolist())) > 1  # rows end at different steps
    logits, generated = assert_matches_teacher_forcing(model, src, src_lengths, decoded)
    # Greedy really is greedy: each token is the argmax among the tokens generation may emit.
    allowed = torch.log_softmax(logits, -1)
    allowed[..., [PAD, BOS]] = -math.inf
    assert torch.equal(decoded.tokens[generated], allowed.argmax(-1)[generated])
    ended = decoded.lengths < max_len
    assert torch.all(decoded.tokens[ended, decoded.lengths[ended] - 1] == EOS)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_size_one_is_greedy(decoder):
    model = sharpen(tiny_model(decoder))
    src, src_lengths = source_batch([5, 3, 6, 1, 4])
    greedy = model.greedy(src, src_lengths, max_len=9)
    beam = model.beam_search(src, src_lengths, beam_size=1, max_len=9, length_penalty=0.6)
    assert torch.equal(beam.tokens, greedy.tokens) and torch.equal(beam.lengths, greedy.lengths)
    torch.testing.assert_close(beam.log_probs, greedy.log_probs.to(beam.log_probs.dtype))
    torch.testing.assert_close(beam.attention, greedy.attention)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_search_with_index_equals_copied_memory(decoder, monkeypatch):
    model = sharpen(tiny_model(decoder, dtype=torch.float32))
    src, src_lengths = source_batch([5, 3, 6, 1, 4])
    calls = []  # (memory rows, index rows or None) of every attention step
    step = model.decoder.attention.step

    def spy(query, memory, *, index=None, **kwargs):
        calls.append((memory.key_proj.shape[0], None if index is None else index.shape[0]))
        return step(query, memory, index=index, **kwargs)

    monkeypatch.setattr(model.decoder.attention, "step", spy)
    shared = model.beam_search(src, src_lengths, beam_size=3, max_len=8)
    assert calls and set(calls) == {(5, 15)}  # B memory rows read by B * beam query rows
    calls.clear()
    copied = model.beam_search(src, src_lengths, beam_size=3, max_len=8, _copy_memory=True)
    assert calls and set(calls) == {(15, None)}
    assert len(set(shared.lengths.tolist())) > 1
    assert_matches_teacher_forcing(model, src, src_lengths, shared)
    assert torch.equal(shared.tokens, copied.tokens) and torch.equal(shared.lengths, copied.lengths)
    torch.testing.assert_close(shared.scores, copied.scores)
    torch.testing.assert_close(shared.attention, copied.attention)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_search_with_wide_beam_is_exhaustive_search(decoder):
    """With more beams than live prefixes, beam search must return the best of all hypotheses: each EOS-ended
    sequence up to max_len, and each unfinished sequence of max_len tokens, scored with the length penalty."""
    vocab, max_len, length_penalty = 5, 3, 1.0  # tokens PAD, BOS, EOS, 3, 4
    model = sharpen(tiny_model(decoder, tgt_vocab=vocab))
    src, src_lengths = source_batch([4, 2, 5, 3, 1, 6])
    decoded = model.beam_search(src, src_lengths, beam_size=12, max_len=max_len, length_penalty=length_penalty)

    words = [EOS, 3, 4]
    hypotheses = [list(p) + [EOS] for n in range(max_len) for p in itertools.product([3, 4], repeat=n)]
    hypotheses += [list(p) for p in itertools.product([3, 4], repeat=max_len)]
    assert len(hypotheses) == 15 and all(t in words for h in hypotheses for t in h)
    for b in range(src.shape[0]):
        best_score, best = -math.inf, None
        for tokens in hypotheses:
            tgt = torch.tensor([[BOS] + tokens[:-1]])
            logits, _ = model(src[b:b + 1], src_lengths[b:b + 1], tgt)
            log_prob = torch.log_softmax(logits, -1)[0, torch.arange(len(tokens)), tokens].sum().item()
            score = length_normalized(log_prob, len(tokens), length_penalty)
            if score > best_score:
                best_score, best = score, tokens
        length = int(decoded.lengths[b])
        assert decoded.tokens[b, :length].tolist() == best
        assert decoded.scores[b].item() == pytest.approx(best_score, rel=1e-9)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoded_attention_rows_sum_to_one_over_valid_source(decoder):
    model = sharpen(tiny_model(decoder, dtype=torch.float32))
    src, src_lengths = source_batch([5, 2, 7, 1, 4], extra_padding=3)
    valid = valid_source(src_lengths, src.shape[1])[:, None, :]
    greedy = model.greedy(src, src_lengths, max_len=7)
    assert len(set(greedy.lengths.tolist())) > 1  # rows end at different steps: padded steps to check
    for decoded in (greedy, model.beam_search(src, src_lengths, beam_size=4, max_len=7)):
        steps = torch.arange(decoded.tokens.shape[1])[None, :] < decoded.lengths[:, None]  # [B, L]
        attention = decoded.attention
        assert torch.all((attention >= 0) & (attention <= 1))
        torch.testing.assert_close((attention * valid).sum(-1)[steps], torch.ones(int(steps.sum())))
        assert torch.all(attention.masked_select(~valid) == 0)
        assert torch.all(attention[~steps] == 0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_attention_backends_agree_through_the_model(decoder):
    """The model only talks to the public layer: the torch backend and the naive reference give the same
    logits, weights and parameter gradients (float64)."""
    model = tiny_model(decoder, dtype=torch.float64, backend="torch")
    reference_model = copy.deepcopy(model)
    reference_model.decoder.attention.backend = "reference"
    src, src_lengths = source_batch([5, 3, 1])
    tgt_in = target_batch(3, 4)
    tgt_out = torch.randint(2, 11, (3, 4))
    for m in (model, reference_model):
        m.loss(src, src_lengths, tgt_in, tgt_out).backward()
    torch.testing.assert_close(model(src, src_lengths, tgt_in, need_weights=True),
                               reference_model(src, src_lengths, tgt_in, need_weights=True), rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_loss_ignores_padding():
    model = tiny_model("parallel")
    src, src_lengths = source_batch([4, 2])
    tgt_in = target_batch(2, 5)
    tgt_out = torch.randint(3, 11, (2, 5))
    tgt_out[1, 3:] = PAD
    logits, _ = model(src, src_lengths, tgt_in)
    real = tgt_out != PAD
    expected = -torch.log_softmax(logits, -1).gather(-1, tgt_out[..., None])[..., 0][real].mean()
    torch.testing.assert_close(model.loss(src, src_lengths, tgt_in, tgt_out), expected)


def copy_task_batch(batch, vocab, max_len):
    """Copy the source: src of random lengths; tgt_in = BOS + src, tgt_out = src + EOS."""
    lengths = torch.randint(2, max_len + 1, (batch,))
    src = torch.randint(3, vocab, (batch, max_len))
    src[torch.arange(max_len)[None, :] >= lengths[:, None]] = PAD
    tgt_in = torch.cat([torch.full((batch, 1), BOS), src], 1)
    tgt_out = torch.cat([src, torch.full((batch, 1), PAD)], 1)
    tgt_out[torch.arange(batch), lengths] = EOS
    return src, lengths, tgt_in, tgt_out


@pytest.mark.parametrize("decoder", DECODERS)
def test_loss_decreases_on_copy_task(decoder):
    torch.manual_seed(1)
    model = Seq2Seq(8, 8, embed_dim=16, hidden_dim=24, attn_dim=16, decoder=decoder, attention_backend="torch",
                    dropout=0.1, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = copy_task_batch(32, 8, 6)
    model.eval()
    with torch.no_grad():
        initial = model.loss(*batch).item()
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model.loss(*batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = model.loss(*batch).item()
    assert final < 0.6 * initial, (initial, final)


def test_bad_arguments():
    model = tiny_model("bahdanau")
    src, src_lengths = source_batch([3, 2])
    with pytest.raises(ValueError, match="decoder"):
        Seq2Seq(5, 5, decoder="luong")
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, torch.tensor([3, 0]), target_batch(2, 3))
    with pytest.raises(ValueError, match="beam_size"):
        model.beam_search(src, src_lengths, beam_size=0, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model.greedy(src, src_lengths, max_len=0)
