"""The one ``GET /health`` poller: launcher, client, attach and the SLURM scripts all wait with it.

Blocking (httpx), one URL after the other against one shared deadline: a server is given until
``timeout_s`` after the call whichever its place in the list, as if all were polled at once.
Callers turn :class:`HealthError` into their own error and message (the launcher adds the log tail).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import httpx

from scope_ds.rollout import protocol

REQUEST_TIMEOUT_S = 5.0  # one /health call; a server that hangs longer counts as not answering


class HealthError(RuntimeError):
    """A server that was not healthy: ``exited`` if ``alive`` said its process had died first, else
    it missed the deadline; ``status`` and ``detail`` are the last answer (``status`` None: none)."""

    def __init__(self, url: str, timeout_s: float, status: int | None, detail: str, exited: bool = False) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.status = status
        self.detail = detail
        self.exited = exited
        if exited:
            super().__init__(f"server {url} exited before it was healthy")
        else:
            super().__init__(f"server {url} not healthy after {timeout_s:.0f} s (last: {self.last})")

    @property
    def last(self) -> str:
        """The last answer in short: ``HTTP 503`` or the transport error."""
        return f"HTTP {self.status}" if self.status is not None else self.detail


def response_message(response: httpx.Response) -> str:
    """The server's message in an error answer (its JSON error, else the start of the text)."""
    try:
        return protocol.error_message(response.json())
    except ValueError:
        return response.text[:500]


def wait_healthy(
    urls: Sequence[str], timeout_s: float, poll_s: float = 0.5, alive: Callable[[], bool] | None = None
) -> None:
    """Return once every URL has answered ``GET /health`` with 200, else raise HealthError.

    ``alive`` (the server processes still run) is asked after every failed poll, so that a server
    that dies at start fails the wait at once instead of at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    # trust_env=False: a proxy from the environment must never sit between trainer and servers.
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False) as http:
        for url in urls:
            _wait_one(http, url, deadline, timeout_s, poll_s, alive)


def _wait_one(
    http: httpx.Client, url: str, deadline: float, timeout_s: float, poll_s: float, alive: Callable[[], bool] | None
) -> None:
    status: int | None = None
    detail = "no answer"
    while True:
        try:
            response = http.get(f"{url.rstrip('/')}/health")
            if response.status_code == 200:
                return
            status, detail = response.status_code, response_message(response)
        except httpx.TransportError as exc:
            status, detail = None, f"{type(exc).__name__}: {exc}"
        if alive is not None and not alive():
            raise HealthError(url, timeout_s, status, detail, exited=True)
        if time.monotonic() > deadline:
            raise HealthError(url, timeout_s, status, detail)
        time.sleep(poll_s)
