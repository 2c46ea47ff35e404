"""What every algorithm gives the trainer: a plan per rollout, and a loss per micro-batch.

Shape legend: B = rollouts, T = response positions (right-padded), mask_BT = real response tokens.

The trainer calls, in order:
1. ``teacher_mask(correct_B)``: which rollouts the teacher must score (SCOPE: the incorrect ones),
   and ``reads_teacher_logp(correct_B)``: which of them before the update (the others, with a
   full-vocabulary KL, in the update's own pass);
2. ``plan(stats)`` once over the whole global batch: each rollout's path, weight and advantage;
3. ``normalizer(plan, stats)`` once over the whole global batch (see losses.aggregate);
   where ``recomputes_old_logprobs``, pi_old by a no-grad student forward, before any update;
4. ``loss(batch, normalizer)`` per micro-batch, on every rank; the micro-batch losses of all ranks
   and micro-batches sum to the whole-batch objective. Student log-probs (and pi_old's) are taken
   at ``train_temperature(rollout temperature)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum

import torch

from scope_ds.algorithms import losses
from scope_ds.algorithms.weights import check_rollout_vectors


class Path(IntEnum):
    """Where a rollout's tokens go. SKIP rollouts (e.g. zero-length) contribute nothing."""

    SKIP = 0
    MLE = 1  # correct path of SCOPE, Eq. 2
    OPD = 2  # incorrect path of SCOPE / the OPD baseline, Eq. 3
    PG = 3  # GRPO's clipped policy gradient
    NLL = 4  # KD: supervised NLL on teacher-generated answers


@dataclass
class RolloutStats:
    """Per-rollout facts of the whole global batch (every group complete)."""

    group_B: torch.Tensor  # prompt-group id of each rollout
    correct_B: torch.Tensor  # verifier outcome (bool)
    lengths_B: torch.Tensor  # response tokens (long)
    reward_B: torch.Tensor | None = None  # scalar reward; defaults to correct_B as 0/1
    student_seq_logp_B: torch.Tensor | None = None  # sum_t log pi_S(a_t | ...), behaviour policy
    teacher_seq_logp_B: torch.Tensor | None = None  # sum_t log pi_T(a_t | ...); NaN where unscored

    def __post_init__(self):
        vecs = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        check_rollout_vectors(**vecs)
        if bool((self.lengths_B < 0).any()):
            raise ValueError("lengths_B has negative entries")


@dataclass
class Plan:
    """What :meth:`Algorithm.plan` decides for each rollout of the global batch."""

    path_B: torch.Tensor  # Path per rollout (long)
    weight_B: torch.Tensor  # constant weight of the rollout's loss (float64, no gradient)
    advantage_B: torch.Tensor | None = None  # GRPO's advantage (float64)


@dataclass
class TokenBatch:
    """One micro-batch of rollouts as the loss sees it. Values at padding are ignored."""

    logp_BT: torch.Tensor  # current student log-probs of the response tokens (with gradient)
    old_logp_BT: torch.Tensor  # pi_old: the trainer's no-grad recompute, or the server's (algo.old_logprobs)
    mask_BT: torch.Tensor  # real response tokens
    path_B: torch.Tensor  # from the plan
    weight_B: torch.Tensor  # from the plan
    advantage_B: torch.Tensor | None = None  # from the plan (GRPO)
    teacher_logp_BT: torch.Tensor | None = None  # teacher log-probs of the sampled tokens (OPD paths)
    ref_logp_BT: torch.Tensor | None = None  # reference policy log-probs (GRPO's KL)
    kl_BT: torch.Tensor | None = None  # full-vocab KL(student||teacher) per token, with gradient
    behaviour_logp_BT: torch.Tensor | None = None  # the rollout server's log-probs; None = not given
    # rollouts whose pi_old is this pass's own log-prob, detached (on-policy: the weights pi_old would
    # be recomputed with; see Algorithm.reads_student_logp); their old_logp_BT is not read
    old_from_logp_B: torch.Tensor | None = None


def _zero_padding(t: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor | None:
    # torch.where, so that NaN/inf padding neither reaches the loss nor its gradient.
    return None if t is None else torch.where(m, t, torch.zeros_like(t))


class Algorithm:
    """Base of the registered algorithms: each is a dataclass of its options (scope_ds/config/algo.py's
    ``*Options``, checked at construction) with this maths."""

    def __post_init__(self):
        self.check()  # a ConfigError (a ValueError) naming the option

    @property
    def recomputes_old_logprobs(self) -> bool:
        """Whether the trainer recomputes pi_old (no-grad student forward, at train_temperature) before
        the update and passes the server's log-probs as ``behaviour_logp_BT``."""
        return self.uses_importance_ratio and self.old_logprobs == "recompute"

    def train_temperature(self, rollout_temperature: float) -> float:
        """The temperature at which the trainer takes the student's log-probs for this loss (and
        pi_old's, when recomputed): the rollout's, so that rho compares like with like."""
        return rollout_temperature

    def teacher_mask(self, correct_B: torch.Tensor) -> torch.Tensor:
        """Rollouts whose teacher log-probs are needed (default: none)."""
        return torch.zeros_like(correct_B, dtype=torch.bool)

    def reads_teacher_logp(self, correct_B: torch.Tensor) -> torch.Tensor:
        """Rollouts of ``teacher_mask`` whose teacher log-probs must exist before the update (the
        scoring stage computes those); the update's full-vocabulary KL pass gives the others'
        (default: all of them)."""
        return self.teacher_mask(correct_B)

    def reads_student_logp(self, correct_B: torch.Tensor) -> torch.Tensor:
        """Rollouts whose plan reads the value of pi_old's log-probs (default: none). With
        ``recomputes_old_logprobs`` only these are recomputed before the update: pi_old is the
        policy of the update itself (one optimizer step per batch), so for every other rollout
        the update's own forward pass gives pi_old, its log-probs detached (rho = 1, gradient
        d log pi_theta), and no separate pass is needed."""
        return torch.zeros_like(correct_B, dtype=torch.bool)

    @property
    def needs_reference(self) -> bool:
        return False

    @property
    def needs_teacher(self) -> bool:
        """Whether the trainer builds the teacher engine: to score rollouts, or for the full-vocab KL."""
        return self.uses_full_kl

    # ---- global batch -------------------------------------------------------------------------
    def plan(self, stats: RolloutStats) -> Plan:
        raise NotImplementedError

    def normalizer(self, plan: Plan, stats: RolloutStats) -> float:
        trained = (plan.path_B != Path.SKIP) & (plan.weight_B != 0)
        return losses.global_normalizer(self.aggregation, stats.lengths_B, stats.group_B, trained)

    # ---- micro-batch --------------------------------------------------------------------------
    def token_terms(self, b: TokenBatch, rho_BT: torch.Tensor) -> torch.Tensor:
        """Per-token loss term [B, T] of each rollout's path (before weighting and aggregation)."""
        raise NotImplementedError

    def loss(self, b: TokenBatch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted, aggregated loss of one micro-batch and its metrics: per-path parts of the loss,
        ``is/truncated_share`` (a share of this micro-batch's real tokens) and, where the mismatch is
        corrected, the token SUMS of :func:`losses.mismatch_stats` (summed over micro-batches and
        ranks, then divided by the summed ``mismatch/tokens``).

        With ``recomputes_old_logprobs`` and ``behaviour_logp_BT`` given, each token's term is
        multiplied by the constant min(pi_old / pi_behaviour, mismatch_cap) before weighting.
        """
        b = self._prepared(b, check=True)
        m = b.mask_BT.bool()
        total, term, weight, corrected = self._objective(b, normalizer)
        metrics = {}
        with torch.no_grad():
            for p in torch.unique(b.path_B).tolist():
                if p != Path.SKIP:
                    sel = (b.path_B == p).to(term.dtype)
                    part = losses.aggregate(term.detach(), m, weight * sel, self.aggregation, normalizer)
                    metrics[f"loss/{Path(p).name.lower()}"] = float(part)
            metrics["is/truncated_share"] = float(losses.truncated_share(b.logp_BT, b.old_logp_BT, m, self.is_cap))
            if corrected:
                metrics.update(losses.mismatch_stats(b.old_logp_BT, b.behaviour_logp_BT, m, self.mismatch_cap))
        return total, metrics

    def _prepared(self, b: TokenBatch, check: bool) -> TokenBatch:
        """``b`` with pi_old filled in where it is the pass's own, checked (``check``: every tensor's
        shape and finite values on the mask), and padding zeroed."""
        if b.old_from_logp_B is not None:
            mine = b.old_from_logp_B.bool()[:, None]
            b = dataclasses.replace(
                b, old_logp_BT=torch.where(mine, b.logp_BT.detach(), b.old_logp_BT), old_from_logp_B=None
            )
        if check:
            losses.check_token_tensors(
                b.mask_BT,
                logp_BT=b.logp_BT,
                old_logp_BT=b.old_logp_BT,
                teacher_logp_BT=self._teacher_on_path(b),
                ref_logp_BT=b.ref_logp_BT,
                kl_BT=b.kl_BT,
                behaviour_logp_BT=b.behaviour_logp_BT,
            )
            check_rollout_vectors(path_B=b.path_B, weight_B=b.weight_B)
            if b.path_B.shape[0] != b.mask_BT.shape[0]:
                raise ValueError(
                    f"path_B has {b.path_B.shape[0]} entries, expected {b.mask_BT.shape[0]} rows of mask_BT"
                )
        m = b.mask_BT.bool()
        return dataclasses.replace(
            b,
            logp_BT=_zero_padding(b.logp_BT, m),
            old_logp_BT=_zero_padding(b.old_logp_BT, m),
            teacher_logp_BT=_zero_padding(b.teacher_logp_BT, m),
            ref_logp_BT=_zero_padding(b.ref_logp_BT, m),
            kl_BT=_zero_padding(b.kl_BT, m),
            behaviour_logp_BT=_zero_padding(b.behaviour_logp_BT, m),
        )

    def _objective(self, b: TokenBatch, normalizer: float):
        """(loss, per-token term, per-rollout weight, whether the mismatch is corrected) of a prepared ``b``."""
        rho = losses.importance_ratio(b.logp_BT, b.old_logp_BT, self.is_cap)
        term = self.token_terms(b, rho)
        corrected = self.recomputes_old_logprobs and b.behaviour_logp_BT is not None
        if corrected:
            term = term * losses.mismatch_weight(b.old_logp_BT, b.behaviour_logp_BT, self.mismatch_cap).to(term.dtype)
        weight = b.weight_B.detach().to(term.dtype)
        return losses.aggregate(term, b.mask_BT.bool(), weight, self.aggregation, normalizer), term, weight, corrected

    def token_grad_fn(self, b: TokenBatch, normalizer: float, index_BT: torch.Tensor, n_tokens: int):
        """d loss / d (logp, kl) token by token, for an LM head that applies the loss's gradient in
        the pass that computes the statistics (``ops.chunked_stats(grad_fn=...)``): no logits are
        recomputed in backward. ``b`` holds the micro-batch's constants (its ``logp_BT`` / ``kl_BT``
        are not read); ``index_BT`` is the flat position of each real token among ``n_tokens``.

        The loss is sum_i w_i agg_t(term_it) / normalizer, and term_it a function of token t's own
        log-prob (and KL) given constants, so a token's gradient needs only its own values: each
        chunk's loss is this same loss over its tokens, one row each (a seq-mean's 1 / length moves
        into the row's weight). Returns ``grad_fn(rows, {stat: values}) -> {stat: d loss / d stat}``."""
        m = b.mask_BT.bool()
        weight_BT = b.weight_B.detach().double()[:, None].expand(m.shape)
        if self.aggregation == "seq-mean":  # a one-token row's mean is its sum: 1 / length goes in the weight
            weight_BT = weight_BT / m.sum(-1, keepdim=True).clamp_min(1)

        def flat(t_BT: torch.Tensor | None) -> torch.Tensor | None:
            if t_BT is None:
                return None
            out = torch.zeros(n_tokens, dtype=t_BT.dtype, device=t_BT.device)
            out[index_BT[m]] = t_BT[m]
            return out

        def per_row(v_B: torch.Tensor | None) -> torch.Tensor | None:
            return None if v_B is None else flat(v_B[:, None].expand(m.shape))

        consts = {
            "old_logp_BT": flat(b.old_logp_BT),
            "teacher_logp_BT": flat(b.teacher_logp_BT),
            "ref_logp_BT": flat(b.ref_logp_BT),
            "behaviour_logp_BT": flat(b.behaviour_logp_BT),
        }
        rows_of = {
            "path_B": per_row(b.path_B),
            "weight_B": flat(weight_BT),
            "advantage_B": per_row(b.advantage_B),
            "old_from_logp_B": per_row(b.old_from_logp_B),
        }

        def grad_fn(rows: slice, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
            leaves = {k: values[k].detach()[:, None].requires_grad_() for k in ("logp", "kl") if k in values}
            with torch.enable_grad():
                tb = TokenBatch(
                    logp_BT=leaves["logp"],
                    kl_BT=leaves.get("kl"),
                    mask_BT=torch.ones_like(leaves["logp"], dtype=torch.bool),
                    **{k: None if v is None else v[rows][:, None] for k, v in consts.items()},
                    **{k: None if v is None else v[rows] for k, v in rows_of.items()},
                )
                loss = self._objective(self._prepared(tb, check=False), normalizer)[0]  # checked once, whole, by loss()
                if not loss.requires_grad:  # nothing in these rows depends on the statistics
                    return dict.fromkeys(leaves)
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            return {k: None if g is None else g[:, 0] for k, g in zip(leaves, grads, strict=True)}

        return grad_fn

    def _teacher_on_path(self, b: TokenBatch) -> torch.Tensor | None:
        # Teacher log-probs are only required (and checked) on rows routed to OPD.
        if b.teacher_logp_BT is None:
            return None
        rows = (b.path_B == Path.OPD)[:, None]
        return torch.where(rows, b.teacher_logp_BT, torch.zeros_like(b.teacher_logp_BT))
