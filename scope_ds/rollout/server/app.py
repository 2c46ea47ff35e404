"""The embedded server's HTTP layer: SGLang's native API on FastAPI.

Routes, request shapes and answers follow docs/rollout.md ("The HTTP API"). Blocking work (weight loads, the
rendezvous and broadcasts of a distributed update, parsing and answering large requests) runs in
threads so that the event loop keeps answering /health and /generate while it happens.

With an API key (``--api-key``, SGLang's scheme) every route but ``/health`` wants
``Authorization: Bearer KEY`` and answers 401 ``{"error": "Unauthorized"}`` without it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from scope_ds.rollout.protocol import ProtocolError
from scope_ds.rollout.server.engine import Engine
from scope_ds.rollout.server.requests import RequestLimits, answer_object, as_float, as_int, parse_generate
from scope_ds.rollout.server.weights import DistributedReceiver, load_from_disk

log = logging.getLogger(__name__)
T = TypeVar("T")

# SGLang 0.5.21 added /begin_weight_update and /end_weight_update and dropped /get_weight_version.
_SESSION_ENDPOINTS_SINCE = (0, 5, 21)


def parse_version(text: str) -> tuple[int, ...]:
    """ "0.5.20" -> (0, 5, 20); suffixes such as ".post1" or "rc1" are ignored."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


@dataclass
class ServerState:
    """What the routes share: the engine, the served model's description, the launch arguments."""

    engine: Engine
    model_path: str
    server_args: dict[str, Any]
    tokenizer: Any = None
    compat: str = "0.5.23"
    receiver: DistributedReceiver = field(default_factory=DistributedReceiver)
    limits: RequestLimits = field(default_factory=RequestLimits)
    api_key: str | None = None  # None: no authentication (SGLang without --api-key)
    group_timeout_s: float = 60.0  # default rendezvous bound of /init_weights_update_group


# Bodies and answers above these sizes are parsed / built in a worker thread, off the event loop.
_THREAD_BODY_BYTES = 256 << 10
_THREAD_ANSWERS = 256
# The routes open without the API key (the launcher and SLURM poll it before they hold a client).
_OPEN_PATHS = frozenset({"/health"})


class ApiKeyGate:
    """ASGI middleware: SGLang's --api-key check (Bearer token), compared in constant time."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS and scope["method"] != "OPTIONS":
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
            if not hmac.compare_digest(given, self.expected):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _result(success: bool, message: str) -> JSONResponse:
    return JSONResponse({"success": success, "message": message}, status_code=200 if success else 400)


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a daemon thread (a blocked rendezvous must not keep the process alive at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(exc: BaseException | None, value: Any) -> None:
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(value)

    def run() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:  # handed to the awaiting route, which reports it
            loop.call_soon_threadsafe(settle, exc, None)
        else:
            loop.call_soon_threadsafe(settle, None, value)

    threading.Thread(target=run, daemon=True).start()
    return await future


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"invalid JSON body: {name} is not a JSON number")


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_no_constant)  # strict JSON: no NaN / Infinity
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"invalid JSON body: {exc}") from exc


async def _read(request: Request, limit: int) -> bytes:
    """The body, refused (400) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ProtocolError(
            f"the request body is {declared} bytes, above this server's limit of {limit} (--max-body-bytes)"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request, limit: int) -> Any:
    raw = await _read(request, limit)
    if not raw:
        return {}
    return await asyncio.to_thread(_loads, raw) if len(raw) > _THREAD_BODY_BYTES else _loads(raw)


async def _object(request: Request, limit: int) -> dict[str, Any]:
    """The body of a control route: a JSON object (an empty body counts as ``{}``)."""
    body = await _json(request, limit)
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


async def _until_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)


def _add_generate(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    tok = state.tokenizer
    encode = (lambda text: tok.encode(text, add_special_tokens=False)) if tok is not None else None
    decode = tok.decode if tok is not None else None

    def parse(body: Any) -> tuple[list, bool]:
        return parse_generate(
            body, context_len=engine.context_len, vocab_size=engine.vocab_size, encode=encode, limits=state.limits
        )

    def answer(items: list, results: list) -> list[dict[str, Any]]:
        return [answer_object(item, res, decode) for item, res in zip(items, results, strict=True)]

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        raw = await _read(request, state.limits.max_body_bytes)
        if len(raw) > _THREAD_BODY_BYTES:  # a large body: decode and validate off the event loop
            items, single = await asyncio.to_thread(lambda: parse(_loads(raw)))
        else:
            items, single = parse(_loads(raw) if raw else {})
        seqs = engine.submit(items, asyncio.get_running_loop())
        results = asyncio.gather(*(s.future for s in seqs))
        watch = asyncio.ensure_future(_until_disconnect(request))
        done, _ = await asyncio.wait({results, watch}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        if results not in done:  # the client went away (e.g. its timeout): free the batch slots
            engine.abort_seqs(seqs, "client disconnected")
            return Response(status_code=499)
        if len(items) > _THREAD_ANSWERS:
            answers = await asyncio.to_thread(answer, items, results.result())
        else:
            answers = answer(items, results.result())
        return JSONResponse(answers[0] if single else answers)


def _add_info(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        return Response(status_code=200)

    def model_info() -> dict[str, Any]:
        return {
            "model_path": state.model_path,
            "tokenizer_path": state.model_path if state.tokenizer is not None else None,
            "is_generation": True,
            "weight_version": engine.weight_version,
            "context_length": engine.context_len,
            "vocab_size": engine.vocab_size,
        }

    app.get("/model_info")(model_info)
    app.get("/get_model_info")(model_info)

    def server_info() -> dict[str, Any]:
        return {
            **{k: v for k, v in state.server_args.items() if k != "api_key"},  # never hand out the key
            "version": f"{state.compat} (scope_ds embedded server)",
            "weight_version": engine.weight_version,
            "internal_states": [engine.stats()],
        }

    app.get("/server_info")(server_info)
    app.get("/get_server_info")(server_info)

    if parse_version(state.compat) < _SESSION_ENDPOINTS_SINCE:

        @app.get("/get_weight_version")
        async def get_weight_version() -> dict[str, Any]:
            return {"weight_version": engine.weight_version}


def _add_control(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    limit = state.limits.max_body_bytes

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        # The embedded server keeps no prefix cache; like SGLang, refuse while requests run.
        if engine.busy():
            return PlainTextResponse("Cache not flushed: requests are running or waiting.", status_code=400)
        return PlainTextResponse("Cache flushed.")

    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> Response:
        mode = (await _object(request, limit)).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise ProtocolError(f"mode must be abort, retract or in_place, got {mode!r}")
        engine.pause(mode)
        return JSONResponse({"message": "Generation paused successfully.", "mode": mode})

    @app.post("/continue_generation")
    async def continue_generation() -> Response:
        engine.resume()
        return JSONResponse({"message": "Generation continued successfully."})

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await _object(request, limit)
        rid = body.get("rid")
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError(f"rid must be a string, got {type(rid).__name__}")
        hits = engine.abort(rid, bool(body.get("abort_all", False)))
        return JSONResponse({"success": True, "message": f"aborted {hits} sequence(s)"})


def _group_args(b: dict[str, Any], default_timeout_s: float) -> tuple[str, int, int, int, str, float]:
    """Validated /init_weights_update_group fields; a ProtocolError names the bad one.

    This server holds one rank of the group, the trainer rank 0: so world_size >= 2 and
    1 <= rank_offset <= world_size - 1. A rank offset of 0 would make the server the rendezvous
    host and a rank outside the world would wait for ranks that never come."""
    for key in ("master_address", "master_port", "rank_offset", "world_size"):
        if key not in b:
            raise ProtocolError(f"{key} is missing")
    address, name = b["master_address"], b.get("group_name", "weight_update_group")
    if not isinstance(address, str) or not address:
        raise ProtocolError(f"master_address must be a host name or address, got {address!r}")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"group_name must be a non-empty string, got {name!r}")
    port, offset, world = (as_int(b[k], k) for k in ("master_port", "rank_offset", "world_size"))
    if not 1 <= port <= 65535:
        raise ProtocolError(f"master_port must be in [1, 65535], got {port}")
    if world < 2:
        raise ProtocolError(f"world_size must be at least 2 (the trainer and this server's 1 rank), got {world}")
    if not 1 <= offset <= world - 1:
        raise ProtocolError(f"rank_offset must be in [1, world_size - 1] = [1, {world - 1}], got {offset}")
    timeout = as_float(b.get("timeout_s", default_timeout_s), "timeout_s")  # scope_ds extension
    if not 0 < timeout <= 3600:
        raise ProtocolError(f"timeout_s must be in (0, 3600] seconds, got {timeout}")
    return address, port, offset, world, name, timeout


def _str_list(b: dict[str, Any], key: str) -> list[Any]:
    value = b.get(key)
    if not isinstance(value, list):
        raise ProtocolError(f"{key} must be a list, got {type(value).__name__}")
    return value


def _add_weights(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    receiver = state.receiver
    limit = state.limits.max_body_bytes

    def bump(body: dict[str, Any]) -> None:
        if body.get("weight_version") is not None:
            engine.weight_version = str(body["weight_version"])

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        body = await _object(request, limit)
        path = body.get("model_path", "")
        if not isinstance(path, str):
            return _result(False, f"model_path must be a string, got {type(path).__name__}")
        # scope_ds extension: a folder that lacks some of the model's weights is refused unless asked for
        partial = body.get("allow_partial", False)
        if not isinstance(partial, bool):
            return _result(False, f"allow_partial must be true or false, got {partial!r}")
        if body.get("abort_all_requests"):
            engine.abort(None, abort_all=True)
        try:
            count = await _in_thread(load_from_disk, engine.model, path, engine.model_lock, partial)
        except (OSError, ValueError, RuntimeError) as exc:
            return _result(False, f"Failed to update weights: {exc}")
        bump(body)
        return _result(True, f"Succeeded to update model weights ({count} tensors).")

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> Response:
        b = await _object(request, limit)
        try:
            address, port, offset, world, name, timeout = _group_args(b, state.group_timeout_s)
        except ProtocolError as exc:
            return _result(False, f"Failed to init group: {exc}")
        backend = b.get("backend", "nccl")
        try:
            used = await _in_thread(receiver.init_group, address, port, offset, world, name, backend, timeout)
        except Exception as exc:  # a failed or timed-out rendezvous: the trainer gets the reason
            return _result(False, f"Failed to init group: {exc!r}")
        return _result(True, f"Succeeded to initialize custom process group ({used}).")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> Response:
        b = await _object(request, limit)
        try:
            fields = (_str_list(b, "names"), _str_list(b, "dtypes"), _str_list(b, "shapes"))
            name = b.get("group_name", "weight_update_group")
            await _in_thread(receiver.receive, engine.model, *fields, name, engine.model_lock)
        except (ProtocolError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            return _result(False, f"Failed to update weights: {exc!r}")
        bump(b)
        return _result(True, "Succeeded to update parameter online from distributed.")

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> Response:
        name = (await _object(request, limit)).get("group_name", "weight_update_group")
        try:
            await _in_thread(receiver.destroy, name)
        except (TypeError, ValueError, RuntimeError) as exc:
            return _result(False, str(exc))
        return _result(True, "Succeeded to destroy custom process group.")

    if parse_version(state.compat) >= _SESSION_ENDPOINTS_SINCE:

        @app.post("/begin_weight_update")
        async def begin_weight_update() -> Response:
            engine.set_updating(True)
            return _result(True, "Weight update session started.")

        @app.post("/end_weight_update")
        async def end_weight_update() -> Response:
            engine.set_updating(False)
            return _result(True, "Weight update session ended.")


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app; the caller starts ``state.engine`` and serves the app with uvicorn."""
    app = FastAPI(title="scope_ds embedded rollout server")

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return _error(str(exc))

    if state.api_key:
        app.add_middleware(ApiKeyGate, api_key=state.api_key)
    _add_generate(app, state)
    _add_info(app, state)
    _add_control(app, state)
    _add_weights(app, state)
    return app
