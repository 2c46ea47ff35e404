"""SGLang's native /generate protocol, client side: build a request, parse an answer.

Pure functions, no I/O, so that the wire format is tested without a server. The shapes follow
docs/rollout.md, "The HTTP API" (SGLang 0.5.6 - 0.5.23); the embedded server answers in the same shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scope_ds.config import GREEDY_EPS  # temperatures below it are greedy in SGLang (temperature 1, top_k 1)
from scope_ds.records import Rollout

# Every key SGLang 0.5.23's SamplingParams accepts from callers; 0.5.22+ answer 400 for any other
# key (there is no "seed": a per-request seed would silently be ignored by older servers).
SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens",
        "stop",
        "stop_token_ids",
        "stop_regex",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "min_new_tokens",
        "n",
        "json_schema",
        "regex",
        "ebnf",
        "structural_tag",
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "no_stop_trim",
        "custom_params",
        "stream_interval",
        "logit_bias",
        "sampling_seed",
    }
)


class ProtocolError(ValueError):
    """A request or an answer that does not follow the protocol (a server maps it to HTTP 400)."""


def logprob_temperature(temperature: float) -> float:
    """The temperature T at which a server reports ``output_token_logprobs``.

    SGLang returns log softmax(logits / T)[token] of the sampling temperature, taken before top-k /
    top-p / min-p truncation; greedy requests (T < 1e-6) report the raw log softmax(logits). A
    trainer that recomputes behaviour log-probs must divide its logits by this value.
    """
    return 1.0 if temperature < GREEDY_EPS else float(temperature)


def build_generate_request(
    prompts: Sequence[Sequence[int]],
    sampling_params: dict[str, Any] | Sequence[dict[str, Any]],
    *,
    return_logprob: bool = True,
    rid: str | None = None,
) -> dict[str, Any]:
    """The JSON body of one POST /generate for a batch of tokenised prompts.

    ``sampling_params`` may hold ``n``; results then come back prompt-major. It may also be a list,
    one object per prompt (then n must be 1, as SGLang requires). A single prompt is sent in the flat
    ``input_ids: [int, ...]`` form so that the answer is one object when n = 1.
    Raises ProtocolError for what every server would refuse, before any bytes are sent.
    """
    if not prompts:
        raise ProtocolError("no prompts to send")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ProtocolError(f"prompt {i} is empty")
    per_prompt = not isinstance(sampling_params, dict)
    params_list = list(sampling_params) if per_prompt else [sampling_params]
    if per_prompt and len(params_list) != len(prompts):
        raise ProtocolError(f"{len(params_list)} sampling_params objects for {len(prompts)} prompts")
    for params in params_list:
        unknown = sorted(set(params) - SAMPLING_KEYS)
        if unknown:
            raise ProtocolError(f"unknown sampling parameter(s) {unknown}; SGLang accepts {sorted(SAMPLING_KEYS)}")
        if int(params.get("n", 1)) < 1 or (per_prompt and int(params.get("n", 1)) != 1):
            raise ProtocolError(f"n must be >= 1 (and 1 with per-prompt sampling_params), got {params.get('n')}")
    ids: list[int] | list[list[int]]
    ids = [int(t) for t in prompts[0]] if len(prompts) == 1 else [[int(t) for t in p] for p in prompts]
    body: dict[str, Any] = {
        "input_ids": ids,
        "sampling_params": [dict(p) for p in params_list] if per_prompt else dict(sampling_params),
        "return_logprob": return_logprob,
        # -1: output tokens only; the trainer recomputes prompt log-probs itself if it needs them.
        "logprob_start_len": -1,
        "stream": False,
    }
    if rid is not None:
        body["rid"] = rid
    return body


def parse_weight_version(value: Any) -> int:
    """SGLang's weight_version is a string ("default" until the first update); ours are integers."""
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def parse_finish_reason(reason: Any) -> str:
    """``{"type": "stop", ...}`` -> "stop"; a null (still running) reason -> ""."""
    if isinstance(reason, dict):
        return str(reason.get("type", ""))
    return "" if reason is None else str(reason)


def error_message(body: Any) -> str:
    """The human message of an error answer: ``{"error": {"message"}}``, ``{"error": str}`` or text."""
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return str(body)


def _one_rollout(out: dict[str, Any], prompt: Sequence[int], return_logprob: bool) -> Rollout:
    """One answer object -> a Rollout with the rollout-stage fields filled."""
    if not isinstance(out, dict) or "meta_info" not in out:
        raise ProtocolError(f"answer object without meta_info: {str(out)[:200]}")
    meta = out["meta_info"]
    response = [int(t) for t in out.get("output_ids") or []]
    logprobs: list[float] = []
    if return_logprob:
        entries = meta.get("output_token_logprobs")
        if entries is None or len(entries) != len(response):
            got = "none" if entries is None else len(entries)
            raise ProtocolError(f"expected {len(response)} output_token_logprobs, got {got}")
        for entry, token in zip(entries, response, strict=True):
            if int(entry[1]) != token:
                raise ProtocolError(f"output_token_logprobs names token {entry[1]} where output_ids has {token}")
            logprobs.append(float(entry[0]))
    return Rollout(
        prompt_ids=list(prompt),
        response_ids=response,
        behaviour_logprobs=logprobs,
        finish_reason=parse_finish_reason(meta.get("finish_reason")),
        weight_version=parse_weight_version(meta.get("weight_version")),
        request_id=str(meta.get("id", "")),
        text=str(out.get("text", "")),
    )


def parse_generate_response(
    body: Any,
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    server: str = "",
    return_logprob: bool = True,
) -> list[list[Rollout]]:
    """The answer to :func:`build_generate_request` -> one list of n rollouts per prompt.

    Relies on SGLang's prompt-major order ``[p0s0, p0s1, ..., p1s0, ...]``. Fills ``sample_index``
    (the sample's index within its prompt), ``server`` and the token-level fields; the caller sets
    the prompt and group ids it knows.
    """
    outs = body if isinstance(body, list) else [body]
    if len(outs) != len(prompts) * n:
        raise ProtocolError(f"expected {len(prompts) * n} answers ({len(prompts)} prompts x n={n}), got {len(outs)}")
    groups: list[list[Rollout]] = []
    for p, prompt in enumerate(prompts):
        group = []
        for s in range(n):
            rollout = _one_rollout(outs[p * n + s], prompt, return_logprob)
            rollout.sample_index = s
            rollout.server = server
            group.append(rollout)
        groups.append(group)
    return groups
