"""The embedded server's HTTP layer: SGLang's native API on FastAPI.

Routes, request shapes and answers follow shared/SGLANG_API.md. Blocking work (weight loads, the
rendezvous and broadcasts of a distributed update) runs in daemon threads so that the event loop
keeps answering /health and /generate while it happens.
"""

from __future__ import annotations

import asyncio
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
from scope_ds.rollout.server.requests import answer_object, parse_generate
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


async def _json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON body: {exc}") from exc


async def _until_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)


def _add_generate(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    tok = state.tokenizer
    encode = (lambda text: tok.encode(text, add_special_tokens=False)) if tok is not None else None
    decode = tok.decode if tok is not None else None

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await _json(request)
        items, single = parse_generate(
            body, context_len=engine.context_len, vocab_size=engine.vocab_size, encode=encode
        )
        seqs = engine.submit(items, asyncio.get_running_loop())
        results = asyncio.gather(*(s.future for s in seqs))
        watch = asyncio.ensure_future(_until_disconnect(request))
        done, _ = await asyncio.wait({results, watch}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        if results not in done:  # the client went away (e.g. its timeout): free the batch slots
            engine.abort_seqs(seqs, "client disconnected")
            return Response(status_code=499)
        answers = [answer_object(item, res, decode) for item, res in zip(items, results.result(), strict=True)]
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
            **state.server_args,
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

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        # The embedded server keeps no prefix cache; like SGLang, refuse while requests run.
        if engine.busy():
            return PlainTextResponse("Cache not flushed: requests are running or waiting.", status_code=400)
        return PlainTextResponse("Cache flushed.")

    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> Response:
        mode = (await _json(request)).get("mode", "abort")
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
        body = await _json(request)
        hits = engine.abort(body.get("rid"), bool(body.get("abort_all", False)))
        return JSONResponse({"success": True, "message": f"aborted {hits} sequence(s)"})


def _add_weights(app: FastAPI, state: ServerState) -> None:
    engine = state.engine
    receiver = state.receiver

    def bump(body: dict[str, Any]) -> None:
        if body.get("weight_version") is not None:
            engine.weight_version = str(body["weight_version"])

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        body = await _json(request)
        if body.get("abort_all_requests"):
            engine.abort(None, abort_all=True)
        try:
            count = await _in_thread(load_from_disk, engine.model, body.get("model_path", ""), engine.model_lock)
        except (OSError, ValueError, RuntimeError) as exc:
            return _result(False, f"Failed to update weights: {exc}")
        bump(body)
        return _result(True, f"Succeeded to update model weights ({count} tensors).")

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> Response:
        b = await _json(request)
        try:
            args = (b["master_address"], int(b["master_port"]), int(b["rank_offset"]), int(b["world_size"]))
            name, backend = b.get("group_name", "weight_update_group"), b.get("backend", "nccl")
            used = await _in_thread(receiver.init_group, *args, name, backend)
        except (KeyError, ValueError, RuntimeError) as exc:
            return _result(False, f"Failed to init group: {exc!r}")
        return _result(True, f"Succeeded to initialize custom process group ({used}).")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> Response:
        b = await _json(request)
        try:
            fields = (b["names"], b["dtypes"], b["shapes"], b.get("group_name", "weight_update_group"))
            await _in_thread(receiver.receive, engine.model, *fields, engine.model_lock)
        except (KeyError, ValueError, RuntimeError) as exc:
            return _result(False, f"Failed to update weights: {exc!r}")
        bump(b)
        return _result(True, "Succeeded to update parameter online from distributed.")

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> Response:
        name = (await _json(request)).get("group_name", "weight_update_group")
        try:
            await _in_thread(receiver.destroy, name)
        except (ValueError, RuntimeError) as exc:
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

    _add_generate(app, state)
    _add_info(app, state)
    _add_control(app, state)
    _add_weights(app, state)
    return app
