"""The embedded server under hostile or broken input, over real loopback HTTP: request limits,
strict JSON types, the API key, partial weight folders, weight-group validation, orphan servers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from scope_ds.rollout.client import RolloutServerError, SyncRolloutClient
from scope_ds.rollout.launcher import LaunchSpec, embedded_command, free_ports, launch_embedded

LIMIT_ARGS = ["--max-prompts", "8", "--max-input-tokens", "200", "--max-body-bytes", "20000"]


@pytest.fixture(scope="module")
def server(embedded_servers, tiny_llama_module_dir) -> str:
    return embedded_servers(tiny_llama_module_dir, extra_args=LIMIT_ARGS)[0].url


@pytest.fixture(scope="module")
def keyed(embedded_servers, tiny_llama_module_dir):
    return embedded_servers(tiny_llama_module_dir, api_key=None)[0]  # a fresh key, as the trainer's


def post(url: str, path: str, body: object = None, *, content: bytes | None = None, **kw) -> httpx.Response:
    kw.setdefault("timeout", 20.0)
    return httpx.post(f"{url}{path}", json=body, content=content, trust_env=False, **kw)


def assert_400(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text)
    for word in words:
        assert word in response.text, (word, response.text)


def test_huge_n_and_sizes_are_400_naming_the_limit(server):
    assert_400(post(server, "/generate", {"input_ids": [2, 3], "sampling_params": {"n": 1e300}}), "n", "1024")
    assert_400(post(server, "/generate", {"input_ids": [2, 3], "sampling_params": {"n": 2000}}), "--max-n")
    big = {"input_ids": [2, 3], "sampling_params": {"max_new_tokens": 10**9}}
    assert_400(post(server, "/generate", big), "max_new_tokens", "65536")
    assert_400(post(server, "/generate", {"input_ids": [[5, 6]] * 9}), "prompts", "--max-prompts", "8")
    assert_400(post(server, "/generate", {"input_ids": [[5] * 30] * 8}), "input tokens", "200")
    assert_400(post(server, "/generate", {"input_ids": [[5, 6]] * 8, "sampling_params": {"n": 600}}), "--max-sequences")
    assert_400(post(server, "/generate", content=b"[" + b"1," * 20000 + b"1]"), "body", "20000")
    assert httpx.get(f"{server}/health", timeout=2.0, trust_env=False).status_code == 200


@pytest.mark.parametrize(
    "path,raw",
    [
        ("/generate", b'{"input_ids": [2, NaN]}'),
        ("/generate", b'{"input_ids": [2, Infinity]}'),
        ("/generate", b'{"input_ids": 5}'),
        ("/generate", b'{"input_ids": [[2, 3], 4]}'),
        ("/generate", b'{"input_ids": [2, 3], "sampling_params": {"stop_token_ids": 5}}'),
        ("/generate", b'{"input_ids": [2, 3], "sampling_params": {"n": 1e999}}'),
        ("/generate", b'{"input_ids": [2, 3], "sampling_params": {"sampling_seed": 1e30}}'),
        ("/pause_generation", b"[1, 2]"),
        ("/abort_request", b'["x"]'),
        ("/abort_request", b'{"rid": [1]}'),
        ("/update_weights_from_disk", b"[]"),
        ("/update_weights_from_disk", b'{"model_path": 5}'),
        (
            "/init_weights_update_group",
            b'{"master_address": "127.0.0.1", "master_port": [1], "rank_offset": 1, "world_size": 2}',
        ),
        ("/update_weights_from_distributed", b'{"names": 5, "dtypes": [], "shapes": []}'),
        ("/destroy_weights_update_group", b'"x"'),
    ],
)
def test_wrong_json_types_are_400_not_500(server, path, raw):
    response = post(server, path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.text)


def test_health_answers_within_a_second_under_a_flood_of_long_requests(server):
    long = {"input_ids": [[1, 40, 41]] * 8, "sampling_params": {"n": 8, "max_new_tokens": 60, "ignore_eos": True}}

    async def flood() -> list[float]:
        async with httpx.AsyncClient(timeout=300, trust_env=False) as http:
            jobs = [asyncio.ensure_future(http.post(f"{server}/generate", json=long)) for _ in range(96)]
            await asyncio.sleep(1.0)
            delays = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert (await http.get(f"{server}/health", timeout=5.0)).status_code == 200
                delays.append(time.perf_counter() - t0)
                await asyncio.sleep(0.3)
            busy = not all(j.done() for j in jobs)
            for j in jobs:
                j.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            assert busy, "the flood ended before /health was asked: make it longer"
            return delays

    delays = asyncio.run(flood())
    assert max(delays) < 1.5, delays


# ---------------------------------------------------------------------------------------- API key
def test_every_route_but_health_wants_the_key(keyed):
    url, key = keyed.url, keyed.api_key
    assert len(key) >= 32
    body = {"input_ids": [1, 40], "sampling_params": {"max_new_tokens": 2}}
    assert post(url, "/generate", body).status_code == 401
    assert post(url, "/generate", body, headers={"Authorization": f"Bearer {key}x"}).status_code == 401
    assert post(url, "/generate", body, headers={"Authorization": key}).status_code == 401
    assert httpx.get(f"{url}/model_info", trust_env=False).status_code == 401
    assert post(url, "/update_weights_from_disk", {"model_path": "/nonexistent"}).status_code == 401
    assert httpx.get(f"{url}/health", trust_env=False).status_code == 200
    auth = {"Authorization": f"Bearer {key}"}
    assert post(url, "/generate", body, headers=auth).status_code == 200
    info = httpx.get(f"{url}/server_info", headers=auth, trust_env=False)
    assert info.status_code == 200 and key not in info.text
    assert key not in keyed.log_path.read_text()  # the launcher masks it in the logged command


def test_the_client_sends_the_key_and_a_401_is_not_retried(keyed):
    with SyncRolloutClient([keyed.url], api_key=keyed.api_key) as client:
        (rollout,) = client.generate([1, 40, 41], {"max_new_tokens": 3})
        assert rollout.response_ids
    with SyncRolloutClient([keyed.url], max_retries=3, backoff_s=5.0) as client:
        t0 = time.perf_counter()
        with pytest.raises(RolloutServerError) as err:
            client.generate([1, 40, 41], {"max_new_tokens": 3})
        assert err.value.status == 401 and err.value.attempts == 1 and time.perf_counter() - t0 < 4.0


# --------------------------------------------------------------------------------- weight updates
def test_a_partial_weight_folder_is_refused_unless_asked_for(server, tiny_llama_module_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_module_dir), dtype=torch.float32)
    part = {"lm_head.weight": model.lm_head.weight.detach().clone()}
    save_file(part, str(tmp_path / "model.safetensors"))
    answer = post(server, "/update_weights_from_disk", {"model_path": str(tmp_path), "weight_version": "9"})
    assert_400(answer, "model.embed_tokens.weight", "allow_partial")
    assert httpx.get(f"{server}/model_info", trust_env=False).json()["weight_version"] == "0"
    ok = post(server, "/update_weights_from_disk", {"model_path": str(tmp_path), "allow_partial": True})
    assert ok.status_code == 200 and ok.json()["success"], ok.text


@pytest.mark.parametrize(
    "fields,word",
    [
        ({"rank_offset": 0, "world_size": 2}, "rank_offset"),
        ({"rank_offset": 2, "world_size": 2}, "rank_offset"),
        ({"rank_offset": 1, "world_size": 1}, "world_size"),
        ({"rank_offset": 5, "world_size": 3}, "rank_offset"),
    ],
)
def test_weight_group_ranks_outside_the_world_are_400_at_once(server, fields, word):
    (port,) = free_ports(1)
    body = {"master_address": "127.0.0.1", "master_port": port, "group_name": f"g{port}", **fields}
    t0 = time.perf_counter()
    answer = post(server, "/init_weights_update_group", body, timeout=10.0)
    assert_400(answer, word)
    assert time.perf_counter() - t0 < 5.0


def test_a_failed_rendezvous_answers_and_sigterm_still_stops_the_server(embedded_servers, tiny_llama_module_dir):
    (proc,) = embedded_servers(tiny_llama_module_dir)
    (port,) = free_ports(1)  # nobody hosts the rendezvous there
    body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}
    t0 = time.perf_counter()
    answer = post(proc.url, "/init_weights_update_group", {**body, "timeout_s": 3, "group_name": "a"}, timeout=60)
    assert answer.status_code == 400 and not answer.json()["success"], answer.text
    assert time.perf_counter() - t0 < 30.0
    # A rendezvous still waiting (default bound: 60 s) must not keep the server from stopping.
    pending = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import httpx; httpx.post('{proc.url}/init_weights_update_group', "
            f"json={dict(body, group_name='b')!r}, timeout=120, trust_env=False)",
        ]
    )
    try:
        time.sleep(2.0)
        t0 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.popen.wait(20.0)
        assert time.perf_counter() - t0 < 20.0
    finally:
        pending.kill()
        pending.wait()
        proc.stop()


# ----------------------------------------------------------------------------------------- orphans
def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def test_the_server_dies_with_a_launcher_killed_by_sigkill(tiny_llama_module_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from scope_ds.rollout.launcher import launch_embedded
        (proc,) = launch_embedded({str(tiny_llama_module_dir)!r}, log_dir={str(tmp_path)!r}, wait_s=120)
        print(proc.pid, flush=True)
        time.sleep(600)
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    helper = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": root}
    )
    try:
        server_pid = int(helper.stdout.readline())
        assert not _gone(server_pid, 0.5)
        helper.send_signal(signal.SIGKILL)
        helper.wait()
        assert _gone(server_pid, 10.0), f"server {server_pid} outlived its launcher"
    finally:
        helper.kill()


def test_a_new_launch_stops_the_server_an_earlier_run_left(tiny_llama_module_dir, tmp_path):
    (port,) = free_ports(1)
    spec = LaunchSpec(str(tiny_llama_module_dir), port)
    root = str(Path(__file__).resolve().parents[2])
    # Started without the launcher (so no parent-death signal): as if its launcher's run was killed
    # on another machine's scheduler, or before this version.
    env = {**os.environ, "PYTHONPATH": root}
    stale = subprocess.Popen(
        embedded_command(spec), start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    other = subprocess.Popen(["sleep", "120"])  # a pid file naming a live, unrelated program
    (tmp_path / f"rollout_server_0_{port}.pid").write_text(f"{stale.pid}\n")
    (tmp_path / "rollout_server_1_1.pid").write_text(f"{other.pid}\n")
    try:
        time.sleep(3.0)
        assert stale.poll() is None
        (proc,) = launch_embedded(str(tiny_llama_module_dir), log_dir=tmp_path, wait_s=120)
        proc.stop()
        assert stale.wait(15.0) is not None
        assert other.poll() is None, "an unrelated process named by a pid file was signalled"
    finally:
        for p in (stale, other):
            p.kill()
            p.wait()
