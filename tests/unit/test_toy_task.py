"""The toy arithmetic task, its exact verifier, the math verifier and the verifier registry."""

from __future__ import annotations

import random

import pytest

from scope_ds.data.toy import (
    MAX_VALUE,
    N_OPS,
    sample_problem,
    split_of,
    toy_problems,
    toy_prompt,
    toy_records,
    toy_solution,
)
from scope_ds.rewards import VERIFIERS, get_verifier
from scope_ds.rewards.toy import extract_boxed, verify_toy


def test_generation_is_deterministic_per_seed() -> None:
    assert toy_problems("train", 50, seed=3) == toy_problems("train", 50, seed=3)
    assert toy_problems("train", 50, seed=3) != toy_problems("train", 50, seed=4)
    assert toy_records("test", 20, seed=1) == toy_records("test", 20, seed=1)


def test_splits_are_disjoint_and_problems_distinct() -> None:
    drawn = {split: toy_problems(split, 300, seed=0) for split in ("train", "dev", "test")}
    expressions = {split: {p.expression for p in problems} for split, problems in drawn.items()}
    assert all(len(expressions[s]) == 300 for s in drawn)  # distinct within a split
    assert not expressions["train"] & expressions["test"]
    assert not expressions["train"] & expressions["dev"]
    assert not expressions["dev"] & expressions["test"]
    # Whatever the seed, a held-out problem is never a training one: the split is a property of the text.
    assert all(split_of(p.expression) == "test" for p in toy_problems("test", 100, seed=99))


def test_expressions_evaluate_to_the_answer_and_steps_chain() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        problem = sample_problem(rng)
        assert eval(problem.expression) == problem.answer  # precedence and brackets agree with the steps
        assert len(problem.steps) == N_OPS
        values = [int(step.split("=")[1]) for step in problem.steps]
        assert all(0 <= v <= MAX_VALUE for v in values)
        assert values[-1] == problem.answer
        # Each step starts from the previous step's result.
        for before, step in zip(values, problem.steps[1:], strict=False):
            assert step.startswith(str(before))


def test_prompt_and_solution_format() -> None:
    problem = toy_problems("train", 1, seed=0)[0]
    assert toy_prompt(problem) == f"Compute {problem.expression}."
    solution = toy_solution(problem)
    assert solution.startswith(" ") and solution.endswith(f"Answer: \\boxed{{{problem.answer}}}")
    assert verify_toy(solution, str(problem.answer)) == 1.0
    record = toy_records("train", 1, seed=0)[0]
    assert (record.prompt, record.answer) == (toy_prompt(problem), str(problem.answer))


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(ValueError, match="toy split must be one of"):
        toy_problems("validation", 1, seed=0)


@pytest.mark.parametrize(
    "response,reward",
    [
        ("3+4=7. 7*2=14. Answer: \\boxed{14}", 1.0),
        ("Answer: \\boxed{ 14 }", 1.0),
        ("\\boxed{13} no wait \\boxed{14}", 1.0),  # the last box is the answer
        ("\\boxed{14} no wait \\boxed{13}", 0.0),
        ("Answer: \\boxed{15}", 0.0),
        ("Answer: \\boxed{014}", 0.0),  # exact: no normalisation
        ("Answer: 14", 0.0),  # no box, no answer
        ("", 0.0),
        ("Answer: \\boxed{14", 0.0),  # unclosed
    ],
)
def test_toy_verifier(response: str, reward: float) -> None:
    assert verify_toy(response, "14") == reward


def test_extract_boxed() -> None:
    assert extract_boxed("a \\boxed{1} b \\boxed{22}") == "22"
    assert extract_boxed("nothing") is None


@pytest.mark.parametrize(
    "response,answer,reward",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("We get $x = \\boxed{1/2}$ in the end", "\\frac12", 1.0),
        ("\\boxed{x^2+1}", "1+x^2", 1.0),
        ("\\boxed{12}", "$12$", 1.0),
        ("\\boxed{12}", "\\boxed{12}", 1.0),
        ("\\boxed{2} or rather \\boxed{3}", "3", 1.0),
        ("\\boxed{0.4}", "\\frac{1}{2}", 0.0),
        ("the answer is 0.5", "0.5", 0.0),  # no box: not an answer
        ("\\boxed{}", "1", 0.0),
        ("\\boxed{\\frac{1}{0}}", "2", 0.0),
        ("\\boxed{3}", "\\invalid{{", 0.0),  # unparsable reference: 0, not an exception
    ],
)
def test_math_verifier(response: str, answer: str, reward: float) -> None:
    assert get_verifier("math")(response, answer) == reward


def test_math_verifier_off_the_main_thread() -> None:
    # math-verify's SIGALRM timeout cannot be set outside the main thread; the verifier must still work.
    from concurrent.futures import ThreadPoolExecutor

    verify = get_verifier("math")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(verify, "\\boxed{0.5}", "\\frac{1}{2}").result() == 1.0


def test_registry() -> None:
    assert VERIFIERS == ("math", "toy")
    assert get_verifier("toy") is verify_toy
    with pytest.raises(ValueError, match="unknown verifier 'gsm'; known verifiers: math, toy"):
        get_verifier("gsm")
