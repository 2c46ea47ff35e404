"""Everything between the trainer and the rollout servers, over SGLang's native HTTP API.

- protocol: build /generate requests and parse answers (pure functions)
- client: async HTTP client (retries, load balancing) and its blocking facade
- server: the embedded CPU server (``python -m scope_ds.rollout.server``)
- weight_sync: disk and distributed weight updates from the trainer
- launcher: start SGLang or embedded servers, or attach to running ones

The trainer never imports sglang. See docs/rollout.md.
"""

from scope_ds.rollout.client import RolloutClient, RolloutServerError, SyncRolloutClient
from scope_ds.rollout.launcher import RolloutServers, ServerLaunchError

__all__ = ["RolloutClient", "RolloutServerError", "RolloutServers", "ServerLaunchError", "SyncRolloutClient"]
