"""Triton kernels of attn-fast (installed as `attn_fast.kernels`): @triton.jit kernels and their thin launchers.

Importing this package imports triton; attn_fast imports it lazily. On CPU tensors the kernels run only under
TRITON_INTERPRET=1 (set before triton is first imported).
"""
from .configs import ForwardConfig, forward_config
from .forward import attention_forward

__all__ = ["ForwardConfig", "attention_forward", "forward_config"]
