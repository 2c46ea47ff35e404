"""The launcher's command lines (SGLang cannot run here) and port picking."""

from __future__ import annotations

import sys

import pytest

from scope_ds.rollout.launcher import LaunchSpec, embedded_command, free_ports, launch, sglang_command
from scope_ds.rollout.server.app import parse_version


def flags(cmd: list[str]) -> dict[str, str]:
    """``--key value`` pairs of a command line (a flag without a value maps to "")."""
    out, i = {}, 0
    while i < len(cmd):
        if cmd[i].startswith("--"):
            has_value = i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
            out[cmd[i]] = cmd[i + 1] if has_value else ""
            i += 2 if has_value else 1
        else:
            i += 1
    return out


def test_sglang_command_has_the_documented_flags():
    spec = LaunchSpec(
        model_path="/m", port=30001, random_seed=7, tp_size=2, base_gpu_id=4, extra_args=("--dtype", "bfloat16")
    )
    cmd = sglang_command(spec, python="/py")
    assert cmd[:3] == ["/py", "-m", "sglang.launch_server"]
    assert flags(cmd) == {
        "--model-path": "/m",
        "--host": "127.0.0.1",
        "--port": "30001",
        "--tp-size": "2",
        "--mem-fraction-static": "0.7",
        "--base-gpu-id": "4",
        "--random-seed": "7",
        "--weight-version": "0",
        "--skip-server-warmup": "",
        "--dtype": "bfloat16",
    }


def test_sglang_command_without_seed():
    assert "--random-seed" not in sglang_command(LaunchSpec(model_path="/m", port=1))


def test_embedded_command_is_the_cpu_twin():
    cmd = embedded_command(LaunchSpec(model_path="/m", port=5, random_seed=1, extra_args=("--sglang-compat", "0.5.20")))
    assert cmd[:3] == [sys.executable, "-m", "scope_ds.rollout.server"]
    assert flags(cmd) == {
        "--model-path": "/m",
        "--host": "127.0.0.1",
        "--port": "5",
        "--weight-version": "0",
        "--random-seed": "1",
        "--sglang-compat": "0.5.20",
    }


def test_free_ports_are_distinct():
    ports = free_ports(8)
    assert len(set(ports)) == 8 and all(0 < p < 65536 for p in ports)


def test_launch_refuses_unknown_kinds_and_bad_per_server_args(tmp_path):
    with pytest.raises(ValueError, match="server kind"):
        launch("vllm", "/m", log_dir=tmp_path)
    with pytest.raises(ValueError, match="per_server_args"):
        launch("embedded", "/m", count=2, per_server_args=[[]], log_dir=tmp_path)


def test_version_parsing_for_the_compat_switch():
    assert parse_version("0.5.20") == (0, 5, 20) < (0, 5, 21)
    assert parse_version("0.5.23.post1") == (0, 5, 23)
    assert parse_version("0.5.21rc1") == (0, 5, 21)


def test_api_key_reaches_both_commands_and_is_masked_in_logs():
    from scope_ds.rollout.launcher import new_api_key, shown_command

    key = new_api_key()
    assert len(key) >= 32 and key != new_api_key()
    spec = LaunchSpec("/m", 30001, api_key=key)
    for cmd in (sglang_command(spec), embedded_command(spec)):
        assert flags(cmd)["--api-key"] == key
        assert key not in shown_command(cmd) and "--api-key '***'" in shown_command(cmd)
    assert "--api-key" not in embedded_command(LaunchSpec("/m", 30001))


def test_keyless_servers_are_refused_beyond_loopback(tmp_path):
    with pytest.raises(ValueError, match="API key"):
        launch("embedded", "/m", host="0.0.0.0", api_key="", log_dir=tmp_path)


def test_a_pid_file_of_another_program_is_left_alone(tmp_path):
    import subprocess

    from scope_ds.rollout.launcher import stop_stale_servers

    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "rollout_server_0_30001.pid").write_text(f"{other.pid}\n")
        (tmp_path / "rollout_server_1_30002.pid").write_text("999999999\n")
        assert stop_stale_servers(tmp_path) == []
        assert other.poll() is None and not list(tmp_path.glob("*.pid"))
    finally:
        other.kill()
        other.wait()


def test_slurm_servers_always_get_the_job_key(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "slurm"))
    from layout import Allocation, train_layout

    over = ["model.student=/m/student", "model.teacher=/m/teacher", f"logging.out_dir={tmp_path}"]
    lay = train_layout(None, over, Allocation(["n0"], 0, ntasks=2), env={"SCOPE_DS_API_KEY": "jobkey"})
    assert flags(lay.servers[0].cmd)["--api-key"] == "jobkey" and "API_KEY=jobkey" in lay.shell()
    fresh = train_layout(None, over, Allocation(["n0"], 0, ntasks=2), env={})
    assert len(fresh.api_key) >= 32 and flags(fresh.servers[0].cmd)["--api-key"] == fresh.api_key
    attached = train_layout(None, [*over, "rollout.servers=[http://h:1]"], Allocation(["n0"], 0, ntasks=2), env={})
    assert attached.servers == [] and attached.api_key == ""


def test_generated_api_keys_never_read_as_an_option():
    """A key starting with '-' made the server's argparse take --api-key for a bare flag."""
    from scope_ds.rollout.launcher import new_api_key

    keys = [new_api_key() for _ in range(2000)]
    assert all(k[0] != "-" and len(k) == 64 for k in keys) and len(set(keys)) == len(keys)
