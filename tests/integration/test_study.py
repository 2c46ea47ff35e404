"""python -m scope_ds.study end to end: 2 arms x 1 seed on the tiny pair, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, run_env, study_file


def _start(study: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scope_ds.study", str(study), "--out", str(out), "--no-progress"]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill9(proc: subprocess.Popen, out: Path) -> None:
    """kill -9 the study and its trainer or evaluator; then any rollout server they left (pid files)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid_file in out.glob("runs/*/*/*/logs/*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _wait(proc: subprocess.Popen, cond, what: str) -> None:
    deadline = time.monotonic() + 600
    while not cond():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"the study never got to {what}"
        time.sleep(0.1)


def test_a_study_killed_in_the_middle_resumes_and_its_table_follows_the_runs(model_pair, tmp_path):
    """Two arms, one seed (the mean and spread over seeds are tests/unit/test_study_table.py's):
    kill -9 in the first run's training, then the same command resumes it from its checkpoint and
    goes on to the second run, where SIGTERM to the study stops it (the trainer saves), then the
    same command to the end: the finished run reused, the stopped one resumed from its checkpoint."""
    study, out = study_file(tmp_path, *model_pair, seeds=(0,)), tmp_path / "out"
    first, second = (out / "runs" / arm / "seed0" for arm in ("scope", "opd"))
    ckpt = lambda run: (run / "train" / "checkpoints" / "latest").is_file()  # noqa: E731
    proc = _start(study, out)
    _wait(proc, lambda: ckpt(first), "its first run's checkpoint")
    _kill9(proc, out)
    assert not (first / "train" / "hf").exists(), "the first run finished before the kill"

    proc = _start(study, out)
    _wait(proc, lambda: (first / "eval" / "results.json").is_file() and ckpt(second), "its second run")
    os.kill(proc.pid, signal.SIGTERM)  # to the study alone: it passes the signal on to the trainer
    said, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "stopping after the current run saves" in said, said[-3000:]
    assert not (second / "train" / "hf").exists() and not (second / "FAILED").exists(), said[-3000:]
    assert "stopped by a signal" in (second / "train.log").read_text()

    done = subprocess.run(
        [sys.executable, "-m", "scope_ds.study", str(study), "--out", str(out), "--no-progress"],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 of 2 runs done" in done.stdout
    # each run resumed once from its checkpoint; the first, finished by the second command, was
    # reused by the third (no third training, no second evaluation)
    for run in (first, second):
        log = (run / "train.log").read_text()
        assert log.count("\n$ ") == 2 and "checkpoint.resume=auto" in log.split("\n$ ")[-1] and "resumed from" in log
        assert (run / "eval.log").read_text().count("\n$ ") == 1

    results = json.loads((out / "study.json").read_text())
    per_run = {}
    for arm in ("scope", "opd"):
        model = json.loads((out / "runs" / arm / "seed0" / "eval" / "results.json").read_text())["models"][0]
        per_run[arm] = model["benchmarks"]["toy"]
        assert model["label"] == f"{arm}-seed0"
        fig = results["arms"][arm]["figures"]["toy"]
        assert fig["avg"]["mean"] == pytest.approx(per_run[arm]["avg"])
        assert fig["pass_at_k"]["2"]["mean"] == pytest.approx(per_run[arm]["pass_at_k"]["2"])
    paired = results["paired"]["scope"]
    assert paired["seeds"] == [0] and paired["avg"]["diff"] == pytest.approx(
        per_run["scope"]["avg"] - per_run["opd"]["avg"]
    )
    assert paired["avg"]["lo"] <= paired["avg"]["diff"] <= paired["avg"]["hi"]
    table = (out / "study.md").read_text()
    assert "| scope | 1/1 |" in table and "| opd | 1/1 |" in table and "## Against opd" in table
    assert all(len(r["curve"]) == 3 for r in results["runs"])  # held-out accuracy at steps 0, 2, 4
    assert (out / "curves.png").stat().st_size > 0 and (out / "pass_at_k.png").stat().st_size > 0
