"""Sequence-level KD: supervised NLL on answers the teacher generated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scope_ds.algorithms.base import Algorithm, Path, Plan, RolloutStats, TokenBatch
from scope_ds.config import KDOptions


@dataclass
class KD(Algorithm, KDOptions):
    """Supervised NLL on the teacher's answers (options: config.KDOptions)."""

    def train_temperature(self, rollout_temperature: float) -> float:
        # Sequence-level KD is supervised learning on the teacher's answers: the student's own (T = 1)
        # distribution fits them, as in SFT. The rollout temperature is how the teacher sampled, not a
        # part of the student's model; the option fits the tempered student instead (docs/algorithms.md).
        return rollout_temperature if self.nll_at_rollout_temperature else 1.0

    def plan(self, stats: RolloutStats) -> Plan:
        keep = stats.lengths_B > 0
        if self.only_correct:
            keep = keep & stats.correct_B.bool()
        path = torch.where(keep, int(Path.NLL), int(Path.SKIP))
        return Plan(path_B=path, weight_B=keep.double())

    def token_terms(self, b: TokenBatch, rho_BT: torch.Tensor) -> torch.Tensor:
        return -b.logp_BT
