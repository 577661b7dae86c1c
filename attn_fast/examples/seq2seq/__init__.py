"""Sequence-to-sequence model built on attn-fast's additive attention: an RNN encoder-decoder with Bahdanau
attention (`model`: bidirectional GRU encoder, the paper's step-by-step `BahdanauDecoder` and the all-steps
`ParallelDecoder`; greedy and beam search through `attn_fast.examples.decoding`), its data pipeline (`data`: the
embedded date-normalization task, any tab-separated file of `source<TAB>target` pairs, character vocabularies,
length-bucketed batches), and what the shared training loop needs to train it, behind `attn-fast train`
(`train`: the task, checkpoints, greedy translation and its scores).
"""
from attn_fast.examples.decoding import Decoded, beam_search, greedy
from attn_fast.examples.seq2seq.data import CharVocab, batches, build_vocabs, make_date_splits, read_tsv
from attn_fast.examples.seq2seq.model import BahdanauDecoder, Encoder, ParallelDecoder, Seq2Seq
from attn_fast.examples.seq2seq.train import TrainConfig, TrainResult, load_checkpoint, train

__all__ = ["BahdanauDecoder", "CharVocab", "Decoded", "Encoder", "ParallelDecoder", "Seq2Seq", "batches",
           "beam_search", "build_vocabs", "greedy", "load_checkpoint", "make_date_splits", "read_tsv", "train",
           "TrainConfig", "TrainResult"]
