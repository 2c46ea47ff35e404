"""The algorithms' options: one dataclass per algorithm, chosen by ``algo.name``.

The algorithm classes (scope_ds/algorithms/) are these options with their maths; the config
(``scope_ds.config``) holds one under ``algo`` and exports every name here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from scope_ds.choices import check_literal_fields
from scope_ds.config.errors import ConfigError

Aggregation = Literal["seq-sum", "token-mean", "seq-mean"]  # the loss's normaliser (algorithms/losses.py)
OldLogprobs = Literal["recompute", "server"]
WeightMode = Literal["ppl", "uniform", "reversed"]  # SCOPE's weights (algorithms/weights.py)
Normalization = Literal["sum", "mean"]
KLForm = Literal["sampled", "full"]


@dataclass
class AlgoOptions:
    """What every algorithm takes."""

    name: ClassVar[str] = ""
    uses_teacher_rollouts: ClassVar[bool] = False  # KD trains on answers the teacher generated
    # False where the loss ignores rho (KD's NLL): is_cap, old_logprobs and mismatch_cap are then no
    # options of the algorithm, and nothing is recomputed or reweighted.
    uses_importance_ratio: ClassVar[bool] = True
    # Rollouts per prompt (rollout.n) below which the plan trains nothing: 2 where the advantage is
    # normalised within the prompt's group (GRPO), which is 0 for a group of one.
    min_group_size: ClassVar[int] = 1

    aggregation: Aggregation = "seq-sum"  # seq-sum (paper) | token-mean (authors' code) | seq-mean
    is_cap: float | None = None  # truncate importance ratios above this (stale rollouts); None = no cap
    # recompute: pi_old from a no-grad trainer forward before the update, and the server's log-probs
    # only correct the train-inference mismatch (truncated IS) | server: pi_old = the server's log-probs
    old_logprobs: OldLogprobs = "recompute"
    mismatch_cap: float = 2.0  # truncate the mismatch weight pi_old / pi_behaviour above this (>= 1)

    @property
    def uses_full_kl(self) -> bool:
        return False

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """The options a user may set, with their defaults (``name`` aside)."""
        hidden = () if cls.uses_importance_ratio else ("is_cap", "old_logprobs", "mismatch_cap")
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in hidden}

    def check(self) -> None:
        check_literal_fields(self, "algo", ConfigError)
        if self.is_cap is not None and not self.is_cap >= 1.0:
            raise ConfigError(f"algo.is_cap must be >= 1 or null, got {self.is_cap}")
        if self.mismatch_cap is None or not self.mismatch_cap >= 1.0:
            raise ConfigError(f"algo.mismatch_cap must be >= 1, got {self.mismatch_cap}")


@dataclass
class DistillOptions(AlgoOptions):
    """SCOPE's and OPD's: the reverse KL to the teacher (Eq. 3)."""

    normalization: Normalization = "sum"  # sum: a subset's weights sum to 1 (paper) | mean: average 1 (authors' code)
    kl: KLForm = "sampled"  # sampled: Eq. 3's single-token estimator (paper) | full: full-vocabulary KL

    @property
    def uses_full_kl(self) -> bool:
        return self.kl == "full"


@dataclass
class ScopeOptions(DistillOptions):
    name: ClassVar[str] = "scope"
    tau: float = 1.0  # softmax temperature of both weights (paper ablates 0.5, 1, 2)
    student_weight: WeightMode = "ppl"  # ppl (Eq. 4) | uniform | reversed (the authors' run scripts)
    teacher_weight: WeightMode = "ppl"  # ppl (Eq. 5) | uniform | reversed

    def check(self) -> None:
        super().check()
        if not self.tau > 0:
            raise ConfigError(f"algo.tau must be > 0, got {self.tau}")


@dataclass
class OPDOptions(DistillOptions):
    name: ClassVar[str] = "opd"


@dataclass
class GRPOOptions(AlgoOptions):
    name: ClassVar[str] = "grpo"
    min_group_size: ClassVar[int] = 2  # r - mean(group) is 0 for a group of one rollout
    aggregation: Aggregation = "token-mean"  # mean over all trained tokens of the global batch
    eps: float = 0.2  # ratio clip range [1 - eps, 1 + eps] (paper's setting)
    kl_coef: float = 1e-4  # weight of k3 KL to the reference policy (paper's setting); 0 = no reference
    std_normalize: bool = True  # divide the centred reward by the group std (False = Dr. GRPO)

    def check(self) -> None:
        super().check()
        if not 0 < self.eps < 1:
            raise ConfigError(f"algo.eps must be in (0, 1), got {self.eps}")
        if self.kl_coef < 0:
            raise ConfigError(f"algo.kl_coef must be >= 0, got {self.kl_coef}")


@dataclass
class KDOptions(AlgoOptions):
    name: ClassVar[str] = "kd"
    uses_teacher_rollouts: ClassVar[bool] = True
    uses_importance_ratio: ClassVar[bool] = False
    aggregation: Aggregation = "token-mean"  # mean NLL over all teacher-answer tokens of the global batch
    only_correct: bool = False  # train only on teacher answers the verifier accepts (rejection sampling)
    # False: the NLL at T = 1, standard sequence-level KD | True: at the rollout (teacher sampling) temperature
    nll_at_rollout_temperature: bool = False


ALGO_OPTIONS: dict[str, type[AlgoOptions]] = {c.name: c for c in (ScopeOptions, OPDOptions, GRPOOptions, KDOptions)}


def algo_options_class(name: Any) -> type[AlgoOptions]:
    """The options class of ``algo.name``; ConfigError naming the allowed names."""
    if name not in ALGO_OPTIONS:
        raise ConfigError(f"unknown algo.name {name!r}; choose one of {sorted(ALGO_OPTIONS)}")
    return ALGO_OPTIONS[name]
