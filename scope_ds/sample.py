"""One record per rollout, from the rollout server to the rollouts log.

The rollout stage fills the first block of fields from the server's answer; each later stage
(reward, score, update) fills its own block. Keeping every stage's output on one object means a
rollout can be written to ``OUT/rollouts/step_N.jsonl`` at any point and read back as a whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
