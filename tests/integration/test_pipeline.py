"""The asynchronous pipeline: exactness at max_staleness = 0, bounded staleness, no hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import (
    REPO,
    TRAIN,
    check_ok,
    deepspeed_cmd,
    launch_train,
    load_weights,
    read_jsonl,
    run_env,
    small_run_overrides,
    token_logprobs_float64,
)


def test_max_staleness_zero_gives_the_synchronous_weights(model_pair, tmp_path):
    student, teacher = model_pair
    piped, by_hand = tmp_path / "pipeline", tmp_path / "reference"
    check_ok(
        launch_train([*small_run_overrides(student, teacher, piped), "pipeline.max_staleness=0"], launcher="python")
    )
    env = run_env()
    ref = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "integration" / "sync_reference.py"),
            *small_run_overrides(student, teacher, by_hand),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    check_ok(ref)
    # the batch of step 2 waits for the update and sync of step 1; that of step 1 for nothing
    waits = [m["time/wait_version"] for m in read_jsonl(piped / "metrics.jsonl")]
    assert waits[1] > max(0.05, 10 * waits[0]), waits
    for step in (1, 2):
        ours, theirs = (read_jsonl(d / "rollouts" / f"step_{step}.jsonl") for d in (piped, by_hand))
        assert [r["response_ids"] for r in ours] == [r["response_ids"] for r in theirs]
        assert [r["weight"] for r in ours] == [r["weight"] for r in theirs]
    a, b = load_weights(piped / "hf"), load_weights(by_hand / "hf")
    assert a.keys() == b.keys()
    for k in a:  # the servers' log-probs carry batch-dependent float32 rounding (~1e-7), nothing more
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert any(not torch.equal(a[k], w) for k, w in load_weights(student).items())


@pytest.mark.parametrize("k,ranks,overlap", [(1, 1, False), (2, 2, True)])
def test_staleness_never_exceeds_k(model_pair, tmp_path, k, ranks, overlap):
    """With overlap, the teacher scores each next batch in its own thread beside the update: its
    scores still match a plain float64 forward pass of the teacher."""
    student, teacher = model_pair
    out = tmp_path / "run"
    steps = 4
    args = [
        *small_run_overrides(student, teacher, out),
        f"train.steps={steps}",
        f"pipeline.max_staleness={k}",
        "pipeline.queue_size=1",
        f"pipeline.overlap_teacher={str(overlap).lower()}",
        "data.eval_every=2",  # the trainer's own collectives (evaluation) beside the scoring
        "data.eval_prompts=2",
        "data.eval_n=1",
    ]
    check_ok(launch_train(args, ranks=ranks, launcher="ranks"))
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in m] == [0, 2, 4]
    scored = [r for s in range(1, steps + 1) for r in read_jsonl(out / "rollouts" / f"step_{s}.jsonl")]
    scored = [r for r in scored if r["teacher_seq_logp"] is not None]
    assert scored and all(not r["correct"] for r in scored)
    for r, ref in zip(scored, _teacher_seq_logp_float64(teacher, scored), strict=True):
        assert r["teacher_seq_logp"] == pytest.approx(ref, abs=1e-4)
    lags = []
    for step in range(1, steps + 1):
        rows = read_jsonl(out / "rollouts" / f"step_{step}.jsonl")
        trained_version = step - 1  # the policy that step `step` updated
        for r in rows:  # staleness by the oldest token: the first segment's version
            (start, oldest), *rest = r["segments"]
            versions = [oldest, *(v for _, v in rest)]
            assert start == 0 and r["weight_version"] == oldest and versions == sorted(versions)
            assert versions[-1] <= trained_version and r["generated_tokens"] == r["response_length"]
            lags.append(trained_version - oldest)
    assert min(lags) >= 0 and max(lags) <= k
    if k == 1:  # pipeline.sync_between_batches: each sync waited for the next batch's samples, none was cut
        rows = [r for s in range(1, steps + 1) for r in read_jsonl(out / "rollouts" / f"step_{s}.jsonl")]
        assert all(len(r["segments"]) == 1 for r in rows), [r["segments"] for r in rows]
    assert max(lags) >= 1, "with k >= 1 generation should run ahead of the update"
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if m["step"] >= 1]  # step 0: the first evaluation
    assert [m["staleness/max"] for m in metrics] == [
        max(s - 1 - r["weight_version"] for r in read_jsonl(out / "rollouts" / f"step_{s}.jsonl"))
        for s in range(1, steps + 1)
    ]
    # Overlap is busy stage time over wall time: above 1 once the next batch is generated during
    # the update of the current one (every step after the first, which may wait for its batch).
    overlaps = [m["pipeline/overlap"] for m in metrics]
    assert all(o > 1 for o in overlaps[1:]), overlaps


@pytest.mark.parametrize("between", [True, False])
def test_the_sync_waits_for_the_samples_under_way(model_pair, tmp_path, embedded_servers, between):
    """pipeline.sync_between_batches (k = 1): generating the next batch outlasts the update, and
    the weight sync waits for it, so no sample is cut in two; without the switch the sync cuts
    them and they continue on the new weights (two segments). The server decodes one sequence at
    a time, so that generating a batch outlasts its update however fast the machine runs them."""
    student, teacher = model_pair
    (server,) = embedded_servers(student, random_seed=0, extra_args=["--max-running-requests", "1"])
    out = tmp_path / "run"
    args = [
        *small_run_overrides(student, teacher, out),
        f"rollout.servers=[{server.url}]",
        "train.steps=4",
        "rollout.n=8",
        "rollout.max_new_tokens=40",
        "pipeline.max_staleness=1",
        f"pipeline.sync_between_batches={str(between).lower()}",
    ]
    check_ok(launch_train(args, launcher="python"))
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if m["step"] >= 2]  # step 1's batch: before any sync
    shares = [m["rollout/partial_share"] for m in metrics]
    if between:
        assert shares == [0.0] * len(shares) and all(m["time/wait_generated"] > 0.01 for m in metrics[:-1]), metrics
    else:
        assert max(shares) > 0 and all("time/wait_generated" not in m for m in metrics)


def _teacher_seq_logp_float64(path, rows) -> list[float]:
    """Sum of the response tokens' log-probs under the teacher (temperature 1), in float64."""
    return [sum(t) for t in token_logprobs_float64(path, rows)]


def test_a_rank_with_nothing_to_score_does_not_hang(zero3_steps):
    """One incorrect rollout in the batch: rank 1 has no teacher work, but runs the same forwards
    (conftest.py's one_incorrect case of zero3_step.py on 2 ranks; a hang would time it out)."""
    result = zero3_steps["one_incorrect"]
    assert list(result["teacher_logp"]) == [0]  # only rollout 0 needed (and got) the teacher


def test_server_failure_mid_run_is_a_clear_error_not_a_hang(model_pair, tmp_path, embedded_servers):
    student, teacher = model_pair
    (server,) = embedded_servers(student, random_seed=0)
    out = tmp_path / "run"
    args = [
        *small_run_overrides(student, teacher, out),
        "train.steps=50",
        f"rollout.servers=[{server.url}]",
        "rollout.retries=1",
        "pipeline.max_staleness=1",
    ]
    cmd = deepspeed_cmd(TRAIN, args, 2)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or not read_jsonl(out / "metrics.jsonl"):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "training never finished a step"
            time.sleep(0.5)
        os.kill(server.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)  # must end by itself, not hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "error: " in output and server.url in output, output[-4000:]
    assert len(read_jsonl(out / "metrics.jsonl")) < 50
