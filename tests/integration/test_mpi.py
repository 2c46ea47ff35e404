"""mpirun -np 2 trains: ranks, world size and the rendezvous address come from mpi4py.

Open MPI and mpi4py come from tools/ci_services.sh (CI runs it; this module runs its `mpi` part,
which installs only what is missing).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from train_helpers import REPO, read_jsonl, small_run_overrides

SERVICES = REPO / "tools" / "ci_services.sh"
# Root may run mpirun only when it says so; 2 ranks on however many cores this machine has.
MPIRUN = ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]


@pytest.fixture(scope="module")
def mpi():
    if shutil.which("mpirun") is None or subprocess.run([sys.executable, "-c", "import mpi4py"]).returncode:
        proc = subprocess.run(["bash", str(SERVICES), "mpi"], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"tools/ci_services.sh mpi failed:\n{proc.stdout}\n{proc.stderr}"
    # The .venv mpi4py goes with the .venv interpreter; another interpreter needs its own.
    subprocess.run([sys.executable, "-c", "import mpi4py"], check=True)


def _mpirun(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # what the ranks know must come from MPI
    return subprocess.run([*MPIRUN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_ranks_and_rendezvous_come_from_mpi4py(mpi, tmp_path):
    # Each rank writes its own file: the ranks' stdout is one pipe and their lines can run together.
    probe = (
        "import json, os, sys; from scope_ds.engines.ds import _env_from_launcher; _env_from_launcher(); "
        "keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'); "
        "open(os.path.join(sys.argv[1], 'rank' + os.environ['RANK'] + '.json'), 'w')"
        ".write(json.dumps({k: os.environ[k] for k in keys}))"
    )
    proc = _mpirun([sys.executable, "-c", probe, str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = sorted((json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")), key=lambda r: r["RANK"])
    assert [(r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"]) for r in ranks] == [("0", "2", "0"), ("1", "2", "1")]
    # One rendezvous for all, a free port chosen by rank 0 (not the fixed default of the variable mapping).
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks}) == 1 and ranks[0]["MASTER_PORT"] != "29500"


def test_mpirun_two_ranks_trains(mpi, model_pair, tmp_path):
    student, teacher = model_pair
    out = tmp_path / "run"
    proc = _mpirun(
        [sys.executable, str(REPO / "scope_ds" / "train.py"), *small_run_overrides(student, teacher, out)], 900
    )
    assert proc.returncode == 0, f"mpirun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss/total"]) for m in metrics)
    assert all(m["rollouts"] == 8 for m in metrics)  # 2 prompts x 4 rollouts, split over the 2 ranks
    assert list((out / "hf").glob("*.safetensors"))
