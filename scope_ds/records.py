"""The plain records that cross floors: a prompt, one rollout of it, and a batch of them.

A prompt source yields ``PromptRecord``; the rollout client makes a ``Rollout`` per sampled answer
and each later stage (reward, score, update) fills its own block of fields on it, so that a rollout
can be written to ``OUT/rollouts/step_N.jsonl`` at any point and read back as a whole; a ``Batch``
carries one global batch through the stages and into a checkpoint. Nothing here imports from the
package: every floor may use these records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to roll out and the reference answer its responses are verified against."""

    prompt_id: str  # stable across runs for the same source and row; logged with every rollout
    prompt: str  # the text the student continues, template already applied
    answer: str  # reference answer as a string; the verifier decides what counts as equal


@dataclass
class Rollout:
    """One sampled response to one prompt, with what each stage learned about it."""

    # --- Filled by the rollout client from the server's answer -----------------------------------
    prompt_id: str = ""  # the data set's id of the prompt (stable across steps and resumes)
    sample_index: int = 0  # index of this rollout within its prompt's group of n samples (0..n-1)
    group_id: str = ""  # id shared by the n rollouts of one prompt in one step (the SCOPE group)
    prompt_ids: list[int] = field(default_factory=list)  # prompt token ids, exactly as sent
    response_ids: list[int] = field(default_factory=list)  # generated ids, incl. a matched EOS/stop
    # log pi_old(a_t | ...) per response token, as the server sampled it (see docs/rollout.md for the
    # temperature convention); the trainer needs them for importance ratios of stale rollouts.
    behaviour_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (EOS / stop token or string), "length" or "abort"
    # policy version of the rollout's oldest token: the servers' weight_version of its first segment
    weight_version: int = 0
    # [first response token, policy version] of each segment: a sample interrupted by a weight
    # update is continued by the new weights, one segment per request (rollout/client.py)
    segments: list[list[int]] = field(default_factory=list)
    generated_tokens: int = 0  # tokens the servers generated for it, including any thrown away
    server: str = ""  # base URL of the server that generated it (for debugging skew between servers)
    request_id: str = ""  # the server's meta_info.id, to match server logs

    # --- Filled by the reward stage ----------------------------------------------------------------
    text: str = ""  # decoded response text, what the verifier reads
    reward: float = 0.0  # verifier reward R in {0, 1}
    correct: bool = False  # R == 1; routes the rollout to the MLE (correct) or OPD (incorrect) path
    path: str = ""  # "mle", "opd", "grpo", "kd", ...: which loss this rollout trains

    # --- Filled by the score / update stages ------------------------------------------------------
    # log pi_T(a_t | ...) per response token, at the rollout temperature; only where the path needs it
    teacher_logprobs: list[float] | None = None
    # log pi_old(a_t | ...) per response token, recomputed by the trainer before the update at the
    # algorithm's training temperature (algo.old_logprobs=recompute); None: the server's are used
    old_logprobs: list[float] | None = None
    student_seq_logp: float | None = None  # log pi_S(y|x), summed over response tokens
    teacher_seq_logp: float | None = None  # log pi_T(y|x); only computed where the path needs it
    weight: float | None = None  # the rollout's weight in the loss (SCOPE Eq. 4 / Eq. 5)

    @property
    def response_length(self) -> int:
        """Number of response tokens, the |y_i| of the SCOPE equations."""
        return len(self.response_ids)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus the response length (for the rollouts log)."""
        out = asdict(self)
        out["response_length"] = self.response_length
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Rollout:
        """Inverse of :meth:`to_json` (derived keys such as response_length are ignored)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in obj.items() if k in names})


@dataclass
class Batch:
    """One global batch as it moves through the stages."""

    step: int  # the optimizer step this batch trains
    records: list[PromptRecord]  # the prompts, in group order
    rollouts: list[Rollout] = field(default_factory=list)  # n per prompt, prompt-major
    times: dict[str, float] = field(default_factory=dict)  # stage -> busy seconds
    verify_timeouts: int = 0  # answers the verifier ran out of time on (counted incorrect)
    # While generating: per prompt, its n samples as they stand (None: not started), filled in by
    # the rollout client as answers come in; what a checkpoint keeps of a batch in flight.
    samples: list[list[Rollout | None]] | None = None

    def to_json(self) -> dict:
        """What a checkpoint keeps of a batch generated ahead: prompts and rollouts as generated
        and verified (the teacher's scores are recomputed after a resume); of a batch in flight,
        its samples so far."""
        out: dict[str, Any] = {"step": self.step, "records": [vars(r) for r in self.records]}
        if self.samples is not None:  # in flight: the samples hold the rollouts so far
            out["samples"] = [[None if r is None else r.to_json() for r in group] for group in self.samples]
            out["rollouts"] = []
        else:
            out["rollouts"] = [{**r.to_json(), "teacher_logprobs": None} for r in self.rollouts]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> Batch:
        records = [PromptRecord(**r) for r in obj["records"]]
        batch = cls(step=obj["step"], records=records, rollouts=[Rollout.from_json(r) for r in obj["rollouts"]])
        if obj.get("samples") is not None:
            batch.samples = [[None if r is None else Rollout.from_json(r) for r in g] for g in obj["samples"]]
        return batch
