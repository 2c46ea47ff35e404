"""The toy arithmetic task, its exact verifier, the math verifier and the verifier registry."""

from __future__ import annotations

import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scope_ds.rewards import VERIFIERS, get_verifier
from scope_ds.toy.task import (
    MAX_VALUE,
    N_OPS,
    random_order_steps,
    sample_problem,
    split_of,
    toy_problems,
    toy_prompt,
    toy_records,
    toy_solution,
)
from scope_ds.toy.verify import extract_boxed, verify_toy


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


def test_any_order_problems_are_sums_solved_in_any_order_that_stays_in_range() -> None:
    problems = toy_problems("train", 300, seed=0, variant="any-order")
    texts = set()
    for p in problems:
        assert "*" not in p.expression and "(" not in p.expression and len(p.ops) == 4 and p.any_order
        assert eval(p.expression) == p.answer
        for seed in range(3):
            steps = random_order_steps(p, random.Random(seed))
            parsed = [re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", step).groups() for step in steps]
            assert sorted((op, int(x)) for _, op, x, _ in parsed) == sorted(p.ops)  # each operation once
            value = p.start
            for a, op, x, result in parsed:  # each step from the last value, computed right, in range
                assert int(a) == value and eval(f"{a}{op}{x}") == int(result) and 0 <= int(result) <= MAX_VALUE
                value = int(result)
            assert value == p.answer and verify_toy(toy_solution(p, steps), str(p.answer)) == 1.0
            texts.add(toy_solution(p, steps))
    assert len(texts) > 2 * len(problems)  # most problems come out in several orders
    assert toy_problems("train", 50, seed=0, variant="chain") == toy_problems("train", 50, seed=0)  # unchanged


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
    verify = get_verifier("math")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(verify, "\\boxed{0.5}", "\\frac{1}{2}").result() == 1.0


def test_registry() -> None:
    assert VERIFIERS == ("math", "toy")
    assert get_verifier("toy") is verify_toy
    with pytest.raises(ValueError, match="unknown verifier 'gsm'; known verifiers: math, toy"):
        get_verifier("gsm")


def test_tokenizer_round_trip_and_prompt_prefix(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from scope_ds.toy.models import sft_tensors, train_tokenizer

    train_tokenizer(seed=0).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)
    problems = toy_problems("test", 50, seed=0)
    for problem in problems:
        prompt, full = toy_prompt(problem), toy_prompt(problem) + toy_solution(problem)
        prompt_ids, full_ids = tok(prompt)["input_ids"], tok(full)["input_ids"]
        assert prompt_ids[0] == tok.bos_token_id and tok.unk_token_id not in full_ids
        assert full_ids[: len(prompt_ids)] == prompt_ids  # generation continues exactly the prompt's tokens
        assert tok.decode(full_ids, skip_special_tokens=True) == full
        # What a rollout decodes from the generated ids alone still verifies.
        assert verify_toy(tok.decode(full_ids[len(prompt_ids) :], skip_special_tokens=True), str(problem.answer))
    digits = [t for t in tok.convert_ids_to_tokens(tok("Compute 123+45.")["input_ids"]) if t.strip("▁").isdigit()]
    assert digits == ["1", "2", "3", "4", "5"]  # numbers digit by digit
    ids_NT, labels_NT = sft_tensors(tok, problems)
    assert ((labels_NT != -100).sum(1) > 10).all() and (labels_NT[:, :5] == -100).all()


def _fake_build(calls: list[Path]):
    def build(out, seed: int = 0, progress: bool = True, variant: str = "chain") -> dict:
        calls.append(Path(out))
        time.sleep(0.2)  # long enough for a concurrent caller to arrive while this one builds
        for name in ("teacher", "student"):
            (Path(out) / name).mkdir()
        report = {"seed": seed}
        (Path(out) / "build_report.json").write_text(json.dumps(report))
        return report

    return build


def test_ensure_toy_models_builds_once_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scope_ds.toy import models as toy_pretrain

    calls: list[Path] = []
    monkeypatch.setattr(toy_pretrain, "build_toy_models", _fake_build(calls))
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: toy_pretrain.ensure_toy_models(tmp_path, seed=5, progress=False), range(3)))
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0].name.startswith(".")  # built aside
    root = tmp_path / f"{toy_pretrain.BUILD_VERSION}-seed5"
    assert all(r.root == root and r.teacher == root / "teacher" and r.report == {"seed": 5} for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", root.name]


def test_failed_build_leaves_nothing_that_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scope_ds.toy import models as toy_pretrain

    def broken(out, seed: int = 0, progress: bool = True, variant: str = "chain") -> dict:
        (Path(out) / "teacher").mkdir()
        raise RuntimeError("out of patience")

    monkeypatch.setattr(toy_pretrain, "build_toy_models", broken)
    with pytest.raises(RuntimeError, match="out of patience"):
        toy_pretrain.ensure_toy_models(tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    calls: list[Path] = []
    monkeypatch.setattr(toy_pretrain, "build_toy_models", _fake_build(calls))
    assert toy_pretrain.ensure_toy_models(tmp_path, progress=False).report == {"seed": 0}
    assert len(calls) == 1


def test_cache_dir_default_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from scope_ds.toy.cache import default_cache_dir

    monkeypatch.setenv("SCOPE_DS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "toy"
    monkeypatch.delenv("SCOPE_DS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "scope_ds" / "toy"
