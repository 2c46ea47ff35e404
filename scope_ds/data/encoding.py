"""What the trainer and the evaluation share about talking to a model: prompt tokens, stop tokens,
and reading a response back.

Both send prompts to the rollout servers as token ids and verify the decoded responses, so both go
through these functions: an evaluation then scores exactly what training samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scope_ds.sample import Rollout


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


def decode_and_verify(tokenizer: Any, rollout: Rollout, answer: str, verifier: Callable[[str, str], float]) -> None:
    """Fill ``rollout.text`` (special tokens skipped: what the verifier reads), ``rollout.reward``
    (the verifier's, as a float) and ``rollout.correct`` (reward >= 1)."""
    rollout.text = tokenizer.decode(rollout.response_ids, skip_special_tokens=True)
    rollout.reward = float(verifier(rollout.text, answer))
    rollout.correct = rollout.reward >= 1.0
