"""Checkpoints with real processes: exact resume after kill -9, crash-safe saves, signals, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from train_helpers import (
    DEFAULT_RUN_ARGS,
    REPO,
    TRAIN,
    assert_adam_steps_close,
    check_ok,
    copy_run,
    deepspeed_cmd,
    launch_train,
    load_weights,
    read_jsonl,
    small_run_overrides,
)


def _start(args: list[str], ranks: int = 2) -> subprocess.Popen:
    """The deepspeed launcher in its own session, so that kill -9 can take all its ranks at once
    (one rank: a plain process, the same engines)."""
    cmd = deepspeed_cmd(TRAIN, args, ranks) if ranks > 1 else [sys.executable, str(TRAIN), *args]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _kill9(proc: subprocess.Popen, out: Path) -> None:
    """kill -9 the launcher and its ranks; then the rollout server they left (by its pid file)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid_file in (out / "logs").glob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {what}:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def _latest(out: Path) -> str | None:
    path = out / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


def test_kill9_and_resume_gives_the_straight_run(model_pair, default_run, tmp_path):
    """The straight run is conftest.py's default run (6 steps on 2 ranks, a checkpoint every 3);
    the same run under the deepspeed launcher, killed after its step-3 save and resumed, equals it."""
    student, teacher = model_pair
    straight, broken = default_run, tmp_path / "broken"
    common = DEFAULT_RUN_ARGS

    proc = _start([*small_run_overrides(student, teacher, broken), *common])
    _wait_for(lambda: _latest(broken) == "step_3", proc, "the step-3 checkpoint")
    _kill9(proc, broken)
    assert not (broken / "hf").exists()  # it really died before the end
    check_ok(
        launch_train(
            [*small_run_overrides(student, teacher, broken), *common, "checkpoint.resume=auto"], launcher="ranks"
        )
    )

    a, b = load_weights(straight / "hf"), load_weights(broken / "hf")
    assert_adam_steps_close(a, b, lr=1e-3, steps=3)  # the steps after the kill
    for step in (4, 5, 6):
        ours, theirs = (read_jsonl(d / "rollouts" / f"step_{step}.jsonl") for d in (straight, broken))
        assert [(r["response_ids"], r["weight_version"], r["weight"]) for r in ours] == [
            (r["response_ids"], r["weight_version"], r["weight"]) for r in theirs
        ]
    assert [m["step"] for m in read_jsonl(broken / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def _state(out: Path, tag: str) -> dict:
    return json.loads((out / "checkpoints" / tag / "scope_state.json").read_text())


def _partial_samples(state: dict) -> list[dict]:
    """The samples a checkpoint caught part-way through generation, with tokens so far."""
    batch = state.get("in_flight") or {"samples": []}
    return [s for g in batch["samples"] for s in g if s and s["response_ids"] and s["finish_reason"] == "abort"]


@pytest.fixture(scope="module")
def long_pair(tiny_llama_builder, tmp_path_factory):
    """A student and teacher that answer at length (random weights, 1024 positions)."""
    root = tmp_path_factory.mktemp("long_pair")
    build = tiny_llama_builder
    return build(root / "student", context=1024), build(root / "teacher", seed=1, context=1024)


def test_kill9_with_samples_in_flight_continues_them_and_trains_each_prompt_once(long_pair, tmp_path):
    """The asynchronous schedule killed while a batch is being generated: the checkpoint holds its
    samples' tokens so far, the resumed run continues each from them (not from its first token),
    and every step and every prompt is trained exactly once."""
    student, teacher = long_pair
    out, steps, per_step = tmp_path / "run", 5, 2
    args = [
        *small_run_overrides(student, teacher, out),
        f"train.steps={steps}",
        "pipeline.max_staleness=1",
        # with the wait each save lands as the batch after next starts, before it has tokens
        "pipeline.sync_between_batches=false",
        "rollout.max_new_tokens=400",
        "checkpoint.every=1",
        "checkpoint.keep=10",
        "checkpoint.export_hf=false",
    ]
    proc = _start(args, ranks=1)
    _wait_for(
        lambda: _latest(out) is not None and _partial_samples(_state(out, _latest(out))),
        proc,
        "a checkpoint with samples in flight",
        poll=0.05,
    )
    _kill9(proc, out)
    tag = _latest(out)  # what the resume starts from: a later save may have landed before the kill
    state = _state(out, tag)
    assert _partial_samples(state), f"{tag} holds no sample part-way: {state['in_flight']}"
    assert int(tag.split("_")[1]) < steps

    resumed = launch_train([*args, "checkpoint.resume=auto"], launcher="python")
    check_ok(resumed)
    log = resumed.stdout + resumed.stderr
    assert "samples in flight" in log

    in_flight = state["in_flight"]
    trained = read_jsonl(out / "rollouts" / f"step_{in_flight['step'] + 1}.jsonl")
    saved = [s for g in in_flight["samples"] for s in g]
    assert len(trained) == len(saved) == per_step * 4
    continued = 0
    for s, r in zip(saved, trained, strict=True):
        if s is None:
            continue
        k = len(s["response_ids"])
        assert r["response_ids"][:k] == s["response_ids"] and r["behaviour_logprobs"][:k] == s["behaviour_logprobs"]
        assert r["segments"][: len(s["segments"])] == s["segments"] and r["weight_version"] == s["weight_version"]
        assert r["generated_tokens"] == r["response_length"]  # nothing generated twice
        continued += s["finish_reason"] == "abort" and k > 0
    assert continued == len(_partial_samples(state))
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, steps + 1))
    groups = [
        [r["prompt_id"] for r in read_jsonl(out / "rollouts" / f"step_{step}.jsonl") if r["sample_index"] == 0]
        for step in range(1, steps + 1)
    ]
    prompts = [p for g in groups for p in g]
    assert all(len(g) == per_step for g in groups) and len(set(prompts)) == len(prompts) == steps * per_step


def test_kill9_during_a_save_resumes_from_the_previous_checkpoint(model_pair, tmp_path):
    student, teacher = model_pair
    out = tmp_path / "run"
    args = [*small_run_overrides(student, teacher, out), "train.steps=30", "checkpoint.every=1", "checkpoint.keep=5"]
    proc = _start(args, ranks=1)
    ckpts = out / "checkpoints"
    _wait_for(
        lambda: _latest(out) is not None and any(ckpts.glob(".tmp-step_*")), proc, "a save in progress", poll=0.002
    )
    _kill9(proc, out)
    partial = sorted(ckpts.glob(".tmp-step_*"))
    assert partial, "the kill did not land during a save"
    latest = _latest(out)
    assert (ckpts / latest / "COMPLETE").exists()
    assert int(latest.split("_")[1]) < int(partial[0].name.split("_")[1])
    resumed = launch_train(
        [*args, "train.steps=" + str(int(latest.split("_")[1]) + 1), "checkpoint.resume=auto"], launcher="python"
    )
    check_ok(resumed)
    assert f"resumed from {ckpts / latest}" in resumed.stdout + resumed.stderr


def test_signal_saves_a_checkpoint_and_exits_cleanly(model_pair, tmp_path):
    student, teacher = model_pair
    out = tmp_path / "run"
    proc = _start([*small_run_overrides(student, teacher, out), "train.steps=200"])
    _wait_for(
        lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip(),
        proc,
        "the first step",
        poll=0.2,
    )
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:  # as SLURM's --signal does for every task
        p.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    latest = _latest(out)
    steps = len(read_jsonl(out / "metrics.jsonl"))
    assert latest == f"step_{steps}" and steps < 200
    assert "stopped by a signal" in output


# Runs a command as a child subreaper: what its children leave behind is handed to it, so that it
# reaps (and reports) the exit code of every process of the tree, and ends only once all have ended.
_REAPER = """
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
runner = subprocess.Popen(sys.argv[2:], start_new_session=True)
codes = {}
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    codes[pid] = os.waitstatus_to_exitcode(status)
open(sys.argv[1], "w").write(json.dumps({"runner": runner.pid, "codes": codes}))
"""


@pytest.mark.parametrize(
    "target, sig, ranks",
    [("deepspeed", signal.SIGTERM, 1), ("launch.py", signal.SIGINT, 1), ("group", signal.SIGINT, 2)],
)
def test_a_signal_to_the_launcher_saves_and_ends_every_process(model_pair, tmp_path, target, sig, ranks):
    """SIGTERM to the deepspeed command (it dies at once: DeepSpeed's runner has no handler on one
    node), SIGINT to launch.py, Ctrl-C (SIGINT to the whole process group): the ranks save the last
    finished step, and no process of the run outlives it. The exit codes are DeepSpeed's launcher's:
    0 where it is left to report the ranks' exit, 1 where its own handler ran (docs/checkpoints.md)."""
    student, teacher = model_pair
    out, report = tmp_path / "run", tmp_path / "codes.json"
    cmd = [
        sys.executable,
        "-c",
        _REAPER,
        str(report),
        *deepspeed_cmd(TRAIN, [*small_run_overrides(student, teacher, out), "train.steps=200"], ranks),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(
        lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip(),
        proc,
        "the first step",
        poll=0.2,
    )
    runner = psutil.Process(proc.pid).children()[0]
    launch = runner.children()[0]
    assert "deepspeed.launcher.launch" in launch.cmdline()
    if target == "deepspeed":
        runner.send_signal(sig)
    elif target == "launch.py":
        launch.send_signal(sig)
    else:
        os.killpg(runner.pid, sig)
    output, _ = proc.communicate(timeout=300)  # the reaper ends once every process of the run has ended
    codes = {int(k): v for k, v in json.loads(report.read_text())["codes"].items()}
    steps = len(read_jsonl(out / "metrics.jsonl"))
    assert _latest(out) == f"step_{steps}" and steps < 200, output[-4000:]
    assert f"stopped by a signal after step {steps}" in output, output[-4000:]
    assert not list((out / "logs").glob("*.pid"))  # the rollout server was stopped, its pid file removed
    # launch.py is the runner's child; its exit code is ours to see once the runner has gone before it
    got = (codes[runner.pid], codes.get(launch.pid))
    expected = {"deepspeed": (-signal.SIGTERM, 0), "launch.py": (1, None), "group": (-signal.SIGINT, 1)}[target]
    assert got == expected, (got, output[-4000:])


def test_convert_ckpt_of_a_two_rank_checkpoint(default_run, tmp_path, embedded_servers):
    """tools/convert_ckpt.py on conftest.py's default run (2 ranks): its latest checkpoint
    (step_6) gives the run's own export."""
    out = default_run
    hf = tmp_path / "converted"
    tool = [sys.executable, str(REPO / "tools" / "convert_ckpt.py")]
    proc = subprocess.run(
        [*tool, str(out / "checkpoints"), str(hf), "--dtype", "fp32"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(hf)).eval()(input_ids=ids).logits
        run_export = AutoModelForCausalLM.from_pretrained(str(out / "hf")).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, run_export, atol=1e-5, rtol=0)
    (server,) = embedded_servers(hf)  # the rollout server serves the converted folder
    from scope_ds.rollout.client import SyncRolloutClient

    with SyncRolloutClient([server.url]) as client:
        (group,) = client.generate_many([[1, 40, 41]], {"max_new_tokens": 4, "temperature": 1.0}, n=2)
    assert len(group) == 2 and all(r.response_length > 0 for r in group)

    # bad input: each a clear error, nothing overwritten
    def fails(args, message):
        p = subprocess.run([*tool, *args], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]

    before = sorted(os.listdir(hf))
    fails([str(out / "checkpoints"), str(hf)], "exists")
    assert sorted(os.listdir(hf)) == before
    fails([str(tmp_path / "nothing"), str(tmp_path / "x")], "no checkpoint folder")
    fails([str(out / "checkpoints"), str(tmp_path / "x"), "--tag", "99"], "no checkpoint step_99")
    corrupt = tmp_path / "corrupt"
    import shutil

    shutil.copytree(out / "checkpoints" / "step_6", corrupt)
    shards = list((corrupt / "ds").glob("*optim_states.pt"))
    assert len(shards) == 2  # one ZeRO partition per rank
    for f in shards:
        f.write_bytes(f.read_bytes()[:100])
    fails([str(corrupt), str(tmp_path / "y")], "corrupt")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_resume_errors_are_clear(model_pair, default_run, tmp_path):
    """Resumes that cannot work, each on its own copy of conftest.py's default run (a finished
    2-rank run, its checkpoints step_3 and step_6): each a clear error, the copy's export untouched."""
    student, teacher = model_pair
    runs = [copy_run(default_run, tmp_path / f"run{i}") for i in range(3)]
    (runs[2] / "checkpoints" / "step_1").mkdir()  # a folder without COMPLETE: a save that died
    cases = {
        "written by 2 ranks and this run has 1": ["checkpoint.resume=auto", "train.steps=7"],
        "no checkpoint folder": [f"checkpoint.resume={tmp_path / 'none'}"],
        "is incomplete": [f"checkpoint.resume={runs[2] / 'checkpoints' / 'step_1'}"],
    }

    def attempt(out: Path, extra: list[str]):  # each its own process and folder, two at a time
        return launch_train([*small_run_overrides(student, teacher, out), *extra], launcher="python", timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(attempt, runs, cases.values()))
    for message, proc in zip(cases, procs, strict=True):
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    for out in runs:
        assert load_weights(out / "hf")  # the finished run's export is untouched
