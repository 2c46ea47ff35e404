"""Exact verifier of the toy arithmetic task: the last \\boxed{...} must hold the answer's very digits."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_boxed(response: str) -> str | None:
    """Content of the last flat ``\\boxed{...}`` in `response`, stripped; None when there is none."""
    matches = _BOXED.findall(response)
    return matches[-1].strip() if matches else None


def verify_toy(response: str, answer: str) -> float:
    """1.0 when the last boxed value equals `answer` exactly (after stripping spaces), else 0.0.

    Exact means no normalisation: "052" or "52.0" is wrong for 52, since the task's solutions never
    write numbers that way and a reward that forgave them would teach the student to.
    """
    predicted = extract_boxed(response)
    return float(predicted is not None and predicted == answer.strip())
