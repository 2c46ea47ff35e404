"""Command line of the embedded server: load the model, start the engine, serve HTTP."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import uvicorn

from scope_ds.openmp import server_threads
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scope_ds.rollout.server", description=__doc__)
    p.add_argument("--model-path", required=True, help="Hugging Face model folder (config + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--random-seed", type=int, default=None, help="seed of the sampler (server-wide, as SGLang)")
    p.add_argument("--weight-version", default="default", help="initial weight_version string")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--context-length", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--max-running-requests", type=int, default=64, help="sequences decoded together at most")
    p.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="idle wait for concurrent requests after a single-prompt one"
    )
    p.add_argument(
        "--num-threads", type=int, default=None, help="torch intra-op threads (default: half the usable CPUs, 1-8)"
    )
    p.add_argument(
        "--transformers-decode",
        action="store_true",
        help="decode through transformers' forward even where the lean step serves the model (lean.py)",
    )
    p.add_argument(
        "--sglang-compat",
        default="0.5.23",
        help="SGLang version whose endpoint set to expose; < 0.5.21 has no begin/end_weight_update (404)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="as SGLang: every route but /health wants 'Authorization: Bearer KEY' (default: none)",
    )
    lim = RequestLimits()
    p.add_argument("--max-n", type=int, default=lim.max_n, help="largest sampling_params.n")
    p.add_argument("--max-new-tokens", type=int, default=lim.max_new_tokens, help="largest max_new_tokens")
    p.add_argument("--max-prompts", type=int, default=lim.max_prompts, help="prompts per /generate request")
    p.add_argument("--max-sequences", type=int, default=lim.max_sequences, help="prompts x n per request")
    p.add_argument("--max-input-tokens", type=int, default=lim.max_input_tokens, help="prompt tokens per request")
    p.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes, help="request body size, bytes")
    p.add_argument(
        "--weight-group-timeout-s",
        type=float,
        default=60.0,
        help="how long /init_weights_update_group waits for the rendezvous (a request's timeout_s overrides)",
    )
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    for key in ("max_n", "max_new_tokens", "max_prompts", "max_sequences", "max_input_tokens", "max_body_bytes"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    return args


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


def build_state(args: argparse.Namespace) -> ServerState:
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
    server_args = {k: v for k, v in vars(args).items() if k != "api_key"}
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
