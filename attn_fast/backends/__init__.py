"""The three implementations behind `attn_fast.additive_attention`: `reference` (the naive oracle, shares nothing),
`torch_backend` (memory-bounded blocks, any device) and `triton_backend` (the fused kernels of `attn_fast.kernels`).
`common` holds the tanh-free half of the backward that the last two share. Only `attn_fast.functional` dispatches
to them."""
