"""The trainer's HTTP client for rollout servers (SGLang or embedded; the same native API).

Async (httpx): many requests in flight over one or several servers, each request sent to the
least-loaded server (ties round-robin). Connection errors, timeouts and 5xx answers are retried
with exponential backoff, on another server when there is one; when the retries run out the
client raises :class:`RolloutServerError` naming the server and the status. A 4xx is not retried.
An aborted sample is continued from its tokens so far (``generate``); one aborted
``max_abort_resubmits`` times in a row without a new token raises :class:`RolloutAbortedError`:
a partial rollout is never returned. ``held`` brings every sample to a standstill for a moment,
its tokens so far in its record (what a checkpoint saves of the samples in flight).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from scope_ds.records import Rollout
from scope_ds.rollout import health, protocol

log = logging.getLogger(__name__)
T = TypeVar("T")

# Idle keep-alive connections are dropped after this many seconds, well before the servers close
# them (uvicorn's timeout_keep_alive is 5 s in SGLang's launch_server and in our embedded server,
# KEEP_ALIVE_S in server/main.py). httpx's default expiry is also 5 s: a request sent on a
# connection idle for ~5 s could cross the server's close and fail with ReadError (and a retry).
KEEPALIVE_EXPIRY_S = 2.0


class RolloutServerError(RuntimeError):
    """A rollout server that failed: unreachable, 5xx after every retry, or a 4xx refusal."""

    def __init__(self, url: str, status: int | None, message: str, attempts: int = 1) -> None:
        self.url = url
        self.status = status
        self.message = message
        self.attempts = attempts
        super().__init__(self._describe())

    def _describe(self) -> str:
        status_text = f"HTTP {self.status}" if self.status is not None else "no answer"
        return f"rollout server {self.url} failed ({status_text}) after {self.attempts} attempt(s): {self.message}"


class RolloutAbortedError(RolloutServerError):
    """Samples of one prompt still aborted after every resubmission (``max_abort_resubmits``).

    Raised instead of returning partial rollouts (``finish_reason == "abort"``), which a trainer
    would otherwise train on as if they were whole. A RolloutServerError, so callers that stop on
    a failing server stop on this too.
    """

    def __init__(
        self, url: str, prompt_id: str, group_id: str, samples: list[int], request_ids: list[str], resubmits: int
    ) -> None:
        self.prompt_id = prompt_id
        self.group_id = group_id
        self.samples = samples  # sample indices still aborted
        self.request_ids = request_ids  # the servers' ids of their last (aborted) answers
        self.resubmits = resubmits
        message = (
            f"prompt {prompt_id!r} (group {group_id!r}): sample(s) {samples} still aborted after {resubmits} "
            f"resubmission(s) (max_abort_resubmits); last request id(s) {request_ids}"
        )
        super().__init__(url, 200, message, resubmits + 1)

    def _describe(self) -> str:
        return f"rollout server {self.url}: {self.message}"


class RolloutClient:
    """Async client over several server URLs. Create and use it inside one event loop."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_connections: int = 1024,
        max_abort_resubmits: int = 8,
        api_key: str = "",
        partial_rollouts: bool = True,
    ) -> None:
        """``api_key``: sent as ``Authorization: Bearer KEY`` on every request (SGLang's --api-key);
        "" sends none. ``partial_rollouts``: continue an aborted sample from its tokens so far
        (True) or generate it again from its first token (False); see :meth:`generate`."""
        if not urls:
            raise ValueError("RolloutClient needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_abort_resubmits = max_abort_resubmits
        self.partial_rollouts = partial_rollouts
        self._inflight = dict.fromkeys(self.urls, 0)
        self._turn = itertools.count()
        self._open = asyncio.Event()  # cleared by `held`: new /generate requests wait for it
        self._open.set()
        self._generating = 0  # this client's /generate requests out, answers not yet stitched
        self._idle = asyncio.Event()  # set while _generating == 0
        self._idle.set()
        self._coalesced = _Coalesced(self)
        self._tasks: set[asyncio.Task[None]] = set()  # the coalesced requests out
        # trust_env=False: a proxy from the environment must never sit between trainer and servers.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            trust_env=False,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _spawn(self, entries: list[_Coalesced.Entry]) -> None:
        """Send ``entries`` as one request, in a task of its own (kept until done); the request is
        cancelled if every entry's caller is (its connection closes: the server aborts the work)."""
        task = asyncio.ensure_future(self._post_batch(entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def abandoned(_: asyncio.Future) -> None:
            if all(e.future.cancelled() for e in entries):
                task.cancel()

        for e in entries:
            e.future.add_done_callback(abandoned)

    # ---- transport ---------------------------------------------------------------------------------
    def _pick(self, avoid: set[str]) -> str:
        """Least in-flight requests first; ties go round-robin; servers in ``avoid`` only if all are."""
        candidates = [u for u in self.urls if u not in avoid] or self.urls
        start = next(self._turn) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda u: self._inflight[u])

    async def request(
        self, method: str, path: str, payload: Any = None, *, url: str | None = None, ok_404: bool = False
    ) -> httpx.Response | None:
        """One HTTP call with retries. ``url=None`` lets the client choose (and change) the server.

        Returns the response of a 2xx (or None for a 404 when ``ok_404``); raises RolloutServerError.
        """
        failed: set[str] = set()
        status: int | None = None
        message = ""
        target = url or self._pick(failed)
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
                target = url or self._pick(failed)
            self._inflight[target] = self._inflight.get(target, 0) + 1
            try:
                response = await self._http.request(method, f"{target}{path}", json=payload)
            except httpx.TransportError as exc:
                status, message = None, f"{type(exc).__name__}: {exc}"
                failed.add(target)
                log.warning("rollout server %s%s: %s (attempt %d)", target, path, message, attempt + 1)
                continue
            finally:
                self._inflight[target] -= 1
            if response.status_code < 400:
                return response
            if response.status_code == 404 and ok_404:
                return None
            status, message = response.status_code, health.response_message(response)
            if response.status_code < 500:  # the request itself is wrong: retrying cannot help
                raise RolloutServerError(target, status, message, attempt + 1)
            failed.add(target)
            log.warning("rollout server %s%s: HTTP %d %s (attempt %d)", target, path, status, message, attempt + 1)
        raise RolloutServerError(target, status, message, self.max_retries + 1)

    async def get_json(self, url: str, path: str) -> Any:
        response = await self.request("GET", path, url=url)
        return _json(response)

    async def post_json(self, url: str, path: str, payload: Any, *, ok_404: bool = False) -> Any:
        response = await self.request("POST", path, payload, url=url, ok_404=ok_404)
        return None if response is None else _json(response)

    async def post_all(self, path: str, payload: Any, *, ok_404: bool = False) -> list[Any]:
        """POST to every server concurrently; answers in ``urls`` order (None for a tolerated 404)."""
        return list(await asyncio.gather(*(self.post_json(u, path, payload, ok_404=ok_404) for u in self.urls)))

    # ---- generation ---------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: Sequence[int],
        sampling_params: dict[str, Any],
        *,
        n: int = 1,
        prompt_id: str = "",
        group_id: str = "",
        return_logprob: bool = True,
        seed: int | None = None,
        samples: list[Rollout | None] | None = None,
    ) -> list[Rollout]:
        """``n`` whole rollouts of one prompt, in sample order, each with its server and versions.

        A sample that comes back aborted (a pause in "abort" mode around a weight update, an
        abort_request) is continued, never regenerated (``partial_rollouts``): its tokens and
        behaviour log-probs are kept and the next request sends prompt + tokens so far as the
        prompt, ``max_new_tokens`` less what is already there. Each request's tokens become one
        segment of the rollout, labelled with the weight version that produced them
        (``Rollout.segments``). With ``partial_rollouts=False`` an aborted sample is generated
        again from its first token (its tokens so far are thrown away, counted in
        ``Rollout.generated_tokens``). A sample aborted ``max_abort_resubmits`` times in a row
        without a new token raises :class:`RolloutAbortedError` (never a partial rollout).

        ``samples``: the caller's list of the n samples as they stand (None: not started; a
        rollout aborted part-way, from a checkpoint say, is continued; a finished one is kept),
        updated in place as each answer comes in, so that :meth:`held` can read every sample's
        tokens so far.
        """
        prompt = [int(t) for t in prompt_ids]
        kept: list[Rollout | None] = samples if samples is not None else [None] * n
        if len(kept) != n:
            raise ValueError(f"prompt {prompt_id!r}: {len(kept)} samples given for n = {n}")
        stalls = [0] * n  # aborts in a row that brought no new token
        server = ""

        async def answered(slots: list[int], request: Callable[[], Awaitable[list[tuple[Rollout, str]]]]) -> None:
            nonlocal server
            async with self._generation():
                for slot, (rollout, url) in zip(slots, await request(), strict=True):
                    server = url
                    kept[slot] = _stitched(kept[slot], rollout, self.partial_rollouts)
                    progressed = rollout.response_length > 0 and self.partial_rollouts
                    stalls[slot] = 0 if progressed else stalls[slot] + 1

        while True:
            missing = [slot for slot in range(n) if kept[slot] is None or kept[slot].finish_reason == "abort"]
            stuck = [slot for slot in missing if stalls[slot] > self.max_abort_resubmits]
            if stuck:
                ids = [kept[slot].request_id for slot in stuck]  # type: ignore[union-attr]
                raise RolloutAbortedError(server, prompt_id, group_id, stuck, ids, self.max_abort_resubmits)
            if not missing:
                break
            fresh = [s for s in missing if not (self.partial_rollouts and kept[s] and kept[s].response_ids)]
            calls = []
            if fresh:
                calls.append(
                    answered(
                        fresh, lambda f=fresh: self._sample_request(prompt, sampling_params, f, seed, return_logprob)
                    )
                )
            for slot in (s for s in missing if s not in fresh):
                so_far = kept[slot]
                calls.append(
                    answered(
                        [slot],
                        lambda r=so_far, s=slot: self._continue_request(r, sampling_params, s, seed, return_logprob),
                    )
                )
            await asyncio.gather(*calls)
        for index, rollout in enumerate(kept):
            assert rollout is not None
            rollout.sample_index, rollout.prompt_id, rollout.group_id = index, prompt_id, group_id
        return kept  # type: ignore[return-value]

    @contextlib.asynccontextmanager
    async def _generation(self) -> AsyncIterator[None]:
        """One /generate request and the stitching of its answer, counted, sent only while the
        client is not :meth:`held`."""
        while not self._open.is_set():
            await self._open.wait()
        self._generating += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._generating -= 1
            if not self._generating:
                self._idle.set()

    async def held(self, fn: Callable[[], T], timeout_s: float = 60.0, poll_s: float = 0.5) -> T:
        """``fn()`` at a moment when every sample of this client stands still, its tokens so far
        stitched into its record (a checkpoint's snapshot of the samples in flight).

        New /generate requests wait; the ones out are ended with ``/abort_request`` (abort_all) on
        every server, again every ``poll_s`` (a request still on its way to a server when the
        abort landed is ended by the next one), until each has answered with what it generated.
        The samples then continue as after any abort. Raises TimeoutError if requests are still
        out after ``timeout_s``, a RolloutServerError if a server is down; the requests go on
        either way. Every request on the servers is ended, also other clients' ones.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._open.clear()
        try:
            while self._generating:
                if loop.time() > deadline:
                    raise TimeoutError(f"{self._generating} /generate request(s) still out after {timeout_s:g} s")
                await self.post_all("/abort_request", {"abort_all": True})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), poll_s)
            return fn()
        finally:
            self._open.set()

    async def _sample_request(
        self, prompt: list[int], sampling_params: dict[str, Any], slots: list[int], seed: int | None, logprob: bool
    ) -> list[tuple[Rollout, str]]:
        """Samples ``slots`` of a prompt from their first token: one request (n = len(slots), or
        one seeded entry per sample: sample j draws from sampling_seed = seed + j)."""
        if seed is None:
            prompts, params, per = [prompt], {**sampling_params, "n": len(slots)}, len(slots)
        else:
            prompts, per = [prompt] * len(slots), 1
            params = [{**sampling_params, "n": 1, "sampling_seed": seed + slot} for slot in slots]
        return await self._post_generate(prompts, params, per, logprob)

    async def _continue_request(
        self, so_far: Rollout, sampling_params: dict[str, Any], slot: int, seed: int | None, logprob: bool
    ) -> list[tuple[Rollout, str]]:
        """The rest of a sample that has tokens: prompt + its tokens as the prompt, the token budget
        less what it has, and the sample's own seed: seeded servers key each draw by (seed, the
        token's position in the sequence), SGLang and the embedded server alike, so the rest is what
        the uninterrupted request would have sampled with the same weights (a resumed run goes on
        as the first run would have)."""
        done = so_far.response_length
        params = {**sampling_params, "n": 1, "max_new_tokens": int(sampling_params.get("max_new_tokens", 128)) - done}
        if seed is not None:
            params["sampling_seed"] = seed + slot
        return await self._post_generate([so_far.prompt_ids + so_far.response_ids], params, 1, logprob)

    async def _post_generate(
        self, prompts: list[list[int]], params: Any, per: int, logprob: bool
    ) -> list[tuple[Rollout, str]]:
        """The answers to ``prompts`` (``per`` samples each), in order. Requests made in the same
        turn of the event loop (every prompt of a ``generate_many``, the continuations after one
        abort) go out together: one /generate per server (see :class:`_Coalesced`)."""
        pending = _Coalesced.Entry(prompts, params, per, logprob, asyncio.get_running_loop().create_future())
        self._coalesced.add(pending)
        return await pending.future

    async def _post_batch(self, entries: list[_Coalesced.Entry]) -> None:
        """One /generate for ``entries`` (alike in ``per`` and logprob; one params object when
        per > 1), each entry's future resolved with its answers or with the request's error."""
        prompts = [p for e in entries for p in e.prompts]
        per, logprob = entries[0].per, entries[0].logprob
        params: Any = entries[0].params
        if per == 1:  # one object per prompt (SGLang: n = 1 each)
            params = [
                q for e in entries for q in (e.params if isinstance(e.params, list) else [e.params] * len(e.prompts))
            ]
            if all(q == params[0] for q in params):
                params = params[0]
        try:
            body = protocol.build_generate_request(prompts, params, return_logprob=logprob)
            response = await self.request("POST", "/generate", body)
            assert response is not None
            server = str(response.request.url).removesuffix("/generate")
            groups = protocol.parse_generate_response(
                _json(response), prompts, per, server=server, return_logprob=logprob
            )
        except Exception as exc:  # every entry of the request fails with it
            for e in entries:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        start = 0
        for e in entries:
            part = groups[start : start + len(e.prompts)]
            start += len(e.prompts)
            if not e.future.done():
                e.future.set_result([(r, server) for g in part for r in g])

    async def generate_many(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: dict[str, Any],
        *,
        n: int = 1,
        prompt_ids: Sequence[str] | None = None,
        group_ids: Sequence[str] | None = None,
        return_logprob: bool = True,
        seeds: Sequence[int] | None = None,
        samples: Sequence[list[Rollout | None]] | None = None,
    ) -> list[list[Rollout]]:
        """Every prompt's samples, groups in prompt order. The prompts ask together: one /generate
        per server with about as many prompts each (``_Coalesced``), then a request per continuation.

        ``seeds[i]``: prompt i's samples use sampling_seed seeds[i] + j (reproducible whatever the
        batching; SGLang needs --enable-deterministic-inference for it). ``samples[i]``: prompt i's
        samples as they stand, updated in place (see :meth:`generate`)."""
        pids = prompt_ids if prompt_ids is not None else [str(i) for i in range(len(prompts))]
        gids = group_ids if group_ids is not None else pids
        seed_list = list(seeds) if seeds is not None else [None] * len(prompts)
        so_far = list(samples) if samples is not None else [None] * len(prompts)
        calls = [
            self.generate(
                p, sampling_params, n=n, prompt_id=pid, group_id=gid, return_logprob=return_logprob, seed=sd, samples=ss
            )
            for p, pid, gid, sd, ss in zip(prompts, pids, gids, seed_list, so_far, strict=True)
        ]
        return list(await asyncio.gather(*calls))

    # ---- control ------------------------------------------------------------------------------------
    async def pause(self, mode: str = "abort") -> None:
        await self.post_all("/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        await self.post_all("/continue_generation", {})

    async def weight_versions(self) -> dict[str, int]:
        infos = await asyncio.gather(*(self.get_json(u, "/model_info") for u in self.urls))
        return {
            u: protocol.parse_weight_version(i.get("weight_version")) for u, i in zip(self.urls, infos, strict=True)
        }

    async def server_infos(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.get_json(u, "/server_info") for u in self.urls)))

    async def wait_healthy(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> None:
        """Wait until every server answers /health with 200, or raise RolloutServerError."""
        # The blocking poller in a worker thread: one implementation for every caller.
        try:
            await asyncio.to_thread(health.wait_healthy, self.urls, timeout_s, poll_s)
        except health.HealthError as exc:
            raise RolloutServerError(
                exc.url, exc.status, f"not healthy after {timeout_s:.0f} s ({exc.detail})"
            ) from exc


class _Coalesced:
    """The /generate requests of one turn of the event loop, sent together.

    Every prompt of a step asks at once (``generate_many``: one coroutine per prompt), and one
    HTTP request per prompt costs the trainer and the server more than the prompt's work on a
    small model (docs/bench_peer.md). Requests added before the loop's next turn are merged:
    those with one sample per prompt into one batch of per-prompt sampling params, those with n
    samples by their (identical) params, each kind split into one request per server (whole
    entries, about as many prompts each), every request with its own retries and failover.
    """

    @dataclass
    class Entry:
        prompts: list[list[int]]
        params: Any  # a dict, or one dict per prompt (n = 1)
        per: int  # samples per prompt
        logprob: bool
        future: asyncio.Future[list[tuple[Rollout, str]]]

    def __init__(self, client: RolloutClient) -> None:
        self.client = client
        self.entries: list[_Coalesced.Entry] = []

    def add(self, entry: Entry) -> None:
        if not self.entries:
            entry.future.get_loop().call_soon(self._flush)
        self.entries.append(entry)

    def _flush(self) -> None:
        entries, self.entries = self.entries, []
        kinds: dict[str, list[_Coalesced.Entry]] = {}
        for e in entries:
            key = json.dumps([e.per, e.logprob, None if e.per == 1 else e.params], sort_keys=True)
            kinds.setdefault(key, []).append(e)
        for group in kinds.values():
            for part in _split(group, len(self.client.urls)):
                self.client._spawn(part)


def _split(entries: list[_Coalesced.Entry], parts: int) -> list[list[_Coalesced.Entry]]:
    """``entries`` in order, cut into at most ``parts`` runs of about equal prompt counts."""
    total = sum(len(e.prompts) for e in entries)
    parts = max(1, min(parts, len(entries)))
    out: list[list[_Coalesced.Entry]] = [[]]
    seen = 0
    for e in entries:
        if out[-1] and seen >= total * len(out) / parts:
            out.append([])
        out[-1].append(e)
        seen += len(e.prompts)
    return out


def _stitched(before: Rollout | None, answer: Rollout, keep: bool) -> Rollout:
    """A sample's record after one more answer: the answer itself for a first request (or with
    ``keep`` False: what came before is thrown away), else the answer's tokens appended to what
    came before as a new segment. Counts every token the servers generated for the sample."""
    spent = before.generated_tokens if before is not None else 0
    if before is None or not keep or not before.response_ids:
        answer.segments = [[0, answer.weight_version]]
        answer.generated_tokens = spent + answer.response_length
        return answer
    if answer.response_ids:
        before.segments.append([before.response_length, answer.weight_version])
    before.response_ids += answer.response_ids
    before.behaviour_logprobs += answer.behaviour_logprobs
    before.finish_reason, before.request_id, before.server = answer.finish_reason, answer.request_id, answer.server
    before.text += answer.text
    before.generated_tokens = spent + answer.response_length
    return before


def _json(response: httpx.Response | None) -> Any:
    if response is None:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


class SyncRolloutClient:
    """A blocking facade: the async client runs on a private event loop in a daemon thread.

    ``submit`` returns a concurrent future, so that a caller can keep an HTTP call in flight while
    it does blocking work itself (the distributed weight sync broadcasts while the servers'
    /update_weights_from_distributed calls wait).
    """

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-client", daemon=True)
        self._thread.start()

        async def make() -> RolloutClient:
            return RolloutClient(urls, **kwargs)

        self.client: RolloutClient = self.run(make())

    @property
    def urls(self) -> list[str]:
        return self.client.urls

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("SyncRolloutClient.run called from its own loop thread (would deadlock)")
        return self.submit(coro).result()

    def generate(self, prompt_ids: Sequence[int], sampling_params: dict[str, Any], **kwargs: Any) -> list[Rollout]:
        return self.run(self.client.generate(prompt_ids, sampling_params, **kwargs))

    def generate_many(
        self, prompts: Sequence[Sequence[int]], sampling_params: dict[str, Any], **kwargs: Any
    ) -> list[list[Rollout]]:
        return self.run(self.client.generate_many(prompts, sampling_params, **kwargs))

    def pause(self, mode: str = "abort") -> None:
        self.run(self.client.pause(mode))

    def held(self, fn: Callable[[], T], timeout_s: float = 60.0) -> T:
        """``fn()`` (on the client's loop thread) while every sample stands still: see RolloutClient.held."""
        return self.run(self.client.held(fn, timeout_s))

    def resume(self) -> None:
        self.run(self.client.resume())

    def weight_versions(self) -> dict[str, int]:
        return self.run(self.client.weight_versions())

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        self.run(self.client.wait_healthy(timeout_s))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        self._loop.close()

    def __enter__(self) -> SyncRolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
