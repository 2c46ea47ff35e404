"""The embedded server's side of /generate: validate a request body, shape the answer.

Pure functions (the tokenizer is passed in), so every 400 the server gives is unit-testable. The
rules and the messages follow SGLang 0.5.23's GenerateReqInput and SamplingParams.verify.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scope_ds.rollout.protocol import SAMPLING_KEYS, ProtocolError
from scope_ds.rollout.server.sampling import SamplingSpec, is_greedy

# Known SGLang keys this server does not implement: refused unless left at their defaults, so that
# a request never silently gets different sampling than it asked for.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "custom_params": None,
    "logit_bias": None,
}

# Top-level fields that may be per-prompt lists; SGLang refuses lists for them when n > 1.
_LISTABLE = ("sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num")


@dataclass
class GenItem:
    """One sequence to generate: one prompt x one of its n samples."""

    prompt_ids: list[int]
    spec: SamplingSpec
    rid: str  # the answer's meta_info.id (fresh per sample)
    parent_rid: str  # the request's rid, so /abort_request can name a whole request
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output tokens only; k >= 0: prompt positions from k on
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False


@dataclass(frozen=True)
class RequestLimits:
    """Upper bounds on one /generate request (the server's --max-* flags).

    Checked before anything is built from the request, so that one body can neither freeze the
    event loop nor grow the server's memory without bound; a request above them is a 400.
    """

    max_n: int = 1024  # samples per prompt (sampling_params.n)
    max_new_tokens: int = 65536  # sampling_params.max_new_tokens (generation stops at the context anyway)
    max_prompts: int = 1024  # prompts in one request
    max_sequences: int = 4096  # prompts x n: sequences one request queues
    max_input_tokens: int = 1 << 20  # prompt tokens summed over the request's prompts
    max_body_bytes: int = 64 << 20  # the request body, bytes (every route)


def as_int(value: Any, name: str) -> int:
    # A float must be finite and integral (int(inf) would raise outside our checks); 1e300 passes
    # here as a Python int, and the range checks of each field refuse it.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise ProtocolError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _at_most(value: int, limit: int, name: str, flag: str) -> None:
    if value > limit:
        raise ProtocolError(f"{name} is {value}, above this server's limit of {limit} ({flag})")


def _as_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError(f"{name} must be a list, got {type(value).__name__}")
    return value


def as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def parse_sampling_params(raw: Any, has_tokenizer: bool, limits: RequestLimits = RequestLimits()) -> SamplingSpec:
    """Validate one sampling_params object into a SamplingSpec (SGLang's defaults and ranges)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError(f"sampling_params must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - SAMPLING_KEYS)
    if unknown:
        raise ProtocolError(f"Unknown sampling parameter(s): {', '.join(unknown)}")
    p = {k: v for k, v in raw.items() if v is not None}
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        if key in p and p[key] != default:
            raise ProtocolError(f"sampling parameter {key} is not supported by the embedded server")
    temperature = as_float(p.get("temperature", 1.0), "temperature")
    top_p = as_float(p.get("top_p", 1.0), "top_p")
    top_k = as_int(p.get("top_k", -1), "top_k")
    min_p = as_float(p.get("min_p", 0.0), "min_p")
    max_new = as_int(p.get("max_new_tokens", 128), "max_new_tokens")
    n = as_int(p.get("n", 1), "n")
    seed = None if p.get("sampling_seed") is None else as_int(p["sampling_seed"], "sampling_seed")
    if temperature < 0.0:
        raise ProtocolError(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise ProtocolError(f"top_p must be in (0, 1], got {top_p}.")
    if not 0.0 <= min_p <= 1.0:
        raise ProtocolError(f"min_p must be in [0, 1], got {min_p}.")
    if top_k < 1 and top_k != -1:
        raise ProtocolError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if max_new < 0:
        raise ProtocolError(f"max_new_tokens must be at least 0, got {max_new}.")
    if n < 1:
        raise ProtocolError(f"n must be at least 1, got {n}.")
    _at_most(n, limits.max_n, "sampling_params.n", "--max-n")
    _at_most(max_new, limits.max_new_tokens, "sampling_params.max_new_tokens", "--max-new-tokens")
    if seed is not None and not 0 <= seed < 2**63 - n:  # sample j is keyed by seed + j (sampling.py)
        raise ProtocolError(f"sampling_seed must be in [0, 2**63 - n), got {seed}.")
    stop = p.get("stop") or []
    stop_strs = (stop,) if isinstance(stop, str) else tuple(str(s) for s in _as_list(stop, "stop"))
    if stop_strs and not has_tokenizer:
        raise ProtocolError(f"stop={list(stop_strs)!r} is unavailable without a tokenizer (it matches decoded text)")
    stop_list = _as_list(p.get("stop_token_ids") or [], "stop_token_ids")
    stop_ids = frozenset(as_int(t, "stop_token_ids") for t in stop_list)
    greedy = is_greedy(temperature)
    return SamplingSpec(
        max_new_tokens=max_new,
        temperature=1.0 if greedy else temperature,
        greedy=greedy or top_k == 1,
        top_p=top_p,
        top_k=0 if top_k == -1 else top_k,
        min_p=min_p,
        stop_token_ids=stop_ids,
        stop_strs=stop_strs,
        ignore_eos=bool(p.get("ignore_eos", False)),
        skip_special_tokens=bool(p.get("skip_special_tokens", True)),
        no_stop_trim=bool(p.get("no_stop_trim", False)),
        n=n,
        seed=seed,
    )


def _prompts(
    body: dict[str, Any], encode: Callable[[str], list[int]] | None, limits: RequestLimits
) -> tuple[list[list[int]], bool]:
    """The batch of prompts and whether the request used the single-prompt form."""
    if body.get("input_ids") is not None:
        ids = _as_list(body["input_ids"], "input_ids")
        if len(ids) == 0:
            raise ProtocolError("input_ids is empty: send at least one token")
        single = not isinstance(ids[0], list)
        prompts = [ids] if single else ids
    elif body.get("text") is not None:
        if encode is None:
            raise ProtocolError("text input needs a tokenizer; this server has none, send input_ids")
        texts = body["text"]
        single = isinstance(texts, str)
        texts = [texts] if single else _as_list(texts, "text")
        _at_most(len(texts), limits.max_prompts, "the number of prompts", "--max-prompts")
        if not all(isinstance(t, str) for t in texts):
            raise ProtocolError("text must be a string or a list of strings")
        _at_most(sum(len(t) for t in texts), limits.max_input_tokens, "the total text length", "--max-input-tokens")
        prompts = [encode(t) for t in texts]
    else:
        raise ProtocolError("Either text or input_ids should be provided.")
    if len(prompts) == 0:
        raise ProtocolError("input_ids is empty: send at least one prompt")
    _at_most(len(prompts), limits.max_prompts, "the number of prompts", "--max-prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or len(prompt) == 0:
            raise ProtocolError(f"prompt {i} is empty or not a list of token ids")
    total = sum(len(p) for p in prompts)
    _at_most(total, limits.max_input_tokens, "the total number of input tokens", "--max-input-tokens")
    return [[as_int(t, "input_ids") for t in p] for p in prompts], single


def _per_prompt(body: dict[str, Any], key: str, default: Any, count: int) -> list[Any]:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, list):
        if len(value) != count:
            raise ProtocolError(f"{key} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def parse_generate(
    body: Any,
    *,
    context_len: int,
    vocab_size: int,
    encode: Callable[[str], list[int]] | None = None,
    limits: RequestLimits = RequestLimits(),
) -> tuple[list[GenItem], bool]:
    """Validate a /generate body into prompt-major GenItems; True when the answer is one object.

    Every refusal is a ProtocolError (a 400), raised before any item is built."""
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    if body.get("stream"):
        raise ProtocolError("stream=true is not supported by the embedded server")
    prompts, single = _prompts(body, encode, limits)
    raw_params = body.get("sampling_params")
    tok = encode is not None
    if isinstance(raw_params, list):
        specs = [parse_sampling_params(r, tok, limits) for r in _per_prompt(body, "sampling_params", {}, len(prompts))]
    else:
        specs = [parse_sampling_params(raw_params, tok, limits)] * len(prompts)
    n = specs[0].n
    if any(s.n != n for s in specs):
        raise ProtocolError("all prompts of one request must use the same n")
    _at_most(len(prompts) * n, limits.max_sequences, "prompts x n", "--max-sequences")
    if n > 1:
        listed = [k for k in _LISTABLE if isinstance(body.get(k), list)]
        if listed:
            raise ProtocolError(f"n > 1 is not supported with list-valued {', '.join(listed)}")
    rids = _per_prompt(body, "rid", None, len(prompts))
    want_lp = _per_prompt(body, "return_logprob", False, len(prompts))
    start = _per_prompt(body, "logprob_start_len", -1, len(prompts))
    top_num = _per_prompt(body, "top_logprobs_num", 0, len(prompts))
    items = []
    for i, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        if len(prompt) >= context_len:
            raise ProtocolError(
                f"The input ({len(prompt)} tokens) is longer than the model's context length ({context_len} tokens)."
            )
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ProtocolError(f"token id {bad[0]} in prompt {i} is outside the vocabulary [0, {vocab_size})")
        parent = str(rids[i]) if rids[i] is not None else uuid.uuid4().hex
        for j in range(n):
            items.append(
                GenItem(
                    prompt_ids=prompt,
                    # sample j of a seeded request draws from seed + j: n samples, not n copies
                    spec=spec if spec.seed is None or j == 0 else dataclasses.replace(spec, seed=spec.seed + j),
                    rid=parent if n == 1 else uuid.uuid4().hex,
                    parent_rid=parent,
                    return_logprob=bool(want_lp[i]),
                    logprob_start_len=as_int(start[i], "logprob_start_len"),
                    top_logprobs_num=as_int(top_num[i], "top_logprobs_num"),
                    return_text_in_logprobs=bool(body.get("return_text_in_logprobs", False)),
                )
            )
    return items, single and n == 1


@dataclass
class GenResult:
    """What the engine hands back for one GenItem."""

    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: dict[str, Any]
    weight_version: str
    e2e_latency: float
    output_top_logprobs: list[list[tuple[float, int]]] | None = None
    input_logprobs: list[float | None] | None = None  # per prompt position, first is None
    matched_stop_str: str | None = None  # set when a stop string ended generation


def _lp_entry(logprob: float | None, token: int, decode: Callable[[list[int]], str] | None) -> list[Any]:
    return [logprob, token, decode([token]) if decode is not None else None]


def answer_object(item: GenItem, res: GenResult, decode: Callable[..., str] | None) -> dict[str, Any]:
    """One object of the /generate answer, in SGLang's shape (``text`` only with a tokenizer)."""
    meta: dict[str, Any] = {
        "id": item.rid,
        "finish_reason": res.finish_reason,
        "prompt_tokens": len(item.prompt_ids),
        "completion_tokens": len(res.output_ids),
        "cached_tokens": 0,
        "weight_version": res.weight_version,
        "e2e_latency": res.e2e_latency,
    }
    if item.return_logprob:
        tok_decode = decode if item.return_text_in_logprobs else None
        meta["output_token_logprobs"] = [
            _lp_entry(lp, t, tok_decode) for lp, t in zip(res.output_logprobs, res.output_ids, strict=True)
        ]
        if item.top_logprobs_num > 0 and res.output_top_logprobs is not None:
            meta["output_top_logprobs"] = [
                [_lp_entry(lp, t, tok_decode) for lp, t in row] for row in res.output_top_logprobs
            ]
        if item.logprob_start_len >= 0 and res.input_logprobs is not None:
            start = item.logprob_start_len
            meta["input_token_logprobs"] = [
                _lp_entry(lp, t, tok_decode)
                for lp, t in zip(res.input_logprobs[start:], item.prompt_ids[start:], strict=True)
            ]
    out: dict[str, Any] = {"output_ids": res.output_ids, "meta_info": meta}
    if decode is not None:
        text = decode(res.output_ids, skip_special_tokens=item.spec.skip_special_tokens)
        if res.matched_stop_str and not item.spec.no_stop_trim:
            cut = text.find(res.matched_stop_str)
            text = text[:cut] if cut >= 0 else text
        out = {"text": text, **out}
    return out
