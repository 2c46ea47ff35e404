"""Carrying out a study: train every (arm, seed), export, evaluate, and keep what is done.

What is done is read off the run folders, never remembered: a run is trained once its student is
exported (``RUN/train/hf/config.json``, written atomically at the end of training), evaluated once
``RUN/eval/results.json`` exists, failed while ``RUN/FAILED`` says so. A study run again reuses
what is done, resumes a run killed mid-training from its latest checkpoint, and tries failed runs
again.

Locally the runs go one after another (``python scope_ds/train.py``, or the DeepSpeed launcher for
``ranks`` > 1; then ``python -m scope_ds.evaluate``), each with its log in its folder. On SLURM
(``--launcher slurm``) each run that is not trained is one ``slurm/train.sh`` job and one job after
them (``afterany``) evaluates and writes the table, with the same outputs.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scope_ds.rollout.launcher import free_ports
from scope_ds.study.spec import RunSpec, Study

REPO = Path(__file__).resolve().parents[2]
POLL_S = 1.0


def trained(run: RunSpec) -> bool:
    return (run.folder / "train" / "hf" / "config.json").is_file()


def evaluated(run: RunSpec) -> bool:
    return (run.folder / "eval" / "results.json").is_file()


def failure(run: RunSpec) -> dict[str, Any] | None:
    path = run.folder / "FAILED"
    return json.loads(path.read_text()) if path.is_file() else None


def _mark_failed(run: RunSpec, stage: str, rc: int, log: Path) -> None:
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "FAILED").write_text(json.dumps({"stage": stage, "rc": rc, "log": str(log)}) + "\n")


def _overrides(study: Study, run: RunSpec) -> list[str]:
    """The run's overrides, resuming from its checkpoint if it has one."""
    resume = (run.folder / "train" / "checkpoints" / "latest").is_file()
    return [*study.train_overrides(run), *(["checkpoint.resume=auto"] if resume else [])]


def train_command(study: Study, run: RunSpec, python: str = sys.executable) -> list[str]:
    """The trainer's command line for ``run``."""
    args = ["--config", str(study.recipe), *_overrides(study, run)]
    script = str(REPO / "scope_ds" / "train.py")
    if study.ranks == 1:
        return [python, script, *args]
    launcher = [
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(study.ranks),
        "--master_port",
        str(free_ports(1)[0]),
    ]
    return [python, *launcher, script, *args]


def _steps_done(run: RunSpec) -> int:
    """Training steps logged so far (metrics.jsonl; step 0 is the evaluation before training)."""
    path = run.folder / "train" / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = 0
    with open(path) as f:
        for line in f:
            try:
                steps = max(steps, int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                continue  # a line being written
    return steps


class _Child:
    """One subprocess, its output appended to ``log``."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "a")
        self._log.write(f"\n$ {' '.join(cmd)}\n")
        self._log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait(self, tick: Any = None) -> int:
        try:
            while self.proc.poll() is None:
                if tick is not None:
                    tick()
                time.sleep(POLL_S)
            return self.proc.returncode
        finally:
            self._log.close()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)


class LocalRunner:
    """Runs a study's runs one after another on this machine, with one progress bar over all."""

    def __init__(self, study: Study, progress: bool = True, python: str = sys.executable) -> None:
        self.study, self.python = study, python
        self.progress = progress
        self._child: _Child | None = None
        self.stopping = False  # a SIGINT / SIGTERM came: passed on to the child, then the study stops

    def _on_signal(self, sig: int, _frame: Any) -> None:
        print(f"\nstudy: signal {sig}: stopping after the current run saves; run the same command to resume",
              file=sys.stderr, flush=True)  # fmt: skip
        self.stopping = True
        if self._child is not None:
            self._child.signal(sig)  # the trainer saves a checkpoint and stops

    def run(self, train: bool = True) -> None:
        """Train (``train``; else only runs trained elsewhere, by SLURM jobs, are evaluated) and
        evaluate every run that is not done; a failure is recorded in the run's FAILED file and the
        study goes on with the next run."""
        from tqdm import tqdm

        runs = self.study.runs()
        steps = self.study.steps
        previous = [signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)]
        bar = tqdm(total=len(runs) * steps, unit="step", disable=not self.progress, dynamic_ncols=True,
                   desc="study", initial=sum(steps if trained(r) else 0 for r in runs))  # fmt: skip
        try:
            for i, run in enumerate(runs, 1):
                if self.stopping:
                    break
                where = f"[{i}/{len(runs)}] {run.label}"
                if train and not trained(run):
                    self._train(run, where, bar)
                if trained(run) and not evaluated(run) and not self.stopping:
                    self._evaluate(run, where, bar)
                if trained(run) and evaluated(run):
                    (run.folder / "FAILED").unlink(missing_ok=True)
        finally:
            bar.close()
            for s, handler in zip((signal.SIGINT, signal.SIGTERM), previous, strict=True):
                signal.signal(s, handler)

    def _train(self, run: RunSpec, where: str, bar: Any) -> None:
        (run.folder / "FAILED").unlink(missing_ok=True)
        base = bar.n
        before = _steps_done(run) if (run.folder / "train" / "checkpoints" / "latest").is_file() else 0
        bar.set_postfix_str(f"{where}: training" + (f" (resumed at step {before})" if before else ""))
        log = run.folder / "train.log"

        def tick() -> None:
            bar.n = base + min(_steps_done(run), self.study.steps)
            bar.refresh()

        self._child = _Child(train_command(self.study, run, self.python), log)
        rc = self._child.wait(tick)
        self._child = None
        if self.stopping and not trained(run):
            return  # stopped, with a checkpoint to resume from: not a failure
        if rc != 0 or not trained(run):
            _mark_failed(run, "train", rc, log)
            bar.write(f"study: {where} failed in training (exit {rc}); log: {log}")
        bar.n = base + self.study.steps
        bar.refresh()

    def _evaluate(self, run: RunSpec, where: str, bar: Any) -> None:
        bar.set_postfix_str(f"{where}: evaluating")
        log = run.folder / "eval.log"
        cmd = [self.python, "-m", "scope_ds.evaluate", *self.study.eval_argv(run)]
        self._child = _Child(cmd, log)
        rc = self._child.wait()
        self._child = None
        if rc != 0 and not self.stopping:
            _mark_failed(run, "eval", rc, log)
            bar.write(f"study: {where} failed in evaluation (exit {rc}); log: {log}")


def submit_slurm(study: Study, study_argv: list[str], sbatch_args: list[str], python: str = sys.executable) -> dict:
    """One ``slurm/train.sh`` job per run not yet trained, then one job that evaluates every run and
    writes the table once they have ended (``afterany``: a failed run is reported, not waited for
    forever). Returns the job ids, also written to OUT/slurm_jobs.json."""
    jobs: dict[str, Any] = {"train": {}, "report": None}
    env = {**os.environ, "SCOPE_DS_PYTHON": python}
    for run in study.runs():
        if trained(run):
            continue
        (run.folder / "FAILED").unlink(missing_ok=True)
        run.folder.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--job-name=study-{run.label}", f"--ntasks={study.ranks}",
               f"--output={run.folder / 'train-%j.log'}", *sbatch_args,
               str(REPO / "slurm" / "train.sh"), str(study.recipe), *_overrides(study, run)]  # fmt: skip
        jobs["train"][run.label] = _sbatch(cmd, env)
    report = [python, "-m", "scope_ds.study", *study_argv, "--launcher", "local", "--no-train", "--no-progress"]
    deps = ":".join(jobs["train"].values())
    cmd = ["sbatch", "--parsable", "--job-name=study-report", "--ntasks=1",
           f"--output={study.out / 'report-%j.log'}", *([f"--dependency=afterany:{deps}"] if deps else []),
           *sbatch_args, "--wrap", shlex.join(report)]  # fmt: skip
    jobs["report"] = _sbatch(cmd, env)
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "slurm_jobs.json").write_text(json.dumps(jobs, indent=2) + "\n")
    return jobs


def _sbatch(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({' '.join(cmd[:4])} ...): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]
