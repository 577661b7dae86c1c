"""Show, Attend and Tell (Xu et al. 2015, soft attention) on attn-fast's `AdditiveAttention`, small enough to
train on a CPU in minutes.

    ImageEncoder    a small CNN: image [B, 3, H, W] -> annotations a [B, L, C], L = (H/8)·(W/8) grid cells
    CaptionDecoder  an LSTM that attends over the annotations at every word:
                        α_t, ĉ_t = attention(query h_{t-1}, keys/values a)       additive attention, α_t [B, L]
                        β_t      = σ(W_β h_{t-1})                                 the gate f_beta, per channel
                        z_t      = β_t ⊙ ĉ_t
                        h_t, c_t = LSTM([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
                        logits_t = L_o(E y_{t-1} + L_h h_t + L_z z_t)            the paper's deep output layer
    Captioner       encoder + decoder, the loss with the doubly stochastic regularization, greedy and beam search

Simplifications, documented: the encoder is a 4-layer CNN trained from scratch (the paper uses a pretrained VGG's
14x14x512 conv features) and adds a learned embedding of each grid cell's position to its annotation (the
relations in the captions are about positions); the initial state is zero by default (`initial_state="zeros"`),
with the paper's version, h_0 and c_0 from the mean annotation (one tanh layer each, the paper's "MLPs"), as
`initial_state="mean"`: on these scenes the mean annotation already holds the bag of coloured shapes, so a
decoder started from it can name them without looking, and its attention stayed diffuse (48-pixel scenes,
32 channels, 750 steps: grounding 0.09 against a chance level of 0.10 and validation exact match 0.31; started
from zero: 0.16 and 0.61); the gate β is per channel (as the popular PyTorch tutorial; the paper's is one scalar);
dropout (on the word embeddings and the deep output) only when `dropout` is set.

Decoding reuses `attn_fast.examples.decoding` (greedy, and beam search that reads B memory rows from B·beam
decoder rows through `index`): the LSTM state (h, c) travels as one tensor [B, 2H] = [h; c], and the image batch
is presented to it through `_DecodingView`, where the "source" is the L annotation positions.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from attn_fast.examples import decoding
from attn_fast.nn.additive import AdditiveAttention, AttentionMemory

INITIAL_STATES = ("zeros", "mean")


class ImageEncoder(nn.Module):
    """Four 3x3 conv layers (three of stride 2), ReLU between, then a learned position embedding per grid cell.

    forward(images [B, 3, H, W]) -> annotations [B, L, C] with L = (H/8)·(W/8), row-major over the grid (cell l
    covers rows [8·(l // W'), +8) and columns [8·(l % W'), +8) of the image, W' = W/8). H and W must equal
    `image_size` (the position embedding is per cell).
    """

    STRIDE = 8  # pixels per grid cell along each axis

    def __init__(self, channels: int = 64, image_size: int = 64):
        super().__init__()
        if image_size % self.STRIDE:
            raise ValueError(f"image_size must be a multiple of {self.STRIDE}, got {image_size}")
        self.image_size, self.channels = image_size, channels
        self.grid = image_size // self.STRIDE
        width = channels // 2
        self.convs = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),  # receptive field 31 px: a whole shape, and around it
        )
        self.position = nn.Parameter(torch.zeros(self.grid * self.grid, channels))
        nn.init.normal_(self.position, std=0.1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be [B, 3, {self.image_size}, {self.image_size}], got "
                             f"{tuple(images.shape)}")
        features = self.convs(images)  # [B, C, H', W']
        return features.flatten(2).transpose(1, 2) + self.position  # [B, L, C]


class CaptionDecoder(nn.Module):
    """The LSTM decoder with soft attention, f_beta gate and deep output (see the module docstring).

    Step interface (what `decoding` uses):
        hidden = decoder.initial_hidden(annotations)                        # [B, 2H] = [h_0; c_0]
        memory = decoder.precompute(annotations, location_counts)          # AttentionMemory, once per batch
        logits, hidden, weights = decoder.step(prev_tokens, hidden, memory, index=..., need_weights=...)
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, annotation_dim: int, attn_dim: int, *,
                 pad_id: int, dropout: float = 0.0, attention_backend: str = "auto", initial_state: str = "zeros"):
        super().__init__()
        if initial_state not in INITIAL_STATES:
            raise ValueError(f"initial_state must be one of {', '.join(map(repr, INITIAL_STATES))}, "
                             f"got {initial_state!r}")
        self.vocab_size, self.hidden_dim, self.initial_state = vocab_size, hidden_dim, initial_state
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.attention = AdditiveAttention(hidden_dim, annotation_dim, attn_dim, backend=attention_backend)
        if initial_state == "mean":
            self.init_h = nn.Linear(annotation_dim, hidden_dim)
            self.init_c = nn.Linear(annotation_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, annotation_dim)
        self.cell = nn.LSTMCell(embed_dim + annotation_dim, hidden_dim)
        self.out_h = nn.Linear(hidden_dim, embed_dim)              # L_h
        self.out_z = nn.Linear(annotation_dim, embed_dim, bias=False)  # L_z
        self.output = nn.Linear(embed_dim, vocab_size)             # L_o

    def initial_hidden(self, annotations: torch.Tensor) -> torch.Tensor:
        """annotations [B, L, C] -> [h_0; c_0] [B, 2H]: zeros, or from the mean annotation."""
        if self.initial_state == "zeros":
            return annotations.new_zeros(annotations.shape[0], 2 * self.hidden_dim)
        mean = annotations.mean(dim=1)
        return torch.cat([torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))], dim=-1)

    def precompute(self, annotations: torch.Tensor, location_counts: torch.Tensor | None = None) -> AttentionMemory:
        """Project the annotations [B, L, C] once per batch. `location_counts` [B] (all L) is accepted so that the
        memory looks like a padded source to `decoding`; every location is visible either way."""
        return self.attention.precompute(annotations, key_lengths=location_counts)

    def step(self, prev_tokens: torch.Tensor, hidden: torch.Tensor, memory: AttentionMemory, *,
             index: torch.Tensor | None = None, need_weights: bool = False):
        """y_{t-1} [B'] int64, [h_{t-1}; c_{t-1}] [B', 2H] -> logits [B', V], [h_t; c_t] [B', 2H],
        α_t [B', L] or None. `index` [B'] maps each row to its memory row (beam search)."""
        logits, hidden, weights, _ = self._step(self.dropout(self.embedding(prev_tokens)), hidden, memory,
                                                index=index, need_weights=need_weights)
        return logits, hidden, weights

    def _step(self, prev_embedded, hidden, memory, *, index=None, need_weights=False):
        h, c = hidden.chunk(2, dim=-1)
        context, weights = self.attention.step(h, memory, index=index, need_weights=need_weights)
        z = torch.sigmoid(self.f_beta(h)) * context  # β_t ⊙ ĉ_t
        h, c = self.cell(torch.cat([prev_embedded, z], dim=-1), (h, c))
        logits = self.output(self.dropout(prev_embedded + self.out_h(h) + self.out_z(z)))
        return logits, torch.cat([h, c], dim=-1), weights, z

    def forward(self, tgt_in: torch.Tensor, annotations: torch.Tensor, *, need_weights: bool = False):
        """Teacher forcing: tgt_in [B, T] (BOS first), annotations [B, L, C] -> logits [B, T, V] and α [B, T, L]
        (with gradient, for the doubly stochastic regularization) or None."""
        memory = self.precompute(annotations)
        embedded = self.dropout(self.embedding(tgt_in))  # [B, T, E]
        hidden = self.initial_hidden(annotations)
        all_logits, all_weights = [], []
        for t in range(tgt_in.shape[1]):
            logits, hidden, weights, _ = self._step(embedded[:, t], hidden, memory, need_weights=need_weights)
            all_logits.append(logits)
            all_weights.append(weights)
        return torch.stack(all_logits, 1), (torch.stack(all_weights, 1) if need_weights else None)


def doubly_stochastic_penalty(weights: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Σ_i (1 − Σ_t α_ti)² per image, summing α only over real steps.

    weights [B, T, L], step_mask [B, T] bool (True where tgt_out is a word or EOS) -> [B]. It is small when every
    location has received about one unit of attention over the caption (Xu et al. 2015, eq. 14).
    """
    attention_per_location = (weights * step_mask[:, :, None].to(weights.dtype)).sum(dim=1)  # [B, L]
    return ((1.0 - attention_per_location) ** 2).sum(dim=-1)


def caption_loss(logits: torch.Tensor, weights: torch.Tensor | None, tgt_out: torch.Tensor, *, pad_id: int,
                 attention_reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, cross-entropy) of a teacher-forced forward: logits [B, T, V], weights α [B, T, L] (None when
    attention_reg is 0), tgt_out [B, T]. Cross-entropy: mean over the non-PAD tokens; total: plus attention_reg ·
    the batch mean of `doubly_stochastic_penalty`. (Apart from `Captioner.loss` so that a trainer can run the
    forward through a wrapper such as DistributedDataParallel.)"""
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=pad_id)
    if attention_reg == 0.0:
        return cross_entropy, cross_entropy
    penalty = doubly_stochastic_penalty(weights, tgt_out != pad_id).mean()
    return cross_entropy + attention_reg * penalty, cross_entropy


class _DecodingView:
    """A batch of images presented to `decoding` the way it sees a Seq2Seq: the "source" is the L
    annotation locations, a placeholder [B, L] int64 tensor that gives decoding the batch size, L, the device and
    the token dtype, with `src_lengths` = L for every row (all locations visible)."""

    def __init__(self, model: Captioner, images: torch.Tensor):
        self.decoder, self.pad_id, self.bos_id, self.eos_id = model.decoder, model.pad_id, model.bos_id, model.eos_id
        self._encoder, self._images = model.encoder, images

    def source(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, locations = self._images.shape[0], self._encoder.grid ** 2
        placeholder = torch.zeros(batch, locations, dtype=torch.long, device=self._images.device)
        return placeholder, torch.full((batch,), locations, dtype=torch.long, device=self._images.device)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        annotations = self._encoder(self._images)
        return annotations, self.decoder.initial_hidden(annotations)


class Captioner(nn.Module):
    """Image captioning with soft attention (Show, Attend and Tell).

    Args:
        vocab_size: V, words including the special tokens.
        embed_dim: E, word embedding size (also the deep output layer's width).
        hidden_dim: H, LSTM size.
        attn_dim: A, the attention's hidden size.
        channels: C, annotation size (CNN width).
        image_size: side of the square input images, a multiple of 8.
        attention_backend: backend of the `AdditiveAttention` layer ("auto", "triton", "torch", "reference").
        initial_state: "zeros" (default) or "mean" (the paper's: h_0, c_0 from the mean annotation).
        dropout: on word embeddings and the deep output.
        pad_id, bos_id, eos_id: the vocabulary's special tokens.
    """

    def __init__(self, vocab_size: int, *, embed_dim: int = 64, hidden_dim: int = 128, attn_dim: int = 64,
                 channels: int = 64, image_size: int = 64, attention_backend: str = "auto",
                 initial_state: str = "zeros", dropout: float = 0.0, pad_id: int = 0, bos_id: int = 1,
                 eos_id: int = 2):
        super().__init__()
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.encoder = ImageEncoder(channels, image_size)
        self.decoder = CaptionDecoder(vocab_size, embed_dim, hidden_dim, channels, attn_dim, pad_id=pad_id,
                                      dropout=dropout, attention_backend=attention_backend,
                                      initial_state=initial_state)

    @property
    def grid(self) -> int:
        """Side of the annotation grid: L = grid²."""
        return self.encoder.grid

    def forward(self, images: torch.Tensor, tgt_in: torch.Tensor, *, need_weights: bool = False):
        """Teacher forcing: images [B, 3, H, W], tgt_in [B, T] -> logits [B, T, V], α [B, T, L] or None."""
        return self.decoder(tgt_in, self.encoder(images), need_weights=need_weights)

    def loss(self, images: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor, *,
             attention_reg: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total loss, cross-entropy, logits [B, T, V]): mean cross-entropy over the non-PAD tokens of tgt_out
        [B, T] plus attention_reg · the batch mean of `doubly_stochastic_penalty` (whose gradient reaches the
        attention through the returned weights)."""
        logits, weights = self(images, tgt_in, need_weights=attention_reg != 0.0)
        return (*caption_loss(logits, weights, tgt_out, pad_id=self.pad_id, attention_reg=attention_reg), logits)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_len: int = 20, *, need_attention: bool = True) -> decoding.Decoded:
        """Greedy captions (call `.eval()` first): `Decoded` with attention [B, L_out, L] over the grid cells
        (None with `need_attention=False`)."""
        view = _DecodingView(self, images)
        return decoding.greedy(view, *view.source(), max_len=max_len, need_attention=need_attention)

    @torch.no_grad()
    def beam_search(self, images: torch.Tensor, beam_size: int = 3, max_len: int = 20,
                    length_penalty: float = 0.6, *, need_attention: bool = True,
                    _copy_memory: bool = False) -> decoding.Decoded:
        """Beam search over B·beam decoder rows reading the B annotation memories through `index` (no copies);
        `need_attention=False` keeps no attention history (`Decoded.attention` is None); `_copy_memory` (tests)
        copies the memory per beam instead. See `decoding.beam_search`."""
        view = _DecodingView(self, images)
        return decoding.beam_search(view, *view.source(), beam_size=beam_size, max_len=max_len,
                                    length_penalty=length_penalty, copy_memory=_copy_memory,
                                    need_attention=need_attention)
