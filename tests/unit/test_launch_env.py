"""The process group's rendezvous: a plain `python scope_ds/train.py` takes a free port, and a taken
port is one clear error naming --master_port (real sockets, a real process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from scope_ds.engines import ds

_LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
    "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK",
)  # fmt: skip
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in _LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)


def test_a_process_started_alone_takes_a_free_port(no_launcher) -> None:
    ds._env_from_launcher()
    env = os.environ
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert env["MASTER_PORT"] != "29500"
    with socket.socket() as s:  # free when chosen
        s.bind(("127.0.0.1", int(env["MASTER_PORT"])))


def test_a_given_port_and_a_launchers_ranks_keep_their_port(no_launcher, monkeypatch) -> None:
    monkeypatch.setenv("MASTER_PORT", "31234")
    ds._env_from_launcher()
    assert os.environ["MASTER_PORT"] == "31234"
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")  # the other rank must find the same port: the fixed default
    ds._env_from_launcher()
    assert os.environ["MASTER_PORT"] == "29500"


def test_a_taken_port_is_one_line_naming_master_port() -> None:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env.update(MASTER_PORT=str(port), PYTHONPATH=_REPO, CUDA_VISIBLE_DEVICES="")
        code = (
            "from scope_ds.engines import ds\n"
            "try:\n    ds.init_distributed()\n"
            "except ds.MasterPortInUseError as e:\n    print('CAUGHT', e)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("CAUGHT")]
    assert f"127.0.0.1:{port} (MASTER_PORT) is taken by another process (EADDRINUSE)" in line
    assert "deepspeed --master_port PORT" in line


def test_threads_share_the_cores_among_the_ranks_of_a_host() -> None:
    assert ds.threads_per_rank(16, ["a", "a", "b", "b", "b", "b"], "a") == 8
    assert ds.threads_per_rank(16, ["a", "a", "b", "b", "b", "b"], "b") == 4
    assert ds.threads_per_rank(2, ["a", "a", "a"], "a") == 1  # never none
    assert ds.threads_per_rank(6, ["a"], "a") == 6
    assert ds.threads_per_rank(2, ["a"], "a", reserved=1) == 1  # one core left by the server
    assert ds.threads_per_rank(16, ["a", "a", "b"], "a", reserved=8) == 4
    assert ds.threads_per_rank(2, ["a"], "a", reserved=4) == 1  # never none


def test_a_launched_embedded_server_keeps_its_cores_from_the_trainer(monkeypatch) -> None:
    """The trainer's ranks on rank 0's host leave the embedded servers it launches their threads
    (half the cores, 1-8, as the server takes them by default) when the servers generate beside
    the update (max_staleness >= 1); synchronous servers, attached servers and SGLang's GPUs take
    none of the trainer's cores."""
    from scope_ds.config import load_config
    from scope_ds.openmp import server_threads
    from scope_ds.pipeline.build import launched_server_threads

    assert [server_threads(c) for c in (1, 2, 3, 16, 64)] == [1, 1, 1, 8, 8]
    cores = len(os.sched_getaffinity(0))
    beside = "pipeline.max_staleness=1"
    cases = {
        (beside,): server_threads(cores),
        (beside, "rollout.num_servers=2"): 2 * server_threads(cores),
        (beside, "rollout.servers=[http://127.0.0.1:1]"): 0,
        (beside, "rollout.backend=sglang"): 0,
        (): 0,  # the synchronous default
    }
    for overrides, want in cases.items():
        cfg = load_config(None, list(overrides))
        assert launched_server_threads(cfg) == want, overrides
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert ds.default_threads(1, server_threads=1) == max(1, cores - 1) == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_without_omp_num_threads_take_half_the_cores_each() -> None:
    """Two real ranks on this host (gloo), OMP_NUM_THREADS unset: each sets cores // 2 intra-op
    threads."""
    cores = len(os.sched_getaffinity(0))
    code = (
        "import torch\nfrom scope_ds.engines import ds\n"
        "rank, world = ds.init_distributed()\n"
        "print('THREADS', ds.default_threads(world), torch.get_num_threads())\n"
        "ds.end_distributed()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*_LAUNCHER_VARS, "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=_REPO, CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1", WORLD_SIZE="2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    want = str(max(1, cores // 2))
    for out in outs:
        assert next(x for x in out.splitlines() if x.startswith("THREADS")).split()[1:] == [want, want], out


def test_omp_num_threads_where_set_is_left_as_it_is(monkeypatch) -> None:
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(1)
        assert ds.default_threads(1) == 1 and torch.get_num_threads() == 1  # unset, a lone rank takes every core
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("given, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_trainer_and_the_embedded_server_wait_passively_unless_told_otherwise(given, want) -> None:
    """OMP_WAIT_POLICY: train.py sets it before anything loads torch (OpenMP reads it once); the
    launcher puts it in the embedded server's environment. A value the user set stays."""
    from scope_ds.rollout.launcher import _with_our_package

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, sys\nimport scope_ds.train\nprint(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PYTHONPATH": _REPO}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.split() == [want, "False"], proc.stdout + proc.stderr[-2000:]
    assert _with_our_package(env)["OMP_WAIT_POLICY"] == want


def test_an_old_deepspeed_is_refused_naming_both_releases() -> None:
    import deepspeed
    import pytest

    from scope_ds.engines.ds import DEEPSPEED_FLOOR, check_deepspeed

    with pytest.raises(RuntimeError, match=rf"DeepSpeed 0\.18\.0 is installed; scope_ds needs {DEEPSPEED_FLOOR}"):
        check_deepspeed("0.18.0")
    check_deepspeed(DEEPSPEED_FLOOR)
    check_deepspeed(deepspeed.__version__)  # the installed one passes
    setup = open(os.path.join(_REPO, "setup.py")).read()
    assert f'"deepspeed>={DEEPSPEED_FLOOR}"' in setup
