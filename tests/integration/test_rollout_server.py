"""The embedded rollout server over real loopback HTTP: shapes, log-probs, validation, pause."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

from scope_ds.rollout.client import RolloutClient
from scope_ds.rollout.protocol import logprob_temperature

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69]]


@pytest.fixture(scope="module")
def server(embedded_servers, tiny_llama_module_dir) -> str:
    return embedded_servers(tiny_llama_module_dir, random_seed=1234)[0].url


@pytest.fixture(scope="module")
def model(tiny_llama_module_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_module_dir), dtype=torch.float32).eval()


def forward_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    """log softmax(logits / T) of each response token from one plain, unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits / logprob_temperature(temperature), dim=-1)
    return [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(response)]


def post(url: str, body: object, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=timeout, trust_env=False)


def assert_matches_forward(model, prompt, output_ids, logprobs, temperature) -> None:
    ref = forward_logprobs(model, prompt, output_ids, temperature)
    assert len(ref) == len(logprobs) == len(output_ids)
    assert max((abs(a - b) for a, b in zip(ref, logprobs, strict=True)), default=0.0) < 1e-4


def test_n_samples_come_back_prompt_major_with_forward_logprobs(server, model):
    body = {
        "input_ids": PROMPTS,
        "sampling_params": {"n": 3, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 12},
        "return_logprob": True,
    }
    answers = post(server, body).json()
    assert isinstance(answers, list) and len(answers) == 9
    assert len({a["meta_info"]["id"] for a in answers}) == 9
    for k, answer in enumerate(answers):
        prompt = PROMPTS[k // 3]  # prompt-major: p0s0, p0s1, p0s2, p1s0, ...
        meta = answer["meta_info"]
        assert meta["prompt_tokens"] == len(prompt)
        assert meta["completion_tokens"] == len(answer["output_ids"]) > 0
        assert meta["weight_version"] == "0"
        assert meta["finish_reason"]["type"] in ("stop", "length")
        assert [e[1] for e in meta["output_token_logprobs"]] == answer["output_ids"]
        lps = [e[0] for e in meta["output_token_logprobs"]]
        assert_matches_forward(model, prompt, answer["output_ids"], lps, 0.8)


def test_single_prompt_n1_is_one_object_and_greedy_is_argmax(server, model):
    prompt = PROMPTS[0]
    answer = post(
        server,
        {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 10}, "return_logprob": True},
    ).json()
    assert isinstance(answer, dict) and "text" in answer
    ids = answer["output_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0]
    assert ids == logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)].argmax(-1).tolist()
    assert_matches_forward(model, prompt, ids, [e[0] for e in answer["meta_info"]["output_token_logprobs"]], 0.0)


def test_concurrent_requests_are_batched_and_stay_exact(server, model):
    """Requests that arrive while others decode join the running batch (left-padded KV merge)."""

    async def run() -> list:
        client = RolloutClient([server], timeout_s=60)
        try:
            tasks = []
            for i in range(12):
                prompt = [1] + [10 + (i * 7 + j) % 90 for j in range(2 + i % 9)]
                # The first request is long, so that the later ones find a running batch to join.
                params = {"temperature": 1.0, "max_new_tokens": 48 if i == 0 else 16, "ignore_eos": True}
                tasks.append(asyncio.ensure_future(client.generate(prompt, params, n=2)))
                await asyncio.sleep(0.003)  # staggered arrivals
            return await asyncio.gather(*tasks)
        finally:
            await client.aclose()

    groups = asyncio.run(run())
    for i, group in enumerate(groups):
        assert [r.sample_index for r in group] == [0, 1]
        for r in group:
            assert r.server == server and r.finish_reason == "length" and r.response_length == (48 if i == 0 else 16)
            assert_matches_forward(model, r.prompt_ids, r.response_ids, r.behaviour_logprobs, 1.0)
    info = httpx.get(f"{server}/server_info", trust_env=False).json()
    assert info["internal_states"][0]["peak_running_reqs"] > 2
    assert info["internal_states"][0]["joins_into_running_batch"] > 0
    assert info["internal_states"][0]["decode_path"] == "lean"  # these logprobs came through lean.py


def test_a_batch_request_starts_at_once_a_single_prompt_waits_for_company(embedded_servers, tiny_llama_module_dir):
    """The idle engine's --batch-wait-ms is for single prompts that may have company on the way; a
    request that brings a batch (the trainer's) has batched itself and is not held back."""
    url = embedded_servers(tiny_llama_module_dir, extra_args=["--batch-wait-ms", "1500"])[0].url
    params = {"max_new_tokens": 2, "temperature": 0.0}
    batch = post(url, {"input_ids": PROMPTS, "sampling_params": params}).json()
    single = post(url, {"input_ids": PROMPTS[0], "sampling_params": params}).json()
    assert max(a["meta_info"]["e2e_latency"] for a in batch) < 1.0
    assert single["meta_info"]["e2e_latency"] >= 1.5


BAD_REQUESTS = {
    "empty input_ids": {"input_ids": [], "sampling_params": {}},
    "empty prompt in batch": {"input_ids": [[1, 2], []]},
    "unknown sampling key": {"input_ids": [1, 2], "sampling_params": {"seed": 1}},
    "prompt longer than context": {"input_ids": list(range(1, 70))},
    "n = 0": {"input_ids": [1, 2], "sampling_params": {"n": 0}},
    "list field with n > 1": {"input_ids": [[1, 2]], "sampling_params": [{"n": 2}]},
    "token outside vocabulary": {"input_ids": [1, 5000]},
    "top_p out of range": {"input_ids": [1, 2], "sampling_params": {"top_p": 0.0}},
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_400_with_message_and_server_keeps_serving(server, name):
    response = post(server, BAD_REQUESTS[name])
    assert response.status_code == 400
    assert response.json()["error"]["message"]
    ok = post(server, {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) >= 1


def test_invalid_json_gets_400(server):
    response = httpx.post(f"{server}/generate", content=b"{not json", timeout=10, trust_env=False)
    assert response.status_code == 400 and "JSON" in json.dumps(response.json())


def test_request_during_pause_waits_then_completes(server, model):
    control = httpx.Client(base_url=server, timeout=10, trust_env=False)
    assert control.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:

        async def during_pause() -> tuple[dict, float]:
            async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
                task = asyncio.ensure_future(
                    http.post(
                        f"{server}/generate",
                        json={
                            "input_ids": PROMPTS[1],
                            "sampling_params": {"max_new_tokens": 5},
                            "return_logprob": True,
                        },
                    )
                )
                await asyncio.sleep(1.0)
                assert not task.done(), "a request during a pause must wait"
                t_resume = time.monotonic()
                await http.post(f"{server}/continue_generation", json={})
                response = await task
                return response.json(), t_resume

        answer, _ = asyncio.run(during_pause())
    finally:
        control.post("/continue_generation", json={})
    assert answer["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    lps = [e[0] for e in answer["meta_info"]["output_token_logprobs"]]
    assert_matches_forward(model, PROMPTS[1], answer["output_ids"], lps, 1.0)


def test_abort_pause_aborts_and_client_resubmits_after_resume(server):
    """pause(abort) answers queued requests with finish_reason abort; the client sends them again."""
    control = httpx.Client(base_url=server, timeout=10, trust_env=False)
    control.post("/pause_generation", json={"mode": "in_place"})  # hold requests in the queue first

    async def scenario() -> tuple[dict, list]:
        client = RolloutClient([server], timeout_s=30)
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            raw = asyncio.ensure_future(http.post(f"{server}/generate", json={"input_ids": PROMPTS[0]}))
            managed = asyncio.ensure_future(client.generate(PROMPTS[0], {"max_new_tokens": 4}, n=2))
            await asyncio.sleep(0.5)
            await http.post(f"{server}/pause_generation", json={"mode": "abort"})
            raw_answer = (await raw).json()
            await asyncio.sleep(0.5)
            assert not managed.done()  # resubmitted, waiting for the resume
            await http.post(f"{server}/continue_generation", json={})
            rollouts = await managed
        await client.aclose()
        return raw_answer, rollouts

    try:
        raw_answer, rollouts = asyncio.run(scenario())
    finally:
        control.post("/continue_generation", json={})
    assert raw_answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert [r.finish_reason != "abort" for r in rollouts] == [True, True]


def test_retract_pause_requeues_running_requests_and_stays_exact(server, model):
    """A running batch is held in place, then retracted (cache dropped, prefix recomputed on resume)."""
    body = {
        "input_ids": PROMPTS[1],
        "sampling_params": {"n": 24, "max_new_tokens": 60, "ignore_eos": True},
        "return_logprob": True,
    }

    async def state(http: httpx.AsyncClient) -> tuple[int, int]:
        s = (await http.get(f"{server}/server_info")).json()["internal_states"][0]
        return s["num_running_reqs"], s["num_waiting_reqs"]

    async def scenario() -> tuple[list, bool]:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            task = asyncio.ensure_future(http.post(f"{server}/generate", json=body))
            while (await state(http))[0] == 0 and not task.done():
                await asyncio.sleep(0.002)
            await http.post(f"{server}/pause_generation", json={"mode": "in_place"})
            held = not task.done() and (await state(http)) == (24, 0)
            if held:
                await http.post(f"{server}/pause_generation", json={"mode": "retract"})
                await asyncio.sleep(0.2)
                assert await state(http) == (0, 24)
            await http.post(f"{server}/continue_generation", json={})
            return (await task).json(), held

    answers, held = asyncio.run(scenario())
    assert held, "the batch finished before the pause: make the request longer"
    for answer in answers:
        assert len(answer["output_ids"]) == 60
        lps = [e[0] for e in answer["meta_info"]["output_token_logprobs"]]
        assert_matches_forward(model, PROMPTS[1], answer["output_ids"], lps, 1.0)


def test_abort_request_by_rid(server):
    control = httpx.Client(base_url=server, timeout=10, trust_env=False)
    control.post("/pause_generation", json={"mode": "in_place"})  # keep it queued, deterministically

    async def scenario() -> tuple[dict, dict, dict]:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            mine = asyncio.ensure_future(
                http.post(f"{server}/generate", json={"input_ids": PROMPTS[0], "rid": "job-7"})
            )
            other = asyncio.ensure_future(
                http.post(
                    f"{server}/generate", json={"input_ids": PROMPTS[1], "sampling_params": {"max_new_tokens": 3}}
                )
            )
            await asyncio.sleep(0.3)
            hit = (await http.post(f"{server}/abort_request", json={"rid": "job-7"})).json()
            answer = (await mine).json()
            await http.post(f"{server}/continue_generation", json={})
            return hit, answer, (await other).json()

    try:
        hit, answer, other = asyncio.run(scenario())
    finally:
        control.post("/continue_generation", json={})
    assert hit["success"] and "1" in hit["message"]
    assert answer["meta_info"]["id"] == "job-7" and answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert other["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_a_client_that_gives_up_frees_its_slots(server):
    """A request whose client disconnected (e.g. its timeout) is aborted, not left queued or running."""
    http = httpx.Client(base_url=server, timeout=10, trust_env=False)
    http.post("/pause_generation", json={"mode": "in_place"})
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server}/generate",
                json={"input_ids": PROMPTS[0], "sampling_params": {"n": 4}},
                timeout=0.3,
                trust_env=False,
            )
        deadline = time.monotonic() + 5.0
        while http.get("/server_info").json()["internal_states"][0]["num_waiting_reqs"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http.get("/server_info").json()["internal_states"][0]["num_waiting_reqs"] == 0
    finally:
        http.post("/continue_generation", json={})


def test_scoring_request_returns_input_logprobs(server, model):
    """slime-style teacher scoring: max_new_tokens 0, logprob_start_len 0, log-probs at T = 1."""
    ids = PROMPTS[2]
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 0}
    answer = post(server, body).json()
    entries = answer["meta_info"]["input_token_logprobs"]
    assert answer["output_ids"] == [] and entries[0][0] is None and [e[1] for e in entries] == ids
    ref = forward_logprobs(model, ids[:1], ids[1:], 1.0)
    assert max(abs(a - e[0]) for a, e in zip(ref, entries[1:], strict=True)) < 1e-4


def test_stop_token_ends_generation_and_is_kept(server, model):
    greedy = post(
        server,
        {"input_ids": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}},
    ).json()
    stop = greedy["output_ids"][2]
    first = greedy["output_ids"].index(stop)
    answer = post(
        server,
        {
            "input_ids": PROMPTS[0],
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True, "stop_token_ids": [stop]},
        },
    ).json()
    assert answer["output_ids"] == greedy["output_ids"][: first + 1]
    assert answer["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_info_endpoints(server, tiny_llama_module_dir):
    http = httpx.Client(base_url=server, timeout=10, trust_env=False)
    assert http.get("/health").status_code == 200
    info = http.get("/model_info").json()
    assert info["weight_version"] == "0" and info["model_path"] == str(tiny_llama_module_dir)
    assert http.get("/get_model_info").json() == info
    assert http.get("/server_info").json()["tp_size"] == 1
    assert http.post("/flush_cache").status_code == 200
    assert http.post("/abort_request", json={"rid": "nothing", "abort_all": False}).json()["success"]
    assert http.post("/begin_weight_update", json={}).status_code == 200
    assert http.post("/end_weight_update", json={}).status_code == 200
