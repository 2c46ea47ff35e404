"""GRPO: group-normalised outcome advantage, clipped ratio, optional k3 KL to a reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scope_ds.algorithms import losses
from scope_ds.algorithms.base import Algorithm, Path, Plan, RolloutStats, TokenBatch
from scope_ds.algorithms.losses import Aggregation
from scope_ds.algorithms.weights import group_advantages


@dataclass
class GRPO(Algorithm):
    name: ClassVar[str] = "grpo"
    min_group_size: ClassVar[int] = 2  # r - mean(group) is 0 for a group of one rollout
    aggregation: Aggregation = "token-mean"  # mean over all trained tokens of the global batch
    eps: float = 0.2  # ratio clip range [1 - eps, 1 + eps] (paper's setting)
    kl_coef: float = 1e-4  # weight of k3 KL to the reference policy (paper's setting); 0 = no reference
    std_normalize: bool = True  # divide the centred reward by the group std (False = Dr. GRPO)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.eps < 1:
            raise ValueError(f"algo.eps must be in (0, 1), got {self.eps}")
        if self.kl_coef < 0:
            raise ValueError(f"algo.kl_coef must be >= 0, got {self.kl_coef}")

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
