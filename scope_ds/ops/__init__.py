"""Memory-lean tensor ops over large vocabularies (pure tensor code, no I/O)."""

from scope_ds.ops.chunked import (
    CHUNK_BYTES,
    TEACHER_STATS,
    TOKEN_STATS,
    GradFn,
    chunked_stat,
    chunked_stats,
    reverse_kl,
    token_entropy,
    token_logprobs,
)

__all__ = [
    "CHUNK_BYTES",
    "TEACHER_STATS",
    "TOKEN_STATS",
    "GradFn",
    "chunked_stat",
    "chunked_stats",
    "reverse_kl",
    "token_entropy",
    "token_logprobs",
]
