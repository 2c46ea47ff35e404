"""Weight sync by broadcast: trainer rank 0 -> every server rank, in buckets.

A process group joins the trainer (rank 0) and each server's ranks (server i from its
``rank_offset``). Per bucket the trainer announces names, dtypes and shapes with
``/update_weights_from_distributed`` on every server, then broadcasts the tensors in that order;
the servers' HTTP answers come once they have received and loaded the bucket. NCCL on GPUs, gloo
on CPU (an embedded server answers an "nccl" group with gloo).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from scope_ds.rollout.client import SyncRolloutClient
from scope_ds.rollout.launcher import free_ports
from scope_ds.rollout.weight_sync import group as pgroup
from scope_ds.rollout.weight_sync.common import WeightSyncError, check_results, check_versions, update_session

Bucket = list[tuple[str, torch.Tensor]]


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group tensors in order into buckets of about ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _with_last(buckets: Iterator[Bucket]) -> Iterator[tuple[Bucket, bool]]:
    """Look one bucket ahead so that the version is announced with the last bucket only."""
    current = next(buckets, None)
    while current is not None:
        following = next(buckets, None)
        yield current, following is None
        current = following


def bucket_payload(bucket: Bucket, group_name: str, version: int | None) -> dict[str, Any]:
    """The JSON of one /update_weights_from_distributed call (version only with the last bucket)."""
    payload: dict[str, Any] = {
        "names": [name for name, _ in bucket],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group_name,
        "flush_cache": version is not None,
    }
    if version is not None:
        payload["weight_version"] = str(version)
    return payload


def default_master_address(urls: list[str]) -> str:
    """Loopback when every server is local; otherwise this host's address as the servers see it."""
    hosts = [urllib.parse.urlsplit(u).hostname or "" for u in urls]

    def local(host: str) -> bool:
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    if all(local(h) for h in hosts):
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


class DistributedWeightSync:
    """Push full weights from trainer rank 0 by collective broadcast (call only on rank 0)."""

    def __init__(
        self,
        client: SyncRolloutClient,
        *,
        backend: str | None = None,
        master_address: str | None = None,
        master_port: int | None = None,
        bucket_bytes: int = 512 << 20,
        group_name: str = "weight_update_group",
        ranks_per_server: list[int] | None = None,
        pause_mode: str = "abort",
        timeout_s: float = 300.0,
    ) -> None:
        """``ranks_per_server``: each server's world size (default: tp_size x pp_size from /server_info).

        ``backend``: default NCCL when this process has CUDA, else gloo; gloo whenever a server
        announces it (the embedded server's ``weight_update_backend``).
        """
        self.client = client
        self.backend = backend
        self.master_address = master_address or default_master_address(client.urls)
        self.master_port = master_port
        self.bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.ranks_per_server = ranks_per_server
        self.pause_mode = pause_mode
        self.timeout_s = timeout_s
        self.group: torch.distributed.ProcessGroup | None = None

    def _plan(self) -> list[int]:
        """Each server's world size; also settles the backend from what the servers announce."""
        infos = self.client.run(self.client.client.server_infos())
        wanted = {i.get("weight_update_backend") for i in infos} - {None}
        if len(wanted) > 1:
            raise WeightSyncError(f"servers ask for different weight-update backends: {sorted(wanted)}")
        if self.backend is not None and wanted and self.backend not in wanted:
            raise WeightSyncError(f"backend {self.backend!r} asked for, but the servers receive with {sorted(wanted)}")
        if self.backend is None:
            self.backend = wanted.pop() if wanted else ("nccl" if torch.cuda.is_available() else "gloo")
        if self.ranks_per_server is not None:
            return list(self.ranks_per_server)
        return [int(i.get("tp_size", 1)) * int(i.get("pp_size", 1)) for i in infos]

    def connect(self) -> None:
        """Create the group: the servers' HTTP joins are in flight while rank 0 joins here."""
        ranks = self._plan()
        offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        world_size = 1 + sum(ranks)
        port = self.master_port or free_ports(1, "0.0.0.0")[0]
        calls = []
        for url, offset in zip(self.client.urls, offsets, strict=True):
            body = {
                "master_address": self.master_address,
                "master_port": port,
                "rank_offset": offset,
                "world_size": world_size,
                "group_name": self.group_name,
                "backend": self.backend,
            }
            calls.append(self.client.submit(self.client.client.post_json(url, "/init_weights_update_group", body)))
        # Rank 0 joins in a daemon thread so that a server that refuses or is down fails this call
        # at once (its HTTP error) instead of after the rendezvous timeout.
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["group"] = pgroup.init_custom_group(
                    self.backend, self.master_address, port, 0, world_size, self.group_name, self.timeout_s
                )
            except BaseException as exc:  # re-raised in the caller's thread below
                joined["error"] = exc

        thread = threading.Thread(target=join, name="weight-group-join", daemon=True)
        thread.start()
        check_results(self.client.urls, [c.result(self.timeout_s) for c in calls], "init_weights_update_group")
        thread.join(self.timeout_s)
        if "group" not in joined:
            raise WeightSyncError(f"trainer could not join the weight-update group: {joined.get('error', 'timeout')}")
        self.group = joined["group"]

    def update(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        staged: Callable[[], None] | None = None,
    ) -> None:
        """Broadcast every tensor to every server, announcing ``version`` with the last bucket, and
        check that every server reports exactly ``version`` (else WeightSyncError). ``staged()``,
        if given, runs first: the tensors go straight into the broadcast, nothing is staged."""
        if staged is not None:
            staged()
        if self.group is None:
            self.connect()
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        with update_session(self.client, self.pause_mode):
            for bucket, last in _with_last(plan_buckets(named_tensors, self.bucket_bytes)):
                payload = bucket_payload(bucket, self.group_name, version if last else None)
                calls = [
                    self.client.submit(self.client.client.post_json(u, "/update_weights_from_distributed", payload))
                    for u in self.client.urls
                ]
                for _, tensor in bucket:
                    pgroup.broadcast(tensor.detach().to(device).contiguous(), self.group, src=0)
                results = [c.result(self.timeout_s) for c in calls]
                check_results(self.client.urls, results, "update_weights_from_distributed")
            check_versions(self.client, version)

    def close(self) -> None:
        """Destroy the group on the servers and here (the servers' side first: it does not block)."""
        if self.group is None:
            return
        results = self.client.run(
            self.client.client.post_all("/destroy_weights_update_group", {"group_name": self.group_name})
        )
        pgroup.destroy_group(self.group)
        self.group = None
        check_results(self.client.urls, results, "destroy_weights_update_group")
