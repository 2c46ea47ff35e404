"""Where a training job's processes go: training ranks and rollout servers on the allocated nodes.

Called by slurm/common.sh (never imported by scope_ds):

    python slurm/layout.py train RECIPE [key=value ...]   # prints the layout as bash assignments
    python slurm/layout.py wait --pids "P ..." URL ...     # poll /health until every URL answers 200

The allocation comes from the environment the batch script sets: SCOPE_DS_NODES (space-separated,
from ``scontrol show hostnames``), SCOPE_DS_GPUS_PER_NODE (0 on CPU nodes), SCOPE_DS_NTASKS (tasks
on CPU), SCOPE_DS_GPUS_MANAGED (1: SLURM hands each step its GPUs), SCOPE_DS_PORT_BASE (servers
take PORT_BASE + i on each node), SCOPE_DS_SERVER_LAYOUT, SCOPE_DS_LAUNCH_SERVERS,
SCOPE_DS_SGLANG_MEM and SCOPE_DS_SGLANG_ARGS (see slurm/site.sh).
A bad recipe or a layout that does not fit exits with status 2 and says why, before any work.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scope_ds.config import ConfigError, load_config  # noqa: E402
from scope_ds.model_paths import served_model  # noqa: E402
from scope_ds.rollout import health  # noqa: E402
from scope_ds.rollout.launcher import LaunchSpec, embedded_command, new_api_key, sglang_command  # noqa: E402


class LayoutError(ValueError):
    """An allocation that cannot hold what the recipe asks for; the message says what to change."""


@dataclass
class Server:
    node: str  # where it runs
    port: int  # its port there
    cmd: list[str]  # its command line
    gpus: int = 0  # GPUs it uses (what its step asks SLURM for, when SLURM hands out GPUs)

    @property
    def url(self) -> str:
        return f"http://{self.node}:{self.port}"


@dataclass
class Layout:
    train_nodes: list[str]  # nodes of the training step
    tasks_per_node: int  # training ranks per node (0: let srun spread SCOPE_DS_NTASKS)
    ntasks: int  # training ranks in all (the world size)
    servers: list[Server] = field(default_factory=list)  # servers this job starts (and waits for)
    startup_timeout_s: float = 300.0  # how long they may take to answer /health
    run_dir: str = ""  # the run folder (logs go to RUN_DIR/logs)
    api_key: str = ""  # the key the job's servers require (they listen beyond loopback: never none)
    sequence_parallel: str = ""  # how the sequence-parallel groups lie, for the start-up line ("": none)

    def shell(self) -> str:
        """Bash assignments for ``eval``: scalars, and arrays SERVER_NODES / SERVER_CMDS / SERVER_URLS."""
        out = {
            "TRAIN_NODES": ",".join(self.train_nodes),
            "TRAIN_NNODES": str(len(self.train_nodes)),
            "TASKS_PER_NODE": str(self.tasks_per_node),
            "NTASKS": str(self.ntasks),
            "STARTUP_TIMEOUT": str(int(self.startup_timeout_s)),
            "RUN_DIR": self.run_dir,
            "API_KEY": self.api_key,
            "SEQUENCE_PARALLEL": self.sequence_parallel,
        }
        lines = [f"{k}={shlex.quote(v)}" for k, v in out.items()]
        for name, items in (
            ("SERVER_NODES", [s.node for s in self.servers]),
            ("SERVER_CMDS", [shlex.join(s.cmd) for s in self.servers]),
            ("SERVER_URLS", [s.url for s in self.servers]),
            ("SERVER_GPUS", [str(s.gpus) for s in self.servers]),
        ):
            lines.append(f"{name}=({' '.join(shlex.quote(i) for i in items)})")
        return "\n".join(lines)


@dataclass
class Allocation:
    nodes: list[str]  # hosts of the job, first = the batch host
    gpus_per_node: int  # 0 on CPU nodes
    ntasks: int  # tasks sbatch was given (used on CPU nodes)
    port_base: int = 30000  # server i on a node listens on port_base + i
    managed: bool = False  # SLURM hands each step its own GPUs (numbered from 0 inside the step)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Allocation:
        env = dict(os.environ if env is None else env)
        nodes = env.get("SCOPE_DS_NODES", "").split()
        if not nodes:
            raise LayoutError("SCOPE_DS_NODES is empty: run this from slurm/train.sh")
        return cls(
            nodes=nodes,
            gpus_per_node=int(env.get("SCOPE_DS_GPUS_PER_NODE", "0")),
            ntasks=int(env.get("SCOPE_DS_NTASKS", "1")),
            port_base=int(env.get("SCOPE_DS_PORT_BASE", "30000")),
            managed=env.get("SCOPE_DS_GPUS_MANAGED", "0") == "1",
        )


def place_servers(alloc: Allocation, count: int, tp: int, layout: str) -> tuple[list[tuple[str, int]], int]:
    """(node, first GPU) of each of ``count`` servers of ``tp`` GPUs, and the GPUs left per node for
    training: ``tail`` takes the last GPUs of every node, ``nodes`` whole nodes at the end of the list."""
    g, n = alloc.gpus_per_node, len(alloc.nodes)
    if tp > g:
        raise LayoutError(f"rollout.gpus_per_server={tp} is more than the {g} GPUs of a node")
    if layout == "tail":
        if count % n:
            raise LayoutError(f"tail layout: rollout.num_servers={count} must be a multiple of the {n} nodes")
        per_node = count // n
        train_gpus = g - per_node * tp
        if train_gpus < 1:
            raise LayoutError(f"tail layout: {per_node} servers x {tp} GPUs leave no GPU of {g} for training")
        return [(node, train_gpus + i * tp) for node in alloc.nodes for i in range(per_node)], train_gpus
    if layout == "nodes":
        per_node = g // tp
        server_nodes = -(-count // per_node)
        if server_nodes >= n:
            raise LayoutError(f"nodes layout: {count} servers need {server_nodes} of the {n} nodes, leaving none")
        nodes = alloc.nodes[n - server_nodes :]
        return [(nodes[i // per_node], (i % per_node) * tp) for i in range(count)], g
    raise LayoutError(f"SCOPE_DS_SERVER_LAYOUT must be tail or nodes, got {layout!r}")


def _servers(
    kind: str, model: str, places: list[tuple[str, int]], tp: int, alloc: Allocation, seed: int, extra, key: str
):
    """Server i serves ``model`` at places[i] = (node, first GPU) on ``tp`` GPUs; the k-th server of
    a node listens on port_base + k."""
    servers, used = [], {}
    mem = float(os.environ.get("SCOPE_DS_SGLANG_MEM", "0.7"))
    build = sglang_command if kind == "sglang" else embedded_command
    for i, (node, gpu) in enumerate(places):
        port = alloc.port_base + used.get(node, 0)
        used[node] = used.get(node, 0) + 1
        first = 0 if alloc.managed else gpu
        spec = LaunchSpec(model, port, host="0.0.0.0", random_seed=seed + i, tp_size=tp, base_gpu_id=first, api_key=key)
        spec.mem_fraction_static, spec.extra_args = mem, tuple(extra)
        servers.append(Server(node, port, build(spec, python="python"), tp if kind == "sglang" else 0))
    return servers


def train_layout(recipe: str, overrides: list[str], alloc: Allocation, env: dict[str, str] | None = None) -> Layout:
    """Training ranks and the servers this job starts, for one recipe on one allocation."""
    env = dict(os.environ if env is None else env)
    cfg = load_config(recipe, overrides)
    r = cfg.rollout
    mode = env.get("SCOPE_DS_LAUNCH_SERVERS", "script")
    if mode not in ("script", "trainer"):
        raise LayoutError(f"SCOPE_DS_LAUNCH_SERVERS must be script or trainer, got {mode!r}")
    # Servers as job steps of their own by default: a signal for the training step reaches every
    # process in it, and would stop servers that the trainer started there (SLURM signals a step's
    # whole process tree, not only its tasks).
    by_script = not r.servers and mode == "script"
    if r.backend == "sglang" and not r.servers and alloc.gpus_per_node == 0:
        raise LayoutError("rollout.backend=sglang needs GPUs, and this allocation has none (try --gpus-per-node)")
    if r.backend == "sglang" and not r.servers and mode == "trainer":
        raise LayoutError(
            "SCOPE_DS_LAUNCH_SERVERS=trainer would start SGLang on the training ranks' GPUs; "
            "use script, or attach running servers with rollout.servers"
        )
    out = Layout([], 0, 0, startup_timeout_s=r.startup_timeout_s, run_dir=cfg.logging.run_dir)
    if alloc.gpus_per_node == 0:  # CPU: srun spreads the tasks sbatch was given; servers on the batch host
        places = [(alloc.nodes[0], 0)] * r.num_servers if by_script else []
        out.train_nodes, out.ntasks = list(alloc.nodes), alloc.ntasks
    else:
        layout = env.get("SCOPE_DS_SERVER_LAYOUT", "tail")
        places, out.tasks_per_node = [], alloc.gpus_per_node
        if by_script:
            places, out.tasks_per_node = place_servers(alloc, r.num_servers, r.gpus_per_server, layout)
        server_nodes = {node for node, _ in places} if layout == "nodes" else set()
        out.train_nodes = [n for n in alloc.nodes if n not in server_nodes]
        out.ntasks = out.tasks_per_node * len(out.train_nodes)
    out.sequence_parallel = _sequence_groups(cfg.parallel.sequence_parallel_size, out)
    out.api_key = r.api_key  # attached servers: theirs, or none
    if places:
        # Servers on 0.0.0.0 are reachable from the whole cluster: they always get a key, the
        # recipe's, the job's (SCOPE_DS_API_KEY) or a fresh one, and the trainer gets the same.
        out.api_key = r.api_key or env.get("SCOPE_DS_API_KEY", "") or new_api_key()
        extra = shlex.split(env.get("SCOPE_DS_SGLANG_ARGS", "")) if r.backend == "sglang" else []
        model, seed = served_model(cfg), cfg.train.seed
        out.servers = _servers(r.backend, model, places, r.gpus_per_server, alloc, seed, extra, out.api_key)
    return out


def _sequence_groups(sp: int, out: Layout) -> str:
    """Where the sequence-parallel groups of ``sp`` consecutive ranks lie: within a node, where the
    all-to-alls of attention have the fastest links. srun numbers a node's tasks consecutively
    (block distribution), so a group stays within one node when ``sp`` divides the training ranks
    per node; refused otherwise, naming the numbers and the key."""
    if sp == 1:
        return ""
    if out.tasks_per_node == 0:  # CPU nodes: srun spreads the tasks
        if out.ntasks % sp:
            raise LayoutError(f"parallel.sequence_parallel_size={sp} does not divide the job's {out.ntasks} tasks")
        return f"sequence-parallel groups of {sp} consecutive ranks"
    if out.tasks_per_node % sp:
        raise LayoutError(
            f"parallel.sequence_parallel_size={sp} does not divide the {out.tasks_per_node} training ranks per node: "
            "a group would span two nodes; pick a size that divides them (or change rollout.num_servers)"
        )
    return f"sequence-parallel groups of {sp} ranks, each within a node ({out.tasks_per_node // sp} per node)"


def wait_healthy(urls: list[str], pids: list[int], timeout_s: float) -> None:
    """Poll each URL's /health until 200; fail at once if a server's launcher process has exited."""
    try:
        health.wait_healthy(urls, timeout_s, poll_s=1.0, alive=lambda: all(_alive(p) for p in pids))
    except health.HealthError as exc:
        if exc.exited:
            dead = [p for p in pids if not _alive(p)]
            raise LayoutError(f"server step(s) {dead} exited before {exc.url} was healthy (see its log)") from exc
        raise LayoutError(f"{exc.url} not healthy after {timeout_s:.0f} s (see its log)") from exc
    print(f"rollout servers healthy: {' '.join(urls)}", file=sys.stderr)


def _alive(pid: int) -> bool:
    """Running (not exited, and not a zombie that the batch shell has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["train"] and len(argv) >= 2:
            print(train_layout(argv[1], argv[2:], Allocation.from_env()).shell())
        elif argv[:2] == ["wait", "--pids"] and len(argv) >= 4:
            timeout = float(os.environ.get("SCOPE_DS_STARTUP_TIMEOUT", "300"))
            wait_healthy(argv[3:], [int(p) for p in argv[2].split()], timeout)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (ConfigError, LayoutError, FileNotFoundError) as e:
        print(f"slurm/layout.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
