"""Benchmarks and static (offline) reports of attn-fast; run from the repository root."""
