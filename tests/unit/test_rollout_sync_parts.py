"""Weight-sync building blocks without servers: buckets, the atomic folder, server-side loading."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

from scope_ds.hf_folder import write_hf_folder
from scope_ds.rollout.server.weights import load_from_disk, param_table
from scope_ds.rollout.weight_sync.distributed import bucket_payload, default_master_address, plan_buckets


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 10, bias=False)
        self.proj.weight = self.embed.weight  # tied, as lm_head / embed_tokens
        self.norm = nn.LayerNorm(4)


def named(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


def test_buckets_keep_order_and_respect_the_size():
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = list(plan_buckets(iter(tensors), bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    assert list(plan_buckets(iter([]), 100)) == []


def test_bucket_payload_announces_names_dtypes_shapes():
    bucket = [("a", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(4))]
    payload = bucket_payload(bucket, "g", version=5)
    assert payload == {
        "names": ["a", "b"],
        "dtypes": ["bfloat16", "float32"],
        "shapes": [[2, 3], [4]],
        "group_name": "g",
        "flush_cache": True,
        "weight_version": "5",
    }
    assert "weight_version" not in bucket_payload(bucket, "g", version=None)


def test_master_address_is_loopback_for_local_servers():
    assert default_master_address(["http://127.0.0.1:1", "http://localhost:2"]) == "127.0.0.1"


def test_folder_is_written_whole_and_loads_back(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    (tmp_path / "cfg" / "model.safetensors").write_text("old weights, never copied")
    src, dst = Tiny(), Tiny()
    out = write_hf_folder(named(src), tmp_path / "v1", config_dir=tmp_path / "cfg")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert load_from_disk(dst, out, threading.Lock()) == 3  # embed (tied with proj), norm weight + bias
    assert torch.equal(dst.proj.weight, src.embed.weight)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))


def test_sharded_folder_has_an_index(tmp_path):
    out = write_hf_folder(named(Tiny()), tmp_path / "v2", shard_bytes=64)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"embed.weight", "norm.weight", "norm.bias"}
    assert len(set(index["weight_map"].values())) == len(list(out.glob("model-*-of-*.safetensors"))) > 1
    dst = Tiny()
    load_from_disk(dst, out, threading.Lock())


def test_a_failed_write_leaves_no_folder(tmp_path):
    def broken():
        yield "embed.weight", torch.zeros(10, 4)
        raise RuntimeError("gather failed")

    with pytest.raises(RuntimeError, match="gather failed"):
        write_hf_folder(broken(), tmp_path / "v3")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_load_changes_nothing(tmp_path):
    src, dst = Tiny(), Tiny()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    good = write_hf_folder(named(src) + [("unknown.weight", torch.zeros(1))], tmp_path / "bad_name")
    with pytest.raises(ValueError, match="unknown weight"):
        load_from_disk(dst, good, threading.Lock())
    bad_shape = write_hf_folder(
        [("norm.weight", torch.zeros(4)), ("embed.weight", torch.zeros(3, 3))], tmp_path / "bad_shape"
    )
    with pytest.raises(ValueError, match="shape"):
        load_from_disk(dst, bad_shape, threading.Lock())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_param_table_reaches_tied_weights_under_both_names():
    table = param_table(Tiny())
    assert table["proj.weight"] is table["embed.weight"]
