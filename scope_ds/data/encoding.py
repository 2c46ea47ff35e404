"""What the trainer and the evaluation share about talking to a model: prompt tokens, stop tokens,
and reading a response back.

Both send prompts to the rollout servers as token ids and verify the decoded responses, so both go
through these functions: an evaluation then scores exactly what training samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from scope_ds.choices import check_choice, literal_values
from scope_ds.config import TruncatedPolicy
from scope_ds.records import PromptRecord

if TYPE_CHECKING:
    from scope_ds.records import Rollout

# How a truncated response (finish_reason "length") is routed; the type of data.truncated.


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt: one user turn through the chat template when the tokenizer has one
    (and ``chat_template``), else the plain encoding with the tokenizer's special tokens. Plain
    ints, ready for a JSON request."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(prompt, add_special_tokens=True)["input_ids"]]


def drop_long_prompts(
    records: Sequence[PromptRecord], tokenizer: Any, max_tokens: int, chat_template: bool = True
) -> tuple[list[PromptRecord], int]:
    """The records whose prompt is at most ``max_tokens`` tokens, in their order, and how many were
    dropped. Lengths are :func:`encode_prompt`'s (chat template included): exactly the tokens sent."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    kept = [r for r in records if len(encode_prompt(tokenizer, r.prompt, chat_template)) <= max_tokens]
    return kept, len(records) - len(kept)


def sampling_params(
    tokenizer: Any, temperature: float, top_p: float, top_k: int, max_new_tokens: int, /, **override: Any
) -> dict[str, Any]:
    """SGLang sampling params that stop at the tokenizer's EOS (when it has one).

    ``override`` adds keys or replaces any of these (hence positional-only: ``max_new_tokens=8``
    there replaces the fifth argument)."""
    params: dict[str, Any] = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
    }
    if getattr(tokenizer, "eos_token_id", None) is not None:
        params["stop_token_ids"] = [int(tokenizer.eos_token_id)]
    return {**params, **override}


def decode_and_verify(
    tokenizer: Any,
    rollout: Rollout,
    answer: str,
    verifier: Callable[[str, str], float],
    truncated: TruncatedPolicy = "verify",
) -> None:
    """Fill ``rollout.text`` (special tokens skipped: what the verifier reads), ``rollout.reward``
    (the verifier's, as a float) and ``rollout.correct`` (reward >= 1); see decode_and_verify_all."""
    decode_and_verify_all(tokenizer, [rollout], [answer], lambda pairs: ([verifier(*p) for p in pairs], 0), truncated)


def decode_and_verify_all(
    tokenizer: Any,
    rollouts: Sequence[Rollout],
    answers: Sequence[str],
    verify_all: Callable[[list[tuple[str, str]]], tuple[list[float], int]],
    truncated: TruncatedPolicy = "verify",
) -> int:
    """decode_and_verify for many rollouts through ``verify_all(pairs) -> (rewards, timeouts)``
    (a rewards.pool.VerifierPool's ``verify``); returns the timeouts, which count as incorrect.

    A truncated response (``finish_reason == "length"``) under ``truncated="incorrect"`` gets reward
    0 whatever it contains (the verifier is not asked). "verify" (the authors' code) and "skip"
    verify it like any other: under "skip" the trainer's plan stage leaves it untrained.
    """
    check_choice("truncated", truncated, literal_values(TruncatedPolicy))
    for r in rollouts:
        r.text = tokenizer.decode(r.response_ids, skip_special_tokens=True)
        r.reward = 0.0
    asked = [i for i, r in enumerate(rollouts) if not (truncated == "incorrect" and r.finish_reason == "length")]
    rewards, timeouts = verify_all([(rollouts[i].text, answers[i]) for i in asked])
    for i, reward in zip(asked, rewards, strict=True):
        rollouts[i].reward = float(reward)
    for r in rollouts:
        r.correct = r.reward >= 1.0
    return timeouts
