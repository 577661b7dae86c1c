"""The named benchmark shapes (DESIGN.md, "Benchmarks"), the random inputs of one problem, and the Seq2Seq model
sizes of the model benchmark (here, so that the CLI can list them without importing the model and its extras).

A shape is (B, T, S, A, D): batch, decoder steps (query rows), source length (keys), attention size, value size.
Inputs are `attn_fast.tools.testing.random_case` problems: normal random projections and values (never zeros, which
would make tanh and the softmax trivially cheap or degenerate) with a `key_lengths` mask, as a padded batch has.
"""
from __future__ import annotations

import dataclasses

import torch

from attn_fast.tools.testing import AttentionCase, random_case


@dataclasses.dataclass(frozen=True)
class ProblemShape:
    """The sizes of one named attention problem, (B, T, S, A, D): query_proj [B, T, A], key_proj [B, S, A],
    value [B, S, D], v [A]. The one table of named shapes (`SHAPES`) is used by the bench, its pytest-benchmark
    suites and the static sm_90 report (benchmarks/static_report.py)."""

    name: str
    batch: int  # B
    tgt_len: int  # T, query rows (decoder steps) per batch row
    src_len: int  # S, keys per batch row
    attn_dim: int  # A
    value_dim: int  # D

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        return self.batch, self.tgt_len, self.src_len, self.attn_dim, self.value_dim

    @property
    def tanh_elements(self) -> int:
        """B*T*S*A: the tanh evaluations of one forward, and the elements of the tensor eager materializes."""
        return self.batch * self.tgt_len * self.src_len * self.attn_dim

    def tanh_tensor_bytes(self, dtype: torch.dtype) -> int:
        """Size of the [B, T, S, A] tensor the eager reference materializes (once; autograd keeps more)."""
        return self.tanh_elements * torch.empty((), dtype=dtype).element_size()

    def decode_step(self) -> ProblemShape:
        """The single decoder step of this shape: one query row (T = 1) against the same memory."""
        return dataclasses.replace(self, tgt_len=1)

    def as_dict(self) -> dict:
        return dict(zip("BTSAD", self.sizes))


NAMED_SHAPES: dict[str, ProblemShape] = {
    shape.name: shape
    for shape in (
        ProblemShape("nmt_train", 32, 50, 50, 256, 512),
        ProblemShape("tts_step", 32, 1, 200, 128, 512),
        ProblemShape("caption", 32, 20, 196, 512, 2048),
        ProblemShape("long", 8, 400, 400, 256, 256),
    )
}
#: Odd, small sizes for CI: every code path of the runner in a fraction of a second per case.
TINY = ProblemShape("tiny", 2, 5, 7, 8, 6)
SHAPES: dict[str, ProblemShape] = {**NAMED_SHAPES, TINY.name: TINY}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                                   "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}[dtype]


def get_shape(name: str) -> ProblemShape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def make_inputs(shape: ProblemShape, dtype: torch.dtype, device: torch.device | str, *, requires_grad: bool = False,
                seed: int = 0) -> AttentionCase:
    """Random inputs of `shape`: query_proj [B, T, A], key_proj [B, S, A], value [B, S, D], v [A] in `dtype` on
    `device`, key_lengths [B] (random in 1..S, so that padding is masked as in a real batch)."""
    case = random_case(*shape.sizes, mask="lengths", seed=seed)  # float64 on CPU: the same values on any device
    return case.cast(dtype, device=device, requires_grad=requires_grad)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    embed_dim: int
    hidden_dim: int
    attn_dim: int
    batch: int
    src_len: int
    tgt_len: int
    beam_size: int = 4

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Seq2Seq sizes (see `model_bench`): "tiny" for CI, "date" (quick), "nmt" (--full).
MODEL_CONFIGS = {
    "tiny": ModelConfig("tiny", vocab_size=16, embed_dim=8, hidden_dim=8, attn_dim=8, batch=3, src_len=6, tgt_len=4,
                        beam_size=2),
    "date": ModelConfig("date", vocab_size=64, embed_dim=64, hidden_dim=128, attn_dim=64, batch=64, src_len=30,
                        tgt_len=11),
    "nmt": ModelConfig("nmt", vocab_size=8000, embed_dim=256, hidden_dim=512, attn_dim=256, batch=32, src_len=50,
                       tgt_len=50),
}
