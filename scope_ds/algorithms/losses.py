"""Token-level loss terms (Eq. 1-3, GRPO, NLL) and their batch-invariant aggregation.

Shape legend: B = rollouts in a micro-batch, T = response positions (right-padded), mask_BT marks
real response tokens (never prompt, never padding). Every aggregation divides by a *global*
normaliser that the caller computes once over the whole global batch, so that the sum of the
micro-batch losses over all data-parallel ranks and micro-batches equals the whole-batch loss:
the gradient does not depend on how the batch was split.
"""

from __future__ import annotations

import math
import typing

import torch

from scope_ds.algorithms.weights import check_finite
from scope_ds.config import Aggregation

AGGREGATIONS = typing.get_args(Aggregation)


def check_token_tensors(mask_BT: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Every given tensor has mask_BT's shape and finite values on the mask; names the culprit."""
    if mask_BT.dim() != 2:
        raise ValueError(f"mask_BT must be 2-D [B, T], got shape {tuple(mask_BT.shape)}")
    if mask_BT.shape[0] == 0:
        raise ValueError("empty batch: mask_BT has no rows")
    m = mask_BT.bool()
    for name, t in tensors.items():
        if t is None:
            continue
        if tuple(t.shape) != tuple(mask_BT.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(mask_BT.shape)} like mask_BT")
        check_finite(name, t.detach(), m)


def capped_exp(log_x: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(log_x), cap), computed in log space: finite for every finite ``log_x`` (no overflow)."""
    return torch.exp(torch.clamp(log_x, max=math.log(cap)))


def importance_ratio(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """rho = pi_theta / pi_old per token (Eq. 1), with gradient d rho = rho d log pi_theta.

    With ``cap`` (truncated importance sampling, for stale rollouts) the value is min(rho, cap) and
    the gradient min(rho, cap) d log pi_theta, so a truncated token still pushes, but no harder than
    ``cap`` times an on-policy one. Computed in log space: never NaN for finite log-probs, however
    far apart (exp of the log-ratio alone would overflow, and rescaling it give inf * 0).
    """
    log_ratio = logp_BT - old_logp_BT.detach()
    if cap is None:
        return torch.exp(log_ratio)
    # exp(x - x.detach()) is 1 in value with gradient d x: the capped constant carries the scale.
    return capped_exp(log_ratio.detach(), cap) * torch.exp(log_ratio - log_ratio.detach())


def truncated_share(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, mask_BT: torch.Tensor, cap: float | None):
    """Fraction of real tokens whose importance ratio exceeds ``cap`` (0 when there is no cap)."""
    if cap is None:
        return torch.zeros((), dtype=torch.float64, device=logp_BT.device)
    m = mask_BT.bool()
    over = ((logp_BT.detach() - old_logp_BT.detach()) > math.log(cap)) & m
    return over.sum().double() / m.sum().clamp_min(1)


def mismatch_weight(old_logp_BT: torch.Tensor, behaviour_logp_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(pi_old / pi_behaviour, cap) per token, a constant (no gradient).

    Corrects for the train-inference mismatch: the tokens were sampled by the rollout server's
    numerics (pi_behaviour), the loss assumes the trainer's (pi_old, recomputed). Truncated IS, as
    in verl / slime / AReaL: one-sided, so a token the server under-rates cannot dominate the batch.
    """
    return capped_exp((old_logp_BT - behaviour_logp_BT).detach(), cap)


def mismatch_stats(
    old_logp_BT: torch.Tensor, behaviour_logp_BT: torch.Tensor, mask_BT: torch.Tensor, cap: float
) -> dict[str, float]:
    """SUMS over the real tokens of one micro-batch, for per-token means over the whole batch:

    - ``mismatch/abs_log_ratio_sum``: sum |log r|, r = pi_old / pi_behaviour;
    - ``mismatch/k3_sum``: sum (r - 1 - log r), the k3 estimator of KL(pi_behaviour || pi_old)
      (the tokens are samples of the behaviour policy; inf only past |log r| ~ 709);
    - ``mismatch/capped_tokens``: tokens whose weight r was truncated at ``cap``;
    - ``mismatch/tokens``: the real tokens counted (divide the three sums above by its total).
    """
    m = mask_BT.bool()
    d = torch.where(m, (old_logp_BT.detach() - behaviour_logp_BT.detach()).double(), 0.0)
    return {
        "mismatch/abs_log_ratio_sum": float(d.abs().sum()),
        "mismatch/k3_sum": float((torch.expm1(d) - d).sum()),  # expm1: no cancellation near r = 1
        "mismatch/capped_tokens": float(((d > math.log(cap)) & m).sum()),
        "mismatch/tokens": float(m.sum()),
    }


def mle_term(rho_BT: torch.Tensor) -> torch.Tensor:
    """Eq. 2, per token: -rho. At theta = theta_old its gradient is the NLL gradient."""
    return -rho_BT


def opd_term(rho_BT: torch.Tensor, logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor) -> torch.Tensor:
    """Eq. 3, per token: rho * (log pi_bar - log pi_T), the sampled-token reverse-KL surrogate."""
    return rho_BT * (logp_BT.detach() - teacher_logp_BT.detach())


def full_kl_term(rho_BT: torch.Tensor, kl_BT: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary alternative to Eq. 3: KL_t(student || teacher), importance-corrected by a
    constant rho (1 on-policy): the KL itself carries the gradient."""
    return rho_BT.detach() * kl_BT


def grpo_term(
    rho_BT: torch.Tensor,
    advantage_B: torch.Tensor,
    eps: float,
    logp_BT: torch.Tensor | None = None,
    ref_logp_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """GRPO per token: -min(rho A, clip(rho, 1-eps, 1+eps) A) + kl_coef * k3(pi_theta, pi_ref).

    k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, the unbiased low-variance KL estimator.
    """
    adv = advantage_B.to(rho_BT.dtype)[:, None]
    term = -torch.minimum(rho_BT * adv, rho_BT.clamp(1 - eps, 1 + eps) * adv)
    if kl_coef and ref_logp_BT is not None:
        d = ref_logp_BT.detach() - logp_BT
        term = term + kl_coef * (torch.exp(d) - d - 1)
    return term


def global_normalizer(aggregation: str, lengths_B: torch.Tensor, group_B: torch.Tensor, trained_B: torch.Tensor):
    """The normaliser of :func:`aggregate`, computed ONCE over the whole global batch.

    seq-sum: number of prompts (J = E_x of a per-prompt sum, Eq. 6); token-mean: number of trained
    response tokens; seq-mean: number of trained rollouts. Never below 1.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "seq-sum":
        n = torch.unique(group_B).numel()
    elif aggregation == "token-mean":
        n = int(lengths_B[trained_B.bool()].sum())
    else:
        n = int(trained_B.bool().sum())
    return float(max(n, 1))


def aggregate(
    term_BT: torch.Tensor, mask_BT: torch.Tensor, weight_B: torch.Tensor, aggregation: str, normalizer: float
) -> torch.Tensor:
    """sum_i w_i * agg_t(term_it) / normalizer, padding excluded.

    agg_t is a sum over the response for 'seq-sum' and 'token-mean', a mean for 'seq-mean'.
    Carries the global totals (``normalizer``) so that it is invariant to data-parallel sharding.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    m = mask_BT.bool()
    per_seq = torch.where(m, term_BT, torch.zeros_like(term_BT)).sum(-1)  # where, not *: padding may hold NaN
    if aggregation == "seq-mean":
        per_seq = per_seq / m.sum(-1).clamp_min(1)
    return (weight_B.to(per_seq.dtype) * per_seq).sum() / normalizer
