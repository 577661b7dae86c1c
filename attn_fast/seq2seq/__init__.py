"""Sequence-to-sequence model built on attn-fast's additive attention: an RNN encoder-decoder with Bahdanau
attention and its data pipeline (`data`: the embedded date-normalization task, any tab-separated file of
`source<TAB>target` pairs, character vocabularies, length-bucketed batches, BLEU and exact match).
"""
