"""slurm/train.sh and slurm/eval.sh on a real one-node SLURM, and the layout they plan on GPU nodes.

The SLURM here is the one tools/ci_services.sh runs (CI starts it; this module starts it when it is
not up, and then stops what it started, by pid). Jobs run on CPU with 2 tasks, the tiny model pair
and the embedded rollout server. A job that fails shows its output and its per-rank logs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, read_jsonl, small_run_overrides, study_file

sys.path.insert(0, str(REPO / "slurm"))
from layout import Allocation, LayoutError, place_servers, train_layout  # noqa: E402

SERVICES = REPO / "tools" / "ci_services.sh"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM that takes jobs; started here if it was not up (and then stopped after)."""
    started = subprocess.run(["bash", str(SERVICES), "status"], capture_output=True).returncode != 0
    if started:
        proc = subprocess.run(["bash", str(SERVICES), "start"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"tools/ci_services.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    if started:
        subprocess.run(["bash", str(SERVICES), "stop"], timeout=120)


class Job:
    """A submitted batch job: its id, output file and run folder; cancelled (by id) if still queued at the end."""

    def __init__(self, script: str, args: list[str], out_dir: Path, env: dict[str, str] | None = None, ntasks: int = 2):
        self.out_dir, self.output = out_dir, out_dir / "job.out"
        out_dir.mkdir(parents=True, exist_ok=True)
        # The job runs this interpreter (not whatever .venv site.sh would pick) with one thread per rank.
        job_env = {**os.environ, "SCOPE_DS_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
        cmd = ["sbatch", "--parsable", f"--ntasks={ntasks}", f"--output={self.output}", f"slurm/{script}", *args]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=job_env, timeout=60)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        self.id = proc.stdout.strip().split(";")[0]

    @classmethod
    def existing(cls, job_id: str, out_dir: Path, output: Path) -> Job:
        """A job submitted by someone else (its id, folder and output file)."""
        job = cls.__new__(cls)
        job.id, job.out_dir, job.output = job_id, out_dir, output
        return job

    def info(self) -> dict[str, str]:
        text = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True).stdout
        return dict(re.findall(r"(JobState|ExitCode|Restarts|Reason)=(\S+)", text))

    def wait(self, timeout: float = 900, until=FINISHED, poll: float = 1.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if info.get("JobState") in until:
                return info
            assert time.monotonic() < deadline, f"job {self.id} still {info} after {timeout:.0f} s\n{self.logs()}"
            time.sleep(poll)

    def logs(self, lines: int = 60) -> str:
        """The job's output file and the tail of every log in its run folder (for failure messages)."""
        parts = []
        for path in [self.output, *sorted(self.out_dir.glob("**/logs/*.log"))]:
            text = path.read_text(errors="replace") if path.is_file() else "(missing)"
            parts.append(f"----- {path}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True)


@pytest.fixture
def jobs():
    """Submit with ``jobs(script, args, out_dir, env)``; whatever is still queued or running is cancelled after."""
    submitted: list[Job] = []

    def submit(*args, **kwargs) -> Job:
        submitted.append(Job(*args, **kwargs))
        return submitted[-1]

    yield submit
    for job in submitted:
        if job.info().get("JobState") not in FINISHED:
            job.cancel()


def _node_states() -> set[str]:
    return set(subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split())


def _train_args(model_pair, run: Path, steps: int) -> list[str]:
    student, teacher = model_pair
    args = [a for a in small_run_overrides(student, teacher, run) if not a.startswith("train.steps=")]
    return ["recipes/toy.yaml", *args, f"train.steps={steps}"]


def _assert_completed(job: Job, info: dict[str, str]) -> None:
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"job {info}\n{job.logs()}"


# ------------------------------------------------------------------------------ jobs on SLURM


def test_sbatch_train_two_tasks_trains_and_leaves_a_checkpoint(slurm, model_pair, jobs, tmp_path):
    run = tmp_path / "run"
    # Rank 0 starts the embedded rollout server itself, as `deepspeed scope_ds/train.py` does.
    job = jobs("train.sh", _train_args(model_pair, run, steps=2), tmp_path, env={"SCOPE_DS_LAUNCH_SERVERS": "trainer"})
    _assert_completed(job, job.wait())
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2], job.logs()
    for rank in (0, 1):  # one log per rank
        assert (run / "logs" / f"train-{job.id}.0-rank{rank}.log").stat().st_size > 0
    assert list((run / "hf").glob("*.safetensors")), "no Hugging Face export"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_2" and (run / "checkpoints" / latest).is_dir(), job.logs()
    text = job.output.read_text()
    assert "training: 2 ranks" in text and "main step exited with status 0" in text and "server 0 on" not in text


def test_signalled_job_saves_requeues_and_resumes(slurm, model_pair, jobs, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the ranks save a
    checkpoint and stop, the job requeues itself, and the restart resumes from that checkpoint. The
    rollout server is a job step of its own, started by the script (the default, and the GPU path)."""
    run, steps = tmp_path / "run", 10
    job = jobs("train.sh", _train_args(model_pair, run, steps), tmp_path)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().strip()):  # a step done: the loop is running
        assert job.info().get("JobState") in ("PENDING", "RUNNING"), job.logs()
        assert time.monotonic() < deadline, job.logs()
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], check=True)
    # A requeued job waits for a begin time (about 2 minutes); let it start sooner, once the node is
    # clean of its first run and a few seconds have passed: slurmd refuses a launch whose credential
    # is from the second in which the first run's was revoked ("Job credential revoked").
    info = job.wait(until=FINISHED | {"PENDING"}, timeout=300, poll=0.5)
    if info.get("JobState") == "PENDING":
        deadline = time.monotonic() + 120
        while _node_states() != {"idle"} and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], check=True)
    info = job.wait()
    _assert_completed(job, info)
    assert info.get("Restarts") == "1", f"{info}\n{job.logs()}"
    first = (run / "logs" / f"train-{job.id}.0-rank0.log").read_text()
    second = (run / "logs" / f"train-{job.id}.1-rank0.log").read_text()
    stopped = re.search(r"stopped by a signal after step (\d+)", first)
    assert stopped and 1 <= int(stopped.group(1)) < steps, job.logs()
    assert f"resumed from {run / 'checkpoints' / ('step_' + stopped.group(1))}" in second, job.logs()
    assert [m["step"] for m in read_jsonl(metrics)] == list(range(1, steps + 1)), job.logs()
    assert "server 0 on" in job.output.read_text() and list((run / "logs").glob(f"server-{job.id}.1-0.log"))


def test_sbatch_eval_on_cpu(slurm, model_pair, jobs, tmp_path):
    out = tmp_path / "eval"
    args = ["--model", str(model_pair[0]), "--benchmarks", "toy", "--toy-prompts", "4", "--n", "2"]
    args += ["--max-new-tokens", "12", "--out", str(out), "--no-progress"]
    job = jobs("eval.sh", args, tmp_path, ntasks=1)
    _assert_completed(job, job.wait(timeout=600))
    results = (out / "results.json").read_text()
    assert '"toy"' in results and "| student |" in job.output.read_text(), job.logs()


def test_a_bad_recipe_fails_the_job_before_anything_starts(slurm, jobs, tmp_path):
    job = jobs("train.sh", ["recipes/toy.yaml", "algo.taux=1", f"logging.out_dir={tmp_path / 'run'}"], tmp_path)
    info = job.wait(timeout=300)
    assert info.get("JobState") == "FAILED", info
    text = job.output.read_text()
    assert "algo.taux" in text and "training:" not in text, text


# ------------------------------------------------------------------- layouts on GPU nodes (pure)


def _alloc(nodes: int, gpus: int, managed: bool = False) -> Allocation:
    return Allocation([f"n{i}" for i in range(nodes)], gpus, ntasks=nodes * gpus, port_base=30000, managed=managed)


def _sglang(overrides: list[str], tmp_path: Path) -> list[str]:
    models = ["model.student=/m/student", "model.teacher=/m/teacher", "rollout.backend=sglang"]
    return [*models, f"logging.out_dir={tmp_path}", *overrides]


def test_tail_layout_takes_the_last_gpus_of_every_node(tmp_path):
    over = _sglang(["rollout.num_servers=4"], tmp_path)
    lay = train_layout(None, over, _alloc(2, 8), env={})
    assert (lay.tasks_per_node, lay.ntasks, lay.train_nodes) == (6, 12, ["n0", "n1"])
    got = [(s.node, s.port, s.cmd[s.cmd.index("--base-gpu-id") + 1]) for s in lay.servers]
    assert got == [("n0", 30000, "6"), ("n0", 30001, "7"), ("n1", 30000, "6"), ("n1", 30001, "7")]
    assert all(s.cmd[s.cmd.index("--host") + 1] == "0.0.0.0" and "/m/student" in s.cmd for s in lay.servers)
    assert [s.url for s in lay.servers][:2] == ["http://n0:30000", "http://n0:30001"]
    # When SLURM hands each step its own GPUs, every server counts from GPU 0 of its step.
    managed = train_layout(None, over, _alloc(2, 8, managed=True), env={})
    assert {s.cmd[s.cmd.index("--base-gpu-id") + 1] for s in managed.servers} == {"0"}


def test_nodes_layout_gives_servers_whole_nodes(tmp_path):
    over = _sglang(["rollout.num_servers=2", "rollout.gpus_per_server=4"], tmp_path)
    lay = train_layout(None, over, _alloc(3, 8), env={"SCOPE_DS_SERVER_LAYOUT": "nodes"})
    assert (lay.train_nodes, lay.tasks_per_node, lay.ntasks) == (["n0", "n1"], 8, 16)
    assert [(s.node, s.cmd[s.cmd.index("--base-gpu-id") + 1], s.gpus) for s in lay.servers] == [
        ("n2", "0", 4),
        ("n2", "4", 4),
    ]


def test_sequence_parallel_groups_lie_within_a_node_and_are_said(tmp_path):
    """Groups of sp consecutive ranks: within a node when sp divides the training ranks per node
    (said in the start-up line through SEQUENCE_PARALLEL); refused, naming the numbers, otherwise."""
    sp = ["parallel.sequence_parallel_size=2", "train.share_prompts=false"]
    lay = train_layout(None, _sglang(["rollout.num_servers=4", *sp], tmp_path), _alloc(2, 8), env={})
    assert lay.sequence_parallel == "sequence-parallel groups of 2 ranks, each within a node (3 per node)"
    assert "SEQUENCE_PARALLEL='sequence-parallel groups of 2 ranks, each within a node (3 per node)'" in lay.shell()
    assert (
        train_layout(None, _sglang(["rollout.num_servers=4"], tmp_path), _alloc(2, 8), env={}).sequence_parallel == ""
    )
    with pytest.raises(
        LayoutError, match="parallel.sequence_parallel_size=4 does not divide the 6 training ranks per node"
    ):
        train_layout(None, _sglang(["rollout.num_servers=4", *sp, "parallel.sequence_parallel_size=4"], tmp_path),
                     _alloc(2, 8), env={})  # fmt: skip
    over = ["model.student=/m/student", "model.teacher=/m/teacher", f"logging.out_dir={tmp_path}", *sp]
    with pytest.raises(LayoutError, match="parallel.sequence_parallel_size=2 does not divide the job's 3 tasks"):
        train_layout(None, over, Allocation(["n0"], 0, ntasks=3), env={})


def test_layouts_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    cases = {
        "needs GPUs": (_alloc(1, 0), ["rollout.num_servers=1"], "tail"),
        "multiple of the 2 nodes": (_alloc(2, 8), ["rollout.num_servers=3"], "tail"),
        "leave no GPU": (_alloc(1, 8), ["rollout.num_servers=4", "rollout.gpus_per_server=2"], "tail"),
        "leaving none": (_alloc(1, 8), ["rollout.num_servers=1"], "nodes"),
        "more than the 8 GPUs": (_alloc(2, 8), ["rollout.num_servers=2", "rollout.gpus_per_server=16"], "tail"),
    }
    for message, (alloc, over, layout) in cases.items():
        with pytest.raises(LayoutError, match=message):
            train_layout(None, _sglang(over, tmp_path), alloc, env={"SCOPE_DS_SERVER_LAYOUT": layout})
    with pytest.raises(LayoutError, match="training ranks' GPUs"):
        train_layout(None, _sglang([], tmp_path), _alloc(1, 8), env={"SCOPE_DS_LAUNCH_SERVERS": "trainer"})
    with pytest.raises(LayoutError, match="tail or nodes"):
        place_servers(_alloc(2, 8), 2, 1, "middle")


def test_cpu_layout_and_attached_servers(tmp_path):
    over = ["model.student=/m/student", "model.teacher=/m/teacher", f"logging.out_dir={tmp_path}"]
    cpu = Allocation(["n0", "n1"], 0, ntasks=4)
    lay = train_layout(None, over, cpu, env={})  # the embedded server as a job step on the batch host
    assert (lay.ntasks, lay.tasks_per_node, [s.url for s in lay.servers]) == (4, 0, ["http://n0:30000"])
    assert "scope_ds.rollout.server" in lay.servers[0].cmd and lay.servers[0].gpus == 0
    assert train_layout(None, over, cpu, env={"SCOPE_DS_LAUNCH_SERVERS": "trainer"}).servers == []
    with pytest.raises(LayoutError, match="script or trainer"):
        train_layout(None, over, cpu, env={"SCOPE_DS_LAUNCH_SERVERS": "auto"})
    attached = _sglang(["rollout.servers=[http://h:1]"], tmp_path)
    lay = train_layout(None, attached, _alloc(2, 8), env={})
    assert (lay.servers, lay.ntasks) == ([], 16)


@pytest.mark.parametrize(
    "recipe, servers, trainers",
    [("recipes/r1_distill_1p5b_skywork_7b.yaml", 4, 12), ("recipes/qwen3_1p7b_base_qwen3_8b.yaml", 8, 8)],
)
def test_paper_recipes_have_the_paper_setting_and_fit_two_nodes(recipe, servers, trainers):
    """SCOPE.md's hyperparameters, and the allocation docs/cluster.md gives (2 nodes x 8 GPUs, tail layout)."""
    from scope_ds.config import load_config

    cfg = load_config(str(REPO / recipe))
    assert (cfg.data.source, cfg.data.prompt_key, cfg.data.answer_key) == (
        "zwhe99/DeepMath-103K",
        "question",
        "final_answer",
    )
    assert cfg.data.template.endswith("Put your final answer within \\boxed{{}}.")
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps, cfg.train.prompts_per_step) == (
        5e-5,
        0.01,
        0,
        256,
    )
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.max_new_tokens) == (8, 0.6, 12288)
    assert (cfg.model.dtype, cfg.rollout.backend, cfg.train.ds_config) == (
        "bfloat16",
        "sglang",
        "ds_configs/zero3.json",
    )
    lay = train_layout(str(REPO / recipe), [], _alloc(2, 8), env={})
    assert (lay.ntasks, len(lay.servers)) == (trainers, servers)
    assert all("sglang.launch_server" in " ".join(s.cmd) and cfg.model.student in s.cmd for s in lay.servers)


def test_a_study_on_slurm_is_a_job_per_run_and_a_report_after_them(slurm, model_pair, tmp_path):
    """python -m scope_ds.study --launcher slurm: one slurm/train.sh job per (arm, seed), then a job
    after them that evaluates every run and writes the study's outputs."""
    study, out = study_file(tmp_path, *model_pair, seeds=(0,)), tmp_path / "out"
    env = {
        **os.environ,
        "SCOPE_DS_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "SCOPE_DS_LAUNCH_SERVERS": "trainer",
    }
    cmd = [sys.executable, "-m", "scope_ds.study", str(study), "--out", str(out), "--launcher", "slurm"]
    submitted = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    ids = json.loads((out / "slurm_jobs.json").read_text())
    assert sorted(ids["train"]) == ["opd-seed0", "scope-seed0"] and ids["report"]
    dependency = subprocess.run(["scontrol", "show", "job", "-o", ids["report"]], capture_output=True, text=True).stdout
    assert f"afterany:{ids['train']['scope-seed0']}" in dependency, dependency  # waits for the training jobs
    report = Job.existing(ids["report"], out, out / f"report-{ids['report']}.log")
    try:
        info = report.wait(timeout=900)
    finally:
        for job_id in [*ids["train"].values(), ids["report"]]:
            subprocess.run(["scancel", job_id], capture_output=True)
    _assert_completed(report, info)
    for label, job_id in ids["train"].items():
        arm = label.removesuffix("-seed0")
        assert (out / "runs" / arm / "seed0" / f"train-{job_id}.log").is_file()
        assert (out / "runs" / arm / "seed0" / "eval" / "results.json").is_file()
    results = json.loads((out / "study.json").read_text())
    assert [r["status"] for r in results["runs"]] == ["done", "done"]
    assert "| scope | 1/1 |" in (out / "study.md").read_text()
