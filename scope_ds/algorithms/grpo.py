"""GRPO: group-normalised outcome advantage, clipped ratio, optional k3 KL to a reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scope_ds.algorithms import losses
from scope_ds.algorithms.base import Algorithm, Path, Plan, RolloutStats, TokenBatch
from scope_ds.algorithms.weights import group_advantages
from scope_ds.config import GRPOOptions


@dataclass
class GRPO(Algorithm, GRPOOptions):
    """Group-normalised advantage with a clipped ratio (options: config.GRPOOptions)."""

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def plan(self, stats: RolloutStats) -> Plan:
        reward = stats.reward_B if stats.reward_B is not None else stats.correct_B.double()
        adv = group_advantages(reward, stats.group_B, std_normalize=self.std_normalize)
        path = torch.where(stats.lengths_B > 0, int(Path.PG), int(Path.SKIP))
        return Plan(path_B=path, weight_B=(path != Path.SKIP).double(), advantage_B=adv)

    def token_terms(self, b: TokenBatch, rho_BT: torch.Tensor) -> torch.Tensor:
        if b.advantage_B is None:
            raise ValueError("advantage_B is required for grpo")
        if self.needs_reference and b.ref_logp_BT is None:
            raise ValueError("ref_logp_BT is required for grpo with algo.kl_coef > 0")
        return losses.grpo_term(rho_BT, b.advantage_B, self.eps, b.logp_BT, b.ref_logp_BT, self.kl_coef)
