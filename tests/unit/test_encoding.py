"""Prompt tokens, stop tokens and decode-and-verify: the one copy the trainer and the evaluation share."""

from __future__ import annotations

import numpy as np

from scope_ds.data.encoding import decode_and_verify, encode_prompt, sampling_params
from scope_ds.rewards.toy import verify_toy
from scope_ds.sample import Rollout


class _Tokenizer:
    """Records how it was called; ids come back as numpy ints, as some tokenizers return them."""

    def __init__(self, chat_template: str | None = None, eos_token_id: int | None = 3) -> None:
        self.chat_template, self.eos_token_id, self.calls = chat_template, eos_token_id, []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append(("chat", messages, kwargs))
        return list(np.array([7, 8, 9]))

    def __call__(self, text, **kwargs):
        self.calls.append(("plain", text, kwargs))
        return {"input_ids": list(np.array([2, 5]))}

    def decode(self, ids, skip_special_tokens=False):
        self.calls.append(("decode", list(ids), skip_special_tokens))
        return " Answer: \\boxed{12}"


def test_encode_prompt_uses_the_chat_template_only_when_there_is_one_and_it_is_on() -> None:
    tok = _Tokenizer(chat_template="{{ messages }}")
    ids = encode_prompt(tok, "Compute 3*4.")
    assert ids == [7, 8, 9] and all(type(t) is int for t in ids)  # plain ints, for a JSON request
    assert tok.calls == [
        (
            "chat",
            [{"role": "user", "content": "Compute 3*4."}],
            {"add_generation_prompt": True, "tokenize": True, "return_dict": False},
        )
    ]
    assert encode_prompt(tok, "q", chat_template=False) == [2, 5]
    assert tok.calls[-1] == ("plain", "q", {"add_special_tokens": True})
    plain = encode_prompt(_Tokenizer(chat_template=None), "q")
    assert plain == [2, 5] and all(type(t) is int for t in plain)


def test_sampling_params_stop_at_eos_and_overrides_win() -> None:
    params = sampling_params(_Tokenizer(), 0.6, 0.95, 20, 64)
    assert params == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 64, "stop_token_ids": [3]}
    assert "stop_token_ids" not in sampling_params(_Tokenizer(eos_token_id=None), 1.0, 1.0, -1, 8)
    override = sampling_params(_Tokenizer(), 1.0, 1.0, -1, 8, max_new_tokens=2, n=4)
    assert override == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": 2,
        "stop_token_ids": [3],
        "n": 4,
    }


def test_decode_and_verify_fills_text_reward_and_correct() -> None:
    tok = _Tokenizer()
    rollout = Rollout(response_ids=[11, 12, 3])
    decode_and_verify(tok, rollout, "12", verify_toy)
    assert tok.calls == [("decode", [11, 12, 3], True)]  # special tokens skipped
    assert (rollout.text, rollout.reward, rollout.correct) == (" Answer: \\boxed{12}", 1.0, True)
    assert type(rollout.reward) is float
    decode_and_verify(tok, rollout, "13", verify_toy)
    assert (rollout.reward, rollout.correct) == (0.0, False)
