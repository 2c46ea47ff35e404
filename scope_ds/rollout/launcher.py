"""Start rollout servers (SGLang on GPUs, the embedded server on CPU) or attach to running ones.

A launched server gets a free port, its own log file and its own process group; it is stopped by
pid (SIGTERM to its group, SIGKILL after a grace period) when the caller is done or at exit. Never
by name: other jobs on the machine may run servers too.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scope_ds.rollout import health

EMBEDDED = "embedded"
SGLANG = "sglang"


class ServerLaunchError(RuntimeError):
    """A server that exited or did not become healthy in time; the message carries its log tail."""


@dataclass
class LaunchSpec:
    """One server's launch arguments (flags of shared/SGLANG_API.md)."""

    model_path: str
    port: int
    host: str = "127.0.0.1"
    random_seed: int | None = None  # server-wide sampler seed (SGLang has no per-request seed)
    weight_version: str = "0"  # numeric, so that rollouts' versions parse as integers
    tp_size: int = 1  # GPUs per SGLang server (its tensor-parallel group)
    base_gpu_id: int = 0  # first GPU of this server's group
    mem_fraction_static: float = 0.7  # SGLang's static memory share (weights + KV cache)
    extra_args: Sequence[str] = field(default_factory=tuple)  # appended verbatim


def sglang_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """``python -m sglang.launch_server ...`` for one server of one GPU group."""
    cmd = [python, "-m", "sglang.launch_server", "--model-path", spec.model_path]
    cmd += ["--host", spec.host, "--port", str(spec.port), "--tp-size", str(spec.tp_size)]
    cmd += ["--mem-fraction-static", str(spec.mem_fraction_static), "--base-gpu-id", str(spec.base_gpu_id)]
    if spec.random_seed is not None:
        cmd += ["--random-seed", str(spec.random_seed)]
    cmd += ["--weight-version", spec.weight_version, "--skip-server-warmup"]
    return cmd + list(spec.extra_args)


def embedded_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """``python -m scope_ds.rollout.server ...``: the same flags minus the GPU ones."""
    cmd = [python, "-m", "scope_ds.rollout.server", "--model-path", spec.model_path]
    cmd += ["--host", spec.host, "--port", str(spec.port), "--weight-version", spec.weight_version]
    if spec.random_seed is not None:
        cmd += ["--random-seed", str(spec.random_seed)]
    return cmd + list(spec.extra_args)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free right now (held open together so that they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ignore_save_signal() -> None:
    # SLURM sends its pre-timeout SIGUSR1 to every process of the job step, servers included; it
    # asks the trainer to save, and must not kill the server the trainer still needs to talk to.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class ServerProcess:
    """A server started by us: its URL, pid and log file."""

    def __init__(self, cmd: list[str], url: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.url = url
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session: SGLang starts child processes, and a group signal reaches them all.
            self.popen = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_ignore_save_signal,
            )
        self.pid = self.popen.pid
        # Beside the log: if the trainer is killed (kill -9 skips atexit), whoever cleans up finds it.
        self.pid_path = self.log_path.with_suffix(".pid")
        self.pid_path.write_text(f"{self.pid}\n")
        atexit.register(self.stop)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.25) -> None:
        """Poll GET /health until 200; raise ServerLaunchError if it exits or the deadline passes."""
        try:
            health.wait_healthy([self.url], timeout_s, poll_s, alive=self.alive)
        except health.HealthError as exc:
            if exc.exited:
                what = f"exited with code {self.popen.returncode} before it was healthy"
            else:
                what = f"not healthy after {timeout_s:.0f} s"
            raise ServerLaunchError(
                f"server {self.url} (pid {self.pid}) {what}; log {self.log_path}:\n{self.log_tail()}"
            ) from exc

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s``. Safe to call twice."""
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait()
        self.pid_path.unlink(missing_ok=True)
        atexit.unregister(self.stop)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # the group id is our child's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass


def _with_our_package(env: dict[str, str] | None) -> dict[str, str]:
    """The environment plus this checkout on PYTHONPATH: the server runs the same scope_ds as we do."""
    out = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[2])
    out["PYTHONPATH"] = os.pathsep.join(p for p in (root, out.get("PYTHONPATH", "")) if p)
    return out


def launch(
    kind: str,
    model_path: str,
    *,
    count: int = 1,
    gpus_per_server: int = 1,
    host: str = "127.0.0.1",
    log_dir: str | Path = "logs",
    random_seed: int | None = 0,
    weight_version: str = "0",
    wait_s: float = 600.0,
    extra_args: Sequence[str] = (),
    per_server_args: Sequence[Sequence[str]] | None = None,
    env: dict[str, str] | None = None,
) -> list[ServerProcess]:
    """Start ``count`` servers and wait until all are healthy (all are stopped if one fails).

    Server i gets seed ``random_seed + i`` (so that servers do not repeat each other's samples) and,
    for SGLang, GPUs ``[i * gpus_per_server, (i + 1) * gpus_per_server)``. ``per_server_args[i]``
    is appended to server i's command after ``extra_args``.
    """
    if kind not in (EMBEDDED, SGLANG):
        raise ValueError(f"server kind must be {EMBEDDED!r} or {SGLANG!r}, got {kind!r}")
    if per_server_args is not None and len(per_server_args) != count:
        raise ValueError(f"per_server_args has {len(per_server_args)} entries for {count} servers")
    procs: list[ServerProcess] = []
    try:
        for i, port in enumerate(free_ports(count, host)):
            spec = LaunchSpec(
                model_path=model_path,
                port=port,
                host=host,
                random_seed=None if random_seed is None else random_seed + i,
                weight_version=weight_version,
                tp_size=gpus_per_server,
                base_gpu_id=i * gpus_per_server,
                extra_args=tuple(extra_args) + tuple(per_server_args[i] if per_server_args else ()),
            )
            cmd = sglang_command(spec) if kind == SGLANG else embedded_command(spec)
            proc_env = env if kind == SGLANG else _with_our_package(env)
            log_path = Path(log_dir) / f"rollout_server_{i}_{port}.log"
            procs.append(ServerProcess(cmd, f"http://{host}:{port}", log_path, proc_env))
        deadline = time.monotonic() + wait_s
        for proc in procs:
            proc.wait_healthy(max(1.0, deadline - time.monotonic()))
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


def launch_embedded(model_path: str, count: int = 1, **kwargs: object) -> list[ServerProcess]:
    """:func:`launch` for the embedded CPU server."""
    return launch(EMBEDDED, model_path, count=count, **kwargs)  # type: ignore[arg-type]


def wait_urls_healthy(urls: Sequence[str], timeout_s: float = 60.0, poll_s: float = 0.5) -> None:
    """For attached servers (not ours): wait until each answers /health with 200."""
    try:
        health.wait_healthy(urls, timeout_s, poll_s)
    except health.HealthError as exc:
        raise ServerLaunchError(f"server {exc.url} not healthy after {timeout_s:.0f} s (last: {exc.last})") from exc


class RolloutServers:
    """The servers of a run: launched here (and stopped by :meth:`stop`) or attached by URL."""

    def __init__(self, urls: Sequence[str], procs: Sequence[ServerProcess] = ()) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.procs = list(procs)

    @classmethod
    def attach(cls, urls: Sequence[str], timeout_s: float = 60.0) -> RolloutServers:
        wait_urls_healthy(urls, timeout_s)
        return cls(urls)

    @classmethod
    def start(cls, kind: str, model_path: str, **kwargs: object) -> RolloutServers:
        procs = launch(kind, model_path, **kwargs)  # type: ignore[arg-type]
        return cls([p.url for p in procs], procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def __enter__(self) -> RolloutServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
