"""The embedded server's request validation and answer shaping, without a server."""

from __future__ import annotations

import pytest

from scope_ds.rollout.protocol import ProtocolError
from scope_ds.rollout.server.requests import GenResult, answer_object, parse_generate, parse_sampling_params

CTX, VOCAB = 64, 128


def parse(body, encode=None):
    return parse_generate(body, context_len=CTX, vocab_size=VOCAB, encode=encode)


def test_defaults_follow_sglang():
    spec = parse_sampling_params({}, has_tokenizer=False)
    assert (spec.max_new_tokens, spec.temperature, spec.top_p, spec.top_k, spec.n) == (128, 1.0, 1.0, 0, 1)
    assert not spec.greedy and not spec.ignore_eos


def test_greedy_rule_and_nulls():
    spec = parse_sampling_params({"temperature": 0.0, "top_k": None}, has_tokenizer=False)
    assert spec.greedy and spec.temperature == 1.0  # SGLang: T < 1e-6 -> T = 1, top_k = 1
    assert parse_sampling_params({"top_k": 1, "temperature": 0.7}, has_tokenizer=False).greedy


def test_n_expands_prompt_major_with_fresh_ids():
    items, single = parse({"input_ids": [[1, 2], [1, 3, 4]], "sampling_params": {"n": 3}, "rid": "req"})
    assert not single and len(items) == 6
    assert [len(i.prompt_ids) for i in items] == [2, 2, 2, 3, 3, 3]
    assert len({i.rid for i in items}) == 6 and {i.parent_rid for i in items} == {"req"}


def test_single_prompt_n1_answers_one_object_with_its_rid():
    items, single = parse({"input_ids": [1, 2], "rid": "abc", "return_logprob": True})
    assert single and items[0].rid == "abc" and items[0].return_logprob


def test_per_prompt_lists_for_n1():
    items, _ = parse(
        {
            "input_ids": [[1], [2]],
            "sampling_params": [{"max_new_tokens": 3}, {"max_new_tokens": 5}],
            "return_logprob": [True, False],
        }
    )
    assert [i.spec.max_new_tokens for i in items] == [3, 5] and [i.return_logprob for i in items] == [True, False]


def test_text_input_needs_a_tokenizer():
    with pytest.raises(ProtocolError, match="tokenizer"):
        parse({"text": "hi"})
    items, single = parse({"text": "hi"}, encode=lambda t: [5] * len(t))
    assert single and items[0].prompt_ids == [5, 5]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"input_ids": []}, "empty"),
        ({"input_ids": [[1], []]}, "prompt 1 is empty"),
        ({}, "Either text or input_ids"),
        ({"input_ids": [1], "sampling_params": {"seed": 1}}, "Unknown sampling parameter"),
        ({"input_ids": list(range(64))}, "longer than the model's context length"),
        ({"input_ids": [1], "sampling_params": {"n": 0}}, "n must be at least 1"),
        ({"input_ids": [[1]], "sampling_params": [{"n": 2}]}, "list-valued sampling_params"),
        ({"input_ids": [[1]], "sampling_params": {"n": 2}, "rid": ["a"]}, "list-valued rid"),
        ({"input_ids": [1, 128]}, "outside the vocabulary"),
        ({"input_ids": [1, "a"]}, "must be an integer"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"input_ids": [1], "sampling_params": {"top_k": 0}}, "top_k"),
        ({"input_ids": [1], "sampling_params": {"min_p": 2}}, "min_p"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"repetition_penalty": 1.2}}, "not supported"),
        ({"input_ids": [1], "sampling_params": {"stop": "x"}}, "without a tokenizer"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "1 entries for 2 prompts"),
        ({"input_ids": [1], "stream": True}, "stream"),
        ([1, 2], "JSON object"),
    ],
)
def test_invalid_requests_are_refused_with_a_message(body, match):
    with pytest.raises(ProtocolError, match=match):
        parse(body)


def test_answer_object_shapes():
    items, _ = parse({"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 1, "top_logprobs_num": 2})
    res = GenResult(
        output_ids=[7, 2],
        output_logprobs=[-0.5, -1.5],
        finish_reason={"type": "stop", "matched": 2},
        weight_version="4",
        e2e_latency=0.1,
        output_top_logprobs=[[(-0.5, 7), (-2.0, 8)], [(-1.5, 2), (-1.6, 9)]],
        input_logprobs=[None, -3.0, -4.0],
    )
    out = answer_object(items[0], res, None)
    assert "text" not in out and out["output_ids"] == [7, 2]
    meta = out["meta_info"]
    assert meta["output_token_logprobs"] == [[-0.5, 7, None], [-1.5, 2, None]]
    assert meta["input_token_logprobs"] == [[-3.0, 2, None], [-4.0, 3, None]]
    assert meta["output_top_logprobs"][1] == [[-1.5, 2, None], [-1.6, 9, None]]
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (3, 2, "4")


def test_answer_text_trims_a_matched_stop_string():
    items, _ = parse({"input_ids": [1], "sampling_params": {"stop": "##"}}, encode=lambda t: [1])
    res = GenResult([5, 6, 7], [0.0] * 3, {"type": "stop", "matched": "##"}, "0", 0.0, matched_stop_str="##")
    out = answer_object(items[0], res, lambda ids, skip_special_tokens=True: "ab##")
    assert out["text"] == "ab"


# ---- limits and JSON types: every refusal is a ProtocolError (a 400), raised before items exist
def test_huge_counts_are_refused_naming_field_and_limit():
    from scope_ds.rollout.server.requests import RequestLimits

    with pytest.raises(ProtocolError, match=r"sampling_params\.n .* limit of 1024 \(--max-n\)"):
        parse({"input_ids": [2, 3], "sampling_params": {"n": 1e300}})
    with pytest.raises(ProtocolError, match=r"max_new_tokens .* 65536"):
        parse({"input_ids": [2, 3], "sampling_params": {"max_new_tokens": 2**40}})
    small = RequestLimits(max_prompts=2, max_input_tokens=5, max_sequences=6)
    with pytest.raises(ProtocolError, match="--max-prompts"):
        parse_generate({"input_ids": [[2]] * 3}, context_len=CTX, vocab_size=VOCAB, limits=small)
    with pytest.raises(ProtocolError, match="--max-input-tokens"):
        parse_generate({"input_ids": [[2, 3, 4], [2, 3, 4]]}, context_len=CTX, vocab_size=VOCAB, limits=small)
    with pytest.raises(ProtocolError, match="--max-sequences"):
        body = {"input_ids": [[2], [3]], "sampling_params": {"n": 4}}
        parse_generate(body, context_len=CTX, vocab_size=VOCAB, limits=small)


@pytest.mark.parametrize(
    "body",
    [
        {"input_ids": [2, float("inf")]},
        {"input_ids": [2, float("nan")]},
        {"input_ids": [2, 3], "sampling_params": {"n": float("inf")}},
        {"input_ids": [2, 3], "sampling_params": {"stop_token_ids": 7}},
        {"input_ids": [2, 3], "sampling_params": {"stop": 7}},
        {"input_ids": [2, 3], "sampling_params": {"sampling_seed": 2**70}},
        {"input_ids": 4},
    ],
)
def test_wrong_types_are_protocol_errors(body):
    with pytest.raises(ProtocolError):
        parse(body)
