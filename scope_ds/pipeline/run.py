"""The parts of a training run, as every stage and checkpoint function receives them.

Built once by ``build.build_run``; the stages read the parts and change only what they own (the
engines' weights, the policy versions). Rank 0 alone holds what speaks HTTP (``rollout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scope_ds.algorithms.base import Algorithm
from scope_ds.config import Config
from scope_ds.data.record import PromptRecord
from scope_ds.engines.models import InferenceEngine, StudentEngine
from scope_ds.metrics import RunLog
from scope_ds.pipeline.versions import PolicyVersions
from scope_ds.rewards.pool import VerifierPool


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

    servers: Any  # rollout.launcher.RolloutServers: launched or attached servers, stopped at close
    client: Any  # rollout.client.SyncRolloutClient
    weight_sync: Any = None  # pushes the student's weights (to eval_client's servers); None: nothing to push
    eval_servers: Any = None  # KD: the student's own servers, for evaluation; None: ``servers``
    eval_client: Any = None  # the client evaluation uses; None: ``client``

    def __post_init__(self) -> None:
        self.eval_client = self.eval_client or self.client

    def close(self) -> None:
        if self.weight_sync is not None and hasattr(self.weight_sync, "close"):
            self.weight_sync.close()
        for client in {id(c): c for c in (self.client, self.eval_client)}.values():
            client.close()
        for servers in (self.servers, self.eval_servers):
            if servers is not None:
                servers.stop()


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: Config
    rank: int
    world: int
    algo: Algorithm
    tokenizer: Any  # the student's (and teacher's) Hugging Face tokenizer
    student_path: str  # the student's model folder (config and tokenizer files for exports)
    student: StudentEngine
    teacher: InferenceEngine | None  # only for algorithms that score with it (algo.needs_teacher)
    reference: InferenceEngine | None  # the initial student, for GRPO's KL term
    versions: PolicyVersions
    verifier: VerifierPool | None = None  # rewards of response texts, in worker processes (rank 0)
    records: list[PromptRecord] | None = None  # training prompts (rank 0 draws from them)
    eval_records: list[PromptRecord] | None = None  # held-out prompts, never trained on
    score_group: Any = None  # the scoring thread's process group (collectives.score_group)
    log: RunLog | None = None  # metrics.jsonl, rollouts, TensorBoard, the progress bar (rank 0 writes)
    rollout: RolloutSide | None = None  # rank 0 only

    @property
    def pushes_weights(self) -> bool:
        """Whether a sync sends the student's weights anywhere (known alike on every rank): always,
        but for KD without in-training evaluation (its rollout servers serve the teacher)."""
        return pushes_weights(self.algo, bool(self.cfg.data.eval_every and self.eval_records))

    @property
    def shares_prompts(self) -> bool:
        """Whether packed micro-batches hold a prompt once for its rollouts (``train.share_prompts``):
        only where every engine that reads them attends with engines/attention.py, which alone
        takes such a row (flash-attention's varlen kernels cannot)."""
        t = self.cfg.train
        return t.packing and t.share_prompts and not self.engines_unable_to_share_prompts

    @property
    def engines_unable_to_share_prompts(self) -> list[InferenceEngine | StudentEngine]:
        """The engines whose attention cannot take a row whose rollouts share their prompt."""
        engines = (self.student, self.teacher, self.reference)
        return [e for e in engines if e is not None and not e.attends_shared_prompts]

    @property
    def run_dir(self) -> str:
        return self.cfg.logging.run_dir

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else 0

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.rollout is not None:
            self.rollout.close()
        if self.verifier is not None:
            self.verifier.close()
