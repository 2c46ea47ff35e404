"""Launching real training runs (the deepspeed launcher, real ranks, real rollout servers) from tests."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "scope_ds" / "train.py"
ZERO3_STEP = REPO / "tests" / "integration" / "zero3_step.py"
# conftest.py's default_run: small_run_overrides (2 prompts x 4 rollouts, SCOPE, synchronous) for
# 6 steps, a checkpoint every 3 (the learning rate is constant: its steps 1-2 are a 2-step run's)
DEFAULT_RUN_ARGS = ["train.steps=6", "checkpoint.every=3", "pipeline.max_staleness=0"]
# zero3_step.py's rollouts: prompts of 4-10 tokens, responses of up to 10
ZERO3_LENGTHS = ["data.max_prompt_tokens=20", "rollout.max_new_tokens=12"]


def free_port() -> int:
    from scope_ds.rollout.launcher import free_ports

    return free_ports(1)[0]


def deepspeed_cmd(script: Path, args: list, ranks: int) -> list[str]:
    """``deepspeed --num_gpus RANKS --master_port FREE SCRIPT ARGS`` (the launcher as a module)."""
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]


def small_run_overrides(student: Path, teacher: Path, out: Path) -> list[str]:
    """A run that takes seconds per step on CPU: 2 prompts x 4 rollouts, short answers."""
    return [
        f"model.student={student}",
        f"model.teacher={teacher}",
        f"logging.out_dir={out}",
        "logging.progress=false",
        "train.steps=2",
        "train.prompts_per_step=2",
        "rollout.n=4",
        "rollout.max_new_tokens=12",
        "train.micro_batch_size=2",
        "train.lr=1e-3",
        "checkpoint.export_hf=true",
        "data.eval_every=0",
    ]


def run_env() -> dict[str, str]:
    """One intra-op thread per process: runs compared bit for bit must use the same thread count."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def launch_train(
    args: list[str], ranks: int = 2, timeout: int = 600, launcher: str = "deepspeed", env: dict[str, str] | None = None
):
    """Run scope_ds/train.py (``env``: extra variables); returns the CompletedProcess. ``launcher``:
    'deepspeed' (the runner and launch.py, as ``deepspeed scope_ds/train.py``), 'ranks' (one
    process per rank with RANK / WORLD_SIZE / MASTER_* set, as srun or torchrun start them: the
    same engines, without the launcher's two start-ups) or 'python' (one process)."""
    env = {**run_env(), **(env or {})}
    if launcher == "ranks":
        return launch_ranks(TRAIN, args, ranks, env, timeout)
    if launcher == "deepspeed":
        cmd = deepspeed_cmd(TRAIN, args, ranks)
    else:
        cmd = [sys.executable, str(REPO / "scope_ds" / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def launch_ranks(script: Path, args: list, ranks: int, env: dict[str, str], timeout: int, grace: float = 60.0):
    """``script`` in ``ranks`` processes that find each other from the environment (rank 0's
    address and a free port), as srun starts a job step's tasks. Once one rank fails, the others
    get ``grace`` seconds, then are killed (as launch.py does). The CompletedProcess holds the first
    failing exit status (else 0) and every rank's output, rank 0's first."""
    port = str(free_port())
    procs, outs, errs = [], [], []
    for rank in range(ranks):
        outs.append(tempfile.TemporaryFile(mode="w+"))
        errs.append(tempfile.TemporaryFile(mode="w+"))
        rank_env = {
            **env,
            **dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks)),
            **dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        }
        cmd = [sys.executable, str(script), *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=outs[-1], stderr=errs[-1], text=True))
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            if failed_at is not None and now - failed_at > grace:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    rc = next((c for c in codes if c != 0), 0)

    def read(files):
        text = []
        for f in files:
            f.seek(0)
            text.append(f.read())
            f.close()
        return "".join(text)

    return subprocess.CompletedProcess(cmd, rc, read(outs), read(errs))


def assert_adam_steps_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float, steps: int) -> None:
    """Two runs' weights after ``steps`` Adam steps of ``lr`` that should be the same but whose
    gradients differ by float32 rounding (~1e-7 relative: a packed row against padded ones, a
    server's batched log-probs): Adam's normalised step turns that into up to lr per step for an
    element whose gradient is near 0. So: at most 0.1% of a tensor's elements beyond 1e-5 and none
    beyond 2 lr per step. A wrong gradient, a lost step or lost optimizer state moves most
    elements by about lr."""
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].double() - b[k].double()).abs()
        off = int((diff > 1e-5).sum())
        assert off <= max(1, diff.numel() // 1000), f"{k}: {off} of {diff.numel()} elements differ by more than 1e-5"
        assert float(diff.max()) < 2 * lr * steps, f"{k}: an element differs by {float(diff.max()):.3g}"


def check_ok(proc):
    """``proc`` (a CompletedProcess), after asserting that it ended well (its output's tails if not)."""
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a shared run folder (conftest.py's ``default_run``), for a test that writes into it."""
    shutil.copytree(run, to, symlinks=True)
    return to


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def token_logprobs_float64(model_path: Path, rows: list[dict], temperature: float = 1.0) -> list[list[float]]:
    """Each logged rollout's response-token log-probs under the model at ``temperature``, computed
    in float64 by a plain Hugging Face forward (one rollout at a time, no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1] / temperature, dim=-1)
            start = len(r["prompt_ids"]) - 1
            targets = ids[0, 1:][start:]
            out.append(logp[start:].gather(1, targets[:, None])[:, 0].tolist())
    return out


def expected_scope_weights(rows: list[dict], tau: float = 1.0) -> dict[int, float]:
    """SCOPE.md's Eq. 4 / 5 from the logged fields alone: per group and path, PPL^(+-1/tau) / sum.

    The student's log-likelihood is the trainer's recomputed pi_old where it was logged, else the
    server's behaviour log-probs (``algo.old_logprobs=server``)."""
    subsets = defaultdict(list)
    for i, r in enumerate(rows):
        if r["response_length"] > 0:
            subsets[(r["group_id"], r["correct"])].append(i)
    out = {i: 0.0 for i in range(len(rows))}
    for (_, correct), members in subsets.items():
        vals = {}
        for i in members:
            r = rows[i]
            student = r.get("old_logprobs") or r["behaviour_logprobs"]
            logp = sum(student) if correct else r["teacher_seq_logp"]
            ppl = math.exp(-logp / r["response_length"])
            vals[i] = ppl ** (1 / tau) if correct else ppl ** (-1 / tau)
        total = sum(vals.values())
        out.update({i: v / total for i, v in vals.items()})
    return out


def study_file(
    tmp_path: Path, student: Path, teacher: Path, arms: dict | None = None, seeds: tuple[int, ...] = (0, 1)
) -> Path:
    """A study of the tiny pair (4 steps of 2 prompts x 2 rollouts, held-out accuracy at steps 0, 2
    and 4), by default SCOPE and OPD over two seeds, OPD the baseline; returns the study file."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"student": str(student), "teacher": str(teacher)},
                "data": {"source": "toy", "eval_every": 2, "eval_prompts": 4, "eval_n": 1},
                "rollout": {"n": 2, "max_new_tokens": 12},
                "train": {"steps": 4, "prompts_per_step": 2, "micro_batch_size": 2, "lr": 1e-3},
            }
        )
    )
    study = tmp_path / "study.yaml"
    arms = arms if arms is not None else {"scope": [], "opd": {"algo.name": "opd"}}
    body = {
        "recipe": "recipe.yaml",
        "arms": arms,
        "seeds": list(seeds),
        "baseline": list(arms)[-1],
        "eval": {"n": 2, "toy_prompts": 6, "max_new_tokens": 12},
        "bootstrap": {"resamples": 200},
    }
    study.write_text(yaml.safe_dump(body, sort_keys=False))
    return study
