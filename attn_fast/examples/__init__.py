"""Applications built on the public layer only: the Seq2Seq date normalizer and the Show, Attend and Tell
captioner, with what they share — the training loop (`training`), its checkpoint files (`checkpoints`), the text
metrics (`metrics`), greedy/beam decoding (`decoding`) and multi-process training (`distributed`)."""
