"""SCOPE (Eq. 2-6) and the OPD baseline, which is SCOPE's incorrect path on every rollout.

Shape legend: B = rollouts of the global batch; T = response positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scope_ds.algorithms import losses
from scope_ds.algorithms.base import Algorithm, Path, Plan, RolloutStats, TokenBatch
from scope_ds.algorithms.weights import ppl_weights
from scope_ds.config import OPDOptions, ScopeOptions


class _DistillBase(Algorithm):
    """SCOPE's and OPD's shared maths (their options: config.DistillOptions)."""

    @property
    def needs_teacher(self) -> bool:
        return True  # the teacher scores the OPD path (Eq. 3; SCOPE's weights of Eq. 5)

    def reads_teacher_logp(self, correct_B: torch.Tensor) -> torch.Tensor:
        # kl=sampled: the loss reads them (Eq. 3). kl=full: the loss reads the KL, whose pass in the
        # update also gives the teacher's log-probs; only weights made from them are needed before.
        if self.kl == "sampled":
            return self.teacher_mask(correct_B)
        return self._weights_read_teacher(correct_B)

    def _weights_read_teacher(self, correct_B: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(correct_B, dtype=torch.bool)  # uniform weights (OPD)

    def token_terms(self, b: TokenBatch, rho_BT: torch.Tensor) -> torch.Tensor:
        on_opd = (b.path_B == Path.OPD)[:, None]
        term = torch.where((b.path_B == Path.MLE)[:, None], losses.mle_term(rho_BT), torch.zeros_like(rho_BT))
        if bool(on_opd.any()):
            if self.kl == "full":
                if b.kl_BT is None:
                    raise ValueError("kl_BT is required with algo.kl=full on OPD rows")
                opd = losses.full_kl_term(rho_BT, b.kl_BT)
            else:
                if b.teacher_logp_BT is None:
                    raise ValueError("teacher_logp_BT is required on OPD rows")
                opd = losses.opd_term(rho_BT, b.logp_BT, b.teacher_logp_BT)
            term = torch.where(on_opd, opd, term)
        return term


@dataclass
class Scope(_DistillBase, ScopeOptions):
    """Correct rollouts -> MLE weighted by student PPL (Eq. 4); incorrect -> OPD weighted by the
    teacher's inverse PPL (Eq. 5); both softmaxes within each prompt's group at temperature tau."""

    def teacher_mask(self, correct_B: torch.Tensor) -> torch.Tensor:
        return ~correct_B.bool()

    def _weights_read_teacher(self, correct_B: torch.Tensor) -> torch.Tensor:
        return ~correct_B.bool() & (self.teacher_weight != "uniform")  # Eq. 5's teacher perplexity

    def reads_student_logp(self, correct_B: torch.Tensor) -> torch.Tensor:
        # Eq. 4's student perplexity, of the correct rollouts (uniform weights read no value)
        return correct_B.bool() & (self.student_weight != "uniform")

    def plan(self, stats: RolloutStats) -> Plan:
        correct = stats.correct_B.bool()
        nonempty = stats.lengths_B > 0
        reads_teacher = bool(self._weights_read_teacher(correct).any())
        if stats.student_seq_logp_B is None or (stats.teacher_seq_logp_B is None and reads_teacher):
            raise ValueError("scope needs student_seq_logp_B and, for incorrect rollouts, teacher_seq_logp_B")
        args = dict(lengths_B=stats.lengths_B, group_B=stats.group_B, tau=self.tau, normalization=self.normalization)
        w_stu = ppl_weights(stats.student_seq_logp_B, member_B=correct, sign=-1.0, mode=self.student_weight, **args)
        t_logp = stats.teacher_seq_logp_B
        if t_logp is None or not reads_teacher:  # uniform weights read no value (kl=full scores in the update)
            t_logp = torch.zeros_like(stats.student_seq_logp_B)
        w_tea = ppl_weights(t_logp, member_B=~correct, sign=+1.0, mode=self.teacher_weight, **args)
        path = torch.where(correct, int(Path.MLE), int(Path.OPD))
        path = torch.where(nonempty, path, int(Path.SKIP))
        return Plan(path_B=path, weight_B=torch.where(correct, w_stu, w_tea))


@dataclass
class OPD(_DistillBase, OPDOptions):
    """The OPD baseline: Eq. 3 on every rollout, uniform weights within each prompt's group."""

    def teacher_mask(self, correct_B: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(correct_B, dtype=torch.bool)

    def plan(self, stats: RolloutStats) -> Plan:
        everyone = torch.ones_like(stats.correct_B, dtype=torch.bool)
        zeros = torch.zeros_like(stats.lengths_B, dtype=torch.float64)
        w = ppl_weights(
            zeros, stats.lengths_B, everyone, stats.group_B, sign=1.0, mode="uniform", normalization=self.normalization
        )
        path = torch.where(stats.lengths_B > 0, int(Path.OPD), int(Path.SKIP))
        return Plan(path_B=path, weight_B=w)
