"""Modules on top of the functional op: `AdditiveAttention` (+ `AttentionMemory` for step-by-step decoding), the
stateful location-sensitive (Tacotron-2) and coverage (See et al.) layers, and what they share (`stateful`)."""
