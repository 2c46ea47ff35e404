"""The math verifier (math-verify underneath) on equivalent and non-equivalent answer forms.

Evaluation numbers are only as good as this: an equivalent form marked wrong lowers Avg@k for every
model alike, and a lenient match (a bare number in the text) would credit answers never given.
"""

from __future__ import annotations

import pytest

from scope_ds.rewards import get_verifier

verify = get_verifier("math")

EQUIVALENT = [
    # fractions and \frac
    ("The answer is \\boxed{\\frac{1}{2}}.", "1/2"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    # decimals
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("\\boxed{0.50}", "0.5"),
    # intervals, with and without spaces or \left \right
    ("\\boxed{(1, 2]}", "(1,2]"),
    ("\\boxed{(1,2]}", "\\left(1, 2\\right]"),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)"),
    # a boxed answer inside a longer text; the reference boxed or in $...$
    ("We add step by step: 3+4=7, so the total is \\boxed{7}. Done.", "7"),
    ("\\boxed{3}", "$3$"),
    ("\\boxed{3}", "\\boxed{3}"),
    # the last box is the answer, earlier ones are drafts
    ("First I thought \\boxed{5}, but rechecking gives \\boxed{7}.", "7"),
]

NOT_EQUIVALENT = [
    ("\\boxed{[1,2)}", "(1,2]"),  # other interval ends
    ("\\boxed{2}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{3}}", "0.33"),  # a rounded decimal is not the fraction
    ("First I thought \\boxed{7}, but rechecking gives \\boxed{5}.", "7"),  # the last box counts
    # no boxed answer at all: nothing is taken from the text
    ("The answer is 7.", "7"),
    ("7", "7"),
    ("", "7"),
    ("\\boxed{}", "7"),
]


@pytest.mark.parametrize(("response", "answer"), EQUIVALENT)
def test_equivalent_forms_verify(response: str, answer: str) -> None:
    assert verify(response, answer) == 1.0


@pytest.mark.parametrize(("response", "answer"), NOT_EQUIVALENT)
def test_other_answers_and_missing_boxes_do_not(response: str, answer: str) -> None:
    assert verify(response, answer) == 0.0
