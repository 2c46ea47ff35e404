"""The one record every prompt source yields: the toy generator and Hugging Face datasets alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to roll out and the reference answer its responses are verified against."""

    prompt_id: str  # stable across runs for the same source and row; logged with every rollout
    prompt: str  # the text the student continues, template already applied
    answer: str  # reference answer as a string; the verifier decides what counts as equal
