"""The trainer's verifier: a real deadline per answer, in a worker process, from any thread."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

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


def test_the_workers_die_with_a_trainer_killed_by_sigkill(tmp_path):
    """A worker left alive would hold the dead trainer's stdout open (a caller reading it hangs)."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        "from scope_ds.rewards.pool import VerifierPool\n"
        "if __name__ == '__main__':\n"
        "    pool = VerifierPool('toy', timeout_s=5.0)\n"
        "    assert pool.verify([('\\\\boxed{1}', '1')]) == ([1.0], 0)\n"
        "    print(pool._proc.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{w}") and "zombie" not in _state(w) for w in workers):
        assert time.monotonic() < deadline, "a verifier worker outlived the trainer"
        time.sleep(0.1)
    assert proc.stdout.read() == ""  # EOF: nothing holds the pipe any more


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:")).lower()
    except OSError:
        return "zombie"


def test_the_worker_does_not_import_the_trainer_again():
    """spawn runs the parent's main script again in the worker (as __mp_main__): for
    scope_ds/train.py that must stay the standard library, not seconds of torch for every worker
    start (the first answers of a run wait for it, and so does every restart after a timeout)."""
    script = Path(__file__).resolve().parents[2] / "scope_ds" / "train.py"
    code = f"import runpy, sys; runpy.run_path({str(script)!r}, run_name='__mp_main__'); print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy = [m for m in ("torch", "transformers", "deepspeed", "scope_ds.config") if f"'{m}'" in out]
    assert heavy == [], f"the worker imports {heavy}"
