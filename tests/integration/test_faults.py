"""Faults injected into real runs: no hang, no lost step, no mixed runs.

Folders are made unwritable with ``chattr +i`` (as root, ``chmod`` does not stop a write); the
flag is cleared again in ``finally`` so that pytest can remove the folder.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from train_helpers import (
    REPO,
    TRAIN,
    check_ok,
    copy_run,
    deepspeed_cmd,
    launch_train,
    read_jsonl,
    run_env,
    small_run_overrides,
)

CHATTR = shutil.which("chattr")
needs_chattr = pytest.mark.skipif(CHATTR is None, reason="chattr (e2fsprogs) is not installed")


def _immutable(folder, on: bool) -> None:
    subprocess.run([CHATTR, "+i" if on else "-i", str(folder)], check=True)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended before {what}:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _start(args: list[str], ranks: int) -> subprocess.Popen:
    """The deepspeed launcher for several ranks; one rank as a plain process (the same engines)."""
    cmd = deepspeed_cmd(TRAIN, args, ranks) if ranks > 1 else [sys.executable, str(TRAIN), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _freeze_during_run(args: list[str], ranks: int, ready, folder) -> tuple[subprocess.Popen, str]:
    """Start a run, make ``folder`` read-only once ``ready()``, and let the run end by itself
    (300 s at most); the flag is cleared whatever happens. Returns the process and its output."""
    proc = _start(args, ranks)
    try:
        _wait_for(ready, proc, "the moment to make the folder read-only")
        _immutable(folder, True)
        output, _ = proc.communicate(timeout=300)
    finally:
        _immutable(folder, False)
        if proc.poll() is None:
            proc.kill()
    return proc, output


def _steps(out) -> list[int]:
    return [m["step"] for m in read_jsonl(out / "metrics.jsonl")]


@needs_chattr
def test_a_failed_weight_sync_is_saved_and_resumes(model_pair, tmp_path):
    """The first sync cannot write its weights folder (chattr +i: EPERM, "operation not permitted"):
    step 1 is logged and saved with the student's version, the run stops with one line naming the
    folder, and a resume pushes the checkpoint's weights and trains on (no wait for a version the
    servers never report)."""
    student, teacher = model_pair
    out, sync_dir = tmp_path / "run", tmp_path / "sync"
    args = [*small_run_overrides(student, teacher, out), "train.steps=3", f"rollout.sync_dir={sync_dir}"]
    # config.yaml is written after the start-up folder checks, before the first sync
    proc, output = _freeze_during_run(args, 1, lambda: (out / "config.yaml").exists(), sync_dir)
    assert proc.returncode == 1 and "error: " in output and "operation not permitted" in output.lower(), output[-3000:]
    state = json.loads((out / "checkpoints" / "step_1" / "scope_state.json").read_text())
    assert (state["step"], state["policy_version"]) == (1, 1)
    assert _steps(out) == [1] and (out / "rollouts" / "step_1.jsonl").is_file()
    check_ok(launch_train([*args, "checkpoint.resume=auto"], ranks=1, timeout=300, launcher="ranks"))
    assert _steps(out) == [1, 2, 3]
    assert {r["weight_version"] for r in read_jsonl(out / "rollouts" / "step_2.jsonl")} == {1}


@needs_chattr
def test_an_unwritable_checkpoint_folder_fails_every_rank_at_once_and_keeps_the_last_save(model_pair, tmp_path):
    student, teacher = model_pair
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    ckpt.mkdir()
    args = [*small_run_overrides(student, teacher, out), f"checkpoint.dir={ckpt}"]
    _immutable(ckpt, True)
    try:  # at start-up: refused before any work, naming the key and the folder
        t0 = time.monotonic()
        proc = launch_train(args, ranks=2, timeout=300)
        assert proc.returncode == 2 and f"checkpoint.dir {ckpt}: cannot write there" in proc.stderr, proc.stderr[-3000:]
        assert time.monotonic() - t0 < 120
    finally:
        _immutable(ckpt, False)
    # mid-run: step 1 is saved, then the folder turns unwritable before step 2's save
    args = [*args, "train.steps=3", "checkpoint.every=1"]
    proc, output = _freeze_during_run(args, 2, lambda: (ckpt / "latest").exists(), ckpt)  # every rank ends
    assert proc.returncode != 0 and "checkpoint step_2 not saved (rank 0: operation not permitted" in output, output[
        -3000:
    ]
    assert (ckpt / "latest").read_text().strip() == "step_1" and (ckpt / "step_1" / "COMPLETE").is_file()


@needs_chattr
def test_a_failed_log_write_on_rank_0_stops_every_rank_and_keeps_what_was_trained(model_pair, tmp_path):
    """Rank 0 alone writes the logs; once OUT/rollouts turns unwritable (chattr +i) the next step's
    write fails there, and every rank stops at once with one line naming the file (no rank left
    waiting in a collective), the step it trained in the checkpoint."""
    student, teacher = model_pair
    out = tmp_path / "run"
    args = [*small_run_overrides(student, teacher, out), "train.steps=30", "checkpoint.every=0"]
    t0 = time.monotonic()
    ready = lambda: (out / "metrics.jsonl").exists() and _steps(out)  # noqa: E731
    proc, output = _freeze_during_run(args, 2, ready, out / "rollouts")
    assert proc.returncode == 1 and "error: " in output and "operation not permitted" in output.lower(), output[-3000:]
    assert str(out / "rollouts" / "step_") in output, output[-3000:]
    assert time.monotonic() - t0 < 240
    logged = _steps(out)
    state = json.loads((out / "checkpoints" / f"step_{logged[-1] + 1}" / "scope_state.json").read_text())
    assert state["step"] == state["policy_version"] == logged[-1] + 1  # trained, not logged: the file could not be


def test_a_rank_killed_before_the_first_save_resumes_from_scratch_with_clean_logs(model_pair, tmp_path):
    """kill -9 of rank 1 mid-run, no checkpoint yet: resume=auto starts over, and the steps the
    dead run logged are dropped, so every step is logged once."""
    student, teacher = model_pair
    out = tmp_path / "run"
    args = [*small_run_overrides(student, teacher, out), "train.steps=3", "checkpoint.every=0"]
    proc = _start([*args, "train.steps=50"], 2)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists() and _steps(out), proc, "a logged step")
        (rank1,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
        rank1.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and not (out / "checkpoints" / "latest").exists()
    check_ok(launch_train([*args, "checkpoint.resume=auto"], ranks=2, launcher="ranks"))
    assert _steps(out) == [1, 2, 3]


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwritten(model_pair, default_run, tmp_path):
    """The used folder is a copy of conftest.py's default run (6 steps, checkpoints, an export):
    a fresh run into it is refused, leaving it as it was; with logging.overwrite=true its outputs
    are replaced by the new run's."""
    student, teacher = model_pair
    out = copy_run(default_run, tmp_path / "run")
    args = [*small_run_overrides(student, teacher, out), "train.steps=1"]
    proc = launch_train(args, launcher="python")
    assert proc.returncode == 2 and "checkpoint.resume=auto" in proc.stderr and "logging.overwrite=true" in proc.stderr
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    check_ok(launch_train([*args, "logging.overwrite=true", "train.steps=2"], launcher="python"))
    assert _steps(out) == [1, 2] and sorted(p.name for p in (out / "rollouts").iterdir()) == [
        "step_1.jsonl",
        "step_2.jsonl",
    ]
