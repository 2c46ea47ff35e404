"""The parts of a training run, as every stage and checkpoint function receives them.

Built once by ``build.build_run``; the stages read the parts and change only what they own (the
engines' weights, the policy versions). ``Run`` is what every rank holds; ``Lead`` is what rank 0
alone holds (everything that speaks HTTP, and the verifier's processes), present exactly there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from scope_ds.algorithms.base import Algorithm
from scope_ds.config import Config
from scope_ds.engines.learner import Learner
from scope_ds.engines.models import InferenceEngine, StudentEngine
from scope_ds.metrics import RunLog
from scope_ds.pipeline.versions import PolicyVersions
from scope_ds.records import PromptRecord
from scope_ds.rewards.pool import VerifierPool
from scope_ds.rollout.client import SyncRolloutClient
from scope_ds.rollout.launcher import RolloutServers
from scope_ds.rollout.weight_sync import WeightSync

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from transformers import PreTrainedTokenizerBase


def pushes_weights(algo: Algorithm, evaluates: bool) -> bool:
    """Whether weight syncs send the student anywhere: always, but for KD without in-training
    evaluation (its rollout servers serve the fixed teacher)."""
    return not algo.uses_teacher_rollouts or evaluates


@dataclass
class RolloutSide:
    """Rank 0's rollout servers, the client that speaks to them, and the weight sync.

    KD generates with the fixed teacher: its servers never change, and in-training evaluation
    goes to servers of its own that serve the student (``eval_*``); for every other algorithm
    those are the rollout servers themselves.
    """

    servers: RolloutServers  # launched or attached servers, stopped at close
    client: SyncRolloutClient
    weight_sync: WeightSync | None = None  # pushes the student (to eval_client's servers); None: nothing to push
    eval_servers: RolloutServers | None = None  # KD: the student's own servers, for evaluation; None: ``servers``
    eval_client: SyncRolloutClient | None = None  # the client evaluation uses; None (given): ``client``

    def __post_init__(self) -> None:
        self.eval_client = self.eval_client or self.client

    def close(self) -> None:
        if self.weight_sync is not None:
            self.weight_sync.close()
        for client in {id(c): c for c in (self.client, self.eval_client)}.values():
            client.close()
        for servers in (self.servers, self.eval_servers):
            if servers is not None:
                servers.stop()


@dataclass
class Lead:
    """What rank 0 alone holds."""

    rollout: RolloutSide  # the servers, their client and the weight sync
    verifier: VerifierPool  # rewards of response texts, in worker processes

    def close(self) -> None:
        self.rollout.close()
        self.verifier.close()


@dataclass
class Run:
    """Everything a training run holds on this rank."""

    cfg: Config
    rank: int
    world: int
    algo: Algorithm
    tokenizer: PreTrainedTokenizerBase  # the student's (and teacher's) Hugging Face tokenizer
    student_path: str  # the student's model folder (config and tokenizer files for exports)
    learner: Learner  # this rank's student, teacher and reference engines, and a step's arithmetic
    versions: PolicyVersions
    records: list[PromptRecord]  # training prompts (rank 0 draws from them)
    eval_records: list[PromptRecord]  # held-out prompts, never trained on
    score_group: ProcessGroup  # the scoring thread's process group (collectives.score_group)
    log: RunLog  # metrics.jsonl, rollouts, TensorBoard, the progress bar (written on rank 0 only)
    lead: Lead | None  # exactly on rank 0 (checked at construction): read it as ``rollout`` / ``verifier``

    def __post_init__(self) -> None:
        if (self.lead is not None) != (self.rank == 0):
            raise ValueError(f"rank {self.rank}: rank 0, and only rank 0, holds the Lead parts")

    @property
    def rollout(self) -> RolloutSide:
        """Rank 0's rollout side (a RuntimeError on any other rank)."""
        return self._lead().rollout

    @property
    def verifier(self) -> VerifierPool:
        """Rank 0's verifier (a RuntimeError on any other rank)."""
        return self._lead().verifier

    def _lead(self) -> Lead:
        if self.lead is None:
            raise RuntimeError(f"rank {self.rank} asked for rank 0's parts (rollout servers, verifier)")
        return self.lead

    @property
    def student(self) -> StudentEngine:
        return self.learner.student

    @property
    def teacher(self) -> InferenceEngine | None:
        """Only for algorithms that score with it (algo.needs_teacher)."""
        return self.learner.teacher

    @property
    def reference(self) -> InferenceEngine | None:
        """The initial student, for GRPO's KL term."""
        return self.learner.reference

    @property
    def pushes_weights(self) -> bool:
        """Whether a sync sends the student's weights anywhere (known alike on every rank): always,
        but for KD without in-training evaluation (its rollout servers serve the teacher)."""
        return pushes_weights(self.algo, bool(self.cfg.data.eval_every and self.eval_records))

    @property
    def run_dir(self) -> str:
        return self.cfg.logging.run_dir

    def close(self) -> None:
        self.log.close()
        if self.lead is not None:
            self.lead.close()
