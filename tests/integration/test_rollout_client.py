"""The rollout client and launcher against real processes: dead servers, failover, refusals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from scope_ds.rollout.client import (
    KEEPALIVE_EXPIRY_S,
    RolloutAbortedError,
    RolloutClient,
    RolloutServerError,
    SyncRolloutClient,
)
from scope_ds.rollout.launcher import RolloutServers, ServerLaunchError, free_ports, launch_embedded
from scope_ds.rollout.server.main import KEEP_ALIVE_S

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


def test_servers_started_without_waiting_are_waited_for_later(tiny_llama_module_dir, tmp_path):
    """wait_s=None: start returns while the servers still start (the trainer builds its engines
    meanwhile); wait_healthy then waits for all, and stops every one of a launch if one fails."""
    servers = RolloutServers.start("embedded", str(tiny_llama_module_dir), count=2, log_dir=tmp_path, wait_s=None)
    try:
        assert all(p.alive() for p in servers.procs) and not _answers(servers.urls[0])  # still importing
        servers.wait_healthy(120)
        assert all(_answers(url) for url in servers.urls)
    finally:
        servers.stop()
    bad = RolloutServers.start("embedded", str(tmp_path / "no_such_model"), count=2, log_dir=tmp_path, wait_s=None)
    with pytest.raises(ServerLaunchError, match="no_such_model"):
        bad.wait_healthy(60)
    assert not any(p.alive() for p in bad.procs) and not list(tmp_path.glob("*.pid"))


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5.0, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


async def _waiting_requests(http: httpx.AsyncClient, url: str, count: int) -> None:
    """Return once the server holds ``count`` queued requests (raise after 10 s)."""
    deadline = time.monotonic() + 10.0
    while (await http.get(f"{url}/server_info")).json()["internal_states"][0]["num_waiting_reqs"] < count:
        assert time.monotonic() < deadline, f"the server never held {count} waiting request(s)"
        await asyncio.sleep(0.02)


def test_rollouts_still_aborted_after_the_resubmits_raise_naming_the_request(server_procs):
    """No partial rollout: aborted twice with max_abort_resubmits=1 -> RolloutAbortedError, not finish "abort"."""
    url = server_procs[0].url

    async def scenario() -> RolloutAbortedError:
        client = RolloutClient([url], timeout_s=30, max_abort_resubmits=1)
        async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
            await http.post(f"{url}/pause_generation", json={"mode": "in_place"})  # hold it in the queue
            try:
                task = asyncio.ensure_future(
                    client.generate(PROMPT, {"max_new_tokens": 4}, n=2, prompt_id="p-7", group_id="3:7")
                )
                for _ in range(2):  # the first send, then its one resubmission
                    await _waiting_requests(http, url, 2)
                    await http.post(f"{url}/pause_generation", json={"mode": "abort"})
                with pytest.raises(RolloutAbortedError) as info:
                    await asyncio.wait_for(task, 10)
                return info.value
            finally:
                await http.post(f"{url}/continue_generation", json={})
                await client.aclose()

    err = asyncio.run(scenario())
    assert isinstance(err, RolloutServerError)  # callers that stop on a failing server stop here too
    assert (err.url, err.prompt_id, err.group_id, err.samples, err.resubmits) == (url, "p-7", "3:7", [0, 1], 1)
    assert len(err.request_ids) == 2 and all(err.request_ids)
    message = str(err)
    assert url in message and "'p-7'" in message and "after 1 resubmission" in message
    assert all(rid in message for rid in err.request_ids)


def _server_idle_close_s(url: str) -> float:
    """Seconds the server keeps an idle keep-alive connection open after answering on it."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        head, body = answer.split(b"\r\n\r\n", 1)
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
        while len(body) < length:
            body += sock.recv(4096)
        t0 = time.monotonic()
        assert sock.recv(4096) == b"", "the server sent more than one answer"  # blocks until it closes
        return time.monotonic() - t0


def test_idle_connections_expire_before_the_server_closes_them(server_procs, caplog):
    """The client drops idle connections (2 s) before the server does (uvicorn, 5 s): no request ever
    goes out on a connection the server is closing, so long steps log no ReadError and no retry."""
    url = server_procs[0].url
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # measured beside the client's requests
        server_close_s = pool.submit(_server_idle_close_s, url)
        ports = _client_ports_and_logs(url, caplog)
        closes_after_s = server_close_s.result(timeout=30)
    assert ports[0] == ports[1] != ports[2]
    assert [r.getMessage() for r in caplog.records if r.name == "scope_ds.rollout.client"] == []
    # What the client's expiry assumes: the server closes idle connections only after KEEP_ALIVE_S.
    assert KEEPALIVE_EXPIRY_S + 1.0 < KEEP_ALIVE_S - 0.5 < closes_after_s < KEEP_ALIVE_S + 2.0


def _client_ports_and_logs(url: str, caplog) -> list[int]:
    """Requests after idle waits of 0.2 s, the client's expiry + 1 s and the server's keep-alive + 1 s;
    the local port of the connection each of the first three went out on."""

    def local_port(response: httpx.Response | None) -> int:
        assert response is not None
        return response.extensions["network_stream"].get_extra_info("client_addr")[1]

    async def scenario() -> list[int]:
        client = RolloutClient([url], timeout_s=30, max_retries=3, backoff_s=0.05)
        try:
            ports = [local_port(await client.request("GET", "/health", url=url))]
            await asyncio.sleep(0.2)  # a short idle: the connection is kept and reused
            ports.append(local_port(await client.request("GET", "/health", url=url)))
            await asyncio.sleep(KEEPALIVE_EXPIRY_S + 1.0)  # the client's expiry passed, the server's not
            ports.append(local_port(await client.request("GET", "/health", url=url)))
            await client.generate(PROMPT, {"max_new_tokens": 2})
            await asyncio.sleep(KEEP_ALIVE_S + 1.0)  # idle longer than the server's keep-alive
            await client.generate(PROMPT, {"max_new_tokens": 2})
            return ports
        finally:
            await client.aclose()

    with caplog.at_level(logging.DEBUG, logger="scope_ds.rollout.client"):
        return asyncio.run(scenario())
