"""Weight sync from a trainer process to two real servers: disk and distributed (gloo).

One server speaks SGLang 0.5.23 (begin/end_weight_update), the other emulates 0.5.20, which
answers 404 there; both must end up with the new weights and the new version.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from scope_ds.rollout.client import SyncRolloutClient
from scope_ds.rollout.weight_sync import DiskWeightSync, DistributedWeightSync

PROMPT = [1, 30, 31, 32, 33, 34]


@pytest.fixture(scope="module")
def servers(embedded_servers, tiny_llama_module_dir) -> list[str]:
    procs = embedded_servers(tiny_llama_module_dir, count=2, per_server_args=[[], ["--sglang-compat", "0.5.20"]])
    return [p.url for p in procs]


@pytest.fixture(scope="module")
def client(servers):
    c = SyncRolloutClient(servers, timeout_s=60, max_retries=1, backoff_s=0.1)
    yield c
    c.close()


def random_model(build, tmp_path: Path, seed: int):
    from transformers import AutoModelForCausalLM

    folder = build(tmp_path / f"seed{seed}", seed=seed, tokenizer=False)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def assert_servers_serve(client: SyncRolloutClient, model, version: int) -> None:
    """Each server's greedy rollout of PROMPT and its log-probs are those of ``model``."""
    for url in client.urls:
        answer = httpx.post(
            f"{url}/generate",
            json={
                "input_ids": PROMPT,
                "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
                "return_logprob": True,
            },
            timeout=30,
            trust_env=False,
        ).json()
        ids = answer["output_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([PROMPT + ids])).logits[0], dim=-1)
        ref = [logp[len(PROMPT) - 1 + t, tok].item() for t, tok in enumerate(ids)]
        got = [e[0] for e in answer["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-4, url
        assert ids == logp[len(PROMPT) - 1 : -1].argmax(-1).tolist()
        assert answer["meta_info"]["weight_version"] == str(version)
    assert client.weight_versions() == dict.fromkeys(client.urls, version)


def test_old_server_has_no_weight_update_session(servers):
    new, old = servers
    assert httpx.post(f"{new}/begin_weight_update", json={}, trust_env=False).status_code == 200
    assert httpx.post(f"{new}/end_weight_update", json={}, trust_env=False).status_code == 200
    assert httpx.post(f"{old}/begin_weight_update", json={}, trust_env=False).status_code == 404
    assert httpx.post(f"{old}/end_weight_update", json={}, trust_env=False).status_code == 404


def test_requests_spread_over_both_servers(client):
    groups = client.generate_many([PROMPT] * 8, {"max_new_tokens": 2}, n=1)
    assert {g[0].server for g in groups} == set(client.urls)


def test_disk_sync_reaches_both_servers(client, tmp_path, tiny_llama_builder, monkeypatch):
    before = max(client.weight_versions().values())
    model = random_model(tiny_llama_builder, tmp_path, seed=1)
    sync = DiskWeightSync(client, tmp_path / "shared", config_dir=tmp_path / "seed1", keep=1)
    version = before + 1  # the caller names the version; the sync checks the servers report it
    paths, request = [], client.client.request

    async def recorded(method, path, *args, **kwargs):  # the real call, its path noted
        paths.append(path)
        return await request(method, path, *args, **kwargs)

    monkeypatch.setattr(client.client, "request", recorded)
    sync.update(model.state_dict().items(), version)
    # SGLang needs no begin/end_weight_update session around an update from disk: two round trips fewer
    assert sorted(set(paths)) == [
        "/continue_generation",
        "/model_info",
        "/pause_generation",
        "/update_weights_from_disk",
    ]
    assert len(paths) == 4 * len(client.urls)
    monkeypatch.undo()
    assert_servers_serve(client, model, version)
    folder = tmp_path / "shared" / f"weights_v{version}"
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [folder.name]  # no temp folder left

    model2 = random_model(tiny_llama_builder, tmp_path, seed=2)
    seen = []

    def staged() -> None:  # the trainer waits here for the batch under way: the folder is written, no pause yet
        states = [httpx.get(f"{u}/server_info", trust_env=False).json()["internal_states"][0] for u in client.urls]
        seen.append(((tmp_path / "shared" / f"weights_v{version + 1}").is_dir(), [s["paused"] for s in states]))

    sync.update(model2.named_parameters(), version + 1, staged)
    assert seen == [(True, [False, False])]
    assert_servers_serve(client, model2, version + 1)
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [f"weights_v{version + 1}"]  # keep=1


def test_distributed_sync_reaches_both_servers(client, tmp_path, tiny_llama_builder):
    before = max(client.weight_versions().values())
    model = random_model(tiny_llama_builder, tmp_path, seed=3)
    # A tiny bucket size forces many buckets: the order of announcements and broadcasts is tested.
    sync = DistributedWeightSync(client, bucket_bytes=16 << 10)
    try:
        sync.update(model.named_parameters(), before + 1)
        assert sync.backend == "gloo"  # the embedded servers ask for it, even next to a GPU
        assert_servers_serve(client, model, before + 1)
        model2 = random_model(tiny_llama_builder, tmp_path, seed=4)
        sync.update(model2.named_parameters(), before + 2)  # the group is reused
        assert_servers_serve(client, model2, before + 2)
    finally:
        sync.close()


def test_refused_update_raises_keeps_version_and_leaves_servers_paused(client, tmp_path, tiny_llama_builder):
    from scope_ds.rollout.client import RolloutServerError

    before = max(client.weight_versions().values())
    sync = DiskWeightSync(client, tmp_path / "shared")
    with pytest.raises(RolloutServerError, match="unknown weight 'not.a.weight'"):
        sync.update([("not.a.weight", torch.zeros(1))], before + 1)
    assert client.weight_versions() == dict.fromkeys(client.urls, before)
    states = [httpx.get(f"{u}/server_info", trust_env=False).json()["internal_states"][0] for u in client.urls]
    assert all(s["paused"] for s in states)  # no rollouts on a half-updated policy
    model = random_model(tiny_llama_builder, tmp_path, seed=5)
    sync.update(model.named_parameters(), before + 1)  # the next good update resumes them
    assert_servers_serve(client, model, before + 1)
