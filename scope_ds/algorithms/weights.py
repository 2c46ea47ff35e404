"""Group-level softmax weights of SCOPE (Eq. 4 and 5), and GRPO's group-normalised advantage.

Shape legend: B = rollouts of the whole global batch (every group complete). Groups are the N
rollouts of one prompt; a "subset" is the members of one group on one path (its correct or its
incorrect rollouts). Everything here is computed in float64 and returns constants (no gradient).
"""

from __future__ import annotations

import typing

import torch

from scope_ds.config import Normalization, WeightMode

WEIGHT_MODES = typing.get_args(WeightMode)
NORMALIZATIONS = typing.get_args(Normalization)


def check_finite(name: str, t: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Raise ValueError naming ``name`` if any entry (of those selected by ``where``) is NaN/inf."""
    sel = t if where is None else t[where]
    if sel.is_floating_point() and not bool(torch.isfinite(sel).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_rollout_vectors(**vectors: torch.Tensor) -> int:
    """All vectors 1-D, non-empty, of one length B; returns B. Names the culprit otherwise."""
    size = None
    for name, t in vectors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got {getattr(t, 'shape', type(t))}")
        if size is None:
            size = t.shape[0]
        elif t.shape[0] != size:
            raise ValueError(f"{name} has {t.shape[0]} entries, expected {size} (one per rollout)")
    if not size:
        raise ValueError(f"empty batch: {next(iter(vectors))} has no rollouts")
    return size


def _segment_ids(group_B: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, inverse = torch.unique(group_B, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def subset_softmax(
    score_B: torch.Tensor, member_B: torch.Tensor, group_B: torch.Tensor, normalization: str = "sum"
) -> torch.Tensor:
    """Softmax of ``score_B`` within each group's members; non-members get exactly 0.

    ``normalization='sum'``: a subset's weights sum to 1 (the paper). ``'mean'``: they average 1,
    i.e. the softmax times the subset size (the authors' released code).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    seg_B, n_seg = _segment_ids(group_B)
    score = torch.where(member_B, score_B.double(), torch.full_like(score_B, -torch.inf, dtype=torch.float64))
    seg_max = torch.full((n_seg,), -torch.inf, dtype=torch.float64, device=score.device)
    seg_max = seg_max.scatter_reduce(0, seg_B, score, reduce="amax")
    shifted = torch.where(member_B, score - seg_max[seg_B], torch.zeros_like(score))
    num = torch.where(member_B, shifted.exp(), torch.zeros_like(score))
    den = torch.zeros(n_seg, dtype=torch.float64, device=score.device).index_add_(0, seg_B, num)
    w = torch.where(member_B, num / den[seg_B].clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num))
    if normalization == "mean":
        count = torch.zeros(n_seg, dtype=torch.float64, device=score.device).index_add_(0, seg_B, member_B.double())
        w = w * count[seg_B]
    return w


def ppl_weights(
    seq_logp_B: torch.Tensor,
    lengths_B: torch.Tensor,
    member_B: torch.Tensor,
    group_B: torch.Tensor,
    *,
    sign: float,
    tau: float = 1.0,
    mode: str = "ppl",
    normalization: str = "sum",
) -> torch.Tensor:
    """Perplexity-softmax weights over each group's members (float64, no gradient).

    score_i = sign * log pi(y_i|x) / (tau |y_i|).  sign = -1 is the student weight of Eq. 4
    (PPL_S^(1/tau), higher student PPL -> larger weight); sign = +1 is the teacher weight of Eq. 5
    (PPL_T^(-1/tau), lower teacher PPL -> larger weight). ``mode='reversed'`` flips the sign (the
    ablation, and what the authors' run scripts do on the student path); ``'uniform'`` weighs every member alike.
    A zero-length response is never a member: it gets weight 0 and does not dilute the others.
    """
    check_rollout_vectors(seq_logp_B=seq_logp_B, lengths_B=lengths_B, member_B=member_B, group_B=group_B)
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be one of {WEIGHT_MODES}, got {mode!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if bool((lengths_B < 0).any()):
        raise ValueError("lengths_B has negative entries")
    member = member_B.bool() & (lengths_B > 0)
    check_finite("seq_logp_B", seq_logp_B, member)
    seq_logp_B = seq_logp_B.detach().double()
    if mode == "uniform":
        score = torch.zeros_like(seq_logp_B)
    else:
        s = -sign if mode == "reversed" else sign
        score = torch.where(
            member, s * seq_logp_B / (tau * lengths_B.double().clamp_min(1)), torch.zeros_like(seq_logp_B)
        )
    return subset_softmax(score, member, group_B, normalization)


def group_advantages(reward_B: torch.Tensor, group_B: torch.Tensor, *, std_normalize: bool = True, eps: float = 1e-6):
    """GRPO's outcome advantage: (r - mean_group) / (std_group + eps), or without the std (Dr. GRPO).

    The std is the unbiased sample std over the group (0 for a group of one).
    """
    check_rollout_vectors(reward_B=reward_B, group_B=group_B)
    check_finite("reward_B", reward_B)
    seg_B, n_seg = _segment_ids(group_B)
    r = reward_B.detach().double()
    zeros = torch.zeros(n_seg, dtype=torch.float64, device=r.device)
    count = zeros.index_add(0, seg_B, torch.ones_like(r))
    mean = zeros.index_add(0, seg_B, r) / count
    centred = r - mean[seg_B]
    if not std_normalize:
        return centred
    var = zeros.index_add(0, seg_B, centred**2) / (count - 1).clamp_min(1)
    return centred / (var.sqrt()[seg_B] + eps)
