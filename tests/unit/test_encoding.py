"""Prompt tokens, stop tokens and decode-and-verify: the one copy the trainer and the evaluation share."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from scope_ds.data.encoding import decode_and_verify, drop_long_prompts, encode_prompt, sampling_params
from scope_ds.records import PromptRecord, Rollout
from scope_ds.toy.verify import verify_toy


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


# ---- with a real (character-level) tokenizer ---------------------------------------------------------


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The integration tests' character-level tokenizer: one token per character; ids 0-3 are specials."""
    from transformers import AutoTokenizer

    from tests.integration.conftest import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("char_tokenizer")
    build_tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def test_drop_long_prompts_counts_the_tokens_sent(char_tokenizer) -> None:
    records = [PromptRecord(f"p{i}", "x" * size, "1") for i, size in enumerate((3, 9, 5, 6, 4))]
    kept, dropped = drop_long_prompts(records, char_tokenizer, 5, chat_template=False)
    assert [r.prompt_id for r in kept] == ["p0", "p2", "p4"] and dropped == 2  # order kept; 5 tokens is in
    assert all(len(encode_prompt(char_tokenizer, r.prompt, False)) <= 5 for r in kept)
    assert drop_long_prompts(records, char_tokenizer, 9, chat_template=False) == (records, 0)
    assert drop_long_prompts([], char_tokenizer, 1, chat_template=False) == ([], 0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        drop_long_prompts(records, char_tokenizer, 0)


def test_drop_long_prompts_counts_the_chat_template(char_tokenizer) -> None:
    """With a chat template, its tokens count too: the limit applies to what the server receives."""
    chat = copy.deepcopy(char_tokenizer)
    chat.chat_template = "{% for m in messages %}<s>Q:{{ m['content'] }}</s>{% endfor %}A:"  # 6 tokens + content
    records = [PromptRecord(f"p{i}", "y" * size, "1") for i, size in enumerate((2, 4, 3))]
    assert [len(encode_prompt(chat, r.prompt)) for r in records] == [8, 10, 9]
    kept, dropped = drop_long_prompts(records, chat, 9)
    assert [r.prompt_id for r in kept] == ["p0", "p2"] and dropped == 1
    assert drop_long_prompts(records, chat, 9, chat_template=False) == (records, 0)  # plain: 2-4 tokens


def _response(tokenizer, text: str, finish_reason: str) -> Rollout:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if finish_reason == "stop":
        ids = [*ids, tokenizer.eos_token_id]
    return Rollout(response_ids=ids, finish_reason=finish_reason)


@pytest.mark.parametrize(
    ("truncated", "finish_reason", "correct"),
    [
        ("verify", "length", True),  # the authors' routing: the verifier alone
        ("incorrect", "length", False),  # cut off: incorrect whatever it holds
        ("incorrect", "stop", True),  # a whole answer is verified as ever
        ("skip", "length", True),  # verified as usual; the plan stage leaves it untrained
    ],
)
def test_truncated_responses_are_routed_by_the_policy(char_tokenizer, truncated, finish_reason, correct) -> None:
    rollout = _response(char_tokenizer, "so \\boxed{12}", finish_reason)
    decode_and_verify(char_tokenizer, rollout, "12", verify_toy, truncated=truncated)
    assert rollout.text == "so \\boxed{12}"  # decoded under every policy (the rollouts log shows it)
    assert (rollout.correct, rollout.reward) == (correct, 1.0 if correct else 0.0)


def test_an_unknown_truncated_policy_is_refused(char_tokenizer) -> None:
    with pytest.raises(ValueError, match=r"truncated must be one of \['verify', 'incorrect', 'skip'\], got 'drop'"):
        decode_and_verify(char_tokenizer, _response(char_tokenizer, "1", "length"), "1", verify_toy, truncated="drop")
