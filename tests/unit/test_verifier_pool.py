"""The trainer's verifier pool: a real deadline per answer, in worker processes, from any thread."""

from __future__ import annotations

import threading
import time

import pytest

from scope_ds.rewards.pool import VerifierPool

# sympy expands this for minutes; math-verify's own SIGALRM timeout cannot stop it in a thread
PATHOLOGICAL = "\\boxed{(x+1)^{100000}}"


@pytest.fixture(scope="module")
def pool():
    p = VerifierPool("math", timeout_s=3.0)
    yield p
    p.close()


def test_answers_are_verified_in_the_workers(pool):
    rewards, timeouts = pool.verify([("so \\boxed{2}", "2"), ("\\boxed{3}", "2"), ("\\boxed{\\frac{1}{2}}", "0.5")])
    assert (rewards, timeouts) == ([1.0, 0.0, 1.0], 0)


def test_a_pathological_answer_times_out_alone_from_a_thread(pool):
    """From a non-main thread (as the trainer's rollout thread calls it): the stuck answer is
    incorrect and counted, the others are still verified, and the call returns near the deadline."""
    got = {}

    def call():
        t0 = time.monotonic()
        got["result"] = pool.verify([("\\boxed{2}", "2"), (PATHOLOGICAL, "1"), ("\\boxed{4}", "4")])
        got["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the verifier pool hung"
    assert got["result"] == ([1.0, 0.0, 1.0], 1)
    assert got["seconds"] < 3.0 + 15
    assert pool.verify([("\\boxed{5}", "5")]) == ([1.0], 0)  # the pool works on after a restart
