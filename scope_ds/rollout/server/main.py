"""Command line of the embedded server: load the model, start the engine, serve HTTP."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import uvicorn

from scope_ds.config import ConfigError
from scope_ds.openmp import server_threads
from scope_ds.options import load_options
from scope_ds.rollout.server.app import ServerState, build_app
from scope_ds.rollout.server.engine import Engine
from scope_ds.rollout.server.requests import RequestLimits
from scope_ds.rollout.weight_sync.group import EMBEDDED_BACKEND

log = logging.getLogger("scope_ds.rollout.server")

# Seconds an idle keep-alive connection stays open, as SGLang's launch_server sets uvicorn's
# timeout_keep_alive. The client drops idle connections sooner (client.KEEPALIVE_EXPIRY_S), so that
# it never sends a request on a connection the server is closing.
KEEP_ALIVE_S = 5
# Seconds SIGTERM waits for running requests before it cancels them: a generation or a weight-group
# rendezvous that never ends must not keep the server alive (uvicorn's default waits forever).
GRACEFUL_SHUTDOWN_S = 5


@dataclass
class ServerOptions:
    """The embedded server's options: ``--flag VALUE``, ``key=value`` or a ``--config`` YAML file
    (scope_ds.options.load_options); the flags are SGLang's names where SGLang has the option."""

    model_path: str  # Hugging Face model folder (config + safetensors)
    host: str = "127.0.0.1"
    port: int = 30000
    random_seed: int | None = None  # seed of the sampler (server-wide, as SGLang)
    weight_version: str = "default"  # initial weight_version string
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    context_length: int | None = None  # tokens; default: the model's max_position_embeddings
    max_running_requests: int = 64  # sequences decoded together at most
    batch_wait_ms: float = 5.0  # idle wait for concurrent requests after a single-prompt one
    num_threads: int | None = None  # torch intra-op threads (default: half the usable CPUs, 1-8)
    # decode through transformers' forward even where the lean step serves the model (lean.py)
    transformers_decode: bool = False
    # SGLang version whose endpoint set to expose; < 0.5.21 has no begin/end_weight_update (404)
    sglang_compat: str = "0.5.23"
    # as SGLang: every route but /health wants 'Authorization: Bearer KEY' (default: none)
    api_key: str | None = None
    max_n: int = RequestLimits.max_n  # largest sampling_params.n
    max_new_tokens: int = RequestLimits.max_new_tokens  # largest max_new_tokens
    max_prompts: int = RequestLimits.max_prompts  # prompts per /generate request
    max_sequences: int = RequestLimits.max_sequences  # prompts x n per request
    max_input_tokens: int = RequestLimits.max_input_tokens  # prompt tokens per request
    max_body_bytes: int = RequestLimits.max_body_bytes  # request body size, bytes
    # seconds /init_weights_update_group waits for the rendezvous (a request's timeout_s overrides)
    weight_group_timeout_s: float = 60.0
    log_level: str = "info"

    def check(self) -> None:
        for key in ("max_n", "max_new_tokens", "max_prompts", "max_sequences", "max_input_tokens", "max_body_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    return load_options(ServerOptions, argv, "python -m scope_ds.rollout.server", __doc__)


def _eos_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        value = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _load_tokenizer(path: str):  # noqa: ANN202 - transformers' tokenizer classes vary
    """The folder's tokenizer if it has one; without, the server answers like --skip-tokenizer-init."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((Path(path) / n).exists() for n in names):
        return None
    return AutoTokenizer.from_pretrained(path)


def build_state(args: ServerOptions) -> ServerState:
    from transformers import AutoModelForCausalLM

    # Half the CPUs by default: the server shares the machine with the HTTP thread and, on a CPU
    # run, with the trainer's ranks (which leave it these cores, openmp.py); oversubscribed
    # intra-op threads were 8x slower on 2 busy cores.
    torch.set_num_threads(args.num_threads or server_threads(len(os.sched_getaffinity(0))))
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=getattr(torch, args.dtype))
    model.eval()
    context_len = int(getattr(model.config, "max_position_embeddings", 4096))
    if args.context_length:
        context_len = min(context_len, args.context_length)
    tokenizer = _load_tokenizer(args.model_path)
    engine = Engine(
        model,
        context_len=context_len,
        eos_ids=_eos_ids(model),
        decode=tokenizer.decode if tokenizer is not None else None,
        max_running=args.max_running_requests,
        batch_wait_s=args.batch_wait_ms / 1000.0,
        seed=args.random_seed,
        weight_version=args.weight_version,
        lean_decode=not args.transformers_decode,
    )
    server_args = {k: v for k, v in dataclasses.asdict(args).items() if k != "api_key"}
    server_args.update(tp_size=1, pp_size=1, dp_size=1, context_length=context_len, pid=os.getpid())
    server_args["weight_update_backend"] = EMBEDDED_BACKEND  # scope_ds extension: the trainer must match it
    return ServerState(
        engine=engine,
        model_path=args.model_path,
        server_args=server_args,
        tokenizer=tokenizer,
        compat=args.sglang_compat,
        limits=RequestLimits(
            max_n=args.max_n,
            max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts,
            max_sequences=args.max_sequences,
            max_input_tokens=args.max_input_tokens,
            max_body_bytes=args.max_body_bytes,
        ),
        api_key=args.api_key or None,
        group_timeout_s=args.weight_group_timeout_s,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = build_state(args)
    state.engine.start()
    log.info(
        "serving %s on http://%s:%d (weight_version=%s, decode: %s)",
        args.model_path,
        args.host,
        args.port,
        args.weight_version,
        state.engine.decode_path,
    )
    try:
        uvicorn.run(
            build_app(state),
            host=args.host,
            port=args.port,
            log_level=args.log_level.lower(),
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    finally:
        state.engine.close()
