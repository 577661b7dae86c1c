"""The Show, Attend and Tell model: shapes, the decoder against a hand-written loop, the doubly stochastic penalty
against its formula and its gradient reaching the attention through the returned weights, decoding against
teacher forcing, beam size 1 against greedy, beam search with `index` against copied memory, and the same
decoding on the Triton kernels (interpreter on CPU)."""
import copy

import pytest
import torch

import attn_fast
from attn_fast.examples.captioning.model import Captioner, doubly_stochastic_penalty

PAD, BOS, EOS, VOCAB = 0, 1, 2, 9
BACKENDS = ["torch", "triton"]


def tiny_captioner(*, dtype=torch.float64, backend="torch", image_size=24, **kwargs):
    options = dict(embed_dim=6, hidden_dim=10, attn_dim=7, channels=8, image_size=image_size,
                   attention_backend=backend)
    options.update(kwargs)
    return Captioner(VOCAB, **options).to(dtype).eval()


def sharpen(model, std=0.5):
    """Redraw every parameter from N(0, std²): an untrained model at its default scale says nearly the same thing
    for every image; this one makes confident, image-dependent choices and ends rows at different lengths."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def decoding_captioner(backend):
    """A float32 model for the decoding tests, started from the mean annotation: the first steps then depend on
    the image, so that the rows of a random batch end at different steps (untrained and started from zero they
    all say the same). The decoding code is the same for both initial states."""
    return tiny_captioner(dtype=torch.float32, backend=backend, initial_state="mean")


def images_like(model, batch):
    size = model.encoder.image_size
    weight = model.decoder.output.weight
    return torch.rand(batch, 3, size, size, dtype=weight.dtype).to(weight.device)


def captions_in(batch, length):
    tgt_in = torch.randint(3, VOCAB, (batch, length))
    tgt_in[:, 0] = BOS
    return tgt_in


def test_shapes_and_normalized_weights():
    model = tiny_captioner()
    images, tgt_in = images_like(model, 4), captions_in(4, 5)
    annotations = model.encoder(images)
    assert annotations.shape == (4, 9, 8) and model.grid == 3
    logits, weights = model(images, tgt_in, need_weights=True)
    assert logits.shape == (4, 5, VOCAB) and weights.shape == (4, 5, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 5, dtype=weights.dtype))
    assert model(images, tgt_in)[1] is None
    with pytest.raises(ValueError, match="images must be"):
        model.encoder(torch.rand(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of 8"):
        Captioner(VOCAB, image_size=20)
    with pytest.raises(ValueError, match="initial_state"):
        Captioner(VOCAB, initial_state="learned")


def naive_logits(model, images, tgt_in):
    """The decoder written out by hand over `attn_fast.additive_attention_reference`, reading the model's weights:
    h0, c0 zero or from the mean annotation, query h_{t-1}, z = σ(W_β h_{t-1}) ⊙ context, LSTM input
    [E y_{t-1}; z], deep output L_o(E y + L_h h_t + L_z z)."""
    dec = model.decoder
    annotations = model.encoder(images)
    mean = annotations.mean(1)
    if dec.initial_state == "mean":
        h, c = torch.tanh(dec.init_h(mean)), torch.tanh(dec.init_c(mean))
    else:
        h = c = mean.new_zeros(mean.shape[0], dec.hidden_dim)
    attention = dec.attention
    key_proj = annotations @ attention.key_layer.weight.T
    logits = []
    for t in range(tgt_in.shape[1]):
        query_proj = h @ attention.query_layer.weight.T + attention.query_layer.bias
        context, _ = attn_fast.additive_attention_reference(query_proj[:, None], key_proj, annotations, attention.v)
        z = torch.sigmoid(h @ dec.f_beta.weight.T + dec.f_beta.bias) * context[:, 0]
        embedded = dec.embedding.weight[tgt_in[:, t]]
        gates = (torch.cat([embedded, z], -1) @ dec.cell.weight_ih.T + dec.cell.bias_ih + h @ dec.cell.weight_hh.T
                 + dec.cell.bias_hh)
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        logits.append((embedded + dec.out_h(h) + z @ dec.out_z.weight.T) @ dec.output.weight.T + dec.output.bias)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("initial_state", ["zeros", "mean"])
def test_decoder_matches_a_hand_written_loop(initial_state):
    model = tiny_captioner(initial_state=initial_state)
    images, tgt_in = images_like(model, 3), captions_in(3, 6)
    logits, _ = model(images, tgt_in)
    torch.testing.assert_close(logits, naive_logits(model, images, tgt_in), rtol=1e-10, atol=1e-10)


def test_doubly_stochastic_penalty_is_the_formula():
    weights = torch.softmax(torch.randn(2, 3, 4, dtype=torch.float64), -1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = [sum((1 - sum(weights[b, t, i] for t in range(3) if mask[b, t])) ** 2 for i in range(4))
                for b in range(2)]
    torch.testing.assert_close(doubly_stochastic_penalty(weights, mask), torch.stack(expected))
    # All attention on one location for 4 real steps: (1 - 4)^2 there, 1 at each of the other L - 1 locations.
    one_hot = torch.zeros(1, 4, 5, dtype=torch.float64)
    one_hot[0, :, 2] = 1.0
    assert doubly_stochastic_penalty(one_hot, torch.ones(1, 4, dtype=torch.bool)).item() == 9.0 + 4.0


def test_loss_adds_the_penalty_and_its_gradient_trains_the_attention():
    model = tiny_captioner()
    images, tgt_in = images_like(model, 3), captions_in(3, 5)
    tgt_out = torch.cat([tgt_in[:, 1:], torch.full((3, 1), EOS)], 1)
    tgt_out[0, 3:] = PAD  # a shorter caption: its padded steps must not count
    total, cross_entropy, _ = model.loss(images, tgt_in, tgt_out, attention_reg=0.5)
    _, weights = model(images, tgt_in, need_weights=True)
    penalty = doubly_stochastic_penalty(weights, tgt_out != PAD).mean()
    torch.testing.assert_close(total, cross_entropy + 0.5 * penalty)
    assert model.loss(images, tgt_in, tgt_out, attention_reg=0.0)[0].item() == cross_entropy.item()

    # The penalty alone (no cross-entropy) reaches every attention parameter, and the gradient through the
    # weights the torch backend returns equals the reference backend's.
    reference = copy.deepcopy(model)
    reference.decoder.attention.backend = "reference"
    grads = []
    for m in (model, reference):
        _, weights = m(images, tgt_in, need_weights=True)
        doubly_stochastic_penalty(weights, tgt_out != PAD).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.decoder.attention.named_parameters()})
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-9, atol=1e-12)
    assert model.encoder.convs[0].weight.grad.abs().max() > 0  # and on into the CNN, through the annotations


def assert_matches_teacher_forcing(model, images, decoded):
    """Feeding the decoded tokens back with teacher forcing gives the same log-probabilities and attention."""
    for b in range(images.shape[0]):
        length = int(decoded.lengths[b])
        tokens = decoded.tokens[b, :length]
        tgt_in = torch.cat([torch.tensor([BOS], device=tokens.device), tokens[:-1]])[None]
        logits, weights = model(images[b:b + 1], tgt_in, need_weights=True)
        log_probs = torch.log_softmax(logits[0].double(), -1).gather(1, tokens[:, None]).sum()
        torch.testing.assert_close(log_probs, decoded.log_probs[b].double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weights[0], decoded.attention[b, :length], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_and_beam_match_teacher_forcing_and_beam_one_is_greedy(backend, triton_device):
    # Drawn on the CPU, then moved: the Triton runs use the triton_device fixture (the GPU when there is one).
    model = sharpen(decoding_captioner(backend)).to(triton_device if backend == "triton" else "cpu")
    images = images_like(model, 4)
    greedy = model.greedy(images, max_len=6)
    assert greedy.attention.shape == (4, greedy.tokens.shape[1], 9)
    assert len(set(greedy.lengths.tolist())) > 1  # rows end at different steps
    assert_matches_teacher_forcing(model, images, greedy)
    beam = model.beam_search(images, beam_size=1, max_len=6)
    assert torch.equal(beam.tokens, greedy.tokens) and torch.equal(beam.lengths, greedy.lengths)
    torch.testing.assert_close(beam.log_probs, greedy.log_probs.to(beam.log_probs.dtype))
    torch.testing.assert_close(beam.attention, greedy.attention)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search_with_index_equals_copied_memory(backend, monkeypatch, triton_device):
    # Drawn on the CPU, then moved: the Triton runs use the triton_device fixture (the GPU when there is one).
    model = sharpen(decoding_captioner(backend)).to(triton_device if backend == "triton" else "cpu")
    images = images_like(model, 3)
    calls = []  # (memory rows, index rows or None) of every attention step
    step = model.decoder.attention.step

    def spy(query, memory, *, index=None, **kwargs):
        calls.append((memory.key_proj.shape[0], None if index is None else index.shape[0]))
        return step(query, memory, index=index, **kwargs)

    monkeypatch.setattr(model.decoder.attention, "step", spy)
    shared = model.beam_search(images, beam_size=3, max_len=6)  # (the spy only records: the plain beam search)
    assert len(set(shared.lengths.tolist())) > 1  # rows end at different steps
    assert calls and set(calls) == {(3, 9)}  # B memory rows read by B * beam decoder rows
    calls.clear()
    copied = model.beam_search(images, beam_size=3, max_len=6, _copy_memory=True)
    assert calls and set(calls) == {(9, None)}
    monkeypatch.undo()
    assert torch.equal(shared.tokens, copied.tokens) and torch.equal(shared.lengths, copied.lengths)
    torch.testing.assert_close(shared.scores, copied.scores)
    torch.testing.assert_close(shared.attention, copied.attention)
    assert_matches_teacher_forcing(model, images, shared)


def test_triton_decoding_equals_torch_decoding(triton_device):
    model = sharpen(tiny_captioner(dtype=torch.float32, backend="torch")).to(triton_device)
    on_triton = copy.deepcopy(model)
    on_triton.decoder.attention.backend = "triton"
    images = images_like(model, 3)
    for decode in (lambda m: m.greedy(images, max_len=5), lambda m: m.beam_search(images, beam_size=2, max_len=5)):
        expected, actual = decode(model), decode(on_triton)
        assert torch.equal(actual.tokens, expected.tokens)
        torch.testing.assert_close(actual.attention, expected.attention, rtol=1e-4, atol=1e-5)
