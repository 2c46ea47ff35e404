"""Start rollout servers (SGLang on GPUs, the embedded server on CPU) or attach to running ones.

A launched server gets a free port, its own log file and its own process group; it is stopped by
pid (SIGTERM to its group, SIGKILL after a grace period) when the caller is done or at exit. Never
by name: other jobs on the machine may run servers too. On Linux it also gets SIGTERM when the
process that launched it dies (even by kill -9), and a launch into a log folder first stops the
servers that an earlier, killed launch left there (named by their pid files).

Launched servers require an API key (SGLang's ``--api-key``): the caller's, or one generated per
launch; ``RolloutServers.api_key`` hands it to the client.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scope_ds.openmp import passive_waits
from scope_ds.rollout import health

EMBEDDED = "embedded"
SGLANG = "sglang"


class ServerLaunchError(RuntimeError):
    """A server that exited or did not become healthy in time; the message carries its log tail."""


@dataclass
class LaunchSpec:
    """One server's launch arguments (the flags in docs/rollout.md, "The HTTP API")."""

    model_path: str
    port: int
    host: str = "127.0.0.1"
    random_seed: int | None = None  # server-wide sampler seed (SGLang has no per-request seed)
    weight_version: str = "0"  # numeric, so that rollouts' versions parse as integers
    tp_size: int = 1  # GPUs per SGLang server (its tensor-parallel group)
    base_gpu_id: int = 0  # first GPU of this server's group
    mem_fraction_static: float = 0.7  # SGLang's static memory share (weights + KV cache)
    extra_args: Sequence[str] = field(default_factory=tuple)  # appended verbatim
    api_key: str = ""  # --api-key (SGLang's Bearer scheme); "" = the server requires none


def sglang_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """``python -m sglang.launch_server ...`` for one server of one GPU group."""
    cmd = [python, "-m", "sglang.launch_server", "--model-path", spec.model_path]
    cmd += ["--host", spec.host, "--port", str(spec.port), "--tp-size", str(spec.tp_size)]
    cmd += ["--mem-fraction-static", str(spec.mem_fraction_static), "--base-gpu-id", str(spec.base_gpu_id)]
    if spec.random_seed is not None:
        cmd += ["--random-seed", str(spec.random_seed)]
    cmd += ["--weight-version", spec.weight_version, "--skip-server-warmup"]
    if spec.api_key:
        cmd += ["--api-key", spec.api_key]
    return cmd + list(spec.extra_args)


def embedded_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """``python -m scope_ds.rollout.server ...``: the same flags minus the GPU ones."""
    cmd = [python, "-m", "scope_ds.rollout.server", "--model-path", spec.model_path]
    cmd += ["--host", spec.host, "--port", str(spec.port), "--weight-version", spec.weight_version]
    if spec.random_seed is not None:
        cmd += ["--random-seed", str(spec.random_seed)]
    if spec.api_key:
        cmd += ["--api-key", spec.api_key]
    return cmd + list(spec.extra_args)


def new_api_key() -> str:
    """A fresh random key (256 bits, hex): what a launch uses unless the caller has one. Hex, not
    token_urlsafe: a key that starts with '-' reads as an option on the server's command line."""
    return secrets.token_hex(32)


def shown_command(cmd: Sequence[str]) -> str:
    """The command line for logs, with the value of --api-key masked."""
    out = list(cmd)
    for i, arg in enumerate(out[:-1]):
        if arg == "--api-key":
            out[i + 1] = "***"
    return shlex.join(out)


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


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _server_preexec(parent_pid: int) -> Callable[[], None]:
    """What the child runs between fork and exec (after setsid, as start_new_session does first)."""
    # Looked up here, in the parent: between fork and exec the child should only make system calls.
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec() -> None:
        # SLURM sends its pre-timeout SIGUSR1 to every process of the job step, servers included; it
        # asks the trainer to save, and must not kill the server the trainer still needs to talk to.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        # SIGTERM when the launching thread's process dies, kill -9 included (atexit does not run
        # then). The setting survives exec and the new session; it is cleared only for set-uid
        # programs. If the launcher died before this line, the check below catches it.
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent_pid:
                os._exit(1)

    return preexec


# What a server's /proc/PID/cmdline contains: a stale pid file is acted on only for these.
_SERVER_MODULES = ("scope_ds.rollout.server", "sglang.launch_server")


def _is_our_server(pid: int, port: int) -> bool:
    """``pid`` runs a rollout server module on ``port`` (a recycled pid of anything else does not)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    has_module = any(args[i] == "-m" and args[i + 1] in _SERVER_MODULES for i in range(len(args) - 1))
    has_port = any(args[i] == "--port" and args[i + 1] == str(port) for i in range(len(args) - 1))
    return has_module and has_port


def stop_stale_servers(log_dir: str | Path, grace_s: float = 10.0) -> list[int]:
    """Stop servers that an earlier launch into ``log_dir`` left running; returns their pids.

    A pid file ``rollout_server_I_PORT.pid`` whose process still runs one of our server modules on
    PORT (checked in /proc/PID/cmdline) gets SIGTERM to its group, then SIGKILL after ``grace_s``;
    pid files of gone (or unrelated, recycled) processes are removed and nothing is signalled.
    """
    stopped = []
    for pid_path in sorted(Path(log_dir).glob("rollout_server_*_*.pid")):
        try:
            pid, port = int(pid_path.read_text().split()[0]), int(pid_path.stem.rsplit("_", 1)[1])
        except (OSError, ValueError, IndexError):
            continue
        if _is_our_server(pid, port):
            _stop_pid(pid, grace_s)
            stopped.append(pid)
        pid_path.unlink(missing_ok=True)
    return stopped


def _stop_pid(pid: int, grace_s: float) -> None:
    """SIGTERM, then SIGKILL, to a process that is not our child (we cannot wait() for it)."""
    try:
        group = os.getpgid(pid) == pid  # a session leader we started: signal its children too
    except ProcessLookupError:
        return
    kill = os.killpg if group else os.kill
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie's parent has yet to reap it; it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class ServerProcess:
    """A server started by us: its URL, pid and log file."""

    def __init__(
        self, cmd: list[str], url: str, log_path: Path, env: dict[str, str] | None = None, api_key: str = ""
    ) -> None:
        self.cmd = cmd
        self.url = url
        self.api_key = api_key  # what its requests must carry as "Authorization: Bearer KEY" ("" = none)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shown_command(cmd)}\n".encode())
            log.flush()
            # Own session: SGLang starts child processes, and a group signal reaches them all.
            self.popen = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_server_preexec(os.getpid()),
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
    """The environment plus this checkout on PYTHONPATH: the server runs the same scope_ds as we do
    (and its OpenMP threads wait passively, unless the environment says otherwise)."""
    out = passive_waits(dict(os.environ if env is None else env))
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
    wait_s: float | None = 600.0,
    extra_args: Sequence[str] = (),
    per_server_args: Sequence[Sequence[str]] | None = None,
    env: dict[str, str] | None = None,
    api_key: str | None = None,
) -> list[ServerProcess]:
    """Start ``count`` servers and wait until all are healthy (all are stopped if one fails).

    Server i gets seed ``random_seed + i`` (so that servers do not repeat each other's samples) and,
    for SGLang, GPUs ``[i * gpus_per_server, (i + 1) * gpus_per_server)``. ``per_server_args[i]``
    is appended to server i's command after ``extra_args``. ``api_key``: the key all of them
    require; None generates one (``ServerProcess.api_key`` holds it); "" starts them without one,
    which only a loopback ``host`` allows. Servers left in ``log_dir`` by an earlier launch whose
    launcher was killed are stopped first. ``wait_s`` None: return at once, with the servers still
    starting (:func:`wait_all_healthy` before the first request).
    """
    if kind not in (EMBEDDED, SGLANG):
        raise ValueError(f"server kind must be {EMBEDDED!r} or {SGLANG!r}, got {kind!r}")
    if per_server_args is not None and len(per_server_args) != count:
        raise ValueError(f"per_server_args has {len(per_server_args)} entries for {count} servers")
    key = new_api_key() if api_key is None else api_key
    if not key and host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"servers on {host} (beyond loopback) need an API key; pass api_key=None for a fresh one")
    stop_stale_servers(log_dir)
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
                api_key=key,
            )
            cmd = sglang_command(spec) if kind == SGLANG else embedded_command(spec)
            proc_env = env if kind == SGLANG else _with_our_package(env)
            log_path = Path(log_dir) / f"rollout_server_{i}_{port}.log"
            procs.append(ServerProcess(cmd, f"http://{host}:{port}", log_path, proc_env, api_key=key))
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    if wait_s is not None:
        wait_all_healthy(procs, wait_s)
    return procs


def wait_all_healthy(procs: Sequence[ServerProcess], wait_s: float) -> None:
    """Wait until every server of one launch is healthy, ``wait_s`` in all; if one fails or the time
    runs out, all are stopped and ServerLaunchError names the one (with its log's tail)."""
    deadline = time.monotonic() + wait_s
    try:
        for proc in procs:
            proc.wait_healthy(max(1.0, deadline - time.monotonic()))
    except BaseException:
        for proc in procs:
            proc.stop()
        raise


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

    def __init__(self, urls: Sequence[str], procs: Sequence[ServerProcess] = (), api_key: str = "") -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.procs = list(procs)
        self.api_key = api_key  # the key every one of them requires ("" = none); give it to the client

    @classmethod
    def attach(cls, urls: Sequence[str], timeout_s: float = 60.0, api_key: str = "") -> RolloutServers:
        """Servers started elsewhere; ``api_key`` is theirs ("" = they require none)."""
        wait_urls_healthy(urls, timeout_s)
        return cls(urls, api_key=api_key)

    @classmethod
    def start(cls, kind: str, model_path: str, **kwargs: object) -> RolloutServers:
        """:func:`launch`; with ``api_key`` None (the default) the servers get a fresh key. With
        ``wait_s=None`` they are still starting: :meth:`wait_healthy` before the first request."""
        procs = launch(kind, model_path, **kwargs)  # type: ignore[arg-type]
        return cls([p.url for p in procs], procs, api_key=procs[0].api_key if procs else "")

    def wait_healthy(self, timeout_s: float) -> None:
        """Until every server answers /health: those launched here are all stopped if one fails."""
        if self.procs:
            wait_all_healthy(self.procs, timeout_s)
        else:
            wait_urls_healthy(self.urls, timeout_s)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def __enter__(self) -> RolloutServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
