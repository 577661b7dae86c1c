"""A/B in one process: a decode step of `AdditiveAttention` on the torch backend with the memory's prepared keys
(`AttentionMemory.key_exp`, e^{2 key_proj} computed once at precompute) against the same step without them.

    python -m benchmarks.prepared_keys_ab [--threads 2] [--calls 200]

Calls of A and B alternate, so that drift in the machine's speed hits both; medians are printed per shape, with the
ratio. Both variants are checked equal first (they compute the same e^{2k}, once or per step).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from attn_fast import AdditiveAttention
from attn_fast.cpu_warmup import warm_cpu_math

#: (name, B, S, A, D): the Seq2Seq dates model's step, the NMT decode step, tts_step (attn_fast/tools/bench/shapes.py).
SHAPES = (("date_step", 64, 30, 64, 256), ("nmt_step", 32, 50, 256, 512), ("tts_step", 32, 200, 128, 512))


def measure(batch: int, src_len: int, attn_dim: int, value_dim: int, calls: int) -> dict:
    torch.manual_seed(0)
    layer = AdditiveAttention(attn_dim, value_dim, attn_dim, backend="torch")
    with torch.no_grad():
        memory = layer.precompute(torch.randn(batch, src_len, value_dim),
                                  key_lengths=torch.randint(src_len // 2, src_len + 1, (batch,)))
        assert memory.key_exp is not None, "the keys should be in the factorized range"
        plain = dataclasses.replace(memory, key_exp=None)
        query = torch.randn(batch, attn_dim)
        assert torch.equal(layer.step(query, memory)[0], layer.step(query, plain)[0])
        samples = {"prepared": [], "per_step": []}
        for _ in range(calls):
            for name, variant in (("prepared", memory), ("per_step", plain)):
                start = time.perf_counter()
                layer.step(query, variant)
                samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {**{f"{name}_ms": value * 1e3 for name, value in medians.items()},
            "ratio": medians["prepared"] / medians["per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warm_cpu_math()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.calls} alternating calls each")
    for name, *sizes in SHAPES:
        result = measure(*sizes, calls=args.calls)
        print(f"{name:<10} B,S,A,D={sizes}: prepared {result['prepared_ms']:.3f} ms, per step "
              f"{result['per_step_ms']:.3f} ms, ratio {result['ratio']:.2f}")


if __name__ == "__main__":
    main()
