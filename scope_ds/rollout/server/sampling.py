"""Next-token sampling for the embedded server, one row per running sequence.

Shapes: B = running sequences, V = vocabulary.
Log-probs follow SGLang's sampler (0.5.x, default build): log softmax(logits / T) of the sampled
token, taken before top-k / top-p / min-p truncation; greedy rows report log softmax(logits).
Like SGLang, ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` in the server's environment reports the raw
log softmax(logits) (temperature 1) instead; the trainer detects that convention (loop.check_mismatch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from scope_ds.config import GREEDY_EPS

ORIGINAL_LOGPROB = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true")


@dataclass(frozen=True)
class SamplingSpec:
    """One request's sampling parameters after validation and SGLang's normalisation."""

    max_new_tokens: int = 128  # generated tokens at most (capped by the context length)
    temperature: float = 1.0  # the T of softmax(logits / T); 1.0 for greedy rows
    greedy: bool = False  # temperature < 1e-6 in the request: argmax, raw log-probs
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # tokens kept by rank; 0 = the whole vocabulary (SGLang's -1)
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob
    stop_token_ids: frozenset[int] = frozenset()  # extra ids that end generation (kept in output)
    stop_strs: tuple[str, ...] = ()  # strings that end generation (needs a tokenizer)
    ignore_eos: bool = False  # keep generating past the model's EOS ids
    skip_special_tokens: bool = True  # decoding option for "text"
    no_stop_trim: bool = False  # keep a matched stop string in "text"
    n: int = 1  # samples per prompt
    seed: int | None = None  # sampling_seed: draws keyed by (seed, position) alone (batch-independent)


@dataclass
class BatchSampling:
    """Per-row sampling parameters as tensors, built once per batch (rows shrink as rows finish)."""

    temperature_B: torch.Tensor
    greedy_B: torch.Tensor
    top_k_B: torch.Tensor
    top_p_B: torch.Tensor
    min_p_B: torch.Tensor

    @classmethod
    def from_specs(cls, specs: list[SamplingSpec], vocab_size: int) -> BatchSampling:
        return cls(
            temperature_B=torch.tensor([s.temperature for s in specs], dtype=torch.float32),
            greedy_B=torch.tensor([s.greedy for s in specs], dtype=torch.bool),
            top_k_B=torch.tensor([s.top_k if 0 < s.top_k < vocab_size else vocab_size for s in specs]),
            top_p_B=torch.tensor([s.top_p for s in specs], dtype=torch.float32),
            min_p_B=torch.tensor([s.min_p for s in specs], dtype=torch.float32),
        )

    def select(self, rows: torch.Tensor) -> BatchSampling:
        """Keep only ``rows`` (indices into the current batch), in that order."""
        return BatchSampling(*(t[rows] for t in vars(self).values()))


def _truncated_probs(probs_BV: torch.Tensor, bs: BatchSampling) -> torch.Tensor:
    """Zero the tokens that top-k, top-p and min-p rule out (the first-ranked token always stays)."""
    vocab = probs_BV.shape[-1]
    needs_k = bool((bs.top_k_B < vocab).any())
    needs_p = bool((bs.top_p_B < 1.0).any())
    needs_min_p = bool((bs.min_p_B > 0.0).any())
    if not (needs_k or needs_p or needs_min_p):
        return probs_BV
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    drop_BV = torch.zeros_like(sorted_BV, dtype=torch.bool)
    if needs_k:
        rank_V = torch.arange(vocab)
        drop_BV |= rank_V[None, :] >= bs.top_k_B[:, None]
    if needs_p:
        # Mass strictly before a token: a token is kept while what precedes it is under top_p.
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
        drop_BV |= before_BV > bs.top_p_B[:, None]
    if needs_min_p:
        drop_BV |= sorted_BV < (bs.min_p_B * sorted_BV[:, 0])[:, None]
    drop_BV[:, 0] = False
    kept_BV = sorted_BV.masked_fill(drop_BV, 0.0)
    return torch.zeros_like(probs_BV).scatter_(-1, order_BV, kept_BV)


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit words that spreads every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def keyed_uniform(seed: int, position: int) -> float:
    """The U[0, 1) draw of a seeded sequence for its token at ``position`` (the token's index in
    prompt + output): a function of the two alone, as SGLang's seeded sampler hashes (seed,
    position). A request that continues a sequence (prompt + its tokens so far, the same seed)
    therefore draws what the uninterrupted one would have, and no row depends on its batch."""
    z = _mix64((seed + 0x9E3779B97F4A7C15) & _MASK64)
    return (_mix64(z ^ ((position * 0xD1B54A32D192ED03) & _MASK64)) >> 11) * 2.0**-53


def _uniforms(keys: list[tuple[int, int] | None], shared: torch.Generator | None) -> torch.Tensor:
    """One U[0, 1) draw per row (float64): ``keyed_uniform(seed, position)`` for a row keyed
    (seed, position), else from ``shared``, in row order."""
    out = torch.empty(len(keys), dtype=torch.float64)
    rest = [i for i, k in enumerate(keys) if k is None]
    if rest:
        out[rest] = torch.rand(len(rest), dtype=torch.float64, generator=shared)
    keyed = [(i, k) for i, k in enumerate(keys) if k is not None]
    if keyed:
        out[[i for i, _ in keyed]] = torch.tensor([keyed_uniform(*k) for _, k in keyed], dtype=torch.float64)
    return out


def _inverse_cdf(probs_RV: torch.Tensor, u_R: torch.Tensor) -> torch.Tensor:
    """Row r's token: the first whose cumulative mass exceeds u_r times the row's total (one batched
    search instead of a multinomial call per row). Tokens of zero mass are never chosen: their
    cumulative mass equals their predecessor's; a draw that rounds up to the total takes the last
    token with mass."""
    cdf_RV = probs_RV.double().cumsum(dim=-1)
    picked_R = torch.searchsorted(cdf_RV, (u_R * cdf_RV[:, -1])[:, None], right=True).squeeze(-1)
    last_R = probs_RV.shape[-1] - 1 - (probs_RV.flip(-1) > 0).int().argmax(dim=-1)
    return torch.minimum(picked_R, last_R)


def sample_next(
    logits_BV: torch.Tensor,
    bs: BatchSampling,
    generator: torch.Generator | None = None,
    row_keys: list[tuple[int, int] | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Rows keyed ``(seed, position)`` in ``row_keys`` (seeded requests) draw ``keyed_uniform`` of
    their key, so their samples depend neither on the batch nor on how the sequence was split
    into requests; the others share ``generator``.
    Returns (tokens_B, logprobs_B, logprobs_BV): the chosen ids, their log-probs under the
    reporting convention of this module, and the full log-prob rows (for top_logprobs_num).
    """
    logits_BV = logits_BV.float()
    logprobs_BV = torch.log_softmax(logits_BV / bs.temperature_B[:, None], dim=-1)
    tokens_B = logits_BV.argmax(dim=-1)
    sample_rows = ~bs.greedy_B
    if bool(sample_rows.any()):
        rows = torch.nonzero(sample_rows).flatten()
        keys = row_keys or [None] * len(tokens_B)
        tokens_B = tokens_B.clone()
        tokens_B[rows] = _inverse_cdf(
            _truncated_probs(logprobs_BV[rows].exp(), bs.select(rows)),
            _uniforms([keys[i] for i in rows.tolist()], generator),
        )
    if ORIGINAL_LOGPROB:
        logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
    logprobs_B = logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
    return tokens_B, logprobs_B, logprobs_BV


def is_greedy(temperature: float) -> bool:
    """SGLang's greedy rule: a temperature below 1e-6 means argmax."""
    return temperature < GREEDY_EPS
