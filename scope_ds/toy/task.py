"""The toy reasoning task of the embedded default: multi-step integer arithmetic.

A problem is an expression such as ``(12+7)*3-5`` whose operations are applied left to right; the
worked solution writes one step per operation and boxes the result:

    prompt:   "Compute (12+7)*3-5."
    solution: " 12+7=19. 19*3=57. 57-5=52. Answer: \\boxed{52}"

Every intermediate value stays in [0, MAX_VALUE], so a model of a few hundred thousand parameters can
learn each step, while chaining N_OPS of them keeps the task multi-step: one wrong step spoils the
answer. Which split a problem belongs to is a hash of its expression, so train, dev and test are
disjoint whatever seeds and sizes are asked for.

Two variants (``data.toy_variant``):
- ``chain`` (the default): the above; a problem has one correct solution text.
- ``any-order``: sums and differences only, four operations, e.g. ``Compute 12+7-5+3.``; a solution
  may apply them in any order that keeps every value in range (``12-5=7. 7+3=10. 10+7=17.``), and
  the SFT data writes each problem in a random one. Correct answers then differ in their text, so
  the student's perplexities (hence SCOPE's weights) differ within a group (docs/study.md).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from scope_ds.records import PromptRecord

N_OPS = 3  # operations per problem, hence written steps per solution
VARIANTS = ("chain", "any-order")
VARIANT_OPS = {"chain": N_OPS, "any-order": 4}  # operations per problem of each variant
START_RANGE = (2, 30)  # first operand, inclusive
OPERAND_RANGE = (2, 9)  # every later operand, inclusive
MAX_VALUE = 99  # no intermediate value exceeds this (nor drops below 0)

# Hash buckets out of 100. "dev" is for decisions made while building models (when to stop
# training); "test" is the held-out split that accuracies are reported on.
SPLITS: dict[str, range] = {"train": range(0, 80), "dev": range(80, 90), "test": range(90, 100)}


@dataclass(frozen=True)
class ToyProblem:
    expression: str  # e.g. "(12+7)*3-5", parenthesised so that ordinary precedence gives the answer
    steps: tuple[str, ...]  # one "a<op>b=c" per operation, in order
    answer: int  # value of the expression
    start: int = 0  # the first operand
    ops: tuple[tuple[str, int], ...] = ()  # (operation, operand) in the expression's order
    any_order: bool = False  # any order of the operations is a correct solution (the any-order variant)


def _allowed_ops(value: int) -> list[str]:
    ops = ["+"] if value + OPERAND_RANGE[0] <= MAX_VALUE else []
    if value - OPERAND_RANGE[0] >= 0:
        ops.append("-")
    if value * OPERAND_RANGE[0] <= MAX_VALUE:
        ops.append("*")
    return ops


def _operand(rng: random.Random, value: int, op: str) -> int:
    lo, hi = OPERAND_RANGE
    if op == "+":
        hi = min(hi, MAX_VALUE - value)
    elif op == "-":
        hi = min(hi, value)
    else:
        hi = min(hi, MAX_VALUE // value) if value > 0 else hi
    return rng.randint(lo, hi)


def sample_problem(rng: random.Random, n_ops: int = N_OPS, variant: str = "chain") -> ToyProblem:
    """One problem drawn from `rng`; its split is whatever `split_of` says."""
    value = rng.randint(*START_RANGE)
    start, expression, last_op, steps, ops = value, str(value), "", [], []
    for _ in range(n_ops):
        allowed = _allowed_ops(value)
        op = rng.choice([o for o in allowed if o != "*"] if variant == "any-order" else allowed)
        operand = _operand(rng, value, op)
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        # Left-to-right order needs brackets only where a product follows a sum or difference.
        if op == "*" and last_op in ("+", "-"):
            expression = f"({expression})"
        expression += f"{op}{operand}"
        steps.append(f"{value}{op}{operand}={result}")
        ops.append((op, operand))
        value, last_op = result, op
    return ToyProblem(expression, tuple(steps), value, start, tuple(ops), variant == "any-order")


def _steps_in_order(problem: ToyProblem, order: list[int]) -> tuple[str, ...] | None:
    """The written steps applying the problem's operations in `order`; None if a value leaves range."""
    value, steps = problem.start, []
    for i in order:
        op, operand = problem.ops[i]
        result = value + operand if op == "+" else value - operand
        if not 0 <= result <= MAX_VALUE:
            return None
        steps.append(f"{value}{op}{operand}={result}")
        value = result
    return tuple(steps)


def random_order_steps(problem: ToyProblem, rng: random.Random, tries: int = 20) -> tuple[str, ...]:
    """The steps of an any-order problem in a random order that stays in range (the expression's
    own order, which always does, if `tries` shuffles find none)."""
    order = list(range(len(problem.ops)))
    for _ in range(tries):
        rng.shuffle(order)
        if (steps := _steps_in_order(problem, order)) is not None:
            return steps
    return problem.steps


def split_of(expression: str) -> str:
    """The split an expression belongs to; fixed by its text alone."""
    bucket = int.from_bytes(hashlib.blake2b(expression.encode(), digest_size=8).digest(), "little") % 100
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def toy_problems(split: str, n: int, seed: int, n_ops: int | None = None, variant: str = "chain") -> list[ToyProblem]:
    """`n` distinct problems of `split`, the same list for the same arguments (`n_ops`: the
    variant's own by default)."""
    if split not in SPLITS:
        raise ValueError(f"toy split must be one of {sorted(SPLITS)}, got {split!r}")
    if variant not in VARIANTS:
        raise ValueError(f"toy variant must be one of {list(VARIANTS)}, got {variant!r}")
    n_ops = VARIANT_OPS[variant] if n_ops is None else n_ops
    # The seed is mixed with the split so that train and test draws are not the same walk filtered.
    rng = random.Random(f"toy:{split}:{seed}:{n_ops}" + ("" if variant == "chain" else f":{variant}"))
    seen: set[str] = set()
    problems: list[ToyProblem] = []
    misses = 0
    while len(problems) < n:
        problem = sample_problem(rng, n_ops, variant)
        if problem.expression in seen or split_of(problem.expression) != split:
            misses += 1
            if misses > 50 * n + 10_000:
                raise ValueError(f"cannot draw {n} distinct toy problems for split {split!r}; ask for fewer")
            continue
        seen.add(problem.expression)
        problems.append(problem)
    return problems


def toy_prompt(problem: ToyProblem) -> str:
    return f"Compute {problem.expression}."


def toy_solution(problem: ToyProblem, steps: tuple[str, ...] | None = None) -> str:
    """The worked solution (`steps`: in another valid order), starting with a space so that prompt +
    solution tokenizes as prompt's tokens + more."""
    steps = problem.steps if steps is None else steps
    return " " + " ".join(f"{step}." for step in steps) + f" Answer: \\boxed{{{problem.answer}}}"


def toy_records(split: str, n: int, seed: int, n_ops: int | None = None, variant: str = "chain") -> list[PromptRecord]:
    """Prompt records for the trainer; prompt_id is the split and the expression, unique within a split."""
    return [
        PromptRecord(prompt_id=f"toy-{split}:{p.expression}", prompt=toy_prompt(p), answer=str(p.answer))
        for p in toy_problems(split, n, seed, n_ops, variant)
    ]
