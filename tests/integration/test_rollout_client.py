"""The rollout client and launcher against real processes: dead servers, failover, refusals."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from scope_ds.rollout.client import RolloutClient, RolloutServerError, SyncRolloutClient
from scope_ds.rollout.launcher import ServerLaunchError, free_ports, launch_embedded

PROMPT = [1, 20, 21, 22]


@pytest.fixture(scope="module")
def server_procs(embedded_servers, tiny_llama_module_dir):
    return embedded_servers(tiny_llama_module_dir, count=1)


def test_killed_server_is_retried_then_fails_with_a_clear_error(embedded_servers, tiny_llama_module_dir):
    proc = embedded_servers(tiny_llama_module_dir)[0]
    with SyncRolloutClient([proc.url], timeout_s=10, max_retries=3, backoff_s=0.1) as client:
        assert client.generate(PROMPT, {"max_new_tokens": 2})[0].server == proc.url
        os.kill(proc.pid, signal.SIGKILL)  # a crash, not a clean shutdown
        proc.popen.wait()
        t0 = time.monotonic()
        with pytest.raises(RolloutServerError) as info:
            client.generate(PROMPT, {"max_new_tokens": 2})
    err = info.value
    assert err.url == proc.url and err.status is None and err.attempts == 4
    assert proc.url in str(err) and "no answer" in str(err)
    assert time.monotonic() - t0 >= 0.1 + 0.2 + 0.4  # exponential backoff between the 4 attempts


def test_requests_fail_over_to_a_live_server(server_procs):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    live = server_procs[0].url
    with SyncRolloutClient([dead, live], timeout_s=10, max_retries=2, backoff_s=0.05) as client:
        groups = client.generate_many([PROMPT] * 6, {"max_new_tokens": 3}, n=2)
    assert all(r.server == live and r.response_length >= 1 for g in groups for r in g)
    assert [g[0].prompt_id for g in groups] == [str(i) for i in range(6)]


def test_refusal_is_not_retried_and_names_the_server(server_procs):
    url = server_procs[0].url

    async def scenario() -> RolloutServerError:
        client = RolloutClient([url], max_retries=3, backoff_s=0.5)
        try:
            await client.request("POST", "/generate", {"input_ids": [1, 2], "sampling_params": {"seed": 3}})
        except RolloutServerError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("a 400 must raise")

    err = asyncio.run(scenario())
    assert (err.url, err.status, err.attempts) == (url, 400, 1)
    assert "seed" in err.message


def test_weight_version_and_health_helpers(server_procs):
    with SyncRolloutClient([server_procs[0].url]) as client:
        client.wait_healthy(timeout_s=10)
        assert client.weight_versions() == {server_procs[0].url: 0}


def test_server_that_dies_at_start_reports_its_log(tmp_path):
    with pytest.raises(ServerLaunchError) as info:
        launch_embedded(str(tmp_path / "no_such_model"), log_dir=tmp_path, wait_s=60)
    message = str(info.value)
    assert "exited with code" in message and "no_such_model" in message
