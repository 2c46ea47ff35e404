"""The plan stage on a hand-made batch: which log-probs feed the weights, and cut-off answers."""

from __future__ import annotations

import math

import pytest

from scope_ds.algorithms import algorithm_of
from scope_ds.config import load_config
from scope_ds.engines.learner import Learner
from scope_ds.records import Rollout


def _learner(*overrides: str) -> Learner:
    """A learner with only what planning reads: the config and the algorithm (no engines)."""
    cfg = load_config(None, list(overrides))
    return Learner(cfg, algorithm_of(cfg.algo), 0, 1, None, None, None)


def _rollout(i: int, correct: bool, finish: str = "stop", old: list[float] | None = None) -> Rollout:
    resp = [5 + i] * (2 + i)
    return Rollout(
        prompt_id="p",
        sample_index=i,
        group_id="0:0",
        prompt_ids=[1, 4],
        response_ids=resp,
        behaviour_logprobs=[-0.5 - 0.25 * i] * len(resp),
        old_logprobs=old,
        finish_reason=finish,
        correct=correct,
        reward=float(correct),
        teacher_logprobs=None if correct else [-1.0 - 0.5 * i] * len(resp),
    )


def _student_weights(seq_logps: dict[int, float], lengths: dict[int, int]) -> dict[int, float]:
    """Eq. 4 (tau = 1) over the given members: PPL_S / sum PPL_S."""
    ppl = {i: math.exp(-seq_logps[i] / lengths[i]) for i in seq_logps}
    return {i: v / sum(ppl.values()) for i, v in ppl.items()}


def test_truncated_answers_are_skipped_and_leave_the_weights_of_the_rest():
    """data.truncated=skip: a cut-off answer is not trained on and joins no weight subset."""
    rs = [_rollout(0, True), _rollout(1, True, finish="length"), _rollout(2, True), _rollout(3, False)]
    _learner("data.truncated=skip", "algo.old_logprobs=server").plan(rs)
    assert [r.path for r in rs] == ["mle", "skip", "mle", "opd"]
    assert rs[1].weight == 0.0 and rs[3].weight == pytest.approx(1.0)
    want = _student_weights({i: sum(rs[i].behaviour_logprobs) for i in (0, 2)}, {0: 2, 2: 4})
    assert (rs[0].weight, rs[2].weight) == pytest.approx((want[0], want[2]), abs=1e-12)


def test_truncated_answers_are_verified_by_default():
    rs = [_rollout(0, True), _rollout(1, True, finish="length")]
    _learner("algo.old_logprobs=server").plan(rs)
    assert [r.path for r in rs] == ["mle", "mle"] and sum(r.weight for r in rs) == pytest.approx(1.0)


def test_the_student_weights_use_the_recomputed_pi_old():
    """Eq. 4's student PPL comes from the trainer's pi_old when it recomputed it, not the server's."""
    rs = [_rollout(0, True, old=[-2.0, -2.0]), _rollout(1, True, old=[-0.1, -0.1, -0.1])]
    _learner().plan(rs)
    want = _student_weights({0: -4.0, 1: -0.3}, {0: 2, 1: 3})
    assert (rs[0].weight, rs[1].weight) == pytest.approx((want[0], want[1]), abs=1e-12)
    assert rs[0].student_seq_logp == pytest.approx(-4.0)
