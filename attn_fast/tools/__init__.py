"""What runs around the library: the `attn-fast` command line (`cli`), `verify` against the float64 reference,
random test problems (`testing`) and the benchmark (`bench`)."""
